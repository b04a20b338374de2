//! How each training pair shifts the policy, split into the feature-activation (ΔX) and
//! behaviour-score (ΔY) pathways.
//!
//! Exact: `total = β(X+ΔX, y+Δy) − β`, `x = β(X+ΔX, y) − β`, `y = β(X, y+Δy) − β`. The shifts
//! are solved for directly, `(A + ΔG) d = Δg − ΔG β`, instead of differencing two refits, so a
//! tiny shift keeps its relative accuracy. `x` and `total` share one factorization of
//! `A + ΔG`; `y` is linear in y and uses the base factorization. ΔG is assembled from the
//! sparse ΔZ in O(nnz·K).
//!
//! First order (the paper's derivative): `x = A⁻¹(ΔZᵀr − Z~ᵀΔZ β)`, `y = A⁻¹ Z~ᵀ Δy`,
//! batched over pairs as two GEMMs and one multi-right-hand-side solve.

use faer::{Mat, MatRef, Par};
use rayon::prelude::*;

use crate::error::{check_finite, zeros, CoreError, Result};
use crate::linalg::{at_b, SolverKind, SpdSolver};
use crate::matrix::{Csr, Index, Matrix};
use crate::pairs::{non_finite, Compact, PairRows, RowSink};
use crate::ridge::{add_ridge, Design, Policy};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Exact,
    FirstOrder,
}

/// The base fit, prepared once and shared by every batch of pairs.
pub struct Base {
    pub design: Design,
    pub b: Vec<f64>,
    /// Centred residual `y~ − Z~ β`.
    pub r: Vec<f64>,
    pub a: Mat<f64>,
    pub solver: SpdSolver,
    /// The policy's own `coef / scale` (not the refit `b`): the weights of the mediation
    /// columns, `ΔX_j · w` per probe, computed as the Python layer always has.
    pub w_raw: Vec<f64>,
}

/// Disagreement of fitted values, relative to the spread of y, above which X, y are taken not
/// to be the data the policy was fit on.
pub const REFIT_TOLERANCE: f64 = 1e-6;

/// What the decomposition needs of a fitted policy (a full [`Policy`] converts into it).
#[derive(Debug, Clone, Copy)]
pub struct BaseSpec<'a> {
    pub coef: &'a [f64],
    pub intercept: f64,
    pub lam: f64,
    pub scale: &'a [f64],
    pub fit_intercept: bool,
}

impl<'a> From<&'a Policy> for BaseSpec<'a> {
    fn from(p: &'a Policy) -> Self {
        Self {
            coef: &p.coef,
            intercept: p.intercept,
            lam: p.lam,
            scale: &p.scale,
            fit_intercept: p.fit_intercept,
        }
    }
}

impl Base {
    pub fn new(policy: &Policy, x: &Matrix<'_>, y: &[f64], par: Par) -> Result<Self> {
        Self::from_spec(policy.into(), x, y, par)
    }

    pub fn from_spec(policy: BaseSpec<'_>, x: &Matrix<'_>, y: &[f64], par: Par) -> Result<Self> {
        if !(policy.lam.is_finite() && policy.lam >= 0.0) {
            return Err(CoreError::value(
                "lam",
                format!("{} is not a finite non-negative number", policy.lam),
            ));
        }
        let k = policy.coef.len();
        if x.ncols() != k {
            return Err(CoreError::shape(
                "X",
                format!("{k} columns (the policy's features)"),
                format!("{} columns", x.ncols()),
            ));
        }
        check_finite("coef", policy.coef, 1)?;
        check_finite("intercept", &[policy.intercept], 1)?;
        let design = Design::new(x, y, Some(policy.scale), true, policy.fit_intercept)?;
        let a = add_ridge(&design.gram(par), policy.lam);
        let solver = SpdSolver::new(a.as_ref())?;
        let b = solver.solve_vec(&design.zt_vec(&design.y_c));
        // Compare fitted values, not coefficients: on an ill-conditioned design two accurate
        // solvers can disagree along near-null directions, but not in what they predict.
        let mut worst = 0.0f64;
        for row in design.z.chunks_exact(k) {
            let diff: f64 = row
                .iter()
                .zip(b.iter().zip(policy.coef))
                .map(|(z, (p, q))| z * (p - q))
                .sum();
            worst = worst.max(diff.abs());
        }
        let size = design.y_c.iter().map(|v| v.abs()).fold(0.0, f64::max);
        // Two float64 solves of a system with condition number c may differ by ~c·eps: allow it
        // (trace(A)/lam bounds c; with lam = 0 the check cannot separate rounding from misuse).
        let trace: f64 = (0..k).map(|i| a[(i, i)]).sum();
        let cond = if policy.lam > 0.0 {
            trace / policy.lam
        } else {
            f64::INFINITY
        };
        let tol = (REFIT_TOLERANCE + 100.0 * f64::EPSILON * cond) * size;
        if worst > tol && worst > 1e-300 {
            return Err(CoreError::value(
                "X, y",
                format!(
                    "refitting the policy on these X, y moves its fitted values by up to {worst:.3e} \
                     (largest |y - mean| {size:.3e}); pass the X and y the policy was fit on"
                ),
            ));
        }
        let mut r = design.y_c.clone();
        for (ri, row) in r.iter_mut().zip(design.z.chunks_exact(k)) {
            *ri -= row.iter().zip(&b).map(|(z, c)| z * c).sum::<f64>();
        }
        let w_raw = policy
            .coef
            .iter()
            .zip(policy.scale)
            .map(|(c, s)| c / s)
            .collect();
        Ok(Self {
            design,
            b,
            r,
            a,
            solver,
            w_raw,
        })
    }
}

