//! Typed errors of the core. Every failure on user data is one of these, never a panic:
//! the binding maps each variant to a Python exception class of the same meaning.

use thiserror::Error;

pub type Result<T> = std::result::Result<T, CoreError>;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// An argument has the wrong length or dimension.
    #[error("shape mismatch in `{field}`: expected {expected}, got {got}")]
    Shape {
        field: String,
        expected: String,
        got: String,
    },
    /// An argument holds NaN or an infinity.
    #[error("`{field}` holds a non-finite value (NaN or inf) at {location}; clean or drop it before fitting")]
    NonFinite { field: String, location: String },
    /// An argument is empty where data is required.
    #[error("`{field}` is empty: {why}")]
    Empty { field: String, why: String },
    /// A scalar or option is out of its domain.
    #[error("invalid value for `{field}`: {why}")]
    Value { field: String, why: String },
    /// A sparse matrix whose structure is inconsistent.
    #[error("malformed sparse matrix `{field}`: {why}")]
    Sparse { field: String, why: String },
    /// The linear system could not be solved even by the fallback.
    #[error("linear solve failed: {why}")]
    Solver { why: String },
}

impl CoreError {
    pub fn shape(field: &str, expected: impl ToString, got: impl ToString) -> Self {
        Self::Shape {
            field: field.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
    pub fn value(field: &str, why: impl ToString) -> Self {
        Self::Value {
            field: field.into(),
            why: why.to_string(),
        }
    }
    pub fn sparse(field: &str, why: impl ToString) -> Self {
        Self::Sparse {
            field: field.into(),
            why: why.to_string(),
        }
    }
    pub fn empty(field: &str, why: impl ToString) -> Self {
        Self::Empty {
            field: field.into(),
            why: why.to_string(),
        }
    }
}

/// Check every value is finite; name the first bad one by row and column of a row-major layout.
pub fn check_finite(field: &str, data: &[f64], ncols: usize) -> Result<()> {
    if let Some(pos) = data.iter().position(|v| !v.is_finite()) {
        let location = if ncols > 1 {
            format!("row {}, column {}", pos / ncols, pos % ncols)
        } else {
            format!("index {pos}")
        };
        return Err(CoreError::NonFinite {
            field: field.into(),
            location,
        });
    }
    Ok(())
}

/// A zeroed buffer of `len` values, or a typed error when it cannot be allocated (absurd shapes
/// must not abort the process).
pub fn zeros<T: Clone + Default>(field: &str, len: usize) -> Result<Vec<T>> {
    let mut v: Vec<T> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        CoreError::value(
            field,
            format!("needs {len} values, more memory than can be allocated"),
        )
    })?;
    v.resize(len, T::default());
    Ok(v)
}

/// Fail with a typed error if `len` f64 values could not be allocated (reserves address space
/// only; nothing is touched).
pub fn check_alloc(field: &str, len: Option<usize>) -> Result<()> {
    let len = len.ok_or_else(|| CoreError::value(field, "the shape's size overflows"))?;
    let mut v: Vec<f64> = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        CoreError::value(
            field,
            format!("needs {len} values, more memory than can be allocated"),
        )
    })
}
