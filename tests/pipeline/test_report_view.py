"""The report's view layer, value by value, on a run built by hand (four pairs, three features,
numbers exact in binary so every expected value is written out); then the rendered page, parsed
rather than searched: hostile text comes back as the same text, once escaped, and the inlined CSS
and JS are the package's files. No model and no browser needed."""

from __future__ import annotations

import dataclasses
import html.parser
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import polars as pl
import pytest

from policytrace.behaviours import get as get_behaviour
from policytrace.pipeline.report import page, panels, svg, tables, view
from policytrace.pipeline.report.frames import RunFrames

PAIRS = ["p-a", "p-b", "p-c", "p-d"]
FEATURES = [7, 9, 11]
COEF = {7: 0.5, 9: -0.25, 11: 0.125}
# d_coef per (pair, feature); alignment = d_coef · coef, d_coef_x = d_coef_y = d_coef / 2,
# mediated_dy = d_coef / 4.
D_COEF = {"p-a": {7: 1.0, 9: 0.5, 11: -2.0}, "p-b": {7: -0.5, 9: 0.0, 11: 1.0},
          "p-c": {7: 0.25, 9: -1.0, 11: 0.0}, "p-d": {7: 0.0, 9: 2.0, 11: 0.5}}


def _pairs() -> pl.DataFrame:
    return pl.DataFrame({
        "pair_id": PAIRS, "group": ["alpha", "alpha", "beta", "beta"],
        "label": ["refusal", "compliance", "refusal", "compliance"],
        "dy_mean": [0.5, -0.25, 1.0, -0.25], "pred_dy_mean": [0.25, -0.5, 0.5, 0.0],
        "direct_dy": [0.25, 0.25, 0.5, -0.25], "mediated_share": [0.5, 2.0, 0.5, 0.0],
        "mediated_r2": [0.75, 0.25, -0.5, 0.5], "score": [2.0, 1.0, -1.0, 0.5],
        "score_x": [1.5, 0.25, -0.5, 0.5], "score_y": [0.5, 0.75, -0.5, 0.0],
        "suspicion": [1.0, -1.0, None, 1.0], "suspicion_reason": ["raises it & more", "agrees", None, "lowers it"],
        "dominant_feature": [7, 9, None, 9], "mode": ["engine"] * 4,
        "off_target_share": [0.5, 0.25, 0.0, 0.75], "off_target_chance": [0.5, 0.5, 0.25, 0.25],
        "off_target_p": [0.01, 0.5, 1.0, 0.125], "interference_significant": [True, False, False, False],
        "side_interference_significant": [False, True, False, False],
    })


def _pair_features() -> pl.DataFrame:
    rows = [(p, f, COEF[f], d, d / 2, d / 2, d * COEF[f], d / 4) for p in PAIRS for f, d in D_COEF[p].items()]
    return pl.DataFrame(rows, orient="row", schema=["pair_id", "feature_id", "coef", "d_coef", "d_coef_x", "d_coef_y",
                                                    "alignment", "mediated_dy"])


def _pair_behaviour() -> pl.DataFrame:
    rows = [("p-a", "alpha", 0.5, 0.25, 0.25), ("p-a", "beta", 0.5, 0.25, 0.25), ("p-b", "alpha", -0.5, -0.5, 0.0),
            ("p-b", "beta", 0.0, -0.5, 0.5), ("p-c", "alpha", 1.0, 0.5, 0.5), ("p-c", "beta", 1.0, 0.5, 0.5),
            ("p-d", "alpha", -0.25, 0.0, -0.25), ("p-d", "beta", -0.25, 0.0, -0.25)]
    return pl.DataFrame(rows, orient="row", schema=["pair_id", "probe_group", "dy_mean", "mediated_dy", "direct_dy"])