/// Per-pair shifts of the coefficients, row-major `P x K`.
#[derive(Debug, Clone)]
pub struct Split {
    pub n_pairs: usize,
    pub k: usize,
    pub d_total: Vec<f64>,
    pub d_x: Vec<f64>,
    pub d_y: Vec<f64>,
    /// Mean over probes of the base policy's predicted change `ΔZ β`.
    pub pred_dy: Vec<f64>,
    /// Pairs whose perturbed system needed the eigendecomposition fallback.
    pub n_fallback: usize,
    /// The policy's predicted change per probe, `ΔX_j · (coef / s)`, row-major `P x n`.
    pub predicted: Vec<f64>,
    /// Mean of ΔX over probes per feature (unscaled), row-major `P x K`.
    pub mean_dx: Vec<f64>,
}

impl Split {
    /// No pairs yet, for `k` features (the start of an [`Split::append`] accumulation).
    pub fn empty(k: usize) -> Self {
        Self {
            n_pairs: 0,
            k,
            d_total: Vec::new(),
            d_x: Vec::new(),
            d_y: Vec::new(),
            pred_dy: Vec::new(),
            n_fallback: 0,
            predicted: Vec::new(),
            mean_dx: Vec::new(),
        }
    }

    /// Append the pairs of a later batch (same features), in order.
    pub fn append(&mut self, other: Split) {
        debug_assert_eq!(self.k, other.k);
        self.n_pairs += other.n_pairs;
        self.d_total.extend(other.d_total);
        self.d_x.extend(other.d_x);
        self.d_y.extend(other.d_y);
        self.pred_dy.extend(other.pred_dy);
        self.n_fallback += other.n_fallback;
        self.predicted.extend(other.predicted);
        self.mean_dx.extend(other.mean_dx);
    }

    pub fn d_xy(&self) -> Vec<f64> {
        (0..self.d_total.len())
            .map(|i| self.d_total[i] - self.d_x[i] - self.d_y[i])
            .collect()
    }
}

/// Decompose a batch of pairs. `dx` stacks the pairs' ΔX row-wise (`P·n x K`, pair-major),
/// `dy` likewise (`P·n`). Runs on the current Rayon pool; `par` drives the GEMMs.
pub fn decompose<I: Index>(
    base: &Base,
    dx: &Csr<'_, I>,
    dy: &[f64],
    method: Method,
    par: Par,
) -> Result<Split> {
    let n = base.design.n;
    if dx.ncols != base.design.k {
        return Err(CoreError::shape(
            "dX",
            format!("{} columns", base.design.k),
            format!("{} columns", dx.ncols),
        ));
    }
    if dx.nrows % n != 0 {
        return Err(CoreError::shape(
            "dX",
            format!("a multiple of n = {n} rows (pairs x probes)"),
            format!("{} rows", dx.nrows),
        ));
    }
    let views: Vec<PairRows<'_>> = (0..dx.nrows / n)
        .map(|j| I::wrap(dx.slice_rows(j * n, (j + 1) * n)))
        .collect();
    decompose_pairs(base, &views, dy, method, par)
}

