//! Symmetric positive (semi-)definite solves on faer, with the documented fallback:
//! Cholesky while the system is numerically positive definite, otherwise a symmetric
//! eigendecomposition whose near-zero eigenvalues are dropped (the minimum-norm solution).

use faer::linalg::solvers::Solve;
use faer::{Mat, MatMut, MatRef, Par, Side};

use crate::error::{CoreError, Result};

/// Below this squared ratio of Cholesky pivots the factorization is not trusted.
pub const PIVOT_RATIO_MIN: f64 = 1e-13;

/// Which factorization solved a system; reported on the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverKind {
    Cholesky,
    /// Eigendecomposition pseudo-inverse: the design was rank-deficient at this lambda.
    EighPinv,
}

impl SolverKind {
    pub fn name(&self) -> &'static str {
        match self {
            SolverKind::Cholesky => "cholesky",
            SolverKind::EighPinv => "eigh-pinv",
        }
    }
}

pub enum SpdSolver {
    Llt(faer::linalg::solvers::Llt<f64>),
    Eigh { u: Mat<f64>, inv_w: Vec<f64> },
}

impl SpdSolver {
    /// Factor the symmetric matrix `a` (only its lower triangle is read by Cholesky).
    pub fn new(a: MatRef<'_, f64>) -> Result<Self> {
        let k = a.nrows();
        for j in 0..k {
            for i in 0..k {
                if !a[(i, j)].is_finite() {
                    return Err(CoreError::Solver {
                        why: "the normal equations hold a non-finite value; the inputs overflow \
                              float64 (rescale X or y)"
                            .into(),
                    });
                }
            }
        }
        if let Ok(llt) = a.llt(Side::Lower) {
            let l = llt.L();
            let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
            for i in 0..k {
                let d = l[(i, i)].abs();
                lo = lo.min(d);
                hi = hi.max(d);
            }
            if k == 0 || (hi > 0.0 && (lo / hi).powi(2) > PIVOT_RATIO_MIN) {
                return Ok(SpdSolver::Llt(llt));
            }
        }
        let evd = a
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| CoreError::Solver {
                why: format!("symmetric eigendecomposition did not converge: {e:?}"),
            })?;
        let s = evd.S().column_vector();
        let wmax = (0..k).map(|i| s[i].abs()).fold(0.0f64, f64::max);
        let tol = wmax * (k.max(1) as f64) * f64::EPSILON;
        let inv_w = (0..k)
            .map(|i| if s[i] > tol { 1.0 / s[i] } else { 0.0 })
            .collect();
        Ok(SpdSolver::Eigh {
            u: evd.U().to_owned(),
            inv_w,
        })
    }

    pub fn kind(&self) -> SolverKind {
        match self {
            SpdSolver::Llt(_) => SolverKind::Cholesky,
            SpdSolver::Eigh { .. } => SolverKind::EighPinv,
        }
    }

    /// Overwrite each column of `rhs` with the solution.
    pub fn solve_in_place(&self, mut rhs: MatMut<'_, f64>) {
        match self {
            SpdSolver::Llt(llt) => llt.solve_in_place(rhs.as_mut()),
            SpdSolver::Eigh { u, inv_w } => {
                let mut t = Mat::<f64>::zeros(u.ncols(), rhs.ncols());
                faer::linalg::matmul::matmul(
                    t.as_mut(),
                    faer::Accum::Replace,
                    u.transpose(),
                    rhs.as_ref(),
                    1.0,
                    Par::Seq,
                );
                for j in 0..t.ncols() {
                    for i in 0..t.nrows() {
                        t[(i, j)] *= inv_w[i];
                    }
                }
                faer::linalg::matmul::matmul(
                    rhs.as_mut(),
                    faer::Accum::Replace,
                    u.as_ref(),
                    t.as_ref(),
                    1.0,
                    Par::Seq,
                );
            }
        }
    }

    pub fn solve_vec(&self, v: &[f64]) -> Vec<f64> {
        let mut m = Mat::<f64>::from_fn(v.len(), 1, |i, _| v[i]);
        self.solve_in_place(m.as_mut());
        (0..v.len()).map(|i| m[(i, 0)]).collect()
    }
}

/// `out = aᵀ b` for row-major `a` (n x p) and `b` (n x q), column-major `out` (p x q).
pub fn at_b(a: MatRef<'_, f64>, b: MatRef<'_, f64>, par: Par) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.ncols(), b.ncols());
    faer::linalg::matmul::matmul(
        out.as_mut(),
        faer::Accum::Replace,
        a.transpose(),
        b,
        1.0,
        par,
    );
    out
}

/// More worker threads than this is a mistake, not a configuration.
pub const MAX_THREADS: usize = 1024;

/// A private Rayon pool of `threads` workers (0 = all cores) and the matching faer `Par`.
///
/// A fresh pool per call keeps the core usable after `fork()` (Rayon's global pool is not
/// fork-safe: PyTorch DataLoader workers fork) and honours the caller's thread budget.
pub fn pool(threads: usize) -> Result<(rayon::ThreadPool, Par)> {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    if n > MAX_THREADS {
        return Err(CoreError::value(
            "threads",
            format!("{n} threads is more than the {MAX_THREADS} the core will start; use 0 for all cores"),
        ));
    }
    // faer's own default would reach for the global pool; every call here passes `Par` explicitly.
    faer::set_global_parallelism(Par::Seq);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| CoreError::value("threads", format!("cannot start {n} threads: {e}")))?;
    let par = if n > 1 { Par::rayon(n) } else { Par::Seq };
    Ok((pool, par))
}

/// Run `f` on a fresh private pool (see [`pool`]).
pub fn with_pool<T: Send>(threads: usize, f: impl FnOnce(Par) -> T + Send) -> Result<T> {
    let (pool, par) = pool(threads)?;
    Ok(pool.install(|| f(par)))
}