def _base() -> dict:
    return {"behaviour": "refusal", "n_probes": 4, "n_features": 3, "lam": 0.5, "probe_fvu": 0.125,
            "warnings": ["look <here> & there"],
            "sae_quality": {"fvu": 0.25, "l0": 4.0, "dead_fraction": 0.125, "ce_delta": -0.5},
            "fidelity": {"r2_heldout": 0.25, "auc_heldout_harmful": 0.75, "folds": 5,
                         "r2_by_category": {"alpha": 0.5, "beta": -1.0}}}


@pytest.fixture
def run() -> RunFrames:
    labels = ["alpha: how", "beta: why", "beta: who"]
    features = pl.DataFrame({"feature_id": FEATURES, "n_active": [3, 2, 1], "frac_active": [0.75, 0.5, 0.25],
                             "score": [0.875, 0.75, 0.625], "rank": [1, 2, 3], "group": ["alpha", "beta", "beta"],
                             "label": labels, "top_probes": ["q1, q2", "q3", ""]})
    policy = pl.DataFrame({"feature_id": FEATURES, "label": labels, "coef": [COEF[f] for f in FEATURES],
                           "coef_raw": [1.0, -0.5, 0.25], "scale": [0.5] * 3, "rank": [1, 2, 3]})
    probes = pl.DataFrame({"id": ["q1", "q2", "q3", "q4"], "prompt": ["how a", "how b", "why c", "why d"],
                           "category": ["alpha", "alpha", "beta", "beta"], "harmful": [True, False, True, True],
                           "y": [-1.0, -3.0, -2.0, -4.0], "y_pred": [-0.5, -2.5, -2.0, -3.0]})
    pair_data = pl.DataFrame({"id": PAIRS, "prompt": [f"prompt {p}" for p in PAIRS],
                              "response": [f"response {p}" for p in PAIRS]})
    groups = pl.DataFrame({"grouping": ["category", "side"], "group": ["alpha", "harmful"], "n_pairs": [2, 2],
                           "interference_rate": [0.5, 0.0], "significant": [True, False]})
    return RunFrames(Path("/runs/r1"), {"stages": {"base": _base()}}, get_behaviour("refusal"), policy, features,
                     probes, _pairs(), _pair_features(), _pair_behaviour(), pair_data, groups,
                     {"gcv_grid": [0.01, 0.1, 1.0], "gcv_score": [3.0, 2.0, None], "lam": 0.1},
                     config_text='[run]\nname = "<x>"\n')


# --------------------------------------------------------------------------------------
# cells and tables
# --------------------------------------------------------------------------------------

def test_fmt_and_cells():
    assert [tables.fmt(v) for v in (None, float("nan"), math.inf, True, False, 0.000123456, 12345.678, 3, "a")] == \
        ["–", "–", "–", "yes", "no", "0.000123", "1.23e+04", "3", "a"]
    t = tables.table(pl.DataFrame({"pair_id": ["a b/c", None], "x": [1.5, None], "ok": [True, False]}),
                     links={"pair_id": "pair"})
    (a, x, ok), (a2, x2, ok2) = t.rows
    assert (a.anchor, a.text, a.numeric) == ("pair-a_b_c", "a b/c", False)
    assert a2.anchor is None and a2.text == "–"
    # A missing number stays in a numeric column (right-aligned, sorted as a number).
    assert (x.value, x.text, x.numeric) == (1.5, "1.5", True) and (x2.value, x2.text, x2.numeric) == (None, "–", True)
    assert (ok.flag, ok.text, ok2.flag, ok2.text) == (True, "yes", False, "no")
    assert t.id is None and not t.filterable
    assert tables.table(pl.DataFrame({"a": [1]}), filterable=True).filterable is False  # a filter needs an id