/// Decompose a batch of pairs given one view per pair (any layout: [`PairRows`]); `dy` is
/// pair-major `P·n`. Runs on the current Rayon pool; `par` drives the GEMMs.
pub fn decompose_pairs(
    base: &Base,
    pairs: &[PairRows<'_>],
    dy: &[f64],
    method: Method,
    par: Par,
) -> Result<Split> {
    let d = &base.design;
    let (n, k) = (d.n, d.k);
    let p = pairs.len();
    for (j, v) in pairs.iter().enumerate() {
        v.check_shape(j, n, k)?;
    }
    if dy.len() != p * n {
        return Err(CoreError::shape(
            "dy",
            format!("{p} pairs x {n} probes = {} values", p * n),
            format!("{} values", dy.len()),
        ));
    }
    check_finite("dy", dy, n)?;
    if p == 0 {
        return Ok(Split::empty(k));
    }
    let inv_s: Vec<f64> = d.scale.iter().map(|s| 1.0 / s).collect();
    let dy_mat = MatRef::from_column_major_slice(dy, n, p);
    // Z~ᵀΔy for every pair at once (centring Δy is unnecessary: Z~ is centred).
    let zt_dy = at_b(d.zref(), dy_mat, par);
    let mut d_y = zt_dy.clone();
    base.solver.solve_in_place(d_y.as_mut());

    match method {
        Method::FirstOrder => first_order(base, pairs, &inv_s, &d_y, par),
        Method::Exact => exact(base, pairs, dy, &inv_s, &zt_dy, &d_y),
    }
}

fn to_rows(m: &Mat<f64>) -> Vec<f64> {
    // Column j of a K x P matrix is pair j: emit pair-major rows.
    let (k, p) = (m.nrows(), m.ncols());
    let mut out = Vec::with_capacity(k * p);
    for j in 0..p {
        for i in 0..k {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// The mediation columns' sums for one pair: the policy's predicted change per probe and
/// the mean ΔX per feature, accumulated in the order the Python layer used (row by row,
/// columns ascending), so they keep their bits.
struct Mediated {
    predicted: Vec<f64>,
    mean_dx: Vec<f64>,
    inv_n: f64,
}

impl Mediated {
    fn new(n: usize, k: usize) -> Self {
        Self {
            predicted: vec![0.0; n],
            mean_dx: vec![0.0; k],
            inv_n: 1.0 / n as f64,
        }
    }
}

/// Per pair of the first-order split: `w = ΔZ β` (n) and `q = ΔZᵀ r` (K), O(nnz), written
/// into the pair's slices of the batch's outputs.
struct FirstOrderSink<'b> {
    base: &'b Base,
    inv_s: &'b [f64],
    w: &'b mut [f64],
    q: &'b mut [f64],
    predicted: &'b mut [f64],
    mean_dx: &'b mut [f64],
    inv_n: f64,
}

impl RowSink for FirstOrderSink<'_> {
    #[inline(always)]
    fn row<I: Index>(&mut self, i: usize, idx: &[I], val: &[f64]) {
        let (b, w_raw, ri) = (&self.base.b, &self.base.w_raw, self.base.r[i]);
        let (mut wi, mut pi) = (0.0, 0.0);
        for (&c, &v) in idx.iter().zip(val) {
            let c = c.to_i64() as usize;
            let z = v * self.inv_s[c];
            wi += z * b[c];
            self.q[c] += z * ri;
            pi += v * w_raw[c];
            self.mean_dx[c] += self.inv_n * v;
        }
        self.w[i] = wi;
        self.predicted[i] = pi;
    }
}

/// One pair's first-order sums, dispatched to the widest SIMD the CPU has.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512dq+avx2+fma", "x86_64+avx2+fma"))]
fn first_order_pair(
    pair: &PairRows<'_>,
    sink: &mut FirstOrderSink<'_>,
    buf: &mut Compact,
    j: usize,
) -> Result<()> {
    let (n, k) = (sink.base.design.n, sink.base.design.k);
    pair.visit(n, k, sink, buf)
        .map_err(|bad| non_finite(j, bad))
}

/// Batch outputs of the first-order pass, one contiguous slice per pair in each.
struct FirstOrderSums {
    /// Column-major `n x P` (pair j's `w` is column j).
    w: Vec<f64>,
    q: Vec<f64>,
    predicted: Vec<f64>,
    mean_dx: Vec<f64>,
}

fn first_order_sums(base: &Base, pairs: &[PairRows<'_>], inv_s: &[f64]) -> Result<FirstOrderSums> {
    let (n, k, p) = (base.design.n, base.design.k, pairs.len());
    let mut s = FirstOrderSums {
        w: zeros("w", n * p)?,
        q: zeros("q", k * p)?,
        predicted: zeros("predicted", n * p)?,
        mean_dx: zeros("mean_dx", k * p)?,
    };
    let inv_n = 1.0 / n as f64;
    let outs: Vec<Result<()>> =
        s.w.par_chunks_mut(n)
            .zip(s.q.par_chunks_mut(k))
            .zip(s.predicted.par_chunks_mut(n))
            .zip(s.mean_dx.par_chunks_mut(k))
            .enumerate()
            .map_init(
                Compact::default,
                |buf, (j, (((w, q), predicted), mean_dx))| {
                    let mut sink = FirstOrderSink {
                        base,
                        inv_s,
                        w,
                        q,
                        predicted,
                        mean_dx,
                        inv_n,
                    };
                    first_order_pair(&pairs[j], &mut sink, buf, j)
                },
            )
            .collect();
    outs.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(s)
}

fn first_order(
    base: &Base,
    pairs: &[PairRows<'_>],
    inv_s: &[f64],
    d_y: &Mat<f64>,
    par: Par,
) -> Result<Split> {
    let d = &base.design;
    let (n, k, p) = (d.n, d.k, pairs.len());
    let s = first_order_sums(base, pairs, inv_s)?;
    let zt_w = at_b(d.zref(), MatRef::from_column_major_slice(&s.w, n, p), par);
    let mut rhs = Mat::<f64>::from_fn(k, p, |i, j| s.q[j * k + i] - zt_w[(i, j)]);
    base.solver.solve_in_place(rhs.as_mut());
    let d_x = to_rows(&rhs);
    let d_y_rows = to_rows(d_y);
    let d_total = d_x.iter().zip(&d_y_rows).map(|(a, b)| a + b).collect();
    let pred_dy =
        s.w.chunks_exact(n)
            .map(|w| w.iter().sum::<f64>() / n as f64)
            .collect();
    Ok(Split {
        n_pairs: p,
        k,
        d_total,
        d_x,
        d_y: d_y_rows,
        pred_dy,
        n_fallback: 0,
        predicted: s.predicted,
        mean_dx: s.mean_dx,
    })
}

struct PairOut {
    d_x: Vec<f64>,
    d_t: Vec<f64>,
    pred: f64,
    kind: SolverKind,
    predicted: Vec<f64>,
    mean_dx: Vec<f64>,
}

/// Reused per-worker buffers of the exact kernel.
struct ExactScratch {
    c1: Vec<f64>,
    dd: Vec<f64>,
    compact: Compact,
}

/// Per pair of the exact split, one pass over the rows of ΔZ. Z~ is read row by row (a
/// sequential stream); column c of Z~ᵀΔZ gains v·(row i of Z~) for every stored (i, c, v), and
/// ΔZᵀΔZ gains each row's outer product.
struct ExactSink<'b> {
    base: &'b Base,
    inv_s: &'b [f64],
    dyj: &'b [f64],
    dy_mean: f64,
    sc: &'b mut ExactScratch,
    m: Vec<f64>,
    gx: Vec<f64>,
    gyy: Vec<f64>,
    pred: f64,
    med: Mediated,
}

impl RowSink for ExactSink<'_> {
    #[inline(always)]
    fn row<I: Index>(&mut self, i: usize, idx: &[I], val: &[f64]) {
        let d = &self.base.design;
        let k = d.k;
        let zrow = &d.z[i * k..(i + 1) * k];
        let (yc, dyc) = (d.y_c[i], self.dyj[i] - self.dy_mean);
        let (inv_s, b, w_raw) = (self.inv_s, &self.base.b, &self.base.w_raw);
        let mut pi = 0.0;
        for (&c, &raw) in idx.iter().zip(val) {
            let c = c.to_i64() as usize;
            let v = raw * inv_s[c];
            let col = &mut self.sc.c1[c * k..(c + 1) * k];
            col.iter_mut().zip(zrow).for_each(|(o, z)| *o += v * z);
            let drow = &mut self.sc.dd[c * k..(c + 1) * k];
            for (&c2, &v2) in idx.iter().zip(val) {
                let c2 = c2.to_i64() as usize;
                drow[c2] += v * v2 * inv_s[c2];
            }
            self.m[c] += v;
            self.gx[c] += v * yc;
            self.gyy[c] += v * dyc;
            self.pred += v * b[c];
            pi += raw * w_raw[c];
            self.med.mean_dx[c] += self.med.inv_n * raw;
        }
        self.med.predicted[i] = pi;
    }
}

/// One pair of the exact split. Compiled for AVX-512 and AVX2 as well as the baseline and
/// dispatched at run time: the O(nnz·K) accumulations are most of the work.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512dq+avx2+fma", "x86_64+avx2+fma"))]
fn exact_sums<'b>(
    base: &'b Base,
    pair: &PairRows<'_>,
    dyj: &'b [f64],
    inv_s: &'b [f64],
    j: usize,
    sc: &'b mut ExactScratch,
) -> Result<ExactSink<'b>> {
    let d = &base.design;
    let (n, k) = (d.n, d.k);
    let dy_mean = if d.intercept {
        dyj.iter().sum::<f64>() / n as f64
    } else {
        0.0
    };
    sc.c1.iter_mut().for_each(|v| *v = 0.0);
    sc.dd.iter_mut().for_each(|v| *v = 0.0);
    let mut buf = std::mem::take(&mut sc.compact);
    let mut sink = ExactSink {
        base,
        inv_s,
        dyj,
        dy_mean,
        sc,
        m: vec![0.0; k],
        gx: vec![0.0; k],
        gyy: vec![0.0; k],
        pred: 0.0,
        med: Mediated::new(n, k),
    };
    let visited = pair.visit(n, k, &mut sink, &mut buf);
    sink.sc.compact = buf;
    visited.map_err(|bad| non_finite(j, bad))?;
    Ok(sink)
}

