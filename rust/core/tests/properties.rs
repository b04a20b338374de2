//! Property tests of `policytrace-core` against a naive dense reference written here.
//!
//! 1. `ridge::fit` and the exact / first-order decomposition against hand-written normal
//!    equations (Gaussian elimination), literal refits and finite differences.
//! 2. Fuzzing of every entry point with malformed input: it must return `Ok` or a `CoreError`,
//!    never panic; plus the exact error variant for targeted cases.
//! 3. Degenerate designs: constant / duplicate columns, all-zero rows, n < K, lam = 0 with
//!    duplicate columns (eigh fallback, minimum-norm solution), huge and tiny magnitudes.
//! 4. Determinism: 1 vs 2 threads give bit-identical statistics and decompositions.
//! 5. `feature_stats` against naive column statistics on sparse input with stored zeros.
//!
//! Case counts are moderate; raise them with `PROPTEST_CASES=...` for a longer soak.
//! Run with `cargo test -p policytrace-core --release`.

#![allow(
    clippy::too_many_arguments,
    clippy::neg_cmp_op_on_partial_ord,
    clippy::needless_range_loop
)]

use std::panic::{catch_unwind, AssertUnwindSafe};

use faer::Par;
use policytrace_core::ridge::{self, Design};
use policytrace_core::{
    decompose, feature_stats, interference, with_pool, Base, CoreError, Csr, Dense, FitOptions,
    Lam, Matrix, Method, Policy, SolverKind, Split, NO_GROUP,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------------
// Configuration and small helpers
// ---------------------------------------------------------------------------------------------

/// `cases` unless `PROPTEST_CASES` is set; no regression files are written into the source tree.
fn cfg(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var("PROPTEST_CASES").is_err() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// `|got - want|_inf <= rel * max(scale, floor)` where `scale` defaults to `|want|_inf`.
fn close(
    what: &str,
    got: &[f64],
    want: &[f64],
    rel: f64,
    scale: Option<f64>,
) -> Result<(), TestCaseError> {
    if got.len() != want.len() {
        return Err(TestCaseError::fail(format!(
            "{what}: length {} vs expected {}",
            got.len(),
            want.len()
        )));
    }
    let s = scale.unwrap_or_else(|| max_abs(want)).max(1e-300);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if !(err <= rel * s) {
            return Err(TestCaseError::fail(format!(
                "{what}[{i}]: got {g:e}, expected {w:e} (|err| {err:e} > {rel:e} * {s:e})\n got  {got:?}\n want {want:?}"
            )));
        }
    }
    Ok(())
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Run `f`, turning a panic into a test failure that names the call.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        TestCaseError::fail(format!("{what} panicked: {msg}"))
    })
}

fn opts(lam: Lam, intercept: bool, standardize: bool) -> FitOptions {
    FitOptions {
        lam,
        intercept,
        standardize,
    }
}

// ---------------------------------------------------------------------------------------------
// Owned CSR
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct OwnedCsr {
    nrows: usize,
    ncols: usize,
    indptr: Vec<i64>,
    indices: Vec<i64>,
    data: Vec<f64>,
}

impl OwnedCsr {
    /// Store every non-zero, and the zeros whose `store_zero` flag is set (explicit zeros).
    fn from_dense(nrows: usize, ncols: usize, x: &[f64], store_zero: &[bool]) -> Self {
        let mut indptr = vec![0i64];
        let mut indices = vec![];
        let mut data = vec![];
        for r in 0..nrows {
            for c in 0..ncols {
                let v = x[r * ncols + c];
                if v != 0.0 || store_zero.get(r * ncols + c).copied().unwrap_or(false) {
                    indices.push(c as i64);
                    data.push(v);
                }
            }
            indptr.push(indices.len() as i64);
        }
        Self {
            nrows,
            ncols,
            indptr,
            indices,
            data,
        }
    }
    fn view(&self, field: &str) -> Csr<'_> {
        Csr::<i64>::new(
            field,
            self.nrows,
            self.ncols,
            &self.indptr,
            &self.indices,
            &self.data,
        )
        .expect("test built a valid CSR")
    }
    fn try_view(&self, field: &str) -> policytrace_core::Result<Csr<'_>> {
        Csr::<i64>::new(
            field,
            self.nrows,
            self.ncols,
            &self.indptr,
            &self.indices,
            &self.data,
        )
    }
    fn scaled(&self, f: f64) -> Self {
        let mut s = self.clone();
        s.data.iter_mut().for_each(|v| *v *= f);
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Naive dense reference
// ---------------------------------------------------------------------------------------------

/// Solve `a x = b` (row-major `k x k`) by Gaussian elimination with partial pivoting.
fn gauss_solve(a: &[f64], b: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut m: Vec<f64> = a.to_vec();
    let mut x: Vec<f64> = b.to_vec();
    for col in 0..k {
        let piv =
            (col..k).max_by(|&i, &j| m[i * k + col].abs().total_cmp(&m[j * k + col].abs()))?;
        if m[piv * k + col] == 0.0 {
            return None;
        }
        if piv != col {
            for j in 0..k {
                m.swap(piv * k + j, col * k + j);
            }
            x.swap(piv, col);
        }
        for i in col + 1..k {
            let f = m[i * k + col] / m[col * k + col];
            if f != 0.0 {
                for j in col..k {
                    m[i * k + j] -= f * m[col * k + j];
                }
                x[i] -= f * x[col];
            }
        }
    }
    for i in (0..k).rev() {
        let mut s = x[i];
        for j in i + 1..k {
            s -= m[i * k + j] * x[j];
        }
        x[i] = s / m[i * k + i];
    }
    Some(x)
}

/// Population std per column, 1 for a (numerically) constant column: the documented rule.
fn naive_scale(x: &[f64], n: usize, k: usize, standardize: bool) -> Vec<f64> {
    if !standardize {
        return vec![1.0; k];
    }
    (0..k)
        .map(|j| {
            let m = (0..n).map(|i| x[i * k + j]).sum::<f64>() / n as f64;
            let ss = (0..n).map(|i| (x[i * k + j] - m).powi(2)).sum::<f64>();
            let sd = (ss / n as f64).sqrt();
            if sd > 0.0 && sd > 1e-12 * m.abs() && sd.is_finite() {
                sd
            } else {
                1.0
            }
        })
        .collect()
}

struct NaiveDesign {
    zc: Vec<f64>,
    zmean: Vec<f64>,
    yc: Vec<f64>,
    ymean: f64,
}

fn naive_design(
    x: &[f64],
    n: usize,
    k: usize,
    y: &[f64],
    intercept: bool,
    scale: &[f64],
) -> NaiveDesign {
    let mut z: Vec<f64> = (0..n * k).map(|p| x[p] / scale[p % k]).collect();
    let mut zmean = vec![0.0; k];
    let mut ymean = 0.0;
    let mut yc = y.to_vec();
    if intercept {
        for j in 0..k {
            zmean[j] = (0..n).map(|i| z[i * k + j]).sum::<f64>() / n as f64;
        }
        for i in 0..n {
            for j in 0..k {
                z[i * k + j] -= zmean[j];
            }
        }
        ymean = y.iter().sum::<f64>() / n as f64;
        yc.iter_mut().for_each(|v| *v -= ymean);
    }
    NaiveDesign {
        zc: z,
        zmean,
        yc,
        ymean,
    }
}

/// `Z~ᵀZ~ + lam I` (row-major) for a naive design.
fn naive_normal(d: &NaiveDesign, n: usize, k: usize, lam: f64) -> Vec<f64> {
    let mut a = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            a[i * k + j] = (0..n)
                .map(|r| d.zc[r * k + i] * d.zc[r * k + j])
                .sum::<f64>();
        }
        a[i * k + i] += lam;
    }
    a
}

#[derive(Debug, Clone)]
struct NaiveFit {
    coef: Vec<f64>,
    intercept: f64,
    scale: Vec<f64>,
}

/// Ridge by the normal equations on the scaled (and centred) design.
fn naive_fit(
    x: &[f64],
    n: usize,
    k: usize,
    y: &[f64],
    lam: f64,
    intercept: bool,
    scale: &[f64],
) -> NaiveFit {
    let d = naive_design(x, n, k, y, intercept, scale);
    let a = naive_normal(&d, n, k, lam);
    let g: Vec<f64> = (0..k)
        .map(|j| (0..n).map(|r| d.zc[r * k + j] * d.yc[r]).sum::<f64>())
        .collect();
    let coef = gauss_solve(&a, &g, k).expect("naive normal equations are singular");
    let b0 = if intercept {
        d.ymean - d.zmean.iter().zip(&coef).map(|(m, b)| m * b).sum::<f64>()
    } else {
        0.0
    };
    NaiveFit {
        coef,
        intercept: b0,
        scale: scale.to_vec(),
    }
}

/// GCV score and effective df at `lam` from the hat matrix: df = tr(A⁻¹ Z~ᵀZ~).
fn naive_gcv(
    x: &[f64],
    n: usize,
    k: usize,
    y: &[f64],
    lam: f64,
    intercept: bool,
    scale: &[f64],
) -> (f64, f64) {
    let d = naive_design(x, n, k, y, intercept, scale);
    let a = naive_normal(&d, n, k, lam);
    let mut df = 0.0;
    for j in 0..k {
        // column j of G = A - lam I
        let mut gcol: Vec<f64> = (0..k).map(|i| a[i * k + j]).collect();
        gcol[j] -= lam;
        df += gauss_solve(&a, &gcol, k).unwrap()[j];
    }
    let fit = naive_fit(x, n, k, y, lam, intercept, scale);
    let rss: f64 = (0..n)
        .map(|r| {
            let pred: f64 = (0..k).map(|j| d.zc[r * k + j] * fit.coef[j]).sum();
            (d.yc[r] - pred).powi(2)
        })
        .sum();
    let denom = n as f64 - df - if intercept { 1.0 } else { 0.0 };
    let score = if denom > 1e-12 * n as f64 {
        n as f64 * rss / (denom * denom)
    } else {
        f64::INFINITY
    };
    (score, df)
}

