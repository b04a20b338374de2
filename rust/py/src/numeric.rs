//! The numeric entry points: convert, release the GIL (`py.detach`), call the core on a private
//! thread pool, return a typed, frozen result object.

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use policytrace_core as core;
use pyo3::prelude::*;

use crate::convert::{self, slice, DxArg, MatArg};
use crate::errors::Result;

fn vec1<T: numpy::Element>(py: Python<'_>, v: Vec<T>) -> Py<PyArray1<T>> {
    PyArray1::from_vec(py, v).unbind()
}

fn mat2(py: Python<'_>, v: Vec<f64>, rows: usize, cols: usize) -> Result<Py<PyArray2<f64>>> {
    Ok(PyArray1::from_vec(py, v).reshape([rows, cols])?.unbind())
}

/// Per-feature statistics (`feature_stats`).
#[pyclass(frozen, get_all, module = "policytrace._core")]
pub struct FeatureStats {
    /// Probes with a non-zero activation, per feature.
    n_active: Py<PyArray1<u64>>,
    mean: Py<PyArray1<f64>>,
    /// Population standard deviation.
    std: Py<PyArray1<f64>>,
    /// Pearson correlation with y (NaN where undefined).
    corr: Py<PyArray1<f64>>,
    /// Means within each probe group, (F, G).
    group_means: Py<PyArray2<f64>>,
    group_counts: Py<PyArray1<u64>>,
}

/// A fitted ridge policy (`fit_policy`).
#[pyclass(frozen, get_all, module = "policytrace._core")]
pub struct FitResult {
    coef: Py<PyArray1<f64>>,
    intercept: f64,
    lam: f64,
    scale: Py<PyArray1<f64>>,
    /// "cholesky" or "eigh-pinv".
    solver: String,
    dual: bool,
    df: f64,
    gcv_grid: Py<PyArray1<f64>>,
    gcv_score: Py<PyArray1<f64>>,
}

/// Per-pair coefficient shifts of one decomposition call, (P, K) each.
#[pyclass(frozen, get_all, module = "policytrace._core")]
pub struct SplitResult {
    d_total: Py<PyArray2<f64>>,
    d_x: Py<PyArray2<f64>>,
    d_y: Py<PyArray2<f64>>,
    /// Mean over probes of the base policy's predicted change, (P,).
    pred_dy: Py<PyArray1<f64>>,
    /// Pairs whose perturbed system needed the eigendecomposition fallback.
    n_fallback: usize,
    /// The policy's predicted change per probe, `ΔX_j · (coef / scale)`, (P, n).
    predicted: Py<PyArray2<f64>>,
    /// Mean ΔX over probes per feature (unscaled), (P, K).
    mean_dx: Py<PyArray2<f64>>,
}

/// Dominant feature, off-target share and flag per pair (`interference`).
#[pyclass(frozen, get_all, module = "policytrace._core")]
pub struct InterferenceResult {
    dominant: Py<PyArray1<i64>>,
    off_target_share: Py<PyArray1<f64>>,
    flag: Py<PyArray1<bool>>,
}

/// Per-feature statistics in one pass over the non-zeros.
#[pyfunction]
#[pyo3(signature = (x, y=None, groups=None, n_groups=0, threads=0))]
pub fn feature_stats<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    y: Option<&Bound<'py, PyAny>>,
    groups: Option<&Bound<'py, PyAny>>,
    n_groups: usize,
    threads: usize,
) -> Result<FeatureStats> {
    let xa = MatArg::extract("X", x)?;
    let ya = y.map(|y| convert::vector("y", y)).transpose()?;
    let ga: Option<PyReadonlyArray1<u32>> = groups
        .map(|g| convert::array("groups", g, "1-D uint32 array of codes"))
        .transpose()?;
    let ys = ya.as_ref().map(slice);
    let gs = ga.as_ref().map(|g| (slice(g), n_groups));
    let xv = xa.view()?;
    let stats = py.detach(|| core::with_pool(threads, |_| core::feature_stats(&xv, ys, gs)))??;
    let (f, g) = (stats.n_features, stats.n_groups);
    Ok(FeatureStats {
        n_active: vec1(py, stats.n_active),
        mean: vec1(py, stats.mean),
        std: vec1(py, stats.std),
        corr: vec1(py, stats.corr),
        group_means: mat2(py, stats.group_means, f, g)?,
        group_counts: vec1(py, stats.group_counts),
    })
}

