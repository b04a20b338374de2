//! Errors, mapped once: the core's `CoreError` variants and the binding's own argument checks
//! become the exception classes of `policytrace.errors` (imported, not looked up by name), and
//! every binding function returns [`Result`] so that `?` works on core and Python results alike.

use policytrace_core::CoreError;
use pyo3::prelude::*;

pyo3::import_exception!(policytrace.errors, ShapeError);
pyo3::import_exception!(policytrace.errors, NonFiniteError);
pyo3::import_exception!(policytrace.errors, EmptyInputError);
pyo3::import_exception!(policytrace.errors, InvalidValueError);
pyo3::import_exception!(policytrace.errors, SparseFormatError);
pyo3::import_exception!(policytrace.errors, SolverError);
pyo3::import_exception!(policytrace.errors, DTypeError);
pyo3::import_exception!(policytrace.errors, LayoutError);

/// A core error, or a Python exception (an argument check of the binding, or pyo3's own).
pub enum Error {
    Core(CoreError),
    Python(PyErr),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Self {
        Error::Core(e)
    }
}

impl From<PyErr> for Error {
    fn from(e: PyErr) -> Self {
        Error::Python(e)
    }
}

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let e = match err {
            Error::Python(e) => return e,
            Error::Core(e) => e,
        };
        let msg = e.to_string();
        match e {
            CoreError::Shape { .. } => ShapeError::new_err(msg),
            CoreError::NonFinite { .. } => NonFiniteError::new_err(msg),
            CoreError::Empty { .. } => EmptyInputError::new_err(msg),
            CoreError::Value { .. } => InvalidValueError::new_err(msg),
            CoreError::Sparse { .. } => SparseFormatError::new_err(msg),
            CoreError::Solver { .. } => SolverError::new_err(msg),
        }
    }
}

/// An argument of the wrong dtype or kind.
pub fn dtype(msg: impl Into<String>) -> Error {
    Error::Python(DTypeError::new_err(msg.into()))
}

/// An array that is not C-contiguous.
pub fn layout(msg: impl Into<String>) -> Error {
    Error::Python(LayoutError::new_err(msg.into()))
}

/// A CSR tuple of the wrong arity or structure.
pub fn sparse(msg: impl Into<String>) -> Error {
    Error::Python(SparseFormatError::new_err(msg.into()))
}

/// A shape that is not two non-negative integers.
pub fn shape(msg: impl Into<String>) -> Error {
    Error::Python(ShapeError::new_err(msg.into()))
}