fn naive_predict(x: &[f64], n: usize, k: usize, f: &NaiveFit) -> Vec<f64> {
    (0..n)
        .map(|r| {
            f.intercept
                + (0..k)
                    .map(|j| x[r * k + j] / f.scale[j] * f.coef[j])
                    .sum::<f64>()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn sparse_entry(lo: f64, hi: f64) -> impl Strategy<Value = f64> {
    prop_oneof![3 => lo..hi, 1 => Just(0.0)]
}

#[derive(Debug, Clone)]
struct FitCase {
    n: usize,
    k: usize,
    x: Vec<f64>,
    store_zero: Vec<bool>,
    y: Vec<f64>,
    lam: f64,
    intercept: bool,
    standardize: bool,
    csr: bool,
}

fn fit_case(
    n: std::ops::Range<usize>,
    k: std::ops::Range<usize>,
) -> impl Strategy<Value = FitCase> {
    (n, k).prop_flat_map(|(n, k)| {
        (
            vec(sparse_entry(-3.0, 3.0), n * k),
            vec(any::<bool>(), n * k),
            vec(-3.0..3.0f64, n),
            0.1..10.0f64,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                move |(x, store_zero, y, lam, intercept, standardize, csr)| FitCase {
                    n,
                    k,
                    x,
                    store_zero,
                    y,
                    lam,
                    intercept,
                    standardize,
                    csr,
                },
            )
    })
}

#[derive(Debug, Clone)]
struct DecCase {
    n: usize,
    k: usize,
    p: usize,
    x: Vec<f64>,
    y: Vec<f64>,
    /// `P·n x K` row-major, pair-major.
    dx: Vec<f64>,
    dx_store_zero: Vec<bool>,
    dy: Vec<f64>,
    lam: f64,
    intercept: bool,
    standardize: bool,
}

fn dec_case(lam: std::ops::Range<f64>) -> impl Strategy<Value = DecCase> {
    (3usize..12, 1usize..7, 1usize..4).prop_flat_map(move |(n, k, p)| {
        (
            vec(-3.0..3.0f64, n * k),
            vec(-3.0..3.0f64, n),
            vec(prop_oneof![2 => Just(0.0), 1 => -1.0..1.0f64], p * n * k),
            vec(prop_oneof![5 => Just(false), 1 => Just(true)], p * n * k),
            vec(prop_oneof![1 => Just(0.0), 2 => -1.0..1.0f64], p * n),
            lam.clone(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                move |(x, y, dx, dx_store_zero, dy, lam, intercept, standardize)| DecCase {
                    n,
                    k,
                    p,
                    x,
                    y,
                    dx,
                    dx_store_zero,
                    dy,
                    lam,
                    intercept,
                    standardize,
                },
            )
    })
}

struct Prepared {
    policy: Policy,
    base: Base,
    dx: OwnedCsr,
}

fn prepare(c: &DecCase) -> Prepared {
    let xm = Matrix::Dense(Dense::new("X", c.n, c.k, &c.x).unwrap());
    let policy = ridge::fit(
        &xm,
        &c.y,
        &opts(Lam::Fixed(c.lam), c.intercept, c.standardize),
        Par::Seq,
    )
    .unwrap();
    let base = Base::new(&policy, &xm, &c.y, Par::Seq).unwrap();
    let dx = OwnedCsr::from_dense(c.p * c.n, c.k, &c.dx, &c.dx_store_zero);
    Prepared { policy, base, dx }
}

fn run_decompose(b: &Base, dx: &OwnedCsr, dy: &[f64], m: Method) -> Split {
    decompose(b, &dx.view("dX"), dy, m, Par::Seq).unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Ridge and decomposition against the naive reference
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cfg(192))]

    #[test]
    fn fit_matches_naive_normal_equations(c in fit_case(2..16, 1..8)) {
        let csr = OwnedCsr::from_dense(c.n, c.k, &c.x, &c.store_zero);
        let xm = if c.csr { Matrix::Csr(csr.view("X")) } else { Matrix::Dense(Dense::new("X", c.n, c.k, &c.x).unwrap()) };
        let pol = ridge::fit(&xm, &c.y, &opts(Lam::Fixed(c.lam), c.intercept, c.standardize), Par::Seq).unwrap();
        let scale = naive_scale(&c.x, c.n, c.k, c.standardize);
        let want = naive_fit(&c.x, c.n, c.k, &c.y, c.lam, c.intercept, &scale);
        close("scale", &pol.scale, &scale, 1e-12, None)?;
        close("coef", &pol.coef, &want.coef, 1e-8, Some(max_abs(&want.coef).max(1e-3)))?;
        close("intercept", &[pol.intercept], &[want.intercept], 1e-8, Some(want.intercept.abs().max(1.0)))?;
        prop_assert_eq!(pol.dual, c.n < c.k);
        prop_assert_eq!(pol.solver, SolverKind::Cholesky);
        prop_assert_eq!(pol.fit_intercept, c.intercept);
        prop_assert_eq!(pol.lam, c.lam);
        let (_, df) = naive_gcv(&c.x, c.n, c.k, &c.y, c.lam, c.intercept, &scale);
        close("df", &[pol.df], &[df], 1e-8, Some(1.0))?;
        // The prediction on the training data, both layouts.
        let pred_want = naive_predict(&c.x, c.n, c.k, &want);
        let scale_y = max_abs(&pred_want).max(1.0);
        close("predict(csr)", &pol.predict(&Matrix::Csr(csr.view("X"))).unwrap(), &pred_want, 1e-8, Some(scale_y))?;
        let dm = Matrix::Dense(Dense::new("X", c.n, c.k, &c.x).unwrap());
        close("predict(dense)", &pol.predict(&dm).unwrap(), &pred_want, 1e-8, Some(scale_y))?;
        // The base refit the decomposition builds reproduces the policy.
        let base = Base::new(&pol, &xm, &c.y, Par::Seq).unwrap();
        close("Base.b", &base.b, &want.coef, 1e-8, Some(max_abs(&want.coef).max(1e-3)))?;
    }

    /// GCV: the scores match n·RSS/(n − df − [intercept])² from the hat matrix, and the chosen
    /// lambda is the grid's minimiser, with its coefficients those of a fixed-lambda fit.
    #[test]
    fn gcv_matches_naive(c in fit_case(3..16, 1..8), grid in vec(0.05..50.0f64, 1..6)) {
        let xm = Matrix::Dense(Dense::new("X", c.n, c.k, &c.x).unwrap());
        let pol = ridge::fit(&xm, &c.y, &opts(Lam::Gcv(Some(grid.clone())), c.intercept, c.standardize), Par::Seq);
        let scale = naive_scale(&c.x, c.n, c.k, c.standardize);
        let naive: Vec<(f64, f64)> = grid.iter().map(|&l| naive_gcv(&c.x, c.n, c.k, &c.y, l, c.intercept, &scale)).collect();
        let d = Design::new(&xm, &c.y, None, c.standardize, c.intercept).unwrap();
        let (scores, dfs) = ridge::gcv_curve(&d, &grid, Par::Seq).unwrap();
        let yy: f64 = naive_design(&c.x, c.n, c.k, &c.y, c.intercept, &scale).yc.iter().map(|v| v * v).sum();
        for (i, ((s, df), (ns, ndf))) in scores.iter().zip(&dfs).zip(&naive).enumerate() {
            close(&format!("df[{i}]"), &[*df], &[*ndf], 1e-8, Some(1.0))?;
            if ns.is_finite() && s.is_finite() {
                let denom = c.n as f64 - ndf - if c.intercept { 1.0 } else { 0.0 };
                let sc = c.n as f64 * yy.max(1e-12) / (denom * denom);
                close(&format!("gcv[{i}]"), &[*s], &[*ns], 1e-8, Some(sc))?;
            }
        }
        match pol {
            Ok(pol) => {
                let finite: Vec<usize> = (0..grid.len()).filter(|&i| scores[i].is_finite()).collect();
                prop_assert!(!finite.is_empty());
                let best = finite.iter().map(|&i| scores[i]).fold(f64::INFINITY, f64::min);
                let chosen = grid.iter().position(|&g| g == pol.lam).unwrap();
                prop_assert_eq!(scores[chosen], best);
                prop_assert_eq!(&pol.gcv_grid, &grid);
                prop_assert_eq!(bits(&pol.gcv_score), bits(&scores));
                let want = naive_fit(&c.x, c.n, c.k, &c.y, pol.lam, c.intercept, &scale);
                close("coef", &pol.coef, &want.coef, 1e-8, Some(max_abs(&want.coef).max(1e-3)))?;
            }
            Err(e) => {
                prop_assert!(scores.iter().all(|s| !s.is_finite()), "GCV failed with finite scores: {e}");
                prop_assert!(matches!(e, CoreError::Value { ref field, .. } if field == "lam"), "{e:?}");
            }
        }
    }

    /// The default grid: 25 log-spaced points; the chosen lambda is on it.
    #[test]
    fn gcv_default_grid(c in fit_case(6..16, 1..5)) {
        let xm = Matrix::Dense(Dense::new("X", c.n, c.k, &c.x).unwrap());
        let pol = ridge::fit(&xm, &c.y, &opts(Lam::Gcv(None), c.intercept, c.standardize), Par::Seq).unwrap();
        prop_assert_eq!(pol.gcv_grid.len(), ridge::GCV_GRID_POINTS);
        prop_assert!(pol.gcv_grid.windows(2).all(|w| w[1] > w[0]));
        prop_assert!(pol.gcv_grid.contains(&pol.lam));
    }

    /// Exact decomposition == three literal refits per pair, on the base policy's scales.
    #[test]
    fn exact_matches_literal_refits(c in dec_case(0.1..5.0)) {
        let pr = prepare(&c);
        let s = run_decompose(&pr.base, &pr.dx, &c.dy, Method::Exact);
        let (n, k) = (c.n, c.k);
        prop_assert_eq!((s.n_pairs, s.k), (c.p, k));
        prop_assert_eq!(s.n_fallback, 0);
        let scale = &pr.policy.scale;
        let b0 = naive_fit(&c.x, n, k, &c.y, c.lam, c.intercept, scale).coef;
        let dxd = pr.dx.clone();
        for j in 0..c.p {
            let x1: Vec<f64> = (0..n * k).map(|q| c.x[q] + c.dx[j * n * k + q]).collect();
            let y1: Vec<f64> = (0..n).map(|i| c.y[i] + c.dy[j * n + i]).collect();
            let bt = naive_fit(&x1, n, k, &y1, c.lam, c.intercept, scale).coef;
            let bx = naive_fit(&x1, n, k, &c.y, c.lam, c.intercept, scale).coef;
            let by = naive_fit(&c.x, n, k, &y1, c.lam, c.intercept, scale).coef;
            let sc = max_abs(&b0).max(max_abs(&bt)).max(max_abs(&bx)).max(max_abs(&by)).max(1e-3);
            let diff = |b: &[f64]| b.iter().zip(&b0).map(|(a, c)| a - c).collect::<Vec<_>>();
            let row = j * k..(j + 1) * k;
            close(&format!("d_total pair {j}"), &s.d_total[row.clone()], &diff(&bt), 1e-8, Some(sc))?;
            close(&format!("d_x pair {j}"), &s.d_x[row.clone()], &diff(&bx), 1e-8, Some(sc))?;
            close(&format!("d_y pair {j}"), &s.d_y[row.clone()], &diff(&by), 1e-8, Some(sc))?;
            // pred_dy: mean over probes of (ΔX / s) β.
            let pred: f64 = (0..n)
                .map(|i| (0..k).map(|q| dxd_dense(&dxd, j * n + i, q) / scale[q] * b0[q]).sum::<f64>())
                .sum::<f64>() / n as f64;
            close(&format!("pred_dy pair {j}"), &[s.pred_dy[j]], &[pred], 1e-8, Some(pred.abs().max(1e-3)))?;
        }
        // The interaction term closes the identity.
        let dxy = s.d_xy();
        let sc = max_abs(&s.d_total).max(max_abs(&s.d_x)).max(max_abs(&s.d_y)).max(1e-300);
        let recon: Vec<f64> = (0..dxy.len()).map(|i| s.d_x[i] + s.d_y[i] + dxy[i]).collect();
        close("d_x + d_y + d_xy", &recon, &s.d_total, 1e-14, Some(sc))?;
    }

    /// The y-pathway is linear: first order == exact, bit for bit, == the naive refit; the
    /// first-order total is d_x + d_y (no interaction term).
    #[test]
    fn first_order_dy_is_exact(c in dec_case(0.1..5.0)) {
        let pr = prepare(&c);
        let ex = run_decompose(&pr.base, &pr.dx, &c.dy, Method::Exact);
        let fo = run_decompose(&pr.base, &pr.dx, &c.dy, Method::FirstOrder);
        prop_assert_eq!(bits(&ex.d_y), bits(&fo.d_y));
        close("pred_dy fo vs exact", &fo.pred_dy, &ex.pred_dy, 1e-12, Some(max_abs(&ex.pred_dy).max(1e-3)))?;
        let dxy = fo.d_xy();
        let sc = max_abs(&fo.d_total).max(1e-300);
        close("first-order d_xy", &dxy, &vec![0.0; dxy.len()], 1e-14, Some(sc))?;
        // Scaling dy scales d_y exactly linearly (up to rounding), whatever dX is.
        let dy3: Vec<f64> = c.dy.iter().map(|v| 3.0 * v).collect();
        let fo3 = run_decompose(&pr.base, &pr.dx, &dy3, Method::FirstOrder);
        let want: Vec<f64> = fo.d_y.iter().map(|v| 3.0 * v).collect();
        close("d_y(3 dy)", &fo3.d_y, &want, 1e-12, Some(max_abs(&want).max(1e-300)))?;
        prop_assert_eq!(bits(&fo3.d_x), bits(&fo.d_x));
    }

    /// First order is the derivative of the exact refit: central differences of the exact
    /// shift in a step eps agree with it, and the one-sided error shrinks linearly in eps.
    #[test]
    fn first_order_is_derivative_of_exact(c in dec_case(0.5..5.0)) {
        let pr = prepare(&c);
        let fo = run_decompose(&pr.base, &pr.dx, &c.dy, Method::FirstOrder);
        let zero_dy = vec![0.0; c.dy.len()];
        // The derivative can be near zero while the curvature is not: scale by |β| too.
        let sc1 = max_abs(&fo.d_x).max(max_abs(&fo.d_total)).max(max_abs(&pr.base.b)).max(1e-12);
        let shift = |eps: f64, dy: &[f64]| run_decompose(&pr.base, &pr.dx.scaled(eps), dy, Method::Exact);

        let maxerr = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0f64, f64::max);
        // Central differences of the x-path: error O(eps²), so a 10x smaller step cuts it
        // ~100x (at least 20x asked), and at eps = 1e-4 it is small.
        let central = |eps: f64, with_dy: bool| {
            let (dyp, dym): (Vec<f64>, Vec<f64>) = if with_dy {
                (c.dy.iter().map(|v| v * eps).collect(), c.dy.iter().map(|v| -v * eps).collect())
            } else {
                (zero_dy.clone(), zero_dy.clone())
            };
            let p = shift(eps, &dyp);
            let m = shift(-eps, &dym);
            let (a, b) = if with_dy { (p.d_total, m.d_total) } else { (p.d_x, m.d_x) };
            a.iter().zip(&b).map(|(a, b)| (a - b) / (2.0 * eps)).collect::<Vec<f64>>()
        };
        for (what, with_dy, fo_v) in [("d_x", false, &fo.d_x), ("d_total", true, &fo.d_total)] {
            let (c3, c4) = (maxerr(&central(1e-3, with_dy), fo_v), maxerr(&central(1e-4, with_dy), fo_v));
            prop_assert!(
                c4 <= 0.05 * c3 + 1e-9 * sc1,
                "central FD of {what} does not converge quadratically: err(1e-3) = {c3:e}, err(1e-4) = {c4:e} (scale {sc1:e})"
            );
            prop_assert!(c4 <= 1e-4 * sc1, "central FD of {what} at eps=1e-4: err {c4:e} (scale {sc1:e})");
        }

        // One-sided: err(eps) = |d_x(eps ΔX)/eps − fo| ~ C eps: at least 5x smaller for a
        // 10x smaller step (unless already at rounding level).
        let err = |eps: f64| {
            let e = shift(eps, &zero_dy);
            e.d_x.iter().zip(&fo.d_x).map(|(a, b)| (a / eps - b).abs()).fold(0.0, f64::max)
        };
        let (e3, e4) = (err(1e-3), err(1e-4));
        prop_assert!(
            e4 <= 0.2 * e3 + 1e-9 * sc1,
            "one-sided error not shrinking linearly: err(1e-3) = {e3:e}, err(1e-4) = {e4:e} (scale {sc1:e})"
        );
    }
}

fn dxd_dense(m: &OwnedCsr, r: usize, c: usize) -> f64 {
    let (a, b) = (m.indptr[r] as usize, m.indptr[r + 1] as usize);
    (a..b)
        .filter(|&p| m.indices[p] as usize == c)
        .map(|p| m.data[p])
        .sum()
}

// ---------------------------------------------------------------------------------------------
// 2. Fuzz: never panic
// ---------------------------------------------------------------------------------------------

fn weird_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => -3.0..3.0f64,
        2 => Just(0.0),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(1e200),
        1 => Just(-1e300),
        1 => Just(1e-300),
        1 => Just(5e-324),
        1 => Just(f64::MAX),
        1 => Just(-0.0),
    ]
}