/// Fit the ridge policy. `lam=None` selects lambda by GCV over `lam_grid` (or the default grid).
#[pyfunction]
#[pyo3(signature = (x, y, lam=None, lam_grid=None, intercept=true, standardize=true, threads=0))]
#[allow(clippy::too_many_arguments)]
pub fn fit_policy<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
    lam: Option<f64>,
    lam_grid: Option<Vec<f64>>,
    intercept: bool,
    standardize: bool,
    threads: usize,
) -> Result<FitResult> {
    let xa = MatArg::extract("X", x)?;
    let ya = convert::vector("y", y)?;
    let opts = core::FitOptions {
        lam: match lam {
            Some(l) => core::Lam::Fixed(l),
            None => core::Lam::Gcv(lam_grid),
        },
        intercept,
        standardize,
    };
    let xv = xa.view()?;
    let ys = slice(&ya);
    let pol =
        py.detach(|| core::with_pool(threads, |par| core::ridge::fit(&xv, ys, &opts, par)))??;
    Ok(FitResult {
        coef: vec1(py, pol.coef),
        intercept: pol.intercept,
        lam: pol.lam,
        scale: vec1(py, pol.scale),
        solver: pol.solver.name().to_string(),
        dual: pol.dual,
        df: pol.df,
        gcv_grid: vec1(py, pol.gcv_grid),
        gcv_score: vec1(py, pol.gcv_score),
    })
}

/// The base fit prepared for decomposing batches of pairs.
#[pyclass(frozen, module = "policytrace._core")]
pub struct Decomposer {
    base: core::Base,
    threads: usize,
}

/// Pairs per chunk between two checks for Ctrl-C.
const PAIRS_PER_CHUNK: usize = 256;

fn method(name: &str) -> Result<core::Method> {
    match name {
        "exact" => Ok(core::Method::Exact),
        "first_order" => Ok(core::Method::FirstOrder),
        other => Err(core::CoreError::value(
            "method",
            format!("'{other}' is not 'exact' or 'first_order'"),
        )
        .into()),
    }
}

#[pymethods]
impl Decomposer {
    #[new]
    #[pyo3(signature = (coef, intercept, lam, scale, fit_intercept, x, y, threads=0))]
    #[allow(clippy::too_many_arguments)]
    fn new<'py>(
        py: Python<'py>,
        coef: &Bound<'py, PyAny>,
        intercept: f64,
        lam: f64,
        scale: &Bound<'py, PyAny>,
        fit_intercept: bool,
        x: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        threads: usize,
    ) -> Result<Self> {
        let (coef, scale) = (
            convert::vector("coef", coef)?,
            convert::vector("scale", scale)?,
        );
        let xa = MatArg::extract("X", x)?;
        let ya = convert::vector("y", y)?;
        let spec = core::BaseSpec {
            coef: slice(&coef),
            intercept,
            lam,
            scale: slice(&scale),
            fit_intercept,
        };
        let (xv, ys) = (xa.view()?, slice(&ya));
        let base = py.detach(|| {
            core::with_pool(threads, |par| core::Base::from_spec(spec, &xv, ys, par))
        })??;
        Ok(Self { base, threads })
    }

    /// Probes and features of the base design.
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.base.design.n, self.base.design.k)
    }

    /// Decompose P pairs. `dx`: a stacked pair-major CSR tuple of shape (P*n, K) (int32 or
    /// int64 indices), a C-contiguous float64/float32 array of shape (P, n, K) or (P*n, K), or a
    /// list with one CSR tuple or (n, K) array per pair; `dy`: (P, n). Nothing is copied.
    #[pyo3(signature = (dx, dy, method="exact", threads=None))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        dx: &Bound<'py, PyAny>,
        dy: &Bound<'py, PyAny>,
        method: &str,
        threads: Option<usize>,
    ) -> Result<SplitResult> {
        let method = self::method(method)?;
        let dya = convert::matrix("dy", dy)?;
        let (n, k, p) = (self.base.design.n, self.base.design.k, dya.shape()[0]);
        if dya.shape()[1] != n {
            return Err(core::CoreError::shape(
                "dy",
                format!("(P, {n})"),
                format!("{:?}", dya.shape()),
            )
            .into());
        }
        let arg = DxArg::extract("dX", dx, true)?;
        let dys = dya.as_slice().expect("checked contiguous");
        let (pool, par) = core::pool(threads.unwrap_or(self.threads))?;
        let raw = arg.slices();
        let views = py.detach(|| pool.install(|| raw.views(n, k)))?;
        if views.len() != p {
            let want = format!("{p} pairs (the rows of dy)");
            return Err(
                core::CoreError::shape("dX", want, format!("{} pairs", views.len())).into(),
            );
        }
        let split = self.run_chunks(py, &pool, par, &views, dys, method)?;
        Ok(SplitResult {
            d_total: mat2(py, split.d_total, p, k)?,
            d_x: mat2(py, split.d_x, p, k)?,
            d_y: mat2(py, split.d_y, p, k)?,
            pred_dy: vec1(py, split.pred_dy),
            n_fallback: split.n_fallback,
            predicted: mat2(py, split.predicted, p, n)?,
            mean_dx: mat2(py, split.mean_dx, p, k)?,
        })
    }
}

