//! Arguments from Python: C-contiguous numpy arrays and the one CSR parser, for int32 or int64
//! indices (scipy's int32 indices are used as they are: no widening copy of a large ΔX).

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use policytrace_core as core;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::errors::{self, Result};

/// A C-contiguous numpy array of element `T` and dimension `D`, or a typed error naming `field`
/// (`what` describes the expected array in the message).
pub fn array<'py, T: numpy::Element, D: numpy::ndarray::Dimension>(
    field: &str,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> Result<numpy::PyReadonlyArray<'py, T, D>> {
    let arr = obj
        .cast::<numpy::PyArray<T, D>>()
        .map_err(|_| errors::dtype(format!("`{field}` must be a {what} numpy array")))?;
    let ro = arr.readonly();
    if !ro.is_c_contiguous() {
        return Err(errors::layout(format!("`{field}` must be C-contiguous")));
    }
    Ok(ro)
}

pub fn vector<'py>(field: &str, obj: &Bound<'py, PyAny>) -> Result<PyReadonlyArray1<'py, f64>> {
    array(field, obj, "1-D float64")
}

pub fn matrix<'py>(field: &str, obj: &Bound<'py, PyAny>) -> Result<PyReadonlyArray2<'py, f64>> {
    array(field, obj, "2-D float64 (row-major)")
}

pub fn index<'py>(field: &str, obj: &Bound<'py, PyAny>) -> Result<PyReadonlyArray1<'py, i64>> {
    array(field, obj, "1-D int64")
}

/// Slice of a contiguous (checked) array.
pub fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>) -> &'a [T] {
    a.as_slice().expect("checked contiguous")
}

/// Index arrays of a CSR, borrowed with their own integer width.
pub enum Indices<'py> {
    I32(PyReadonlyArray1<'py, i32>, PyReadonlyArray1<'py, i32>),
    I64(PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, i64>),
}

/// A CSR tuple `(indptr, indices, data, (nrows, ncols))` borrowed from Python.
pub struct CsrArg<'py> {
    pub field: String,
    pub indices: Indices<'py>,
    pub data: PyReadonlyArray1<'py, f64>,
    pub nrows: usize,
    pub ncols: usize,
}

impl<'py> CsrArg<'py> {
    pub fn extract(field: &str, t: &Bound<'py, PyTuple>) -> Result<Self> {
        if t.len() != 4 {
            return Err(errors::sparse(format!(
                "`{field}` as CSR must be (indptr, indices, data, (nrows, ncols))"
            )));
        }
        let (nrows, ncols): (usize, usize) = t.get_item(3)?.extract().map_err(|_| {
            errors::shape(format!("`{field}` CSR shape must be two non-negative ints"))
        })?;
        let (ip, ix) = (t.get_item(0)?, t.get_item(1)?);
        let indices = if let Ok(ip32) = ip.cast::<PyArray1<i32>>() {
            let ix32 = ix.cast::<PyArray1<i32>>().map_err(|_| {
                errors::dtype(format!(
                    "`{field}.indices` must have the dtype of `{field}.indptr` (int32)"
                ))
            })?;
            let (a, b) = (ip32.readonly(), ix32.readonly());
            if !a.is_c_contiguous() || !b.is_c_contiguous() {
                return Err(errors::layout(format!(
                    "`{field}.indptr` and `{field}.indices` must be C-contiguous"
                )));
            }
            Indices::I32(a, b)
        } else {
            Indices::I64(
                index(&format!("{field}.indptr"), &ip)?,
                index(&format!("{field}.indices"), &ix)?,
            )
        };
        Ok(Self {
            field: field.to_string(),
            indices,
            data: vector(&format!("{field}.data"), &t.get_item(2)?)?,
            nrows,
            ncols,
        })
    }
}

/// Run `$body` with `$indptr`, `$indices` bound to the argument's index slices, of whichever
/// integer width it has (the body is generic code instantiated for both).
#[macro_export]
macro_rules! with_indices {
    ($arg:expr, |$indptr:ident, $indices:ident| $body:expr) => {
        match &$arg.indices {
            $crate::convert::Indices::I32(a, b) => {
                let ($indptr, $indices) = ($crate::convert::slice(a), $crate::convert::slice(b));
                $body
            }
            $crate::convert::Indices::I64(a, b) => {
                let ($indptr, $indices) = ($crate::convert::slice(a), $crate::convert::slice(b));
                $body
            }
        }
    };
}

/// A design matrix: dense 2-D float64, or a CSR tuple (int64 indices; int32 are widened, the
/// Python layer passes int64).
pub enum MatArg<'py> {
    Dense(String, PyReadonlyArray2<'py, f64>),
    Csr(Vec<i64>, Vec<i64>, CsrArg<'py>),
}

impl<'py> MatArg<'py> {
    pub fn extract(field: &str, obj: &Bound<'py, PyAny>) -> Result<Self> {
        if let Ok(t) = obj.cast::<PyTuple>() {
            let csr = CsrArg::extract(field, t)?;
            let (ip, ix) = match &csr.indices {
                Indices::I32(a, b) => (
                    slice(a).iter().map(|&v| v as i64).collect(),
                    slice(b).iter().map(|&v| v as i64).collect(),
                ),
                Indices::I64(..) => (Vec::new(), Vec::new()),
            };
            return Ok(MatArg::Csr(ip, ix, csr));
        }
        Ok(MatArg::Dense(field.to_string(), matrix(field, obj)?))
    }

    pub fn view(&self) -> core::Result<core::Matrix<'_>> {
        match self {
            MatArg::Dense(field, a) => {
                let (r, c) = (a.shape()[0], a.shape()[1]);
                let data = a.as_slice().expect("checked contiguous");
                Ok(core::Matrix::Dense(core::Dense::new(field, r, c, data)?))
            }
            MatArg::Csr(ip, ix, csr) => {
                let (indptr, indices): (&[i64], &[i64]) = match &csr.indices {
                    Indices::I64(a, b) => (slice(a), slice(b)),
                    Indices::I32(..) => (ip, ix),
                };
                Ok(core::Matrix::Csr(core::Csr::new(
                    &csr.field,
                    csr.nrows,
                    csr.ncols,
                    indptr,
                    indices,
                    slice(&csr.data),
                )?))
            }
        }
    }
}