def test_header_and_wording(run):
    v = view.report_view(run)
    assert v.header == view.Header("/runs/r1", "4", 4, "3", "0.5",
                                   "default TopK SAE: FVU 0.25 on its training tokens, L0 4, dead 12.5%, "
                                   "CE loss -0.5 nats when spliced", ("look <here> & there",))
    assert (v.wording.name, v.wording.flag, v.wording.positive_side, v.wording.negative_side) == \
        ("refusal", "harmful", "harmful", "harmless")
    assert view.sae_text(None) == "SAE: user-supplied"
    assert view.sae_text({"fvu": 0.5, "l0": 2.0, "dead_fraction": 0.0, "ce_delta": 0.25}).endswith(
        "dead 0%, CE loss +0.25 nats when spliced")
    assert v.config == '[run]\nname = "<x>"\n'


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------

def test_summary_by_label_and_category(run):
    s = view.summary(run)
    assert s.by_label.columns == ("label", "pairs", "mean_change", "mediated", "direct", "median_mediated_r2",
                                  "contradicting_label")
    assert s.by_label.values("label") == ["compliance", "refusal"]
    assert s.by_label.values("pairs") == [2, 2]
    assert s.by_label.values("mean_change") == [-0.25, 0.75]
    assert s.by_label.values("mediated") == [-0.25, 0.375]
    assert s.by_label.values("direct") == [0.0, 0.375]
    assert s.by_label.values("median_mediated_r2") == [0.375, 0.125]
    assert s.by_label.values("contradicting_label") == [1, 1]  # p-d and p-a; p-c's missing suspicion not counted
    # Σ mediated / Σ dy_mean = 0.25 / 1.0
    assert (s.mediated_share, s.mediated_share_text) == (0.25, "0.25")
    c = s.by_category
    assert c.columns == ("probe category", "mean_change", "mediated", "direct", "mediated_share")
    assert c.values("probe category") == ["alpha", "beta"]
    assert c.values("mean_change") == [0.1875, 0.3125] and c.values("mediated") == [0.0625, 0.0625]
    assert c.values("direct") == [0.125, 0.25]
    assert c.values("mediated_share") == pytest.approx([1 / 3, 0.2]) and c.texts("mediated_share") == ["0.333", "0.2"]


def test_summary_share_is_undefined_without_change(run):
    flat = run.pairs.with_columns(pl.lit(0.0).alias("dy_mean"))
    s = view.summary(dataclasses.replace(run, pairs=flat))
    assert math.isnan(s.mediated_share) and s.mediated_share_text == "–"


def test_curator_ranks_by_suspicion_ties_by_id_missing_last(run):
    t = view.curator(run)
    assert t.columns == ("pair_id", "category", "label", "dy_mean", "mediated", "suspicion", "reason")
    assert t.values("pair_id") == ["p-a", "p-d", "p-b", "p-c"]
    assert t.values("suspicion") == [1.0, 1.0, -1.0, None]
    assert t.texts("reason") == ["raises it & more", "lowers it", "agrees", "–"]
    assert [r[0].anchor for r in t.rows] == ["pair-p-a", "pair-p-d", "pair-p-b", "pair-p-c"]
    assert (t.id, t.filterable) == ("pairs-table", True)


def test_policy_bars_and_feature_table(run):
    p = view.policy(run)
    assert (p.shown, p.total) == (3, 3)
    assert p.bars == tables.Bars(("7 · alpha: how", "9 · beta: why", "11 · beta: who"), (0.5, -0.25, 0.125))
    t = p.table
    assert t.columns == ("feature_id", "label", "coef", "group", "mean_abs_d_coef", "mediated_total")
    assert t.values("feature_id") == [7, 9, 11] and [r[0].anchor for r in t.rows] == ["feature-7", "feature-9",
                                                                                        "feature-11"]
    assert t.values("mean_abs_d_coef") == [0.4375, 0.875, 0.875]
    assert t.values("mediated_total") == [0.1875, 0.375, -0.125]
    assert (t.id, t.filterable) == ("features-table", True)


