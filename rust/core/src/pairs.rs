//! One pair's ΔX (n probes × K features) in whichever layout the caller holds it, read row by
//! row as non-zeros, so the decomposition takes dense, stacked-CSR and per-pair inputs without
//! an intermediate copy of the whole batch.
//!
//! CSR views are validated when built ([`Csr::new`]); dense rows are checked for finite values
//! as they are read, and the first bad value is reported by pair, probe and feature.

use crate::error::{CoreError, Result};
use crate::matrix::{Csr, Index};

/// A borrowed per-pair ΔX of `n` rows and `k` columns.
#[derive(Clone, Copy, Debug)]
pub enum PairRows<'a> {
    Csr32(Csr<'a, i32>),
    Csr64(Csr<'a, i64>),
    /// Row-major `n·k` float64 values.
    Dense64(&'a [f64]),
    /// Row-major `n·k` float32 values (widened as they are read).
    Dense32(&'a [f32]),
}

/// Receives a pair's rows, each as its non-zero columns (strictly increasing) and values.
pub trait RowSink {
    fn row<I: Index>(&mut self, i: usize, idx: &[I], val: &[f64]);
}

/// Per-worker buffer for the non-zeros of one dense row.
#[derive(Default)]
pub struct Compact {
    idx: Vec<i32>,
    val: Vec<f64>,
}

/// A dense value that is not finite, where it sits in its pair.
#[derive(Debug, Clone, Copy)]
pub struct BadValue {
    pub probe: usize,
    pub feature: usize,
}

impl<'a> PairRows<'a> {
    /// Feed every row to `sink` (empty rows are skipped: they contribute nothing).
    #[inline(always)]
    pub fn visit<S: RowSink>(
        &self,
        n: usize,
        k: usize,
        sink: &mut S,
        buf: &mut Compact,
    ) -> std::result::Result<(), BadValue> {
        match self {
            PairRows::Csr32(c) => visit_csr(c, n, sink),
            PairRows::Csr64(c) => visit_csr(c, n, sink),
            PairRows::Dense64(d) => visit_dense(d, n, k, sink, buf, |v| v),
            PairRows::Dense32(d) => visit_dense(d, n, k, sink, buf, |v| v as f64),
        }
        .map(|_| ())
    }

    /// Stored values (dense: every cell), for the cost model of callers.
    pub fn stored(&self) -> usize {
        match self {
            PairRows::Csr32(c) => c.nnz(),
            PairRows::Csr64(c) => c.nnz(),
            PairRows::Dense64(d) => d.len(),
            PairRows::Dense32(d) => d.len(),
        }
    }

    /// Check the view's shape against the base design (`pair` names it in the error).
    pub fn check_shape(&self, pair: usize, n: usize, k: usize) -> Result<()> {
        let (ok, got) = match self {
            PairRows::Csr32(c) => (
                c.nrows == n && c.ncols == k,
                format!("({}, {})", c.nrows, c.ncols),
            ),
            PairRows::Csr64(c) => (
                c.nrows == n && c.ncols == k,
                format!("({}, {})", c.nrows, c.ncols),
            ),
            PairRows::Dense64(d) => (
                Some(d.len()) == n.checked_mul(k),
                format!("{} values", d.len()),
            ),
            PairRows::Dense32(d) => (
                Some(d.len()) == n.checked_mul(k),
                format!("{} values", d.len()),
            ),
        };
        if ok {
            return Ok(());
        }
        Err(CoreError::shape(
            &format!("dX[{pair}]"),
            format!("({n}, {k}) (probes x features)"),
            got,
        ))
    }
}

#[inline(always)]
fn visit_csr<I: Index, S: RowSink>(
    c: &Csr<'_, I>,
    n: usize,
    sink: &mut S,
) -> std::result::Result<(), BadValue> {
    for i in 0..n {
        let (idx, val) = c.row(i);
        if !idx.is_empty() {
            sink.row(i, idx, val);
        }
    }
    Ok(())
}

#[inline(always)]
fn visit_dense<T: Copy, S: RowSink>(
    d: &[T],
    n: usize,
    k: usize,
    sink: &mut S,
    buf: &mut Compact,
    widen: impl Fn(T) -> f64,
) -> std::result::Result<(), BadValue> {
    buf.idx.resize(k, 0);
    buf.val.resize(k, 0.0);
    for i in 0..n {
        // Branch-free compaction: every value is written, the count advances only past
        // non-zeros; a non-finite value is looked for only once a row is known to hold one.
        let (mut len, mut finite) = (0usize, true);
        for (c, &raw) in d[i * k..(i + 1) * k].iter().enumerate() {
            let v = widen(raw);
            buf.idx[len] = c as i32;
            buf.val[len] = v;
            len += (v != 0.0) as usize;
            finite &= v.is_finite();
        }
        if !finite {
            let row = &d[i * k..(i + 1) * k];
            let feature = row.iter().position(|&r| !widen(r).is_finite()).unwrap_or(0);
            return Err(BadValue { probe: i, feature });
        }
        if len > 0 {
            sink.row(i, &buf.idx[..len], &buf.val[..len]);
        }
    }
    Ok(())
}

/// The typed error for a non-finite dense value of pair `pair`.
pub fn non_finite(pair: usize, bad: BadValue) -> CoreError {
    CoreError::NonFinite {
        field: "dX".into(),
        location: format!(
            "pair {pair}, probe {}, feature column {}",
            bad.probe, bad.feature
        ),
    }
}

/// Per-pair views of a stacked, pair-major CSR of `P·n` rows, validated first (in parallel on
/// the current Rayon pool).
#[allow(clippy::too_many_arguments)]
pub fn csr_pairs<'a, I: Index>(
    field: &str,
    nrows: usize,
    ncols: usize,
    indptr: &'a [I],
    indices: &'a [I],
    data: &'a [f64],
    n: usize,
    k: usize,
) -> Result<Vec<PairRows<'a>>> {
    let csr = Csr::new(field, nrows, ncols, indptr, indices, data)?;
    if ncols != k || n == 0 || nrows % n != 0 {
        return Err(CoreError::shape(
            field,
            format!("(P*{n}, {k}) (pairs x probes, features)"),
            format!("({nrows}, {ncols})"),
        ));
    }
    Ok((0..nrows / n)
        .map(|j| I::wrap(csr.slice_rows(j * n, (j + 1) * n)))
        .collect())
}

/// Per-pair views of a row-major dense block of shape (P, n, K), (P·n, K) or (n, K).
pub fn dense_pairs<'a, T>(
    field: &str,
    shape: &[usize],
    data: &'a [T],
    n: usize,
    k: usize,
    wrap: fn(&'a [T]) -> PairRows<'a>,
) -> Result<Vec<PairRows<'a>>> {
    let rows: Option<usize> = match shape {
        [p, r, c] if *r == n && *c == k => p.checked_mul(n),
        [r, c] if *c == k => Some(*r),
        _ => None,
    };
    let per = n.checked_mul(k).unwrap_or(0);
    match rows {
        Some(r) if n > 0 && r % n == 0 && r.checked_mul(k) == Some(data.len()) && per > 0 => {
            Ok(data.chunks_exact(per).map(wrap).collect())
        }
        _ => Err(CoreError::shape(
            field,
            format!("(P, {n}, {k}) or (P*{n}, {k}) (pairs, probes, features)"),
            format!("{shape:?}"),
        )),
    }
}
