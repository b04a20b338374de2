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

use crate::error::{check_finite, CoreError, Result};
use crate::linalg::{at_b, SolverKind, SpdSolver};
use crate::matrix::{Csr, Index, Matrix};
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
        Ok(Self {
            design,
            b,
            r,
            a,
            solver,
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
    let d = &base.design;
    let (n, k) = (d.n, d.k);
    if dx.ncols != k {
        return Err(CoreError::shape(
            "dX",
            format!("{k} columns"),
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
    let p = dx.nrows / n;
    if dy.len() != p * n {
        return Err(CoreError::shape(
            "dy",
            format!("{p} pairs x {n} probes = {} values", p * n),
            format!("{} values", dy.len()),
        ));
    }
    check_finite("dy", dy, n)?;
    if p == 0 {
        return Ok(Split {
            n_pairs: 0,
            k,
            d_total: vec![],
            d_x: vec![],
            d_y: vec![],
            pred_dy: vec![],
            n_fallback: 0,
        });
    }
    let inv_s: Vec<f64> = d.scale.iter().map(|s| 1.0 / s).collect();
    let dy_mat = MatRef::from_column_major_slice(dy, n, p);
    // Z~ᵀΔy for every pair at once (centring Δy is unnecessary: Z~ is centred).
    let zt_dy = at_b(d.zref(), dy_mat, par);
    let mut d_y = zt_dy.clone();
    base.solver.solve_in_place(d_y.as_mut());

    let split = match method {
        Method::FirstOrder => first_order(base, dx, &inv_s, &d_y, p, par),
        Method::Exact => exact(base, dx, dy, &inv_s, &zt_dy, &d_y, p),
    }?;
    Ok(split)
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

/// `w = ΔZ β` and `q = ΔZᵀ r` for one pair, dispatched to the widest SIMD the CPU has.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512dq+avx2+fma", "x86_64+avx2+fma"))]
fn first_order_pair<I: Index>(
    base: &Base,
    rows: &Csr<'_, I>,
    inv_s: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (n, k) = (base.design.n, base.design.k);
    let mut w = vec![0.0; n];
    let mut q = vec![0.0; k];
    for (i, wi) in w.iter_mut().enumerate() {
        let (idx, val) = rows.row(i);
        let ri = base.r[i];
        for (&c, &v) in idx.iter().zip(val) {
            let c = c.to_i64() as usize;
            let z = v * inv_s[c];
            *wi += z * base.b[c];
            q[c] += z * ri;
        }
    }
    (w, q)
}

fn first_order<I: Index>(
    base: &Base,
    dx: &Csr<'_, I>,
    inv_s: &[f64],
    d_y: &Mat<f64>,
    p: usize,
    par: Par,
) -> Result<Split> {
    let d = &base.design;
    let (n, k) = (d.n, d.k);
    // Per pair: w = ΔZ β (length n) and q = ΔZᵀ r (length K), both O(nnz).
    let per_pair: Vec<(Vec<f64>, Vec<f64>)> = (0..p)
        .into_par_iter()
        .map(|j| first_order_pair(base, &dx.slice_rows(j * n, (j + 1) * n), inv_s))
        .collect();
    let mut w_mat = Mat::<f64>::zeros(n, p);
    for (j, (w, _)) in per_pair.iter().enumerate() {
        for i in 0..n {
            w_mat[(i, j)] = w[i];
        }
    }
    let zt_w = at_b(d.zref(), w_mat.as_ref(), par);
    let mut rhs = Mat::<f64>::from_fn(k, p, |i, j| per_pair[j].1[i] - zt_w[(i, j)]);
    base.solver.solve_in_place(rhs.as_mut());
    let d_x = to_rows(&rhs);
    let d_y_rows = to_rows(d_y);
    let d_total = d_x.iter().zip(&d_y_rows).map(|(a, b)| a + b).collect();
    let pred_dy = per_pair
        .iter()
        .map(|(w, _)| w.iter().sum::<f64>() / n as f64)
        .collect();
    Ok(Split {
        n_pairs: p,
        k,
        d_total,
        d_x,
        d_y: d_y_rows,
        pred_dy,
        n_fallback: 0,
    })
}

struct PairOut {
    d_x: Vec<f64>,
    d_t: Vec<f64>,
    pred: f64,
    kind: SolverKind,
}

/// Reused per-worker buffers of the exact kernel.
struct ExactScratch {
    c1: Vec<f64>,
    dd: Vec<f64>,
}

/// One pair of the exact split. Compiled for AVX-512 and AVX2 as well as the baseline and
/// dispatched at run time: the O(nnz·K) accumulations are most of the work.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512dq+avx2+fma", "x86_64+avx2+fma"))]
fn exact_pair<I: Index>(
    base: &Base,
    rows: &Csr<'_, I>,
    dyj: &[f64],
    inv_s: &[f64],
    zt_dy: &Mat<f64>,
    j: usize,
    sc: &mut ExactScratch,
) -> Result<PairOut> {
    let d = &base.design;
    let (n, k) = (d.n, d.k);
    let nf = n as f64;
    let dy_mean = if d.intercept {
        dyj.iter().sum::<f64>() / nf
    } else {
        0.0
    };
    let mut m = vec![0.0; k];
    let mut gx = vec![0.0; k];
    let mut gyy = vec![0.0; k];
    let mut pred = 0.0;
    // One pass over the rows of ΔZ. Z~ is read row by row (a sequential stream); column c of
    // Z~ᵀΔZ gains v·(row i of Z~) for every stored (i, c, v), and ΔZᵀΔZ gains each row's
    // outer product.
    sc.c1.iter_mut().for_each(|v| *v = 0.0);
    sc.dd.iter_mut().for_each(|v| *v = 0.0);
    for i in 0..n {
        let (idx, val) = rows.row(i);
        if idx.is_empty() {
            continue;
        }
        let zrow = &d.z[i * k..(i + 1) * k];
        let (yc, dyc) = (d.y_c[i], dyj[i] - dy_mean);
        for (&c, &v) in idx.iter().zip(val) {
            let c = c.to_i64() as usize;
            let v = v * inv_s[c];
            let col = &mut sc.c1[c * k..(c + 1) * k];
            col.iter_mut().zip(zrow).for_each(|(o, z)| *o += v * z);
            let drow = &mut sc.dd[c * k..(c + 1) * k];
            for (&c2, &v2) in idx.iter().zip(val) {
                let c2 = c2.to_i64() as usize;
                drow[c2] += v * v2 * inv_s[c2];
            }
            m[c] += v;
            gx[c] += v * yc;
            gyy[c] += v * dyc;
            pred += v * base.b[c];
        }
    }
    if d.intercept {
        m.iter_mut().for_each(|v| *v /= nf);
    } else {
        m.iter_mut().for_each(|v| *v = 0.0);
    }
    let (c1, dd) = (&sc.c1, &sc.dd);
    // ΔG = Z~ᵀΔZ + ΔZᵀZ~ + ΔZᵀΔZ − n m mᵀ (the centred ΔZ's Gram).
    let dg = Mat::<f64>::from_fn(k, k, |a, b| {
        c1[b * k + a] + c1[a * k + b] + dd[a * k + b] - nf * m[a] * m[b]
    });
    let mut rhs = Mat::<f64>::zeros(k, 2);
    for a in 0..k {
        let dgb: f64 = (0..k).map(|b| dg[(a, b)] * base.b[b]).sum();
        let rx = gx[a] - dgb;
        rhs[(a, 0)] = rx;
        rhs[(a, 1)] = rx + zt_dy[(a, j)] + gyy[a];
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
        pred: pred / nf,
        kind: solver.kind(),
    })
}

#[allow(clippy::too_many_arguments)]
fn exact<I: Index>(
    base: &Base,
    dx: &Csr<'_, I>,
    dy: &[f64],
    inv_s: &[f64],
    zt_dy: &Mat<f64>,
    d_y: &Mat<f64>,
    p: usize,
) -> Result<Split> {
    let d = &base.design;
    let (n, k) = (d.n, d.k);
    let outs: Vec<Result<PairOut>> = (0..p)
        .into_par_iter()
        .map_init(
            || ExactScratch {
                c1: vec![0.0; k * k],
                dd: vec![0.0; k * k],
            },
            |sc, j| {
                let rows = dx.slice_rows(j * n, (j + 1) * n);
                let dyj = &dy[j * n..(j + 1) * n];
                exact_pair(base, &rows, dyj, inv_s, zt_dy, j, sc)
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
    };
    for o in outs {
        let o = o?;
        split.d_x.extend(o.d_x);
        split.d_total.extend(o.d_t);
        split.pred_dy.push(o.pred);
        split.n_fallback += (o.kind == SolverKind::EighPinv) as usize;
    }
    Ok(split)
}
