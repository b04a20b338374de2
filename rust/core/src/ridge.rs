//! The symbolic policy: closed-form ridge over the selected SAE features,
//! `argmin_{b0,b} ||y - b0 - Z b||^2 + lam ||b||^2` with `Z = X / s`.
//!
//! The scales `s` are fixed at the base fit (population std per column, 1 for constant
//! columns, or all 1 without standardization). With an intercept the problem is solved on the
//! centred design `Z~`, `y~` and `b0 = mean(y) - mean(Z) b`. `lam` is given or chosen by
//! generalized cross-validation from one eigendecomposition.

use faer::{Mat, MatRef, Par};

use crate::error::{CoreError, Result};
use crate::linalg::{at_b, SolverKind, SpdSolver};
use crate::matrix::{check_vec, Matrix};
use crate::stats::pow2_unit;

/// How lambda is chosen.
#[derive(Debug, Clone)]
pub enum Lam {
    Fixed(f64),
    /// GCV over the given grid, or over the default grid when `None`.
    Gcv(Option<Vec<f64>>),
}

#[derive(Debug, Clone)]
pub struct FitOptions {
    pub lam: Lam,
    pub intercept: bool,
    pub standardize: bool,
}

/// Number of points and span of the default GCV grid, relative to the mean eigenvalue of
/// `Z~ᵀ Z~` (so the grid follows the data's scale).
pub const GCV_GRID_POINTS: usize = 25;
pub const GCV_GRID_LO: f64 = 1e-6;
pub const GCV_GRID_HI: f64 = 1e3;

#[derive(Debug, Clone)]
pub struct Policy {
    /// Coefficients on the scaled features `Z = X / s` (the policy's own units).
    pub coef: Vec<f64>,
    pub intercept: f64,
    pub lam: f64,
    pub scale: Vec<f64>,
    pub fit_intercept: bool,
    pub solver: SolverKind,
    /// Whether the fit was solved in the dual (n < K).
    pub dual: bool,
    /// Effective degrees of freedom of the penalized part at `lam`.
    pub df: f64,
    pub gcv_grid: Vec<f64>,
    pub gcv_score: Vec<f64>,
}

/// The scaled (and, with an intercept, centred) design, shared by fitting and decomposition.
pub struct Design {
    pub n: usize,
    pub k: usize,
    /// Row-major `n x k`: `Z~ = X / s - mean` (centred only with an intercept).
    pub z: Vec<f64>,
    pub z_mean: Vec<f64>,
    pub y_c: Vec<f64>,
    pub y_mean: f64,
    pub scale: Vec<f64>,
    pub intercept: bool,
}