/// Solve one pair's perturbed system from its sums: `(A + ΔG) [d_x, d_total] = rhs`.
fn exact_solve(base: &Base, s: ExactSink<'_>, zt_dy: &Mat<f64>, j: usize) -> Result<PairOut> {
    let d = &base.design;
    let (n, k) = (d.n, d.k);
    let nf = n as f64;
    let mut m = s.m;
    if d.intercept {
        m.iter_mut().for_each(|v| *v /= nf);
    } else {
        m.iter_mut().for_each(|v| *v = 0.0);
    }
    let (c1, dd) = (&s.sc.c1, &s.sc.dd);
    // ΔG = Z~ᵀΔZ + ΔZᵀZ~ + ΔZᵀΔZ − n m mᵀ (the centred ΔZ's Gram).
    let dg = Mat::<f64>::from_fn(k, k, |a, b| {
        c1[b * k + a] + c1[a * k + b] + dd[a * k + b] - nf * m[a] * m[b]
    });
    let mut rhs = Mat::<f64>::zeros(k, 2);
    for a in 0..k {
        let dgb: f64 = (0..k).map(|b| dg[(a, b)] * base.b[b]).sum();
        let rx = s.gx[a] - dgb;
        rhs[(a, 0)] = rx;
        rhs[(a, 1)] = rx + zt_dy[(a, j)] + s.gyy[a];
    }
    let ax = Mat::<f64>::from_fn(k, k, |a, b| base.a[(a, b)] + dg[(a, b)]);
    let solver = SpdSolver::new(ax.as_ref()).map_err(|e| match e {
        CoreError::Solver { why } => CoreError::Solver {
            why: format!("pair {j}: {why}"),
        },
        other => other,
    })?;
    solver.solve_in_place(rhs.as_mut());
    Ok(PairOut {
        d_x: (0..k).map(|a| rhs[(a, 0)]).collect(),
        d_t: (0..k).map(|a| rhs[(a, 1)]).collect(),
        pred: s.pred / nf,
        kind: solver.kind(),
        predicted: s.med.predicted,
        mean_dx: s.med.mean_dx,
    })
}