def test_alignment_scores_and_heatmap(run):
    a = view.alignment(run)
    assert a.top.values("pair_id") == ["p-a", "p-b", "p-d", "p-c"]
    assert a.top.values("score") == [2.0, 1.0, 0.5, -1.0]
    assert a.scatter == tables.Scatter((1.5, 0.25, -0.5, 0.5), (0.5, 0.75, -0.5, 0.0),
                                       ("refusal", "compliance", "refusal", "compliance"),
                                       "ΔX pathway (Σ d_coef_x · coef)", "ΔY pathway (Σ d_coef_y · coef)")
    # Columns: features by mean |d_coef| (9 and 11 tie at 0.875: by id); rows by category, label, id.
    assert a.n_features == 3 and a.heatmap.cols == ("9", "11", "7")
    assert a.heatmap.rows == ("alpha · p-b", "alpha · p-a", "beta · p-d", "beta · p-c")
    assert a.heatmap.values == ((0.0, 0.125, -0.25), (-0.125, -0.25, 0.5), (-0.5, 0.0625, 0.0), (0.25, 0.0, 0.125))


def test_alignment_without_per_feature_shifts(run):
    a = view.alignment(dataclasses.replace(run, pair_features=run.pair_features.clear()))
    assert (a.scatter, a.heatmap, a.n_features) == (None, None, 0)
    assert a.top.values("pair_id") == ["p-a", "p-b", "p-d", "p-c"]


def test_interference_counts_and_flagged(run):
    i = view.interference(run)
    assert (i.computed, i.significant, i.side_significant, i.n_pairs) == (True, 1, 1, 4)
    assert i.flagged.values("pair_id") == ["p-a", "p-b"]  # by category or by side
    assert i.flagged.columns == ("pair_id", "group", "label", "off_target_share", "off_target_chance",
                                 "off_target_p", "interference_significant", "side_interference_significant",
                                 "dominant_feature")
    assert [r[-1].anchor for r in i.flagged.rows] == ["feature-7", "feature-9"]
    assert i.groups.values("significant") == [True, False] and i.groups.rows[0][-1].flag
    quiet = run.pairs.with_columns(pl.lit(False).alias("interference_significant"),
                                   pl.lit(False).alias("side_interference_significant"))
    assert view.interference(dataclasses.replace(run, pairs=quiet)).flagged is None
    gradient = run.pairs.drop("interference_significant", "side_interference_significant")
    assert view.interference(dataclasses.replace(run, pairs=gradient)) == view.InterferenceView(False)


def test_fidelity_tables_and_lambda_path(run):
    f = view.fidelity(run)
    assert f.by_category.columns == ("category", "harmful", "probes", "mean_y", "mean_y_pred")
    assert f.by_category.values("category") == ["alpha", "alpha", "beta"]
    assert f.by_category.values("harmful") == [False, True, True]
    assert f.by_category.values("probes") == [1, 1, 2]
    assert f.by_category.values("mean_y") == [-3.0, -1.0, -3.0]
    assert f.by_category.values("mean_y_pred") == [-2.5, -0.5, -2.5]
    # Only the float measures (folds is an int, r2_by_category a dict).
    assert f.measures.values("measure") == ["r2_heldout", "auc_heldout_harmful"]
    assert f.measures.values("value") == [0.25, 0.75]
    assert f.r2_by_category.values("probe category") == ["alpha", "beta"]
    assert f.r2_by_category.values("held-out R²") == [0.5, -1.0]
    assert (f.folds, f.probe_fvu) == ("5", "0.125")
    assert f.lam_path == tables.LinePath((0.01, 0.1, 1.0), (3.0, 2.0, math.inf), 0.1, "λ (log scale)", "GCV score")
    assert f.lam_path.drawable
    given = view.lam_path({"gcv_grid": [0.5], "gcv_score": [None], "lam": 0.5})
    assert given is not None and not given.drawable
    assert view.lam_path({}) is None