impl Design {
    /// `scale`: fixed scales (from an existing policy) or `None` to derive them.
    pub fn new(
        x: &Matrix<'_>,
        y: &[f64],
        scale: Option<&[f64]>,
        standardize: bool,
        intercept: bool,
    ) -> Result<Self> {
        let (n, k) = (x.nrows(), x.ncols());
        if n == 0 {
            return Err(CoreError::empty("X", "no probes (rows)"));
        }
        if k == 0 {
            return Err(CoreError::empty("X", "no features (columns)"));
        }
        check_vec("y", y, n)?;
        let mut z = x.to_dense("X")?;
        let scale = match scale {
            Some(s) => {
                if s.len() != k {
                    return Err(CoreError::shape("scale", format!("length {k}"), s.len()));
                }
                if let Some(j) = s.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
                    return Err(CoreError::value(
                        "scale",
                        format!("scale[{j}] = {} must be finite and positive", s[j]),
                    ));
                }
                s.to_vec()
            }
            None if standardize => column_std(&z, n, k),
            None => vec![1.0; k],
        };
        for row in z.chunks_exact_mut(k) {
            row.iter_mut().zip(&scale).for_each(|(v, s)| *v /= s);
        }
        let mut z_mean = vec![0.0; k];
        let mut y_mean = 0.0;
        let mut y_c = y.to_vec();
        if intercept {
            z_mean = column_mean(&z, n, k);
            for row in z.chunks_exact_mut(k) {
                row.iter_mut().zip(&z_mean).for_each(|(v, m)| *v -= m);
            }
            // A column constant up to rounding carries nothing once centred: make it exactly
            // zero so its rounding residue cannot steer the default GCV grid or the solve.
            let spread = column_rms(&z, n, k);
            for j in 0..k {
                if is_constant(spread[j], z_mean[j]) {
                    z.iter_mut().skip(j).step_by(k).for_each(|v| *v = 0.0);
                }
            }
            y_mean = y.iter().sum::<f64>() / n as f64;
            y_c.iter_mut().for_each(|v| *v -= y_mean);
        }
        Ok(Self {
            n,
            k,
            z,
            z_mean,
            y_c,
            y_mean,
            scale,
            intercept,
        })
    }

    pub fn zref(&self) -> MatRef<'_, f64> {
        MatRef::from_row_major_slice(&self.z, self.n, self.k)
    }

    /// `Z~ᵀ Z~` (column-major k x k).
    pub fn gram(&self, par: Par) -> Mat<f64> {
        let g = at_b(self.zref(), self.zref(), par);
        symmetrize(g)
    }

    /// `Z~ᵀ v` for a length-n vector.
    pub fn zt_vec(&self, v: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; self.k];
        for (row, &vi) in self.z.chunks_exact(self.k).zip(v) {
            if vi != 0.0 {
                out.iter_mut().zip(row).for_each(|(o, z)| *o += vi * z);
            }
        }
        out
    }
}

