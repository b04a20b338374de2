//! Thin PyO3 layer over `policytrace-core`: convert arguments, release the GIL, call the core,
//! convert results, map errors to the exception classes of `policytrace.errors`.
//!
//! The Python package normalizes inputs (dtype, layout, sparse format) before calling here;
//! these functions still check everything, so direct calls get typed errors too.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use policytrace_core as core;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// Raise `policytrace.errors.<class>(msg)`.
fn raise(py: Python<'_>, class: &str, msg: String) -> PyErr {
    match py
        .import("policytrace.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((msg.clone(),)))
    {
        Ok(exc) => PyErr::from_value(exc),
        Err(_) => PyRuntimeError::new_err(msg),
    }
}

fn map_err(py: Python<'_>, e: core::CoreError) -> PyErr {
    let class = match &e {
        core::CoreError::Shape { .. } => "ShapeError",
        core::CoreError::NonFinite { .. } => "NonFiniteError",
        core::CoreError::Empty { .. } => "EmptyInputError",
        core::CoreError::Value { .. } => "InvalidValueError",
        core::CoreError::Sparse { .. } => "SparseFormatError",
        core::CoreError::Solver { .. } => "SolverError",
    };
    raise(py, class, e.to_string())
}

/// A C-contiguous numpy array of element `T` and dimension `D`, or a typed error naming `field`
/// (`what` describes the expected array in the message).
fn array_arg<'py, T: numpy::Element, D: numpy::ndarray::Dimension>(
    py: Python<'py>,
    field: &str,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<numpy::PyReadonlyArray<'py, T, D>> {
    let arr = obj.cast::<numpy::PyArray<T, D>>().map_err(|_| {
        raise(
            py,
            "DTypeError",
            format!("`{field}` must be a {what} numpy array"),
        )
    })?;
    let ro = arr.readonly();
    if !ro.is_c_contiguous() {
        return Err(raise(
            py,
            "LayoutError",
            format!("`{field}` must be C-contiguous"),
        ));
    }
    Ok(ro)
}

fn vec_arg<'py>(
    py: Python<'py>,
    field: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray1<'py, f64>> {
    array_arg(py, field, obj, "1-D float64")
}

fn mat_arg<'py>(
    py: Python<'py>,
    field: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray2<'py, f64>> {
    array_arg(py, field, obj, "2-D float64 (row-major)")
}

fn idx_arg<'py>(
    py: Python<'py>,
    field: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray1<'py, i64>> {
    array_arg(py, field, obj, "1-D int64")
}

/// The two input layouts, borrowed from Python: a dense 2-D array or a CSR tuple
/// `(indptr, indices, data, (nrows, ncols))`.
enum MatArg<'py> {
    Dense(PyReadonlyArray2<'py, f64>),
    Csr {
        indptr: PyReadonlyArray1<'py, i64>,
        indices: PyReadonlyArray1<'py, i64>,
        data: PyReadonlyArray1<'py, f64>,
        nrows: usize,
        ncols: usize,
    },
}

impl<'py> MatArg<'py> {
    fn extract(py: Python<'py>, field: &str, obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(t) = obj.cast::<PyTuple>() {
            if t.len() != 4 {
                return Err(raise(
                    py,
                    "SparseFormatError",
                    format!("`{field}` as CSR must be (indptr, indices, data, (nrows, ncols))"),
                ));
            }
            let (nrows, ncols): (usize, usize) = t.get_item(3)?.extract().map_err(|_| {
                raise(
                    py,
                    "ShapeError",
                    format!("`{field}` CSR shape must be two non-negative ints"),
                )
            })?;
            return Ok(MatArg::Csr {
                indptr: idx_arg(py, &format!("{field}.indptr"), &t.get_item(0)?)?,
                indices: idx_arg(py, &format!("{field}.indices"), &t.get_item(1)?)?,
                data: vec_arg(py, &format!("{field}.data"), &t.get_item(2)?)?,
                nrows,
                ncols,
            });
        }
        Ok(MatArg::Dense(mat_arg(py, field, obj)?))
    }

    fn view(&self, field: &str) -> core::Result<core::Matrix<'_>> {
        match self {
            MatArg::Dense(a) => {
                let (r, c) = (a.shape()[0], a.shape()[1]);
                Ok(core::Matrix::Dense(core::Dense::new(
                    field,
                    r,
                    c,
                    a.as_slice().expect("checked contiguous"),
                )?))
            }
            MatArg::Csr {
                indptr,
                indices,
                data,
                nrows,
                ncols,
            } => Ok(core::Matrix::Csr(core::Csr::new(
                field,
                *nrows,
                *ncols,
                indptr.as_slice().expect("checked contiguous"),
                indices.as_slice().expect("checked contiguous"),
                data.as_slice().expect("checked contiguous"),
            )?)),
        }
    }
}

