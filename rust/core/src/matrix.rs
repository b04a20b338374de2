//! Borrowed views of the two input layouts: row-major dense and CSR.
//! Both are validated once on construction so the kernels can index without checks.

use rayon::prelude::*;

use crate::error::{check_finite, zeros, CoreError, Result};
use crate::pairs::PairRows;

/// Integer type of CSR index arrays: scipy uses int32 until int64 is needed, and taking
/// either avoids copying large ΔX index arrays.
pub trait Index: Copy + Send + Sync + std::fmt::Display + 'static {
    fn to_i64(self) -> i64;
    /// A pair's rows of this index width as a [`PairRows`] view.
    fn wrap(c: Csr<'_, Self>) -> PairRows<'_>;
}
impl Index for i64 {
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self
    }
    fn wrap(c: Csr<'_, Self>) -> PairRows<'_> {
        PairRows::Csr64(c)
    }
}
impl Index for i32 {
    #[inline(always)]
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn wrap(c: Csr<'_, Self>) -> PairRows<'_> {
        PairRows::Csr32(c)
    }
}

/// Rows per task when validating in parallel.
const VALIDATE_ROWS: usize = 2048;

/// A validated CSR matrix (rows are probes, columns are features).
#[derive(Clone, Copy, Debug)]
pub struct Csr<'a, I: Index = i64> {
    pub nrows: usize,
    pub ncols: usize,
    pub indptr: &'a [I],
    pub indices: &'a [I],
    pub data: &'a [f64],
    /// Position of `indices[0]` in the full arrays (non-zero for a row slice).
    pub offset: usize,
}

impl<'a, I: Index> Csr<'a, I> {
    /// Validate structure and values. Rows must be canonical (strictly increasing column
    /// indices): the variance kernels count stored entries, so duplicates would bias them.
    pub fn new(
        field: &str,
        nrows: usize,
        ncols: usize,
        indptr: &'a [I],
        indices: &'a [I],
        data: &'a [f64],
    ) -> Result<Self> {
        let Some(rows_plus_one) = nrows.checked_add(1) else {
            return Err(CoreError::sparse(
                field,
                format!("{nrows} rows is not a valid shape"),
            ));
        };
        if indptr.len() != rows_plus_one {
            return Err(CoreError::sparse(
                field,
                format!(
                    "indptr has length {} but {} rows need {}",
                    indptr.len(),
                    nrows,
                    nrows + 1
                ),
            ));
        }
        if indices.len() != data.len() {
            return Err(CoreError::sparse(
                field,
                format!(
                    "indices ({}) and data ({}) differ in length",
                    indices.len(),
                    data.len()
                ),
            ));
        }
        if indptr[0].to_i64() != 0 {
            return Err(CoreError::sparse(field, "indptr[0] must be 0"));
        }
        if let Some(r) = (0..nrows).find(|&r| indptr[r + 1].to_i64() < indptr[r].to_i64()) {
            return Err(CoreError::sparse(
                field,
                format!("indptr decreases at row {r}"),
            ));
        }
        if indptr[nrows].to_i64() as u64 != data.len() as u64 {
            return Err(CoreError::sparse(
                field,
                format!(
                    "indptr[-1] = {} but there are {} stored values",
                    indptr[nrows],
                    data.len()
                ),
            ));
        }
        // Rows are independent: check them in parallel (on the caller's pool), reporting the
        // first bad row so the message does not depend on scheduling. A branch-free pass says
        // whether a row is sound; only a faulty row is walked again to word the fault.
        let check_row = |r: usize| -> Option<CoreError> {
            let (a, b) = (indptr[r].to_i64() as usize, indptr[r + 1].to_i64() as usize);
            let (idx, val) = (&indices[a..b], &data[a..b]);
            let mut sound = true;
            let mut prev = -1i64;
            for (&c, &v) in idx.iter().zip(val) {
                let c = c.to_i64();
                sound &= (c > prev) & ((c as u64) < ncols as u64) & v.is_finite();
                prev = c;
            }
            if sound {
                None
            } else {
                row_fault(field, r, ncols, idx, val)
            }
        };
        let first_bad = (0..nrows.div_ceil(VALIDATE_ROWS))
            .into_par_iter()
            .find_map_first(|b| {
                (b * VALIDATE_ROWS..((b + 1) * VALIDATE_ROWS).min(nrows)).find_map(check_row)
            });
        if let Some(e) = first_bad {
            return Err(e);
        }
        Ok(Self {
            nrows,
            ncols,
            indptr,
            indices,
            data,
            offset: 0,
        })
    }