fn exact(
    base: &Base,
    pairs: &[PairRows<'_>],
    dy: &[f64],
    inv_s: &[f64],
    zt_dy: &Mat<f64>,
    d_y: &Mat<f64>,
) -> Result<Split> {
    let d = &base.design;
    let (n, k, p) = (d.n, d.k, pairs.len());
    let outs: Vec<Result<PairOut>> = (0..p)
        .into_par_iter()
        .map_init(
            || ExactScratch {
                c1: vec![0.0; k * k],
                dd: vec![0.0; k * k],
                compact: Compact::default(),
            },
            |sc, j| {
                let dyj = &dy[j * n..(j + 1) * n];
                let sums = exact_sums(base, &pairs[j], dyj, inv_s, j, sc)?;
                exact_solve(base, sums, zt_dy, j)
            },
        )
        .collect();
    let mut split = Split {
        n_pairs: p,
        k,
        d_total: Vec::with_capacity(p * k),
        d_x: Vec::with_capacity(p * k),
        d_y: to_rows(d_y),
        pred_dy: Vec::with_capacity(p),
        n_fallback: 0,
        predicted: Vec::with_capacity(p * n),
        mean_dx: Vec::with_capacity(p * k),
    };
    for o in outs {
        let o = o?;
        split.d_x.extend(o.d_x);
        split.d_total.extend(o.d_t);
        split.pred_dy.push(o.pred);
        split.n_fallback += (o.kind == SolverKind::EighPinv) as usize;
        split.predicted.extend(o.predicted);
        split.mean_dx.extend(o.mean_dx);
    }
    Ok(split)
}