def test_fidelity_without_any_measure(run):
    f = view.fidelity(dataclasses.replace(run, manifest={"stages": {"base": {}}}))
    assert f.measures.height == 0 and f.r2_by_category.height == 0 and (f.folds, f.probe_fvu) == ("?", "–")


def test_validation_tables_where_validate_ran(run):
    assert view.validation(run) == view.ValidationView(None, None, None) and not view.validation(run).ran
    lds = pl.DataFrame({"method": ["suspicion"], "target": ["behaviour"], "lds": [0.5], "ci_low": [0.25],
                        "ci_high": [0.75], "subsets": [20], "alpha": [0.5], "extra": [1]})
    removal = pl.DataFrame({"method": ["suspicion"], "k": [2], "removed": ["p-a,p-b"], "behaviour_drop": [0.125]})
    v = view.validation(dataclasses.replace(run, validation=lds, removal=removal))
    assert v.ran and v.planted is None
    assert v.lds.columns == ("method", "target", "lds", "ci_low", "ci_high", "subsets", "alpha")
    assert v.lds.values("lds") == [0.5]
    assert v.removal.columns == ("method", "k", "behaviour_drop") and v.removal.values("behaviour_drop") == [0.125]


# --------------------------------------------------------------------------------------
# drill-downs
# --------------------------------------------------------------------------------------

def test_pair_panel_facts_features_and_categories(run):
    ps = panels.pair_panels(run)
    assert [p.id for p in ps] == PAIRS and [p.anchor for p in ps] == [f"pair-{p}" for p in PAIRS]
    a = ps[0]
    assert dict(a.facts) == {
        "mode": "engine", "label · category": "refusal · alpha", "suspicion": "1 — raises it & more",
        "behaviour change (dy_mean)": "0.5", "mediated / direct": "0.25 / 0.25", "mediated share · R²": "0.5 · 0.75",
        "SMDA score (x / y)": "2 (1.5 / 0.5)", "off-target share vs chance": "0.5 vs 0.5 (p 0.01, significant)"}
    assert [k for k, _ in a.facts][0] == "mode" and a.dominant == tables.Link("7", "feature-7")
    assert (a.prompt, a.response) == ("prompt p-a", "response p-a")
    assert a.by_category.values("probe_group") == ["alpha", "beta"] and a.by_category.values("dy_mean") == [0.5, 0.5]
    # Features by |alignment|: 7 (0.5), 11 (-0.25), 9 (-0.125).
    assert a.features.values("feature_id") == [7, 11, 9]
    assert a.features.values("alignment") == [0.5, -0.25, -0.125]
    assert a.features.values("d_coef_x") == [0.5, -1.0, 0.25]
    assert a.bars == tables.Bars(("7 · alpha: how", "11 · beta: who", "9 · beta: why"), (0.5, -0.25, -0.125))
    c = ps[2]
    assert c.dominant is None and dict(c.facts)["suspicion"] == "– — "
    assert dict(c.facts)["off-target share vs chance"] == "0 vs 0.25 (p 1)"


def test_pair_panel_without_per_feature_shifts(run):
    p = panels.pair_panels(dataclasses.replace(run, pair_features=run.pair_features.clear()))[0]
    assert p.bars is None and p.features.height == 0
    assert p.features.columns == ("feature_id", "label", "d_coef_x", "d_coef_y", "alignment", "mediated_dy")