impl Decomposer {
    /// Decompose the pairs chunk by chunk, checking for Ctrl-C between chunks.
    fn run_chunks(
        &self,
        py: Python<'_>,
        pool: &rayon::ThreadPool,
        par: core::Par,
        views: &[core::PairRows<'_>],
        dys: &[f64],
        method: core::Method,
    ) -> Result<core::Split> {
        let (n, p) = (self.base.design.n, views.len());
        let mut acc = core::Split::empty(self.base.design.k);
        let mut start = 0;
        while start < p {
            let end = (start + PAIRS_PER_CHUNK).min(p);
            let (chunk, dyc) = (&views[start..end], &dys[start * n..end * n]);
            acc.append(py.detach(|| {
                pool.install(|| core::decompose_pairs(&self.base, chunk, dyc, method, par))
            })?);
            start = end;
            py.check_signals()?;
        }
        Ok(acc)
    }
}

/// Dominant feature, off-target share and interference flag per pair.
#[pyfunction]
pub fn interference<'py>(
    py: Python<'py>,
    d_coef: &Bound<'py, PyAny>,
    feature_group: &Bound<'py, PyAny>,
    pair_group: &Bound<'py, PyAny>,
) -> Result<InterferenceResult> {
    let d = convert::matrix("d_coef", d_coef)?;
    let fg = convert::index("feature_group", feature_group)?;
    let pg = convert::index("pair_group", pair_group)?;
    if d.shape()[0] != pg.len() {
        return Err(core::CoreError::shape(
            "pair_group",
            format!("length {}", d.shape()[0]),
            pg.len(),
        )
        .into());
    }
    let res = core::interference(
        d.as_slice().expect("checked contiguous"),
        d.shape()[1],
        slice(&fg),
        slice(&pg),
    )?;
    Ok(InterferenceResult {
        dominant: vec1(py, res.dominant),
        off_target_share: vec1(py, res.off_target_share),
        flag: vec1(py, res.flag),
    })
}

/// Inner products of stored pair gradients (p, d) with concept gradients (c, d), both float32
/// (a memory-mapped store is read in place); returns (p, c) float64.
#[pyfunction]
#[pyo3(signature = (pairs, concepts, threads=0))]
pub fn gradient_scores<'py>(
    py: Python<'py>,
    pairs: &Bound<'py, PyAny>,
    concepts: &Bound<'py, PyAny>,
    threads: usize,
) -> Result<Bound<'py, PyArray2<f64>>> {
    let pa = convert::array::<f32, numpy::Ix2>("pairs", pairs, "2-D float32")?;
    let ca = convert::array::<f32, numpy::Ix2>("concepts", concepts, "2-D float32")?;
    let (p, d) = (pa.shape()[0], pa.shape()[1]);
    let (c, dc) = (ca.shape()[0], ca.shape()[1]);
    if dc != d {
        return Err(core::CoreError::shape(
            "concepts",
            format!("{d} columns (the pairs')"),
            format!("{dc} columns"),
        )
        .into());
    }
    let (ps, cs) = (
        pa.as_slice().expect("checked contiguous"),
        ca.as_slice().expect("checked contiguous"),
    );
    let out = py.detach(|| core::with_pool(threads, |_| core::gradient_scores(ps, cs, d)))??;
    Ok(PyArray1::from_vec(py, out).reshape([p, c])?)
}