/// Per-feature statistics; returns a dict of arrays.
#[pyfunction]
#[pyo3(signature = (x, y=None, groups=None, n_groups=0, threads=0))]
fn feature_stats<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    y: Option<&Bound<'py, PyAny>>,
    groups: Option<&Bound<'py, PyAny>>,
    n_groups: usize,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let xa = MatArg::extract(py, "X", x)?;
    let ya = y.map(|y| vec_arg(py, "y", y)).transpose()?;
    let ga = match groups {
        Some(g) => Some(
            g.cast::<PyArray1<u32>>()
                .map_err(|_| {
                    raise(
                        py,
                        "DTypeError",
                        "`groups` must be a 1-D uint32 array of codes".into(),
                    )
                })?
                .readonly(),
        ),
        None => None,
    };
    let ys = ya.as_ref().map(|a| a.as_slice().expect("contiguous"));
    let gs = match &ga {
        Some(g) => Some(
            g.as_slice()
                .map_err(|_| raise(py, "LayoutError", "`groups` must be C-contiguous".into()))?,
        ),
        None => None,
    };
    let xv = xa.view("X").map_err(|e| map_err(py, e))?;
    let stats = py
        .detach(|| {
            core::with_pool(threads, |_| {
                core::feature_stats(&xv, ys, gs.map(|g| (g, n_groups)))
            })?
        })
        .map_err(|e| map_err(py, e))?;
    let out = PyDict::new(py);
    let (f, g) = (stats.n_features, stats.n_groups);
    out.set_item("n_active", PyArray1::from_vec(py, stats.n_active))?;
    out.set_item("mean", PyArray1::from_vec(py, stats.mean))?;
    out.set_item("std", PyArray1::from_vec(py, stats.std))?;
    out.set_item("corr", PyArray1::from_vec(py, stats.corr))?;
    out.set_item(
        "group_means",
        PyArray1::from_vec(py, stats.group_means).reshape([f, g])?,
    )?;
    out.set_item("group_counts", PyArray1::from_vec(py, stats.group_counts))?;
    Ok(out)
}

/// Fit the ridge policy. `lam=None` selects lambda by GCV over `lam_grid` (or the default grid).
#[pyfunction]
#[pyo3(signature = (x, y, lam=None, lam_grid=None, intercept=true, standardize=true, threads=0))]
#[allow(clippy::too_many_arguments)]
fn fit_policy<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
    lam: Option<f64>,
    lam_grid: Option<Vec<f64>>,
    intercept: bool,
    standardize: bool,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let xa = MatArg::extract(py, "X", x)?;
    let ya = vec_arg(py, "y", y)?;
    let ys = ya.as_slice().expect("contiguous");
    let opts = core::FitOptions {
        lam: match lam {
            Some(l) => core::Lam::Fixed(l),
            None => core::Lam::Gcv(lam_grid),
        },
        intercept,
        standardize,
    };
    let xv = xa.view("X").map_err(|e| map_err(py, e))?;
    let pol = py
        .detach(|| core::with_pool(threads, |par| core::ridge::fit(&xv, ys, &opts, par))?)
        .map_err(|e| map_err(py, e))?;
    let out = PyDict::new(py);
    out.set_item("coef", PyArray1::from_vec(py, pol.coef))?;
    out.set_item("intercept", pol.intercept)?;
    out.set_item("lam", pol.lam)?;
    out.set_item("scale", PyArray1::from_vec(py, pol.scale))?;
    out.set_item("solver", pol.solver.name())?;
    out.set_item("dual", pol.dual)?;
    out.set_item("df", pol.df)?;
    out.set_item("gcv_grid", PyArray1::from_vec(py, pol.gcv_grid))?;
    out.set_item("gcv_score", PyArray1::from_vec(py, pol.gcv_score))?;
    Ok(out)
}

/// The base fit prepared for decomposing batches of pairs.
#[pyclass(frozen, module = "policytrace._core")]
struct Decomposer {
    base: core::Base,
    threads: usize,
}