fn column_mean(z: &[f64], n: usize, k: usize) -> Vec<f64> {
    let mut m = vec![0.0; k];
    for row in z.chunks_exact(k) {
        m.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
    m.iter_mut().for_each(|v| *v /= n as f64);
    m
}

/// Largest |z| per column, as the exact power-of-two unit its squares are summed in.
fn column_units(z: &[f64], k: usize) -> Vec<f64> {
    let mut m = vec![0.0f64; k];
    for row in z.chunks_exact(k) {
        m.iter_mut().zip(row).for_each(|(a, b)| *a = a.max(b.abs()));
    }
    m.into_iter().map(pow2_unit).collect()
}

fn column_rms(z: &[f64], n: usize, k: usize) -> Vec<f64> {
    let unit = column_units(z, k);
    let mut ss = vec![0.0; k];
    for row in z.chunks_exact(k) {
        for j in 0..k {
            let d = row[j] / unit[j];
            ss[j] += d * d;
        }
    }
    ss.iter()
        .zip(&unit)
        .map(|(s, u)| (s / n as f64).sqrt() * u)
        .collect()
}

/// A spread at the rounding level of the column's mean (or exactly zero) means constant.
pub(crate) fn is_constant(sd: f64, mean: f64) -> bool {
    !(sd > 0.0 && sd > 1e-12 * mean.abs() && sd.is_finite())
}

/// Population std per column (two-pass); 1 for a constant column so it stays as it is.
pub fn column_std(z: &[f64], n: usize, k: usize) -> Vec<f64> {
    let m = column_mean(z, n, k);
    let unit = column_units(z, k);
    let mut ss = vec![0.0; k];
    for row in z.chunks_exact(k) {
        for j in 0..k {
            let d = (row[j] - m[j]) / unit[j];
            ss[j] += d * d;
        }
    }
    ss.iter()
        .zip(&m)
        .zip(&unit)
        .map(|((s, mj), u)| {
            let sd = (s / n as f64).sqrt() * u;
            if is_constant(sd, *mj) {
                1.0
            } else {
                sd
            }
        })
        .collect()
}

fn symmetrize(mut g: Mat<f64>) -> Mat<f64> {
    let k = g.nrows();
    for j in 0..k {
        for i in j + 1..k {
            let v = 0.5 * (g[(i, j)] + g[(j, i)]);
            g[(i, j)] = v;
            g[(j, i)] = v;
        }
    }
    g
}

pub fn add_ridge(g: &Mat<f64>, lam: f64) -> Mat<f64> {
    let mut a = g.clone();
    for i in 0..a.nrows() {
        a[(i, i)] += lam;
    }
    a
}

fn check_lam(lam: f64) -> Result<()> {
    check_lam_named("lam", lam)
}

fn check_lam_named(field: &str, lam: f64) -> Result<()> {
    if !lam.is_finite() || lam < 0.0 {
        return Err(CoreError::value(
            field,
            format!("{lam} is not a finite non-negative number"),
        ));
    }
    Ok(())
}

/// Default GCV grid: log-spaced, relative to the mean eigenvalue of the Gram matrix.
pub fn default_grid(trace_over_k: f64) -> Vec<f64> {
    let t = if trace_over_k > 0.0 && trace_over_k.is_finite() {
        trace_over_k
    } else {
        1.0
    };
    let (lo, hi) = (GCV_GRID_LO.ln(), GCV_GRID_HI.ln());
    (0..GCV_GRID_POINTS)
        .map(|i| t * (lo + (hi - lo) * i as f64 / (GCV_GRID_POINTS - 1) as f64).exp())
        .collect()
}

/// Squared singular values of Z~ kept as non-zero, the squared coordinates of y~ on their
/// left singular vectors, and the part of |y~|² outside them.
type Spectrum = (Vec<f64>, Vec<f64>, f64);

/// Below this ratio of smallest to largest kept eigenvalue of Z~ᵀZ~ (κ(Z~) > 1e4), the Gram
/// route would lose the small singular values: the SVD is used instead.
const GRAM_EIG_RATIO_MIN: f64 = 1e-8;

/// The spectrum from the K x K eigendecomposition of Z~ᵀZ~ (cheap when n >> K), or `None`
/// when n < K or the design is too ill-conditioned for it to be accurate.
fn spectrum_from_gram(d: &Design, par: Par) -> Result<Option<Spectrum>> {
    if d.n < d.k {
        return Ok(None);
    }
    let g = d.gram(par);
    let evd = g
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| CoreError::Solver {
            why: format!("eigendecomposition for GCV did not converge: {e:?}"),
        })?;
    let (v, s) = (evd.U(), evd.S().column_vector());
    let wmax = (0..d.k).map(|i| s[i]).fold(0.0, f64::max);
    let tol = wmax * (d.n.max(d.k) as f64) * f64::EPSILON;
    let kept: Vec<usize> = (0..d.k).filter(|&i| s[i] > tol).collect();
    if kept.iter().any(|&i| s[i] < GRAM_EIG_RATIO_MIN * wmax) {
        return Ok(None);
    }
    let zy = d.zt_vec(&d.y_c);
    let (mut w, mut a2) = (vec![], vec![]);
    let mut b_ols = vec![0.0; d.k];
    for &i in &kept {
        // c = v_iᵀ Z~ᵀ y~ = s_i (u_iᵀ y~): a_i² = c² / w_i.
        let c: f64 = (0..d.k).map(|r| v[(r, i)] * zy[r]).sum();
        w.push(s[i]);
        a2.push(c * c / s[i]);
        for r in 0..d.k {
            b_ols[r] += v[(r, i)] * c / s[i];
        }
    }
    // The residual outside the column space, computed explicitly (no |y|² − |fit|² cancellation).
    let rest: f64 =
        d.z.chunks_exact(d.k)
            .zip(&d.y_c)
            .map(|(row, yi)| {
                let e = yi - row.iter().zip(&b_ols).map(|(z, b)| z * b).sum::<f64>();
                e * e
            })
            .sum();
    Ok(Some((w, a2, rest)))
}