    #[inline]
    pub fn row(&self, r: usize) -> (&'a [I], &'a [f64]) {
        let a = self.indptr[r].to_i64() as usize - self.offset;
        let b = self.indptr[r + 1].to_i64() as usize - self.offset;
        (&self.indices[a..b], &self.data[a..b])
    }

    /// Rows `start..end` as a view (no copy).
    pub fn slice_rows(&self, start: usize, end: usize) -> Csr<'a, I> {
        let a = self.indptr[start].to_i64() as usize - self.offset;
        let b = self.indptr[end].to_i64() as usize - self.offset;
        Csr {
            nrows: end - start,
            ncols: self.ncols,
            indptr: &self.indptr[start..=end],
            indices: &self.indices[a..b],
            data: &self.data[a..b],
            offset: self.indptr[start].to_i64() as usize,
        }
    }

    pub fn nnz(&self) -> usize {
        self.data.len()
    }
}

/// The first fault of a CSR row (out-of-range or unsorted column, non-finite value), worded.
fn row_fault<I: Index>(
    field: &str,
    r: usize,
    ncols: usize,
    idx: &[I],
    val: &[f64],
) -> Option<CoreError> {
    let mut prev = -1i64;
    for (&c, &v) in idx.iter().zip(val) {
        let c = c.to_i64();
        if c < 0 || c as usize >= ncols {
            return Some(CoreError::sparse(
                field,
                format!("row {r} has column index {c}, outside 0..{ncols}"),
            ));
        }
        if c <= prev {
            return Some(CoreError::sparse(
                field,
                format!(
                    "row {r} has unsorted or duplicate column indices; \
                     canonicalize it first (scipy: X.sum_duplicates(); X.sort_indices())"
                ),
            ));
        }
        prev = c;
        if !v.is_finite() {
            return Some(CoreError::NonFinite {
                field: field.into(),
                location: format!("row {r}, column {c}"),
            });
        }
    }
    None
}

/// A validated row-major dense matrix.
#[derive(Clone, Copy, Debug)]
pub struct Dense<'a> {
    pub nrows: usize,
    pub ncols: usize,
    pub data: &'a [f64],
}

impl<'a> Dense<'a> {
    pub fn new(field: &str, nrows: usize, ncols: usize, data: &'a [f64]) -> Result<Self> {
        if nrows.checked_mul(ncols) != Some(data.len()) {
            return Err(CoreError::shape(
                field,
                format!("{nrows}x{ncols} values"),
                format!("{} values", data.len()),
            ));
        }
        check_finite(field, data, ncols)?;
        Ok(Self { nrows, ncols, data })
    }
    #[inline]
    pub fn row(&self, r: usize) -> &'a [f64] {
        &self.data[r * self.ncols..(r + 1) * self.ncols]
    }
}

/// A probe-by-feature matrix in either layout.
#[derive(Clone, Copy, Debug)]
pub enum Matrix<'a> {
    Dense(Dense<'a>),
    Csr(Csr<'a>),
}

impl<'a> Matrix<'a> {
    pub fn nrows(&self) -> usize {
        match self {
            Matrix::Dense(d) => d.nrows,
            Matrix::Csr(c) => c.nrows,
        }
    }
    pub fn ncols(&self) -> usize {
        match self {
            Matrix::Dense(d) => d.ncols,
            Matrix::Csr(c) => c.ncols,
        }
    }
    /// Copy into a row-major dense buffer.
    pub fn to_dense(&self, field: &str) -> Result<Vec<f64>> {
        Ok(match self {
            Matrix::Dense(d) => d.data.to_vec(),
            Matrix::Csr(c) => {
                let len = c.nrows.checked_mul(c.ncols).ok_or_else(|| {
                    CoreError::value(
                        field,
                        format!("{}x{} is too large to densify", c.nrows, c.ncols),
                    )
                })?;
                let mut out = zeros(field, len)?;
                for r in 0..c.nrows {
                    let (idx, val) = c.row(r);
                    let row = &mut out[r * c.ncols..(r + 1) * c.ncols];
                    for (&j, &v) in idx.iter().zip(val) {
                        row[j as usize] += v;
                    }
                }
                out
            }
        })
    }
}

/// Check a vector's length and values.
pub fn check_vec(field: &str, v: &[f64], len: usize) -> Result<()> {
    if v.len() != len {
        return Err(CoreError::shape(
            field,
            format!("length {len}"),
            format!("length {}", v.len()),
        ));
    }
    check_finite(field, v, 1)
}