def test_pair_panel_shows_what_the_loss_trained_on(run):
    data = run.pair_data.with_columns(
        pl.Series("tokens", [["<u>", "hi", "<a>", "no", "!"], ["x"], ["y", "z"], ["w"]]),
        pl.Series("loss_mask", [[False, False, False, True, True], [True], [False, True], [False]]),
        pl.Series("messages", [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "no!"}], None, None, None]),
        pl.Series("train_turns", [[2], None, None, None]))
    ps = panels.pair_panels(dataclasses.replace(run, pair_data=data))
    a = ps[0]
    assert a.trained == (("<u>", False), ("hi", False), ("<a>", False), ("no", True), ("!", True))
    assert a.trained_count == "2 of 5 tokens trained"
    assert a.turns == (("system", "be brief", False), ("user", "hi", False), ("assistant", "no!", True))
    assert ps[1].turns == () and ps[1].trained_count == "1 of 1 tokens trained"
    html = page.render(view.report_view(dataclasses.replace(run, pair_data=data)))
    assert html.count('class="tok-on"') == 2 + 1 + 1 and "2 of 5 tokens trained" in html
    assert 'class="turn trained-turn"' in html
    # an older run folder without the mask: no section rather than a wrong one
    assert panels.pair_panels(run)[0].trained == () and panels.pair_panels(run)[0].trained_count == ""


def test_empty_output_columns_are_warnings(run):
    man = {"stages": {"base": _base(), "pairs": {"empty_columns": ["suspicion"]}}}
    v = view.header(dataclasses.replace(run, manifest=man))
    assert v.warnings[-1] == "pairs.parquet column 'suspicion' is empty for every pair"


def test_feature_panel_facts_probes_and_movers(run):
    fs = panels.feature_panels(run)
    assert [f.anchor for f in fs] == ["feature-7", "feature-9", "feature-11"]
    f9 = fs[1]
    assert dict(f9.facts) == {"label": "beta: why", "coefficient (rank)": "-0.25 (2)", "group": "beta",
                              "selection score": "0.75", "active on probes": "2 (0.5)"}
    assert f9.top_probes.values("probe") == ["q3"] and f9.top_probes.values("y") == [-2.0]
    assert fs[0].top_probes.values("prompt") == ["how a", "how b"]
    assert fs[2].top_probes.height == 0
    # Pairs by |d_coef| on feature 9: p-d (2), p-c (-1), p-a (0.5), p-b (0).
    assert f9.movers.values("pair_id") == ["p-d", "p-c", "p-a", "p-b"]
    assert f9.movers.values("label") == ["compliance", "refusal", "refusal", "compliance"]
    assert f9.movers.values("mediated_dy") == [0.5, -0.25, 0.125, 0.0]
    assert [r[0].anchor for r in f9.movers.rows] == ["pair-p-d", "pair-p-c", "pair-p-a", "pair-p-b"]


# --------------------------------------------------------------------------------------
# the rendered page, parsed
# --------------------------------------------------------------------------------------