/// Pairs per chunk between two checks for Ctrl-C.
const PAIRS_PER_CHUNK: usize = 256;

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
    ) -> PyResult<Self> {
        let coef = vec_arg(py, "coef", coef)?
            .as_slice()
            .expect("contiguous")
            .to_vec();
        let scale = vec_arg(py, "scale", scale)?
            .as_slice()
            .expect("contiguous")
            .to_vec();
        let xa = MatArg::extract(py, "X", x)?;
        let ya = vec_arg(py, "y", y)?;
        let ys = ya.as_slice().expect("contiguous");
        let policy = core::Policy {
            coef,
            intercept,
            lam,
            scale,
            fit_intercept,
            solver: core::SolverKind::Cholesky,
            dual: false,
            df: 0.0,
            gcv_grid: vec![],
            gcv_score: vec![],
        };
        if !(lam.is_finite() && lam >= 0.0) {
            return Err(map_err(
                py,
                core::CoreError::value("lam", format!("{lam} is not a finite non-negative number")),
            ));
        }
        let xv = xa.view("X").map_err(|e| map_err(py, e))?;
        let base = py
            .detach(|| core::with_pool(threads, |par| core::Base::new(&policy, &xv, ys, par))?)
            .map_err(|e| map_err(py, e))?;
        Ok(Self { base, threads })
    }

    /// Probes and features of the base design.
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.base.design.n, self.base.design.k)
    }

    /// Decompose P pairs. `dx`: CSR tuple of shape (P*n, K), pair-major; `dy`: (P, n).
    /// Returns a dict with `d_total`, `d_x`, `d_y` (P, K), `pred_dy` (P,) and `n_fallback`.
    #[pyo3(signature = (dx, dy, method="exact", threads=None))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        dx: &Bound<'py, PyAny>,
        dy: &Bound<'py, PyAny>,
        method: &str,
        threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let method = match method {
            "exact" => core::Method::Exact,
            "first_order" => core::Method::FirstOrder,
            other => {
                return Err(map_err(
                    py,
                    core::CoreError::value(
                        "method",
                        format!("'{other}' is not 'exact' or 'first_order'"),
                    ),
                ))
            }
        };
        let dya = mat_arg(py, "dy", dy)?;
        let n = self.base.design.n;
        let p = dya.shape()[0];
        if dya.shape()[1] != n {
            return Err(map_err(
                py,
                core::CoreError::shape("dy", format!("(P, {n})"), format!("{:?}", dya.shape())),
            ));
        }
        let dys = dya.as_slice().expect("contiguous");
        let t = dx.cast::<PyTuple>().map_err(|_| {
            raise(
                py,
                "SparseFormatError",
                "`dX` must be given to the core as a CSR tuple".into(),
            )
        })?;
        if t.len() != 4 {
            return Err(raise(
                py,
                "SparseFormatError",
                "`dX` as CSR must be (indptr, indices, data, (nrows, ncols))".into(),
            ));
        }
        let (nrows, ncols): (usize, usize) = t.get_item(3)?.extract().map_err(|_| {
            raise(
                py,
                "ShapeError",
                "`dX` CSR shape must be two non-negative ints".into(),
            )
        })?;
        let data = vec_arg(py, "dX.data", &t.get_item(2)?)?;
        let ds = data.as_slice().expect("contiguous");
        let (ip, ix) = (t.get_item(0)?, t.get_item(1)?);
        let threads = threads.unwrap_or(self.threads);
        let acc = if let Ok(ip32) = ip.cast::<PyArray1<i32>>() {
            // scipy's int32 indices are used as they are: no widening copy of a large ΔX.
            let indptr = ip32.readonly();
            let indices = ix
                .cast::<PyArray1<i32>>()
                .map_err(|_| {
                    raise(
                        py,
                        "DTypeError",
                        "`dX.indices` must have indptr's dtype (int32)".into(),
                    )
                })?
                .readonly();
            let a = indptr
                .as_slice()
                .map_err(|_| raise(py, "LayoutError", "`dX.indptr` must be C-contiguous".into()))?;
            let b = indices.as_slice().map_err(|_| {
                raise(
                    py,
                    "LayoutError",
                    "`dX.indices` must be C-contiguous".into(),
                )
            })?;
            self.run_chunks(py, nrows, ncols, a, b, ds, dys, p, method, threads)?
        } else {
            let indptr = idx_arg(py, "dX.indptr", &ip)?;
            let indices = idx_arg(py, "dX.indices", &ix)?;
            let (a, b) = (
                indptr.as_slice().expect("contiguous"),
                indices.as_slice().expect("contiguous"),
            );
            self.run_chunks(py, nrows, ncols, a, b, ds, dys, p, method, threads)?
        };
        let k = self.base.design.k;
        let out = PyDict::new(py);
        out.set_item(
            "d_total",
            PyArray1::from_vec(py, acc.d_total).reshape([p, k])?,
        )?;
        out.set_item("d_x", PyArray1::from_vec(py, acc.d_x).reshape([p, k])?)?;
        out.set_item("d_y", PyArray1::from_vec(py, acc.d_y).reshape([p, k])?)?;
        out.set_item("pred_dy", PyArray1::from_vec(py, acc.pred_dy))?;
        out.set_item("n_fallback", acc.n_fallback)?;
        Ok(out)
    }
}