/// How a well-formed CSR is broken (or not).
#[derive(Debug, Clone)]
enum Mutation {
    None,
    IndptrPush(i64),
    IndptrPop,
    IndptrSet(usize, i64),
    IndexSet(usize, i64),
    SwapIndices(usize),
    DuplicateIndex(usize),
    DataSet(usize, f64),
    DataPop,
    IndicesPop,
    Nrows(usize),
    Ncols(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => Just(Mutation::None),
        1 => (-3i64..12).prop_map(Mutation::IndptrPush),
        1 => Just(Mutation::IndptrPop),
        1 => (0usize..12, -3i64..12).prop_map(|(i, v)| Mutation::IndptrSet(i, v)),
        1 => (0usize..40, -3i64..10).prop_map(|(i, v)| Mutation::IndexSet(i, v)),
        1 => (0usize..40).prop_map(Mutation::SwapIndices),
        1 => (0usize..40).prop_map(Mutation::DuplicateIndex),
        2 => (0usize..40, weird_f64()).prop_map(|(i, v)| Mutation::DataSet(i, v)),
        1 => Just(Mutation::DataPop),
        1 => Just(Mutation::IndicesPop),
        1 => (0usize..8).prop_map(Mutation::Nrows),
        1 => (0usize..8).prop_map(Mutation::Ncols),
    ]
}

fn apply(mut m: OwnedCsr, mu: &Mutation) -> OwnedCsr {
    let nnz = m.indices.len();
    match *mu {
        Mutation::None => {}
        Mutation::IndptrPush(v) => m.indptr.push(v),
        Mutation::IndptrPop => {
            m.indptr.pop();
        }
        Mutation::IndptrSet(i, v) => {
            if !m.indptr.is_empty() {
                let i = i % m.indptr.len();
                m.indptr[i] = v;
            }
        }
        Mutation::IndexSet(i, v) => {
            if nnz > 0 {
                m.indices[i % nnz] = v;
            }
        }
        Mutation::SwapIndices(i) => {
            if nnz > 1 {
                let i = i % (nnz - 1);
                m.indices.swap(i, i + 1);
            }
        }
        Mutation::DuplicateIndex(i) => {
            if nnz > 1 {
                let i = i % (nnz - 1);
                m.indices[i + 1] = m.indices[i];
            }
        }
        Mutation::DataSet(i, v) => {
            if nnz > 0 {
                m.data[i % nnz] = v;
            }
        }
        Mutation::DataPop => {
            m.data.pop();
        }
        Mutation::IndicesPop => {
            m.indices.pop();
        }
        Mutation::Nrows(r) => m.nrows = r,
        Mutation::Ncols(c) => m.ncols = c,
    }
    m
}

/// A CSR built from a random (possibly empty) dense matrix, then maybe broken.
fn fuzz_csr(
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> impl Strategy<Value = OwnedCsr> {
    (rows, cols)
        .prop_flat_map(|(r, c)| {
            (
                Just(r),
                Just(c),
                vec(prop_oneof![2 => Just(0.0), 3 => weird_f64()], r * c),
                vec(any::<bool>(), r * c),
                mutation(),
            )
        })
        .prop_map(|(r, c, x, z, mu)| apply(OwnedCsr::from_dense(r, c, &x, &z), &mu))
}

/// Completely arbitrary arrays.
fn raw_csr() -> impl Strategy<Value = OwnedCsr> {
    (
        0usize..5,
        0usize..5,
        vec(-2i64..9, 0..7),
        vec(-2i64..6, 0..9),
        vec(weird_f64(), 0..9),
    )
        .prop_map(|(nrows, ncols, indptr, indices, data)| OwnedCsr {
            nrows,
            ncols,
            indptr,
            indices,
            data,
        })
}

fn fuzz_lam() -> impl Strategy<Value = Lam> {
    prop_oneof![
        3 => prop_oneof![0.0..10.0f64, Just(0.0), Just(-1.0), Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e300), Just(5e-324)].prop_map(Lam::Fixed),
        1 => Just(Lam::Gcv(None)),
        2 => vec(prop_oneof![0.0..10.0f64, Just(0.0), Just(-1.0), Just(f64::NAN), Just(f64::INFINITY), Just(1e300)], 0..4).prop_map(|g| Lam::Gcv(Some(g))),
    ]
}