class _Page(html.parser.HTMLParser):
    """Elements with their attributes, and the text inside every element as a browser reads it
    (entities decoded), keyed by tag, ``#id`` and ``.class``, in document order of closing."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[tuple[str, dict, list]] = []
        self.text: dict[str, list[str]] = {}
        self.cells: list[str] = []

    VOID = {"meta", "col", "input", "br", "wbr"}  # HTML's; SVG's empty elements are written <x/>

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag not in self.VOID:
            self.stack.append((tag, a, []))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        while self.stack:
            t, a, parts = self.stack.pop()
            content = "".join(parts)
            if self.stack:
                self.stack[-1][2].append(content)
            for key in (t, a.get("id") and "#" + a["id"], a.get("class") and "." + a["class"]):
                if key:
                    self.text.setdefault(key, []).append(content)
            if t == tag:
                return

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    return p


HOSTILE = '<script>alert("x")</script> & \'q\''


def _hostile(run: RunFrames) -> RunFrames:
    data = run.pair_data.with_columns(pl.lit(HOSTILE).alias("prompt"))
    features = run.features.with_columns(pl.lit(HOSTILE).alias("label"))
    pairs = run.pairs.with_columns(pl.lit(HOSTILE).alias("suspicion_reason"))
    return dataclasses.replace(run, pair_data=data, features=features, pairs=pairs, config_text=HOSTILE)


def test_page_shows_hostile_text_as_text_once_escaped(run):
    doc = _parse(page.render(view.report_view(_hostile(run))))
    assert [t for t, _ in doc.tags].count("script") == 1  # the page's own, no injected one
    assert doc.text[".text"].count(HOSTILE) == len(PAIRS)  # every prompt, as written
    assert HOSTILE in doc.text["pre"]  # the configuration
    assert f"suspicion1 — {HOSTILE}" in doc.text[".kv"][0]  # a fact: escaped once, not twice
    titles = [a["title"] for t, a in doc.tags if t == "td" and "title" in a]
    # The curator's reasons, and the feature labels of every pair panel's feature table.
    assert titles.count(HOSTILE) == len(PAIRS) + len(PAIRS) * len(FEATURES)
    assert f"7 · {HOSTILE}"[:70] in doc.text["text"]  # a bar's label: an SVG <text> element


def test_page_facts_escaped_once(run):
    doc = _parse(page.render(view.report_view(run)))
    facts = doc.text[".kv"][0]
    assert "suspicion1 — raises it & more" in facts and "&amp;" not in facts
    assert doc.text[".warn"] == ["Check this before trusting the attributions: look <here> & there."]


def test_page_sections_anchors_and_order(run):
    text = page.render(view.report_view(run))
    doc = _parse(text)
    ids = [a["id"] for _, a in doc.tags if "id" in a]
    sections = ["summary", "curator", "policy", "alignment", "interference", "fidelity", "validation", "drilldowns",
                "config"]
    assert [i for i in ids if i in sections] == sections
    nav = [a["href"] for t, a in doc.tags if t == "a" and a.get("href", "").startswith("#")][:8]
    assert nav == [f"#{s}" for s in sections if s != "drilldowns"]
    assert {f"pair-{p}" for p in PAIRS} | {f"feature-{f}" for f in FEATURES} <= set(ids)
    assert {"pairs-table", "features-table", "selftest-result"} <= set(ids)
    panels_ = [a for t, a in doc.tags if t == "section"]
    assert all(a["class"] == "panel" for a in panels_) and len(panels_) == len(PAIRS) + len(FEATURES)
    filters = [a["data-table"] for t, a in doc.tags if t == "input"]
    assert filters == ["pairs-table", "features-table"]
    numeric = [a["data-v"] for t, a in doc.tags if t == "td" and a.get("class") == "num" and "data-v" in a]
    assert "0.1875" in numeric and "-0.25" in numeric


def test_page_is_one_offline_file_with_the_package_css_and_js(run):
    doc = _parse(page.render(view.report_view(run)))
    static = Path(page.__file__).parent / "static"
    assert [t.strip() for t in doc.text["style"]] == [static.joinpath("report.css").read_text().strip()]
    assert [t.strip() for t in doc.text["script"]] == [static.joinpath("report.js").read_text().strip()]
    assert not [t for t, a in doc.tags if t == "link" or "src" in a]
    for name in ("report.css", "report.js"):  # verbatim inclusion: nothing Jinja would read as syntax
        body = static.joinpath(name).read_text()
        assert not any(s in body for s in ("{{", "{%", "{#", "</")), name


def test_svg_charts_escape_their_text():
    for chart in (svg.chart(tables.Bars((HOSTILE, "b"), (1.0, -0.5))),
                  svg.chart(tables.Scatter((1.0,), (-1.0,), (HOSTILE,), HOSTILE, "y")),
                  svg.chart(tables.Heatmap(((0.5,),), (HOSTILE,), ("c&",))),
                  svg.chart(tables.LinePath((0.1, 1.0), (2.0, 1.0), 0.1, HOSTILE, "y"), w=300)):
        root = ET.fromstring(str(chart))  # well-formed: nothing broke out of its element
        assert root.tag == "svg" and not root.findall(".//script")
        texts = ["".join(e.itertext()) for e in root.iter() if e.tag in ("text", "title")]
        assert any(HOSTILE in t for t in texts), texts


# --------------------------------------------------------------------------------------
# mediation across layers (sae.layers)
# --------------------------------------------------------------------------------------

def _layers() -> pl.DataFrame:
    return pl.DataFrame({
        "layer": [8, 4, 10], "main": [False, False, True], "best": [True, False, False], "n_features": [3, 2, 3],
        "lam": [0.5, 1.0, 0.5], "r2_heldout": [0.5, 0.25, None], "r2_mean_baseline": [-0.125, -0.125, -0.125],
        "probe_fvu": [0.25, 0.125, 0.5], "sae_fvu": [0.125, 0.125, 0.25], "n_pairs": [4, 4, 4],
        "dy_sum": [1.0, 1.0, 1.0], "mediated_sum": [0.75, -0.5, 0.25], "mediated_share": [0.75, -0.5, 0.25],
        "mediated_r2": [0.5, -2.0, 0.125], "median_pair_r2": [0.25, None, 0.0]})


def test_no_layers_section_without_the_curve(run):
    assert view.report_view(run).layers is None
    text = page.render(view.report_view(run))
    assert 'id="layers"' not in text and 'href="#layers"' not in text


def test_layers_curve_table_and_best(run):
    run = dataclasses.replace(run, layers=_layers(),
                              manifest={"stages": {"base": _base(), "layers": {"best_layer": 8}}})
    v = view.layers(run)
    assert (v.best_layer, v.best_share, v.main_layer, v.main_share, v.first_order) == ("8", "0.75", "10", "0.25",
                                                                                       False)
    t = v.table
    assert t.columns == ("layer", "features", "policy held-out R²", "mean baseline R²", "SAE FVU (probes)",
                         "Σ mediated", "Σ dy_mean", "mediated share", "R² across pairs", "median pair R²", "main",
                         "best")
    assert t.values("layer") == [4, 8, 10]  # by layer
    assert t.values("mediated share") == [-0.5, 0.75, 0.25]
    assert t.values("policy held-out R²") == [0.25, 0.5, None] and t.texts("median pair R²") == ["–", "0.25", "0"]
    assert t.values("best") == [False, True, False] and t.id == "layers-table"
    c = v.curve
    assert c.xs == (4.0, 8.0, 10.0) and c.mark == 8.0
    assert [name for name, _ in c.series] == ["mediated share", "R² across pairs", "policy held-out R²"]
    assert c.series[0][1] == (-0.5, 0.75, 0.25) and c.series[1][1] == (-2.0, 0.5, 0.125)
    assert math.isnan(c.series[2][1][2])
    doc = _parse(page.render(view.report_view(run)))
    ids = [a["id"] for _, a in doc.tags if "id" in a]
    assert ids.index("validation") < ids.index("layers") < ids.index("drilldowns") and "layers-table" in ids
    assert "#layers" in [a["href"] for t, a in doc.tags if t == "a" and a.get("href", "").startswith("#")]
    first_order = dataclasses.replace(run, layers=_layers().with_columns(pl.lit(None).cast(pl.Float64)
                                                                         .alias("median_pair_r2")))
    assert view.layers(first_order).first_order


def test_curve_chart_clips_and_escapes():
    c = tables.Curve((0.0, 5.0, 9.0), ((HOSTILE, (0.5, -16.0, 1.0)), ("b", (math.nan, 0.25, 0.5))), 5.0, HOSTILE,
                     "y")
    root = ET.fromstring(str(svg.chart(c)))
    assert root.tag == "svg" and not root.findall(".//script")
    texts = ["".join(e.itertext()) for e in root.iter() if e.tag in ("text", "title")]
    assert any(HOSTILE in t for t in texts) and any("-16" in t for t in texts)  # the tooltip keeps the value
    ys = [float(e.get("cy")) for e in root.iter() if e.tag == "circle"]
    assert len(ys) == 5 and max(ys) <= 240 - 45  # the clipped point sits on the axis' lower edge