/// The spectrum from the thin SVD Z~ = U S Vᵀ: accurate for any conditioning.
fn spectrum_from_svd(d: &Design) -> Result<Spectrum> {
    let svd = d.zref().thin_svd().map_err(|e| CoreError::Solver {
        why: format!("SVD for GCV did not converge: {e:?}"),
    })?;
    let (u, s) = (svd.U(), svd.S().column_vector());
    let r = s.nrows();
    let smax = (0..r).map(|i| s[i]).fold(0.0, f64::max);
    let tol = smax * smax * (d.n.max(d.k) as f64) * f64::EPSILON;
    let mut fitted = vec![0.0; d.n];
    let (mut w, mut a2) = (vec![], vec![]);
    for i in 0..r {
        let wi = s[i] * s[i];
        if wi > tol {
            let a: f64 = (0..d.n).map(|row| u[(row, i)] * d.y_c[row]).sum();
            w.push(wi);
            a2.push(a * a);
            fitted
                .iter_mut()
                .enumerate()
                .for_each(|(row, f)| *f += a * u[(row, i)]);
        }
    }
    let rest: f64 = d
        .y_c
        .iter()
        .zip(&fitted)
        .map(|(y, f)| (y - f) * (y - f))
        .sum();
    Ok((w, a2, rest))
}

/// GCV(lam) = n * RSS(lam) / (n - df(lam) - [intercept])^2 for every lam of the grid, from one
/// spectral factorization of the centred design (see [`spectrum_from_gram`]).
/// Returns (scores, df per lam). Scores are +inf where the denominator vanishes.
pub fn gcv_curve(d: &Design, grid: &[f64], par: Par) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = d.n as f64;
    let lost = if d.intercept { 1.0 } else { 0.0 };
    // Kept eigenvalues w_i of the Gram (or kernel) matrix, the squared coordinates a_i^2 of y~
    // on the matching left singular vectors, and `rest`, the part of |y~|^2 outside them.
    // RSS(lam) = rest + sum (lam / (w_i + lam))^2 a_i^2 then has no cancellation, even when
    // the fit is nearly exact (n close to df), where |y~|^2 - |fitted|^2 would lose it all.
    let (w, a2, rest) = match spectrum_from_gram(d, par)? {
        Some(spec) => spec,
        None => spectrum_from_svd(d)?,
    };
    let mut scores = Vec::with_capacity(grid.len());
    let mut dfs = Vec::with_capacity(grid.len());
    for &lam in grid {
        check_lam_named("lam_grid", lam)?;
        let mut df = 0.0;
        let mut rss = rest;
        for (&wi, &ai2) in w.iter().zip(&a2) {
            df += wi / (wi + lam);
            let f = lam / (wi + lam);
            rss += f * f * ai2;
        }
        let denom = n - df - lost;
        scores.push(if denom > 1e-12 * n {
            n * rss / (denom * denom)
        } else {
            f64::INFINITY
        });
        dfs.push(df);
    }
    Ok((scores, dfs))
}

/// Fit the policy on dense or CSR `x` (n x k) and `y`.
pub fn fit(x: &Matrix<'_>, y: &[f64], opts: &FitOptions, par: Par) -> Result<Policy> {
    let d = Design::new(x, y, None, opts.standardize, opts.intercept)?;
    fit_design(&d, opts, par)
}