/// Check the structural promises of a successful `feature_stats`.
fn stats_shape_ok(
    fs: &policytrace_core::FeatureStats,
    n: usize,
    f: usize,
    g: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!((fs.n_rows, fs.n_features, fs.n_groups), (n, f, g));
    prop_assert_eq!(fs.mean.len(), f);
    prop_assert_eq!(fs.std.len(), f);
    prop_assert_eq!(fs.corr.len(), f);
    prop_assert_eq!(fs.n_active.len(), f);
    prop_assert_eq!(fs.group_means.len(), f * g);
    prop_assert_eq!(fs.group_counts.iter().sum::<u64>(), n as u64);
    prop_assert!(fs.n_active.iter().all(|&a| a <= n as u64));
    prop_assert!(fs
        .corr
        .iter()
        .all(|c| c.is_nan() || (-1.0..=1.0).contains(c)));
    Ok(())
}

/// Drive every entry point that takes a matrix; none may panic.
fn exercise(
    m: &Matrix<'_>,
    y: &[f64],
    codes: &[u32],
    n_groups: usize,
    lam: &Lam,
    intercept: bool,
    standardize: bool,
    dx: Option<&OwnedCsr>,
    dy: &[f64],
) -> Result<(), TestCaseError> {
    let fs = no_panic("feature_stats(y, groups)", || {
        feature_stats(m, Some(y), Some((codes, n_groups)))
    })?;
    if let Ok(fs) = &fs {
        stats_shape_ok(fs, m.nrows(), m.ncols(), n_groups)?;
    }
    let fs0 = no_panic("feature_stats(None, None)", || feature_stats(m, None, None))?;
    if let Ok(fs0) = &fs0 {
        stats_shape_ok(fs0, m.nrows(), m.ncols(), 1)?;
        prop_assert!(fs0.corr.iter().all(|c| c.is_nan()));
    }
    let o = opts(lam.clone(), intercept, standardize);
    let pol = no_panic("ridge::fit", || ridge::fit(m, y, &o, Par::Seq))?;
    let _ = no_panic("Design::new", || {
        Design::new(m, y, None, standardize, intercept)
    })?;
    if let Ok(pol) = pol {
        prop_assert_eq!(pol.coef.len(), m.ncols());
        let _ = no_panic("predict", || pol.predict(m))?;
        let base = no_panic("Base::new", || Base::new(&pol, m, y, Par::Seq))?;
        if let (Ok(base), Some(dx)) = (base, dx) {
            if let Ok(dxv) = dx.try_view("dX") {
                for method in [Method::Exact, Method::FirstOrder] {
                    let s = no_panic("decompose", || decompose(&base, &dxv, dy, method, Par::Seq))?;
                    if let Ok(s) = s {
                        prop_assert_eq!(s.d_x.len(), s.n_pairs * s.k);
                        prop_assert_eq!(s.d_y.len(), s.n_pairs * s.k);
                        prop_assert_eq!(s.d_total.len(), s.n_pairs * s.k);
                        prop_assert_eq!(s.pred_dy.len(), s.n_pairs);
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(cfg(256))]

    /// Arbitrary arrays: `Csr::new` validates or rejects, and what it accepts is usable.
    #[test]
    fn fuzz_raw_csr_never_panics(
        m in raw_csr(),
        y in vec(weird_f64(), 0..6),
        codes in vec(0u32..4, 0..6),
        n_groups in 0usize..5,
        lam in fuzz_lam(),
        intercept in any::<bool>(),
        standardize in any::<bool>(),
    ) {
        let csr = no_panic("Csr::new", || m.try_view("X"))?;
        if let Ok(csr) = csr {
            exercise(&Matrix::Csr(csr), &y, &codes, n_groups, &lam, intercept, standardize, None, &[])?;
        }
        // The same numbers as a dense matrix of a guessed shape.
        let dense = no_panic("Dense::new", || Dense::new("X", m.nrows, m.ncols, &m.data))?;
        if let Ok(d) = dense {
            exercise(&Matrix::Dense(d), &y, &codes, n_groups, &lam, intercept, standardize, None, &[])?;
        }
    }

    /// Well-formed CSRs with one defect (or none), y of a random length, random groups,
    /// pathological lambdas, and a (possibly broken) stacked dX with dy of a random length.
    #[test]
    fn fuzz_mutated_inputs_never_panic(
        m in fuzz_csr(0..6, 0..5),
        ylen_delta in prop_oneof![4 => Just(0i64), 1 => -2i64..3],
        yvals in vec(prop_oneof![8 => -3.0..3.0f64, 1 => weird_f64()], 8),
        codes in vec(0u32..4, 8),
        n_groups in 0usize..5,
        lam in fuzz_lam(),
        intercept in any::<bool>(),
        standardize in any::<bool>(),
        dx in fuzz_csr(0..14, 0..6),
        dy in vec(prop_oneof![8 => -1.0..1.0f64, 1 => weird_f64()], 0..14),
    ) {
        let ylen = (m.nrows as i64 + ylen_delta).clamp(0, 8) as usize;
        let y = &yvals[..ylen];
        let codes = &codes[..ylen.min(codes.len())];
        let csr = no_panic("Csr::new", || m.try_view("X"))?;
        if let Ok(csr) = csr {
            exercise(&Matrix::Csr(csr), y, codes, n_groups, &lam, intercept, standardize, Some(&dx), &dy)?;
            let dense = m_to_dense(&m);
            if let Ok(d) = Dense::new("X", m.nrows, m.ncols, &dense) {
                exercise(&Matrix::Dense(d), y, codes, n_groups, &lam, intercept, standardize, Some(&dx), &dy)?;
            }
        }
    }

    /// A valid base and everything about the pairs or the policy wrong in turn.
    #[test]
    fn fuzz_decompose_never_panics(
        n in 1usize..6,
        k in 1usize..4,
        xv in vec(-3.0..3.0f64, 24),
        yv in vec(-3.0..3.0f64, 6),
        p in 0usize..3,
        row_delta in prop_oneof![3 => Just(0i64), 1 => -2i64..3],
        col_delta in prop_oneof![3 => Just(0i64), 1 => -1i64..2],
        dxv in vec(prop_oneof![2 => Just(0.0), 2 => -1.0..1.0f64, 1 => weird_f64()], 64),
        mu in mutation(),
        dy_delta in prop_oneof![3 => Just(0i64), 1 => -2i64..3],
        dyv in vec(prop_oneof![6 => -1.0..1.0f64, 1 => weird_f64()], 24),
        pol_mu in 0usize..10,
        weird in weird_f64(),
        lam in prop_oneof![0.0..3.0f64, Just(0.0)],
        intercept in any::<bool>(),
        standardize in any::<bool>(),
    ) {
        let x = &xv[..n * k];
        let y = &yv[..n];
        let xm = Matrix::Dense(Dense::new("X", n, k, x).unwrap());
        let Ok(mut pol) = ridge::fit(&xm, y, &opts(Lam::Fixed(lam), intercept, standardize), Par::Seq) else {
            return Ok(());
        };
        // Break the policy in one of several ways.
        match pol_mu {
            0 => pol.lam = weird,
            1 => pol.scale.push(1.0),
            2 => pol.scale[0] = weird,
            3 => { pol.coef.pop(); }
            4 => pol.coef[0] = weird,
            5 => pol.lam = -pol.lam - 1.0,
            _ => {}
        }
        let rows = ((p * n) as i64 + row_delta).max(0) as usize;
        let cols = (k as i64 + col_delta).max(0) as usize;
        let dxs = apply(OwnedCsr::from_dense(rows, cols, &dxv[..(rows * cols).min(64)].iter().copied().chain(std::iter::repeat(0.0)).take(rows * cols).collect::<Vec<_>>(), &[]), &mu);
        let dylen = ((p * n) as i64 + dy_delta).clamp(0, 24) as usize;
        let dy = &dyv[..dylen];
        let base = no_panic("Base::new", || Base::new(&pol, &xm, y, Par::Seq))?;
        if let Ok(base) = base {
            if let Ok(dxc) = no_panic("Csr::<i64>::new(dX)", || dxs.try_view("dX"))? {
                for method in [Method::Exact, Method::FirstOrder] {
                    let s = no_panic("decompose", || decompose(&base, &dxc, dy, method, Par::Seq))?;
                    if let Ok(s) = s {
                        prop_assert_eq!(s.d_total.len(), s.n_pairs * k);
                        prop_assert_eq!(s.pred_dy.len(), s.n_pairs);
                    }
                }
            }
        }
    }

    /// `interference`: arbitrary arrays never panic; valid ones match a naive computation.
    #[test]
    fn fuzz_interference(
        k in 0usize..5,
        p in 0usize..4,
        dv in vec(weird_f64(), 0..20),
        dlen_delta in prop_oneof![3 => Just(0i64), 1 => -2i64..3],
        fg in vec(-2i64..3, 0..6),
        fg_len_delta in prop_oneof![3 => Just(0i64), 1 => -1i64..2],
        pg in vec(-2i64..3, 4),
    ) {
        let dlen = ((p * k) as i64 + dlen_delta).clamp(0, dv.len() as i64) as usize;
        let d = &dv[..dlen];
        let fglen = ((k as i64) + fg_len_delta).clamp(0, fg.len() as i64) as usize;
        let fgs = &fg[..fglen];
        let pgs = &pg[..p];
        let r = no_panic("interference", || interference(d, k, fgs, pgs))?;
        if let Ok(r) = r {
            prop_assert_eq!(d.len(), p * k);
            prop_assert_eq!(fgs.len(), k);
            prop_assert!(d.iter().all(|v| v.is_finite()));
            if k > 0 {
                prop_assert_eq!(r.dominant.len(), p);
                prop_assert_eq!(r.off_target_share.len(), p);
                prop_assert_eq!(r.flag.len(), p);
                for j in 0..p {
                    let row = &d[j * k..(j + 1) * k];
                    let g = pgs[j];
                    let intended = |q: usize| g != NO_GROUP && fgs[q] == g;
                    let mut best = -1i64;
                    let mut bv = 0.0;
                    for (q, v) in row.iter().enumerate() {
                        if v.abs() > bv { bv = v.abs(); best = q as i64; }
                    }
                    let total: f64 = row.iter().map(|v| v.abs()).sum();
                    let off: f64 = row.iter().enumerate().filter(|(q, _)| !intended(*q)).map(|(_, v)| v.abs()).sum();
                    prop_assert_eq!(r.dominant[j], best);
                    // (When the |d| sum overflows to inf, both sides are inf/inf = NaN: skip.)
                    if total.is_finite() {
                        let share = if total > 0.0 { off / total } else { 0.0 };
                        close("off_target_share", &[r.off_target_share[j]], &[share], 1e-12, Some(1.0))?;
                    }
                    prop_assert_eq!(r.flag[j], best >= 0 && !intended(best as usize));
                }
            }
        } else if let Err(e) = r {
            prop_assert!(matches!(e, CoreError::Shape { .. } | CoreError::NonFinite { .. } | CoreError::Empty { .. }), "{e:?}");
        }
    }
}

fn m_to_dense(m: &OwnedCsr) -> Vec<f64> {
    let mut out = vec![0.0; m.nrows * m.ncols];
    for r in 0..m.nrows {
        for p in m.indptr[r] as usize..m.indptr[r + 1] as usize {
            out[r * m.ncols + m.indices[p] as usize] += m.data[p];
        }
    }
    out
}

// --- Targeted error variants -----------------------------------------------------------------

fn small_problem() -> (Vec<f64>, Vec<f64>) {
    // 5 x 2, full rank.
    let x = vec![1.0, 0.5, -1.0, 2.0, 0.3, -0.7, 2.2, 0.1, -0.4, 1.3];
    let y = vec![0.2, -1.0, 0.7, 1.5, 0.0];
    (x, y)
}

fn is_nonfinite(e: &CoreError, f: &str) -> bool {
    matches!(e, CoreError::NonFinite { field, .. } if field == f)
}
fn is_shape(e: &CoreError, f: &str) -> bool {
    matches!(e, CoreError::Shape { field, .. } if field == f)
}
fn is_value(e: &CoreError, f: &str) -> bool {
    matches!(e, CoreError::Value { field, .. } if field == f)
}
fn is_sparse(e: &CoreError, f: &str) -> bool {
    matches!(e, CoreError::Sparse { field, .. } if field == f)
}
fn is_empty(e: &CoreError, f: &str) -> bool {
    matches!(e, CoreError::Empty { field, .. } if field == f)
}

#[test]
fn targeted_error_variants() {
    let (x, y) = small_problem();
    let xm = Matrix::Dense(Dense::new("X", 5, 2, &x).unwrap());
    let fixed = opts(Lam::Fixed(1.0), true, true);

    // NaN / inf in y.
    let mut ynan = y.clone();
    ynan[2] = f64::NAN;
    let e = ridge::fit(&xm, &ynan, &fixed, Par::Seq).unwrap_err();
    assert!(is_nonfinite(&e, "y"), "{e:?}");
    let e = feature_stats(&xm, Some(&ynan), None).unwrap_err();
    assert!(is_nonfinite(&e, "y"), "{e:?}");
    let mut yinf = y.clone();
    yinf[0] = f64::NEG_INFINITY;
    assert!(is_nonfinite(
        &ridge::fit(&xm, &yinf, &fixed, Par::Seq).unwrap_err(),
        "y"
    ));

    // y of the wrong length.
    assert!(is_shape(
        &ridge::fit(&xm, &y[..4], &fixed, Par::Seq).unwrap_err(),
        "y"
    ));
    assert!(is_shape(
        &feature_stats(&xm, Some(&y[..4]), None).unwrap_err(),
        "y"
    ));

    // Dense with the wrong number of values, or a NaN.
    assert!(is_shape(&Dense::new("X", 5, 3, &x).unwrap_err(), "X"));
    let mut xnan = x.clone();
    xnan[3] = f64::NAN;
    let e = Dense::new("X", 5, 2, &xnan).unwrap_err();
    assert_eq!(
        e,
        CoreError::NonFinite {
            field: "X".into(),
            location: "row 1, column 1".into()
        }
    );

    // Bad CSR structure: each defect is CoreError::Sparse.
    let ok = OwnedCsr::from_dense(5, 2, &x, &[]);
    assert!(ok.try_view("X").is_ok());
    let sparse_cases: Vec<(&str, OwnedCsr)> = vec![
        (
            "indptr too short",
            OwnedCsr {
                indptr: ok.indptr[..5].to_vec(),
                ..ok.clone()
            },
        ),
        (
            "indptr too long",
            OwnedCsr {
                indptr: [ok.indptr.clone(), vec![10]].concat(),
                ..ok.clone()
            },
        ),
        ("indptr[0] != 0", {
            let mut m = ok.clone();
            m.indptr[0] = 1;
            m
        }),
        ("indptr decreasing", {
            let mut m = ok.clone();
            m.indptr[2] = 1;
            m
        }),
        ("indptr[-1] != nnz", {
            let mut m = ok.clone();
            *m.indptr.last_mut().unwrap() = 9;
            m
        }),
        ("negative index", {
            let mut m = ok.clone();
            m.indices[0] = -1;
            m
        }),
        ("index out of range", {
            let mut m = ok.clone();
            m.indices[1] = 2;
            m
        }),
        ("unsorted", {
            let mut m = ok.clone();
            m.indices.swap(0, 1);
            m
        }),
        ("duplicate", {
            let mut m = ok.clone();
            m.indices[1] = m.indices[0];
            m
        }),
        ("indices/data lengths", {
            let mut m = ok.clone();
            m.data.pop();
            m
        }),
        (
            "empty indptr",
            OwnedCsr {
                indptr: vec![],
                ..ok.clone()
            },
        ),
    ];
    for (what, m) in &sparse_cases {
        let e = m.try_view("X").unwrap_err();
        assert!(is_sparse(&e, "X"), "{what}: {e:?}");
    }
    // A NaN value inside a CSR.
    let mut m = ok.clone();
    m.data[3] = f64::NAN;
    assert!(is_nonfinite(&m.try_view("X").unwrap_err(), "X"));

    // lam out of its domain.
    for bad in [f64::NAN, -1.0, f64::INFINITY, f64::NEG_INFINITY] {
        let e = ridge::fit(&xm, &y, &opts(Lam::Fixed(bad), true, true), Par::Seq).unwrap_err();
        assert!(is_value(&e, "lam"), "lam={bad}: {e:?}");
        let e = ridge::fit(
            &xm,
            &y,
            &opts(Lam::Gcv(Some(vec![1.0, bad])), true, true),
            Par::Seq,
        )
        .unwrap_err();
        assert!(is_value(&e, "lam_grid"), "grid with {bad}: {e:?}");
    }
    let e = ridge::fit(&xm, &y, &opts(Lam::Gcv(Some(vec![])), true, true), Par::Seq).unwrap_err();
    assert!(is_empty(&e, "lam_grid"), "{e:?}");

    // Empty matrices.
    let empty_rows = OwnedCsr {
        nrows: 0,
        ncols: 3,
        indptr: vec![0],
        indices: vec![],
        data: vec![],
    };
    let em = Matrix::Csr(empty_rows.view("X"));
    assert!(is_empty(
        &ridge::fit(&em, &[], &fixed, Par::Seq).unwrap_err(),
        "X"
    ));
    assert!(is_empty(&feature_stats(&em, None, None).unwrap_err(), "X"));
    let no_cols = OwnedCsr {
        nrows: 2,
        ncols: 0,
        indptr: vec![0, 0, 0],
        indices: vec![],
        data: vec![],
    };
    let nc = Matrix::Csr(no_cols.view("X"));
    assert!(is_empty(
        &ridge::fit(&nc, &[1.0, 2.0], &fixed, Par::Seq).unwrap_err(),
        "X"
    ));
    assert!(is_empty(&feature_stats(&nc, None, None).unwrap_err(), "X"));
    let d0 = Dense::new("X", 0, 0, &[]).unwrap();
    assert!(is_empty(
        &feature_stats(&Matrix::Dense(d0), None, None).unwrap_err(),
        "X"
    ));

    // Groups: wrong length, zero groups, code out of range, an empty group.
    let codes = [0u32, 1, 0, 1, 2];
    assert!(is_shape(
        &feature_stats(&xm, None, Some((&codes[..4], 3))).unwrap_err(),
        "groups"
    ));
    assert!(is_value(
        &feature_stats(&xm, None, Some((&codes, 0))).unwrap_err(),
        "groups"
    ));
    assert!(is_value(
        &feature_stats(&xm, None, Some((&codes, 2))).unwrap_err(),
        "groups"
    ));
    assert!(is_value(
        &feature_stats(&xm, None, Some((&codes, 4))).unwrap_err(),
        "groups"
    ));
    assert!(feature_stats(&xm, None, Some((&codes, 3))).is_ok());

    // Decomposition.
    let pol = ridge::fit(&xm, &y, &fixed, Par::Seq).unwrap();
    let base = Base::new(&pol, &xm, &y, Par::Seq).unwrap();
    let dx = OwnedCsr::from_dense(10, 2, &[0.1; 20], &[]);
    let dxv = dx.view("dX");
    let dy = vec![0.05; 10];
    assert!(decompose(&base, &dxv, &dy, Method::Exact, Par::Seq).is_ok());
    for method in [Method::Exact, Method::FirstOrder] {
        // dy of the wrong length.
        let e = decompose(&base, &dxv, &dy[..9], method, Par::Seq).unwrap_err();
        assert!(is_shape(&e, "dy"), "{e:?}");
        // NaN in dy.
        let mut dyn_ = dy.clone();
        dyn_[7] = f64::NAN;
        assert!(is_nonfinite(
            &decompose(&base, &dxv, &dyn_, method, Par::Seq).unwrap_err(),
            "dy"
        ));
        // ncols mismatch.
        let dx3 = OwnedCsr::from_dense(10, 3, &[0.1; 30], &[]);
        let e = decompose(&base, &dx3.view("dX"), &dy, method, Par::Seq).unwrap_err();
        assert!(is_shape(&e, "dX"), "{e:?}");
        // P·n row mismatch.
        let dx9 = OwnedCsr::from_dense(9, 2, &[0.1; 18], &[]);
        let e = decompose(&base, &dx9.view("dX"), &dy[..9], method, Par::Seq).unwrap_err();
        assert!(is_shape(&e, "dX"), "{e:?}");
        // Zero pairs: an empty split.
        let dx0 = OwnedCsr {
            nrows: 0,
            ncols: 2,
            indptr: vec![0],
            indices: vec![],
            data: vec![],
        };
        let s = decompose(&base, &dx0.view("dX"), &[], method, Par::Seq).unwrap();
        assert_eq!(
            (
                s.n_pairs,
                s.k,
                s.d_total.len(),
                s.pred_dy.len(),
                s.n_fallback
            ),
            (0, 2, 0, 0, 0)
        );
    }
    // Base on other data, another width, NaN in y.
    let mut y2 = y.clone();
    y2[0] += 10.0;
    assert!(is_value(
        &Base::new(&pol, &xm, &y2, Par::Seq).err().unwrap(),
        "X, y"
    ));
    let x3 = Dense::new("X", 5, 1, &y).unwrap();
    assert!(is_shape(
        &Base::new(&pol, &Matrix::Dense(x3), &y, Par::Seq)
            .err()
            .unwrap(),
        "X"
    ));
    assert!(is_nonfinite(
        &Base::new(&pol, &xm, &ynan, Par::Seq).err().unwrap(),
        "y"
    ));
    let mut badpol = pol.clone();
    badpol.scale[1] = 0.0;
    assert!(is_value(
        &Base::new(&badpol, &xm, &y, Par::Seq).err().unwrap(),
        "scale"
    ));
    badpol.scale.push(1.0);
    assert!(is_shape(
        &Base::new(&badpol, &xm, &y, Par::Seq).err().unwrap(),
        "scale"
    ));

    // predict on the wrong width.
    assert!(is_shape(
        &pol.predict(&Matrix::Dense(Dense::new("X", 5, 1, &y).unwrap()))
            .unwrap_err(),
        "X"
    ));
    // with_pool: 0 (all cores), 1 and 2 threads all run.
    for t in [0, 1, 2] {
        assert_eq!(with_pool(t, |_| 7).unwrap(), 7);
    }

    // Interference.
    assert!(is_shape(
        &interference(&[1.0, 2.0], 2, &[0], &[0]).unwrap_err(),
        "feature_group"
    ));
    assert!(is_shape(
        &interference(&[1.0, 2.0, 3.0], 2, &[0, 1], &[0]).unwrap_err(),
        "d_coef"
    ));
    assert!(is_nonfinite(
        &interference(&[1.0, f64::NAN], 2, &[0, 1], &[0]).unwrap_err(),
        "d_coef"
    ));
    let r = interference(&[0.0, 0.0, 1.0, -3.0], 2, &[0, 1], &[0, 0]).unwrap();
    assert_eq!(r.dominant, vec![-1, 1]);
    assert_eq!(r.flag, vec![false, true]);
    assert_eq!(r.off_target_share, vec![0.0, 0.75]);
}

/// Sizes near `usize::MAX` must be rejected, not overflow.
///
/// Regression (panicked at commit 0207408): `Csr::new` checked `indptr.len() != nrows + 1`;
/// with `nrows = usize::MAX` the sum wrapped to 0 in release, an empty `indptr` passed, and
/// `indptr[0]` panicked with an index out of bounds.
#[test]
fn csr_new_huge_nrows_is_an_error() {
    let r = catch_unwind(|| Csr::<i64>::new("X", usize::MAX, 1, &[], &[], &[]).map(|_| ()));
    assert!(matches!(r, Ok(Err(CoreError::Sparse { .. }))), "{r:?}");
}

/// Regression (accepted at commit 0207408): `Dense::new` checked `data.len() != nrows * ncols`,
/// which wraps in release: `Dense::new("X", 1 << 32, 1 << 32, &[])` returned a "valid"
/// 2^32 x 2^32 matrix with no data, on which any row access panics.
#[test]
fn dense_new_overflowing_shape_is_an_error() {
    let r = catch_unwind(|| Dense::new("X", 1usize << 32, 1usize << 32, &[]).map(|_| ()));
    assert!(matches!(r, Ok(Err(CoreError::Shape { .. }))), "{r:?}");
}

/// Regression (panicked at commit 0207408): `feature_stats` allocated `vec![0u64; n_groups]`
/// before checking that every group is non-empty, so `n_groups = usize::MAX` (with valid codes)
/// panicked with "capacity overflow" instead of returning a `CoreError::Value`.
#[test]
fn feature_stats_huge_n_groups_is_an_error() {
    let (x, _) = small_problem();
    let xm = Matrix::Dense(Dense::new("X", 5, 2, &x).unwrap());
    let codes = [0u32, 1, 0, 1, 2];
    let r = catch_unwind(AssertUnwindSafe(|| {
        feature_stats(&xm, None, Some((&codes, usize::MAX))).map(|_| ())
    }));
    assert!(matches!(r, Ok(Err(CoreError::Value { .. }))), "{r:?}");
}

/// Regression (accepted at commit 0207408): `Base::new` rejects a policy not fit on these X, y
/// by comparing fitted values, but a NaN in `policy.coef` bypassed the check (each row's
/// difference is NaN and `worst.max(NaN)` keeps `worst = 0`), so `Base::new` returned `Ok`.
#[test]
fn base_rejects_non_finite_policy_coef() {
    let (x, y) = small_problem();
    let xm = Matrix::Dense(Dense::new("X", 5, 2, &x).unwrap());
    let pol = ridge::fit(&xm, &y, &opts(Lam::Fixed(1.0), true, true), Par::Seq).unwrap();
    let mut bad = vec![];
    for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut p = pol.clone();
        p.coef[0] = v;
        if Base::new(&p, &xm, &y, Par::Seq).is_ok() {
            bad.push(format!("coef[0] = {v}: Base::new returned Ok"));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("; "));
}

/// Regression (wrong at commit 0207408): `interference` with `k = 0` and `P > 0` pairs returned
/// `dominant`, `off_target_share` and `flag` of length 0, not P (`d.chunks_exact(1)` over the
/// empty `d` yields nothing). Expected: P entries (dominant -1, share 0, no flag), or an error.
#[test]
fn interference_zero_features_has_p_rows() {
    let r = interference(&[], 0, &[], &[0, 1, NO_GROUP]);
    match r {
        Ok(r) => {
            assert_eq!(r.dominant, vec![-1, -1, -1]);
            assert_eq!(r.off_target_share, vec![0.0; 3]);
            assert_eq!(r.flag, vec![false; 3]);
        }
        Err(e) => assert!(
            matches!(e, CoreError::Shape { .. } | CoreError::Empty { .. }),
            "{e:?}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Degenerate inputs
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cfg(128))]

    /// Constant columns get scale 1; with an intercept their coefficient is 0.
    #[test]
    fn constant_columns(
        c in fit_case(3..14, 2..6),
        col in 0usize..6,
        value in prop_oneof![Just(0.0), Just(2.5), Just(0.1), Just(-7.3), -5.0..5.0f64],
    ) {
        let (n, k) = (c.n, c.k);
        let col = col % k;
        let mut x = c.x.clone();
        for i in 0..n { x[i * k + col] = value; }
        let owned = OwnedCsr::from_dense(n, k, &x, &c.store_zero);
        let dense = Dense::new("X", n, k, &x).unwrap();
        let xm = if c.csr { Matrix::Csr(owned.view("X")) } else { Matrix::Dense(dense) };
        let pol = ridge::fit(&xm, &c.y, &opts(Lam::Fixed(c.lam), c.intercept, c.standardize), Par::Seq).unwrap();
        let scale = naive_scale(&x, n, k, c.standardize);
        prop_assert_eq!(pol.scale[col], 1.0);
        let want = naive_fit(&x, n, k, &c.y, c.lam, c.intercept, &scale);
        let sc = max_abs(&want.coef).max(1e-3);
        close("coef", &pol.coef, &want.coef, 1e-8, Some(sc))?;
        if c.intercept {
            prop_assert!(pol.coef[col].abs() <= 1e-10 * sc, "constant column coef {}", pol.coef[col]);
        }
    }

    /// Duplicate columns (lam > 0) share the coefficient equally.
    #[test]
    fn duplicate_columns_share_equally(c in fit_case(3..14, 1..5), col in 0usize..5) {
        let (n, k) = (c.n, c.k);
        let col = col % k;
        let x2: Vec<f64> = (0..n).flat_map(|i| { let mut r = c.x[i * k..(i + 1) * k].to_vec(); r.push(c.x[i * k + col]); r }).collect();
        let xm = Matrix::Dense(Dense::new("X", n, k + 1, &x2).unwrap());
        let pol = ridge::fit(&xm, &c.y, &opts(Lam::Fixed(c.lam), c.intercept, c.standardize), Par::Seq).unwrap();
        let scale = naive_scale(&x2, n, k + 1, c.standardize);
        let want = naive_fit(&x2, n, k + 1, &c.y, c.lam, c.intercept, &scale);
        let sc = max_abs(&want.coef).max(1e-3);
        close("coef", &pol.coef, &want.coef, 1e-8, Some(sc))?;
        close("duplicate pair", &[pol.coef[col]], &[pol.coef[k]], 1e-10, Some(sc))?;
    }

    /// All-zero rows (empty CSR rows) are ordinary rows of zeros.
    #[test]
    fn all_zero_rows(c in fit_case(3..14, 1..6), zero_rows in vec(any::<bool>(), 14)) {
        let (n, k) = (c.n, c.k);
        let mut x = c.x.clone();
        for i in 0..n { if zero_rows[i] { x[i * k..(i + 1) * k].iter_mut().for_each(|v| *v = 0.0); } }
        let owned = OwnedCsr::from_dense(n, k, &x, &[]);
        let pol = ridge::fit(&Matrix::Csr(owned.view("X")), &c.y, &opts(Lam::Fixed(c.lam), c.intercept, c.standardize), Par::Seq).unwrap();
        let scale = naive_scale(&x, n, k, c.standardize);
        let want = naive_fit(&x, n, k, &c.y, c.lam, c.intercept, &scale);
        close("coef", &pol.coef, &want.coef, 1e-8, Some(max_abs(&want.coef).max(1e-3)))?;
        let fs = feature_stats(&Matrix::Csr(owned.view("X")), Some(&c.y), None).unwrap();
        let fd = feature_stats(&Matrix::Dense(Dense::new("X", n, k, &x).unwrap()), Some(&c.y), None).unwrap();
        close("mean csr vs dense", &fs.mean, &fd.mean, 1e-12, Some(max_abs(&fd.mean).max(1.0)))?;
        close("std csr vs dense", &fs.std, &fd.std, 1e-12, Some(max_abs(&fd.std).max(1.0)))?;
    }

    /// n < K: the dual path, equal to the primal normal equations.
    #[test]
    fn dual_path_matches_primal(c in fit_case(2..6, 6..14)) {
        let xm = Matrix::Dense(Dense::new("X", c.n, c.k, &c.x).unwrap());
        let pol = ridge::fit(&xm, &c.y, &opts(Lam::Fixed(c.lam), c.intercept, c.standardize), Par::Seq).unwrap();
        prop_assert!(pol.dual);
        let scale = naive_scale(&c.x, c.n, c.k, c.standardize);
        let want = naive_fit(&c.x, c.n, c.k, &c.y, c.lam, c.intercept, &scale);
        close("coef", &pol.coef, &want.coef, 1e-8, Some(max_abs(&want.coef).max(1e-3)))?;
        close("intercept", &[pol.intercept], &[want.intercept], 1e-8, Some(want.intercept.abs().max(1.0)))?;
        // The base (always primal) agrees and a decomposition runs.
        let base = Base::new(&pol, &xm, &c.y, Par::Seq).unwrap();
        close("base.b", &base.b, &want.coef, 1e-8, Some(max_abs(&want.coef).max(1e-3)))?;
    }

    /// lam = 0 with a duplicated column: rank-deficient, solved by the eigh fallback, giving
    /// the minimum-norm solution: the merged column's OLS coefficient split equally.
    #[test]
    fn lam_zero_duplicate_columns_min_norm(
        n in 8usize..20, k in 1usize..5, col in 0usize..5,
        xv in vec(-3.0..3.0f64, 100), yv in vec(-3.0..3.0f64, 20),
        intercept in any::<bool>(), standardize in any::<bool>(),
    ) {
        let col = col % k;
        let x = &xv[..n * k];
        let y = &yv[..n];
        let x2: Vec<f64> = (0..n).flat_map(|i| { let mut r = x[i * k..(i + 1) * k].to_vec(); r.push(x[i * k + col]); r }).collect();
        let xm = Matrix::Dense(Dense::new("X", n, k + 1, &x2).unwrap());
        let pol = ridge::fit(&xm, y, &opts(Lam::Fixed(0.0), intercept, standardize), Par::Seq).unwrap();
        prop_assert_eq!(pol.solver, SolverKind::EighPinv);
        let scale = naive_scale(x, n, k, standardize);
        let ols = naive_fit(x, n, k, y, 0.0, intercept, &scale);
        let mut want = ols.coef.clone();
        want[col] /= 2.0;
        want.push(want[col]);
        let sc = max_abs(&ols.coef).max(1e-3);
        close("min-norm coef", &pol.coef, &want, 1e-7, Some(sc))?;
        close("intercept", &[pol.intercept], &[ols.intercept], 1e-7, Some(ols.intercept.abs().max(1.0)))?;
        // The base refit reproduces it (same fallback).
        let base = Base::new(&pol, &xm, y, Par::Seq).unwrap();
        close("base.b", &base.b, &want, 1e-7, Some(sc))?;
        // A pair that moves only y: the perturbed system is the singular base one (fallback
        // counted), d_x = 0 and d_total = d_y.
        let dx0 = OwnedCsr::from_dense(n, k + 1, &vec![0.0; n * (k + 1)], &[]);
        let dy: Vec<f64> = (0..n).map(|i| yv[(i + 3) % 20] * 0.1).collect();
        let s = decompose(&base, &dx0.view("dX"), &dy, Method::Exact, Par::Seq).unwrap();
        prop_assert_eq!(s.n_fallback, 1);
        let scd = max_abs(&s.d_y).max(1e-3 * sc);
        close("d_x (no dX)", &s.d_x, &vec![0.0; k + 1], 1e-9, Some(scd))?;
        close("d_total (no dX)", &s.d_total, &s.d_y, 1e-7, Some(scd))?;
        prop_assert!((s.d_y[col] - s.d_y[k]).abs() <= 1e-7 * scd, "d_y splits equally: {:?}", s.d_y);
    }

    /// Rescaling X by 1e8 or 1e-8 under standardize leaves the policy unchanged (its scales
    /// absorb the factor), with and without an intercept.
    #[test]
    fn huge_and_tiny_magnitudes(c in fit_case(4..16, 1..6), factor in prop_oneof![Just(1e8), Just(1e-8), Just(3.7e7), Just(2.9e-7)]) {
        let xd: Vec<f64> = c.x.iter().map(|v| v * factor).collect();
        let base_x = Matrix::Dense(Dense::new("X", c.n, c.k, &c.x).unwrap());
        let big_x = Matrix::Dense(Dense::new("X", c.n, c.k, &xd).unwrap());
        let o = opts(Lam::Fixed(c.lam), c.intercept, true);
        let p1 = ridge::fit(&base_x, &c.y, &o, Par::Seq).unwrap();
        let p2 = ridge::fit(&big_x, &c.y, &o, Par::Seq).unwrap();
        let sc = max_abs(&p1.coef).max(1e-3);
        close("coef", &p2.coef, &p1.coef, 1e-9, Some(sc))?;
        close("intercept", &[p2.intercept], &[p1.intercept], 1e-9, Some(p1.intercept.abs().max(1.0)))?;
        let want_scale: Vec<f64> = p1.scale.iter().map(|s| if *s == 1.0 { 1.0 } else { s * factor }).collect();
        // An all-zero column keeps scale 1 in both.
        close("scale", &p2.scale, &want_scale, 1e-12, None)?;
        // Predictions on the scaled data agree.
        close("predict", &p2.predict(&big_x).unwrap(), &p1.predict(&base_x).unwrap(), 1e-9, Some(max_abs(&c.y).max(1.0)))?;
        // Stats scale with the factor.
        let s1 = feature_stats(&base_x, Some(&c.y), None).unwrap();
        let s2 = feature_stats(&big_x, Some(&c.y), None).unwrap();
        let m1: Vec<f64> = s1.mean.iter().map(|v| v * factor).collect();
        let d1: Vec<f64> = s1.std.iter().map(|v| v * factor).collect();
        let sx = max_abs(&xd).max(1e-300);
        close("mean", &s2.mean, &m1, 1e-12, Some(sx))?;
        close("std", &s2.std, &d1, 1e-12, Some(sx))?;
        for (j, (a, b)) in s1.corr.iter().zip(&s2.corr).enumerate() {
            if s1.std[j] > 1e-6 * max_abs(&c.x) {
                prop_assert!((a - b).abs() <= 1e-10, "corr {a} vs {b}");
            } // (near-constant columns: see feature_stats_constant_column_corr_is_nan)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Determinism across thread counts
// ---------------------------------------------------------------------------------------------

struct AllOut {
    stats: policytrace_core::FeatureStats,
    coef: Vec<f64>,
    base_b: Vec<f64>,
    exact: Split,
    first: Split,
}

fn run_all(
    threads: usize,
    x: &OwnedCsr,
    y: &[f64],
    codes: &[u32],
    g: usize,
    dx: &OwnedCsr,
    dy: &[f64],
    lam: Lam,
) -> AllOut {
    with_pool(threads, |par| {
        let xm = Matrix::Csr(x.view("X"));
        let stats = feature_stats(&xm, Some(y), Some((codes, g))).unwrap();
        let pol = ridge::fit(&xm, y, &opts(lam, true, true), par).unwrap();
        let base = Base::new(&pol, &xm, y, par).unwrap();
        let exact = decompose(&base, &dx.view("dX"), dy, Method::Exact, par).unwrap();
        let first = decompose(&base, &dx.view("dX"), dy, Method::FirstOrder, par).unwrap();
        AllOut {
            stats,
            coef: pol.coef,
            base_b: base.b,
            exact,
            first,
        }
    })
    .unwrap()
}

fn assert_bit_identical(a: &AllOut, b: &AllOut) -> Result<(), TestCaseError> {
    prop_assert_eq!(bits(&a.stats.mean), bits(&b.stats.mean), "stats.mean");
    prop_assert_eq!(bits(&a.stats.std), bits(&b.stats.std), "stats.std");
    prop_assert_eq!(bits(&a.stats.corr), bits(&b.stats.corr), "stats.corr");
    prop_assert_eq!(
        bits(&a.stats.group_means),
        bits(&b.stats.group_means),
        "stats.group_means"
    );
    prop_assert_eq!(&a.stats.n_active, &b.stats.n_active, "stats.n_active");
    prop_assert_eq!(bits(&a.coef), bits(&b.coef), "policy.coef");
    prop_assert_eq!(bits(&a.base_b), bits(&b.base_b), "base.b");
    for (name, s, t) in [
        ("exact", &a.exact, &b.exact),
        ("first-order", &a.first, &b.first),
    ] {
        prop_assert_eq!(bits(&s.d_total), bits(&t.d_total), "{} d_total", name);
        prop_assert_eq!(bits(&s.d_x), bits(&t.d_x), "{} d_x", name);
        prop_assert_eq!(bits(&s.d_y), bits(&t.d_y), "{} d_y", name);
        prop_assert_eq!(bits(&s.pred_dy), bits(&t.pred_dy), "{} pred_dy", name);
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct DetCase {
    n: usize,
    k: usize,
    p: usize,
    g: usize,
    seed: u64,
    lam: f64,
}

/// A cheap deterministic generator so the large cases don't go through proptest's shrinker.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64) / ((1u64 << 53) as f64)
    }
}

fn det_inputs(c: &DetCase) -> (OwnedCsr, Vec<f64>, Vec<u32>, OwnedCsr, Vec<f64>) {
    let mut r = Lcg(c.seed);
    let (n, k, p) = (c.n, c.k, c.p);
    let mut x = vec![0.0; n * k];
    let mut zx = vec![false; n * k];
    for i in 0..n * k {
        let u = r.next();
        if u < 0.5 {
            x[i] = (r.next() - 0.3) * 4.0;
        } else {
            zx[i] = u < 0.55; // explicit stored zeros
        }
    }
    // Every column non-constant: one guaranteed non-zero per column.
    for j in 0..k {
        x[(j % n) * k + j] = 1.0 + j as f64;
    }
    let y: Vec<f64> = (0..n).map(|_| r.next() * 2.0 - 1.0).collect();
    let codes: Vec<u32> = (0..n)
        .map(|i| {
            if i < c.g {
                i as u32
            } else {
                (r.next() * c.g as f64) as u32 % c.g as u32
            }
        })
        .collect();
    let mut dx = vec![0.0; p * n * k];
    for v in dx.iter_mut() {
        if r.next() < 0.1 {
            *v = r.next() - 0.5;
        }
    }
    let dy: Vec<f64> = (0..p * n)
        .map(|_| if r.next() < 0.5 { r.next() - 0.5 } else { 0.0 })
        .collect();
    (
        OwnedCsr::from_dense(n, k, &x, &zx),
        y,
        codes,
        OwnedCsr::from_dense(p * n, k, &dx, &[]),
        dy,
    )
}

proptest! {
    #![proptest_config(cfg(24))]

    /// One thread and two threads give bit-identical outputs.
    #[test]
    fn one_vs_two_threads_bit_identical(
        c in (200usize..1200, 2usize..40, 1usize..5, 1usize..5, any::<u64>(), 0.1..10.0f64)
            .prop_map(|(n, k, p, g, seed, lam)| DetCase { n, k, p, g, seed, lam })
    ) {
        let (x, y, codes, dx, dy) = det_inputs(&c);
        let a = run_all(1, &x, &y, &codes, c.g, &dx, &dy, Lam::Fixed(c.lam));
        let b = run_all(2, &x, &y, &codes, c.g, &dx, &dy, Lam::Fixed(c.lam));
        assert_bit_identical(&a, &b)?;
    }
}

/// A larger fixed case, big enough for faer's GEMMs to go parallel, with GCV.
#[test]
fn one_vs_two_threads_bit_identical_large() {
    let c = DetCase {
        n: 8000,
        k: 160,
        p: 6,
        g: 4,
        seed: 42,
        lam: 1.0,
    };
    let (x, y, codes, dx, dy) = det_inputs(&c);
    for lam in [Lam::Fixed(c.lam), Lam::Gcv(None)] {
        let a = run_all(1, &x, &y, &codes, c.g, &dx, &dy, lam.clone());
        let b = run_all(2, &x, &y, &codes, c.g, &dx, &dy, lam.clone());
        let c2 = run_all(2, &x, &y, &codes, c.g, &dx, &dy, lam.clone());
        assert_bit_identical(&a, &b).unwrap();
        assert_bit_identical(&b, &c2).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 5. feature_stats against naive column statistics
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct StatsCase {
    n: usize,
    f: usize,
    x: Vec<f64>,
    store_zero: Vec<bool>,
    y: Vec<f64>,
    g: usize,
    codes: Vec<u32>,
}

fn stats_case() -> impl Strategy<Value = StatsCase> {
    (1usize..40, 1usize..8, 1usize..5).prop_flat_map(|(n, f, g)| {
        let g = g.min(n);
        (
            vec(
                prop_oneof![3 => Just(0.0), 2 => -5.0..5.0f64, 1 => 0.0..1e-3f64],
                n * f,
            ),
            vec(any::<bool>(), n * f),
            vec(-2.0..2.0f64, n),
            vec(0u32..g as u32, n),
        )
            .prop_map(move |(x, store_zero, y, mut codes)| {
                // Every group gets at least one probe.
                for (i, c) in codes.iter_mut().enumerate().take(g) {
                    *c = i as u32;
                }
                StatsCase {
                    n,
                    f,
                    x,
                    store_zero,
                    y,
                    g,
                    codes,
                }
            })
    })
}

struct NaiveStats {
    mean: Vec<f64>,
    std: Vec<f64>,
    corr: Vec<f64>,
    n_active: Vec<u64>,
    group_means: Vec<f64>,
    group_counts: Vec<u64>,
}

fn naive_stats(x: &[f64], n: usize, f: usize, y: &[f64], codes: &[u32], g: usize) -> NaiveStats {
    let nf = n as f64;
    let ym = y.iter().sum::<f64>() / nf;
    let sy = (y.iter().map(|v| (v - ym).powi(2)).sum::<f64>() / nf).sqrt();
    let mut out = NaiveStats {
        mean: vec![],
        std: vec![],
        corr: vec![],
        n_active: vec![],
        group_means: vec![0.0; f * g],
        group_counts: vec![0; g],
    };
    for &c in codes {
        out.group_counts[c as usize] += 1;
    }
    for j in 0..f {
        let col: Vec<f64> = (0..n).map(|i| x[i * f + j]).collect();
        let m = col.iter().sum::<f64>() / nf;
        let sd = (col.iter().map(|v| (v - m).powi(2)).sum::<f64>() / nf).sqrt();
        let cov = col
            .iter()
            .zip(y)
            .map(|(a, b)| (a - m) * (b - ym))
            .sum::<f64>()
            / nf;
        out.mean.push(m);
        out.std.push(sd);
        out.corr.push(if sd > 0.0 && sy > 0.0 {
            cov / (sd * sy)
        } else {
            f64::NAN
        });
        out.n_active
            .push(col.iter().filter(|v| **v != 0.0).count() as u64);
        for k in 0..g {
            let s: f64 = (0..n)
                .filter(|&i| codes[i] as usize == k)
                .map(|i| col[i])
                .sum();
            out.group_means[j * g + k] = s / out.group_counts[k] as f64;
        }
    }
    out
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn feature_stats_matches_naive(c in stats_case()) {
        let owned = OwnedCsr::from_dense(c.n, c.f, &c.x, &c.store_zero);
        let want = naive_stats(&c.x, c.n, c.f, &c.y, &c.codes, c.g);
        let dense = Dense::new("X", c.n, c.f, &c.x).unwrap();
        for (layout, xm) in [("csr", Matrix::Csr(owned.view("X"))), ("dense", Matrix::Dense(dense))] {
            let fs = feature_stats(&xm, Some(&c.y), Some((&c.codes, c.g))).unwrap();
            stats_shape_ok(&fs, c.n, c.f, c.g)?;
            let sx = max_abs(&c.x).max(1e-300);
            close(&format!("{layout} mean"), &fs.mean, &want.mean, 1e-12, Some(sx))?;
            close(&format!("{layout} std"), &fs.std, &want.std, 1e-12, Some(sx))?;
            close(&format!("{layout} group_means"), &fs.group_means, &want.group_means, 1e-12, Some(sx))?;
            prop_assert_eq!(&fs.n_active, &want.n_active);
            prop_assert_eq!(&fs.group_counts, &want.group_counts);
            for j in 0..c.f {
                let (a, b) = (fs.corr[j], want.corr[j]);
                if b.is_nan() {
                    prop_assert!(a.is_nan(), "{layout} corr[{j}] = {a}, expected NaN (zero variance)");
                } else {
                    // Well-separated columns only: relative std above rounding level.
                    if want.std[j] > 1e-6 * sx {
                        prop_assert!((a - b).abs() <= 1e-9, "{layout} corr[{j}] = {a}, expected {b}");
                    }
                }
            }
            // Without y: NaN correlations, same other stats.
            let f0 = feature_stats(&xm, None, None).unwrap();
            prop_assert!(f0.corr.iter().all(|v| v.is_nan()));
            prop_assert_eq!(bits(&f0.mean), bits(&fs.mean));
            prop_assert_eq!(bits(&f0.std), bits(&fs.std));
            prop_assert_eq!(f0.group_counts, vec![c.n as u64]);
        }
        // A row slice of a bigger CSR (non-zero offset) gives the statistics of those rows.
        if c.n >= 2 {
            let (a, b) = (c.n / 3, c.n - c.n / 4);
            let full = owned.view("X");
            let sl = full.slice_rows(a, b);
            let sub = OwnedCsr::from_dense(b - a, c.f, &c.x[a * c.f..b * c.f], &c.store_zero[a * c.f..b * c.f]);
            let fs = feature_stats(&Matrix::Csr(sl), Some(&c.y[a..b]), None).unwrap();
            let fw = feature_stats(&Matrix::Csr(sub.view("X")), Some(&c.y[a..b]), None).unwrap();
            prop_assert_eq!(bits(&fs.mean), bits(&fw.mean));
            prop_assert_eq!(bits(&fs.std), bits(&fw.std));
            prop_assert_eq!(bits(&fs.corr), bits(&fw.corr));
            prop_assert_eq!(&fs.n_active, &fw.n_active);
        }
    }
}

/// A column whose values are all equal has zero variance; its correlation with y must be NaN
/// (the documented "NaN where a side has zero variance"), not a number made of rounding noise.
/// Likewise for a constant y.
///
/// BUG (core): `feature_stats` only returns NaN when `std * sy` is exactly 0. For a constant
/// column whose value is not exactly representable as its own mean (0.1, 1/3, 123.456, ...),
/// `sum / n` differs from the value by an ulp, the centred sum of squares is ~1e-30 instead of
/// 0, `std` comes out ~1e-16 instead of 0, and `corr` is rounding noise in [-1, 1] (e.g. value 0.1
/// over 1000 rows: std = 3.3e-16, corr = -0.053). Same for a constant y (every corr is noise).
/// `ridge::column_std` already treats `sd <= 1e-12 |mean|` as constant; `feature_stats` does not.
#[test]

fn feature_stats_constant_column_corr_is_nan() {
    let n = 1000;
    let vals = [0.1, 1.0 / 3.0, 2.5, 1e-7, 123.456, 0.0];
    let f = vals.len();
    let x: Vec<f64> = (0..n).flat_map(|_| vals.iter().copied()).collect();
    let y: Vec<f64> = (0..n).map(|i| ((i * 37) % 101) as f64 / 101.0).collect();
    let xm = Matrix::Dense(Dense::new("X", n, f, &x).unwrap());
    let fs = feature_stats(&xm, Some(&y), None).unwrap();
    let mut bad = vec![];
    for j in 0..f {
        if !fs.corr[j].is_nan() {
            bad.push(format!(
                "column {j} = {} everywhere: std = {:e}, corr = {}",
                vals[j], fs.std[j], fs.corr[j]
            ));
        }
    }
    // A constant y: every correlation is undefined.
    let xv: Vec<f64> = (0..n * 2).map(|i| ((i * 13) % 7) as f64).collect();
    let xm2 = Matrix::Dense(Dense::new("X", n, 2, &xv).unwrap());
    let yc = vec![0.1; n];
    let fs2 = feature_stats(&xm2, Some(&yc), None).unwrap();
    for j in 0..2 {
        if !fs2.corr[j].is_nan() {
            bad.push(format!("y = 0.1 everywhere: corr[{j}] = {}", fs2.corr[j]));
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

proptest! {
    #![proptest_config(cfg(64))]

    /// Statistics and the fitted policy are equivariant under scaling the data by a power of two
    /// up to 2^±660: the same bits, scaled exactly, where squares of the raw values would
    /// overflow or underflow float64.
    #[test]
    fn second_moments_survive_extreme_scales(
        vals in vec(-4.0f64..4.0, 24),
        ys in vec(-2.0f64..2.0, 8),
        e in prop_oneof![Just(-660i32), Just(-200), Just(0), Just(200), Just(660)],
    ) {
        let (n, k) = (8, 3);
        let s = 2f64.powi(e);
        let scaled: Vec<f64> = vals.iter().map(|v| v * s).collect();
        let base = feature_stats(&Matrix::Dense(Dense::new("X", n, k, &vals).unwrap()), Some(&ys), None).unwrap();
        let big = feature_stats(&Matrix::Dense(Dense::new("X", n, k, &scaled).unwrap()), Some(&ys), None).unwrap();
        for j in 0..k {
            prop_assert_eq!(big.std[j].to_bits(), (base.std[j] * s).to_bits());
            prop_assert!(big.corr[j].to_bits() == base.corr[j].to_bits() || (big.corr[j].is_nan() && base.corr[j].is_nan()));
        }
        let o = opts(Lam::Fixed(0.5), true, true);
        let p0 = ridge::fit(&Matrix::Dense(Dense::new("X", n, k, &vals).unwrap()), &ys, &o, Par::Seq).unwrap();
        let p1 = ridge::fit(&Matrix::Dense(Dense::new("X", n, k, &scaled).unwrap()), &ys, &o, Par::Seq).unwrap();
        prop_assert_eq!(bits(&p0.coef), bits(&p1.coef));
    }
}
