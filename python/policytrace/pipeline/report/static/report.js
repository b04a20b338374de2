// policytrace report.html: inlined into the page by templates/page.html.j2 (nothing fetched).
// Sortable tables (click a header), filterable ones (type in the box above), and the page's
// self-check at report.html#selftest. docs/design.md, module table (pipeline/report/).

// Numeric cells carry their raw value in data-v, so a column sorts by value, not by its text.
function sortKey(cell) {
  const v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
  const n = parseFloat(v);
  return isNaN(n) ? v : n;
}

function sortTable(th) {
  const t = th.closest('table'), i = [...th.parentNode.children].indexOf(th);
  const asc = !th.classList.contains('sorted-asc');
  t.querySelectorAll('th').forEach(h => h.classList.remove('sorted-asc', 'sorted-desc'));
  th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
  const rows = [...t.tBodies[0].rows];
  rows.sort((a, b) => {
    const x = sortKey(a.cells[i]), y = sortKey(b.cells[i]);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
  });
  rows.forEach(r => t.tBodies[0].appendChild(r));
}

function filterTable(inp) {
  const t = document.getElementById(inp.dataset.table), q = inp.value.toLowerCase();
  [...t.tBodies[0].rows].forEach(r => { r.style.display = r.textContent.toLowerCase().includes(q) ? '' : 'none'; });
}

document.addEventListener('click', e => {
  if (e.target.tagName === 'TH' && e.target.closest('table.sortable')) sortTable(e.target);
});
document.addEventListener('input', e => { if (e.target.classList.contains('filter')) filterTable(e.target); });

// The self-check's sort test: one click on the curator table's dy_mean header must leave that
// column in ascending order (not merely mark the header).
function sortsAscending() {
  const th = document.querySelector('#pairs-table th:nth-child(4)');
  if (!th) return false;
  th.click();
  const keys = [...th.closest('table').tBodies[0].rows].map(r => sortKey(r.cells[3]));
  return th.classList.contains('sorted-asc') && keys.every((k, j) => j === 0 || !(keys[j - 1] > k));
}

// The self-check's filter test: typing the first pair's id into the box above the curator table
// must hide some rows and keep that pair's. Cleared afterwards.
function filters() {
  const box = document.querySelector('input.filter[data-table="pairs-table"]');
  const rows = [...document.querySelectorAll('#pairs-table tbody tr')];
  if (!box || rows.length < 2) return false;
  box.value = rows[0].cells[0].textContent;
  box.dispatchEvent(new Event('input', {bubbles: true}));
  const shown = rows.filter(r => r.style.display !== 'none');
  const ok = shown.length >= 1 && shown.length < rows.length && shown.includes(rows[0]);
  box.value = '';
  box.dispatchEvent(new Event('input', {bubbles: true}));
  return ok;
}

// The page checks its own layout: nothing wider than the window, the first pair and feature
// panels open from their links, the curator table sorts and filters. The JSON lands in
// #selftest-result, which the browser test reads.
function selftest() {
  const out = {width: window.innerWidth, page_width: document.documentElement.scrollWidth, overflow: [], panels: {}};
  if (document.documentElement.scrollWidth > window.innerWidth + 1) out.overflow.push('page');
  document.querySelectorAll('table,svg,.kv,.text').forEach((el, i) => {
    const r = el.getBoundingClientRect();
    if (r.right > window.innerWidth + 1) out.overflow.push((el.id || el.tagName) + '#' + i + ' right=' + Math.round(r.right));
  });
  for (const kind of ['pair', 'feature']) {
    const a = document.querySelector('a[href^="#' + kind + '-"]');
    if (!a) { out.panels[kind] = 'no link'; continue; }
    const id = a.getAttribute('href').slice(1);
    location.hash = id;
    const p = document.getElementById(id);
    out.panels[kind] = p && getComputedStyle(p).display !== 'none' ? 'opens' : 'does not open';
    if (p) {
      const r = p.getBoundingClientRect();
      if (r.right > window.innerWidth + 1) out.overflow.push(id + ' right=' + Math.round(r.right));
    }
  }
  out.sorted = sortsAscending();
  out.filtered = filters();
  document.getElementById('selftest-result').textContent = JSON.stringify(out);
}
if (location.hash === '#selftest') window.addEventListener('load', selftest);