pub fn fit_design(d: &Design, opts: &FitOptions, par: Par) -> Result<Policy> {
    let (lam, gcv_grid, gcv_score, df) = match &opts.lam {
        Lam::Fixed(l) => {
            check_lam(*l)?;
            (*l, vec![], vec![], None)
        }
        Lam::Gcv(grid) => {
            let grid = match grid {
                Some(g) if g.is_empty() => {
                    return Err(CoreError::empty(
                        "lam_grid",
                        "GCV needs at least one lambda",
                    ))
                }
                Some(g) => g.clone(),
                None => {
                    let tr: f64 = d.z.iter().map(|v| v * v).sum::<f64>() / d.k as f64;
                    default_grid(tr)
                }
            };
            let (scores, dfs) = gcv_curve(d, &grid, par)?;
            // Smallest score; ties go to the larger (more regularized) lambda.
            let mut best: Option<usize> = None;
            for i in 0..grid.len() {
                if !scores[i].is_finite() {
                    continue;
                }
                best = match best {
                    None => Some(i),
                    Some(b) if scores[i] < scores[b] => Some(i),
                    Some(b) if scores[i] == scores[b] && grid[i] > grid[b] => Some(i),
                    keep => keep,
                };
            }
            let b = best.ok_or_else(|| {
                CoreError::value(
                    "lam",
                    "GCV is undefined on every grid point (too few probes for the features); \
                     give a fixed lam or more probes",
                )
            })?;
            (grid[b], grid, scores, Some(dfs[b]))
        }
    };
    let (coef, solver, dual) = solve_ridge(d, lam, par)?;
    let intercept = if d.intercept {
        d.y_mean - d.z_mean.iter().zip(&coef).map(|(m, b)| m * b).sum::<f64>()
    } else {
        0.0
    };
    let df = match df {
        Some(df) => df,
        None => effective_df(d, lam, par)?,
    };
    Ok(Policy {
        coef,
        intercept,
        lam,
        scale: d.scale.clone(),
        fit_intercept: d.intercept,
        solver,
        dual,
        df,
        gcv_grid,
        gcv_score,
    })
}

fn effective_df(d: &Design, lam: f64, par: Par) -> Result<f64> {
    Ok(gcv_curve(d, &[lam], par)?.1[0])
}

/// Solve for the penalized coefficients: primal `(Z~ᵀZ~ + lam I) b = Z~ᵀ y~` when n >= k,
/// dual `b = Z~ᵀ (Z~Z~ᵀ + lam I)^-1 y~` otherwise (the cheaper system of the two).
pub fn solve_ridge(d: &Design, lam: f64, par: Par) -> Result<(Vec<f64>, SolverKind, bool)> {
    if d.n >= d.k {
        let a = add_ridge(&d.gram(par), lam);
        let s = SpdSolver::new(a.as_ref())?;
        Ok((s.solve_vec(&d.zt_vec(&d.y_c)), s.kind(), false))
    } else {
        let kn = symmetrize(at_b(d.zref().transpose(), d.zref().transpose(), par));
        let a = add_ridge(&kn, lam);
        let s = SpdSolver::new(a.as_ref())?;
        let alpha = s.solve_vec(&d.y_c);
        Ok((d.zt_vec(&alpha), s.kind(), true))
    }
}

impl Policy {
    /// `b0 + (X / s) b` for dense row-major or CSR `x`.
    pub fn predict(&self, x: &Matrix<'_>) -> Result<Vec<f64>> {
        let k = self.coef.len();
        if x.ncols() != k {
            return Err(CoreError::shape(
                "X",
                format!("{k} columns"),
                format!("{} columns", x.ncols()),
            ));
        }
        let w: Vec<f64> = self
            .coef
            .iter()
            .zip(&self.scale)
            .map(|(b, s)| b / s)
            .collect();
        let mut out = vec![self.intercept; x.nrows()];
        match x {
            Matrix::Dense(dm) => {
                for (r, o) in out.iter_mut().enumerate() {
                    *o += dm.row(r).iter().zip(&w).map(|(a, b)| a * b).sum::<f64>();
                }
            }
            Matrix::Csr(c) => {
                for (r, o) in out.iter_mut().enumerate() {
                    let (idx, val) = c.row(r);
                    *o += idx
                        .iter()
                        .zip(val)
                        .map(|(&j, v)| v * w[j as usize])
                        .sum::<f64>();
                }
            }
        }
        Ok(out)
    }
}