/// A batch of ΔX as the caller holds it: one stacked pair-major CSR tuple, one dense float64
/// or float32 array ((P, n, K) or (P·n, K)), or a list with one CSR tuple or dense (n, K) array
/// per pair. Borrowed, never copied.
pub enum DxArg<'py> {
    Csr(CsrArg<'py>),
    F64(String, numpy::PyReadonlyArrayDyn<'py, f64>),
    F32(String, numpy::PyReadonlyArrayDyn<'py, f32>),
    List(Vec<DxArg<'py>>),
}

impl<'py> DxArg<'py> {
    pub fn extract(field: &str, obj: &Bound<'py, PyAny>, top: bool) -> Result<Self> {
        if let Ok(t) = obj.cast::<PyTuple>() {
            return Ok(DxArg::Csr(CsrArg::extract(field, t)?));
        }
        if let Ok(a) = obj.cast::<numpy::PyArrayDyn<f64>>() {
            return Ok(DxArg::F64(field.into(), contiguous(field, a.readonly())?));
        }
        if let Ok(a) = obj.cast::<numpy::PyArrayDyn<f32>>() {
            return Ok(DxArg::F32(field.into(), contiguous(field, a.readonly())?));
        }
        if top {
            if let Ok(l) = obj.cast::<pyo3::types::PyList>() {
                let items = l
                    .iter()
                    .enumerate()
                    .map(|(i, o)| DxArg::extract(&format!("{field}[{i}]"), &o, false))
                    .collect::<Result<Vec<_>>>()?;
                return Ok(DxArg::List(items));
            }
        }
        Err(errors::dtype(format!(
            "`{field}` must be a CSR tuple or a C-contiguous float64/float32 numpy array{}",
            if top {
                ", or a list of them (one per pair)"
            } else {
                ""
            }
        )))
    }

    /// The borrowed slices (plain data, safe to hand to worker threads).
    pub fn slices(&self) -> RawDx<'_> {
        match self {
            DxArg::Csr(c) => RawDx::Csr(
                match &c.indices {
                    Indices::I32(a, b) => RawIdx::I32(slice(a), slice(b)),
                    Indices::I64(a, b) => RawIdx::I64(slice(a), slice(b)),
                },
                &c.field,
                c.nrows,
                c.ncols,
                slice(&c.data),
            ),
            DxArg::F64(f, a) => RawDx::F64(
                f,
                a.shape().to_vec(),
                a.as_slice().expect("checked contiguous"),
            ),
            DxArg::F32(f, a) => RawDx::F32(
                f,
                a.shape().to_vec(),
                a.as_slice().expect("checked contiguous"),
            ),
            DxArg::List(items) => RawDx::List(items.iter().map(|i| i.slices()).collect()),
        }
    }
}

pub enum RawIdx<'a> {
    I32(&'a [i32], &'a [i32]),
    I64(&'a [i64], &'a [i64]),
}

/// [`DxArg`]'s data as plain borrowed slices.
pub enum RawDx<'a> {
    Csr(RawIdx<'a>, &'a str, usize, usize, &'a [f64]),
    F64(&'a str, Vec<usize>, &'a [f64]),
    F32(&'a str, Vec<usize>, &'a [f32]),
    List(Vec<RawDx<'a>>),
}

impl<'a> RawDx<'a> {
    /// Validated per-pair views for a base design of `n` probes and `k` features (runs on the
    /// current Rayon pool; call it with the GIL released).
    pub fn views(&self, n: usize, k: usize) -> core::Result<Vec<core::PairRows<'a>>> {
        use core::pairs::{csr_pairs, dense_pairs};
        match self {
            RawDx::Csr(RawIdx::I32(ip, ix), f, r, c, d) => csr_pairs(f, *r, *c, ip, ix, d, n, k),
            RawDx::Csr(RawIdx::I64(ip, ix), f, r, c, d) => csr_pairs(f, *r, *c, ip, ix, d, n, k),
            RawDx::F64(f, shape, d) => dense_pairs(f, shape, d, n, k, core::PairRows::Dense64),
            RawDx::F32(f, shape, d) => dense_pairs(f, shape, d, n, k, core::PairRows::Dense32),
            RawDx::List(items) => {
                use rayon::prelude::*;
                let per: Vec<core::Result<Vec<core::PairRows<'a>>>> =
                    items.par_iter().map(|it| it.views(n, k)).collect();
                let mut out = Vec::with_capacity(items.len());
                for (i, v) in per.into_iter().enumerate() {
                    let v = v?;
                    if v.len() != 1 {
                        return Err(core::CoreError::shape(
                            &format!("dX[{i}]"),
                            format!("({n}, {k}) (one pair: probes x features)"),
                            format!("{} pairs' rows", v.len()),
                        ));
                    }
                    out.extend(v);
                }
                Ok(out)
            }
        }
    }
}

fn contiguous<'py, T: numpy::Element>(
    field: &str,
    a: numpy::PyReadonlyArrayDyn<'py, T>,
) -> Result<numpy::PyReadonlyArrayDyn<'py, T>> {
    if !a.is_c_contiguous() {
        return Err(errors::layout(format!("`{field}` must be C-contiguous")));
    }
    Ok(a)
}