impl Decomposer {
    /// Validate the stacked ΔX (in parallel) and decompose it chunk by chunk, checking for
    /// Ctrl-C between chunks.
    #[allow(clippy::too_many_arguments)]
    fn run_chunks<I: core::matrix::Index>(
        &self,
        py: Python<'_>,
        nrows: usize,
        ncols: usize,
        indptr: &[I],
        indices: &[I],
        data: &[f64],
        dys: &[f64],
        p: usize,
        method: core::Method,
        threads: usize,
    ) -> PyResult<core::Split> {
        let (n, k) = (self.base.design.n, self.base.design.k);
        if nrows != p * n {
            return Err(map_err(
                py,
                core::CoreError::shape(
                    "dX",
                    format!("{} rows ({p} pairs x {n} probes)", p * n),
                    format!("{nrows} rows"),
                ),
            ));
        }
        let (pool, par) = core::pool(threads).map_err(|e| map_err(py, e))?;
        let dxc = py
            .detach(|| pool.install(|| core::Csr::new("dX", nrows, ncols, indptr, indices, data)))
            .map_err(|e| map_err(py, e))?;
        let mut acc = core::Split {
            n_pairs: 0,
            k,
            d_total: Vec::with_capacity(p * k),
            d_x: Vec::with_capacity(p * k),
            d_y: Vec::with_capacity(p * k),
            pred_dy: Vec::with_capacity(p),
            n_fallback: 0,
        };
        let mut start = 0;
        while start < p {
            let end = (start + PAIRS_PER_CHUNK).min(p);
            let chunk = dxc.slice_rows(start * n, end * n);
            let dyc = &dys[start * n..end * n];
            let part = py
                .detach(|| pool.install(|| core::decompose(&self.base, &chunk, dyc, method, par)))
                .map_err(|e| map_err(py, e))?;
            acc.n_pairs += part.n_pairs;
            acc.d_total.extend(part.d_total);
            acc.d_x.extend(part.d_x);
            acc.d_y.extend(part.d_y);
            acc.pred_dy.extend(part.pred_dy);
            acc.n_fallback += part.n_fallback;
            start = end;
            py.check_signals()?;
        }
        Ok(acc)
    }
}

/// Dominant feature, off-target share and interference flag per pair.
#[pyfunction]
fn interference<'py>(
    py: Python<'py>,
    d_coef: &Bound<'py, PyAny>,
    feature_group: &Bound<'py, PyAny>,
    pair_group: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let d = mat_arg(py, "d_coef", d_coef)?;
    let k = d.shape()[1];
    let fg = idx_arg(py, "feature_group", feature_group)?;
    let pg = idx_arg(py, "pair_group", pair_group)?;
    if d.shape()[0] != pg.len() {
        return Err(map_err(
            py,
            core::CoreError::shape("pair_group", format!("length {}", d.shape()[0]), pg.len()),
        ));
    }
    let res = core::interference(
        d.as_slice().expect("contiguous"),
        k,
        fg.as_slice().expect("contiguous"),
        pg.as_slice().expect("contiguous"),
    )
    .map_err(|e| map_err(py, e))?;
    (
        PyArray1::from_vec(py, res.dominant),
        PyArray1::from_vec(py, res.off_target_share),
        PyArray1::from_vec(py, res.flag),
    )
        .into_pyobject(py)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(feature_stats, m)?)?;
    m.add_function(wrap_pyfunction!(fit_policy, m)?)?;
    m.add_function(wrap_pyfunction!(interference, m)?)?;
    m.add_class::<Decomposer>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
