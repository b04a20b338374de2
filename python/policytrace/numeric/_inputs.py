"""Normalize user inputs to the two layouts the core takes: a C-contiguous float64 ndarray or a
canonical CSR tuple ``(indptr int64, indices int64, data float64, (nrows, ncols))``.

float32/float16/integer/bool inputs are converted to float64 (all math is float64);
complex, object and string arrays are refused with :class:`DTypeError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import scipy.sparse as sp

from ..errors import (
    DTypeError,
    EmptyInputError,
    NonFiniteError,
    ShapeError,
    SparseFormatError,
)

CsrTuple = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]
MatrixArg = Union[np.ndarray, CsrTuple]


def _check_dtype(name: str, dtype: np.dtype) -> None:
    if dtype.kind not in "fiub":
        raise DTypeError(
            f"`{name}` has dtype {dtype}; policytrace needs real numbers (float32/float64)"
        )


def as_vector(name: str, v: Any, length: int | None = None) -> np.ndarray:
    """A finite float64 C-contiguous 1-D copy-if-needed of ``v``."""
    a = np.asarray(v)
    _check_dtype(name, a.dtype)
    if a.ndim != 1:
        raise ShapeError(f"`{name}` must be 1-D, got shape {a.shape}")
    if length is not None and a.shape[0] != length:
        raise ShapeError(f"`{name}` must have length {length}, got {a.shape[0]}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise NonFiniteError(f"`{name}` holds a non-finite value at index {bad[0]}")
    return a


def _is_csr_triple(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) in (3, 4) and not isinstance(x[0], (int, float))


def _check_structure(name: str, indptr: np.ndarray, indices: np.ndarray, shape) -> None:
    """Name the first structural fault of a CSR (row and column where it applies)."""
    nrows, ncols = int(shape[0]), int(shape[1])
    if indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
        raise SparseFormatError(f"`{name}` indices and indptr must be integers")
    if indptr.ndim != 1 or len(indptr) != nrows + 1:
        raise SparseFormatError(f"`{name}` indptr has length {len(indptr)}; {nrows} rows need {nrows + 1}")
    if len(indptr) and (indptr[0] != 0 or indptr[-1] != len(indices)):
        raise SparseFormatError(
            f"`{name}` indptr must start at 0 and end at the number of stored values ({len(indices)})"
        )
    steps = np.diff(indptr)
    if (steps < 0).any():
        raise SparseFormatError(f"`{name}` indptr decreases at row {int(np.argmax(steps < 0))}")
    bad = (indices < 0) | (indices >= ncols)
    if bad.any():
        pos = int(np.argmax(bad))
        row = int(np.searchsorted(indptr, pos, side="right") - 1)
        raise SparseFormatError(
            f"`{name}` row {row} has column index {int(indices[pos])}, outside 0..{ncols}"
        )


def _checked_csr(name: str, m: sp.spmatrix) -> sp.csr_matrix:
    """CSR with a validated structure (indptr monotone, indices in range), canonical rows."""
    csr = m.tocsr() if m.format != "csr" else m
    _check_structure(name, csr.indptr, csr.indices, csr.shape)
    try:
        csr.check_format(full_check=True)
    except (ValueError, TypeError, IndexError) as e:
        raise SparseFormatError(f"`{name}` is not a valid sparse matrix: {e}") from e
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return csr


def _csr_from_triple(name: str, x: tuple, ncols: int | None) -> sp.csr_matrix:
    """A scipy CSR from ``(indptr, indices, data[, shape])``, its structure checked."""
    if len(x) == 4:
        indptr, indices, data, shape = x
    else:
        indptr, indices, data = x
        if ncols is None:
            raise ShapeError(f"`{name}` given as (indptr, indices, data) needs a 4th item, the shape")
        shape = (len(indptr) - 1, ncols)
    indptr, indices = np.asarray(indptr), np.asarray(indices)
    try:
        shape = (int(shape[0]), int(shape[1]))
    except (TypeError, ValueError, IndexError) as e:
        raise SparseFormatError(f"`{name}` CSR shape must be two integers, got {shape!r}") from e
    if shape[0] < 0 or shape[1] < 0:
        raise SparseFormatError(f"`{name}` CSR shape {shape} is negative")
    _check_structure(name, indptr, indices, shape)
    _check_dtype(name, np.asarray(data).dtype)
    try:
        m = sp.csr_matrix((np.asarray(data), indices, indptr), shape=shape)
        m.check_format(full_check=True)
    except (ValueError, TypeError, IndexError, OverflowError) as e:
        raise SparseFormatError(f"`{name}` is not a valid CSR triple: {e}") from e
    return m


def _sparse_arg(name: str, x: sp.spmatrix) -> MatrixArg:
    _check_dtype(name, x.dtype)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise EmptyInputError(f"`{name}` has shape {x.shape}; it needs probes and features")
    csr = _checked_csr(name, x)
    return (
        np.ascontiguousarray(csr.indptr, dtype=np.int64),
        np.ascontiguousarray(csr.indices, dtype=np.int64),
        np.ascontiguousarray(csr.data, dtype=np.float64),
        (int(csr.shape[0]), int(csr.shape[1])),
    )


def _dense_arg(name: str, x: Any) -> np.ndarray:
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise ShapeError(f"`{name}` is not a rectangular array: {e}") from e
    _check_dtype(name, a.dtype)
    if a.ndim != 2:
        raise ShapeError(f"`{name}` must be 2-D (probes x features), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise EmptyInputError(f"`{name}` has shape {a.shape}; it needs probes and features")
    return np.ascontiguousarray(a, dtype=np.float64)


def _check_finite_matrix(name: str, arr: MatrixArg) -> None:
    data = arr[2] if isinstance(arr, tuple) else arr
    if np.isfinite(data).all():
        return
    if isinstance(arr, tuple):
        bad = int(np.flatnonzero(~np.isfinite(data))[0])
        row = int(np.searchsorted(arr[0], bad, side="right") - 1)
        where = f"row {row}, column {int(arr[1][bad])}"
    else:
        r, c = np.argwhere(~np.isfinite(data))[0]
        where = f"row {r}, column {c}"
    raise NonFiniteError(f"`{name}` holds a non-finite value (NaN or inf) at {where}")


def as_matrix(name: str, x: Any, ncols: int | None = None, nrows: int | None = None) -> MatrixArg:
    """Dense 2-D float64 array or canonical CSR tuple, shape-checked."""
    if _is_csr_triple(x):
        x = _csr_from_triple(name, x, ncols)
    arr = _sparse_arg(name, x) if sp.issparse(x) else _dense_arg(name, x)
    shape = arr[3] if isinstance(arr, tuple) else arr.shape
    _check_finite_matrix(name, arr)
    if ncols is not None and shape[1] != ncols:
        raise ShapeError(f"`{name}` must have {ncols} columns (features), got {shape[1]}")
    if nrows is not None and shape[0] != nrows:
        raise ShapeError(f"`{name}` must have {nrows} rows (probes), got {shape[0]}")
    return arr


def to_scipy(x: MatrixArg) -> np.ndarray | sp.csr_matrix:
    if isinstance(x, tuple):
        indptr, indices, data, shape = x
        return sp.csr_matrix((data, indices, indptr), shape=shape)
    return x


def stack_pairs(dX: Any, n: int, k: int, validate: bool = True) -> tuple[sp.csr_matrix, int]:
    """Every accepted form of per-pair ΔX (:func:`pairs_arg`) as one pair-major scipy CSR of
    shape (P*n, K): the float64 reference's input, and the route that words a value error in
    pair/probe terms (``validate``: check structure and finiteness)."""
    arg, p = pairs_arg(dX, n, k)
    parts = arg if isinstance(arg, list) else [arg]
    mats = [to_scipy(a) if isinstance(a, tuple) else sp.csr_matrix(a.astype(np.float64, copy=False)) for a in parts]
    if validate:
        for i, m in enumerate(mats):
            _checked_csr("dX" if len(mats) == 1 and not isinstance(arg, list) else f"dX[{i}]", m)
    m = mats[0] if len(mats) == 1 else sp.vstack(mats, format="csr")
    if validate and m.nnz and not np.isfinite(m.data).all():
        bad = int(np.flatnonzero(~np.isfinite(m.data))[0])
        row = int(np.searchsorted(m.indptr, bad, side="right") - 1)
        raise NonFiniteError(
            f"`dX` holds a non-finite value at pair {row // n}, probe {row % n}, "
            f"feature column {int(m.indices[bad])}"
        )
    return m, p


def _core_csr(name: str, m: sp.spmatrix) -> CsrTuple:
    """A scipy matrix as the core reads it: CSR with canonical rows, float64 values; the index
    arrays keep their width and nothing is copied when it is already so."""
    csr = m if m.format == "csr" else m.tocsr()
    if not csr.has_canonical_format:
        csr = csr.copy()
        csr.sum_duplicates()
    return csr_tuple(csr.astype(np.float64, copy=False))


def _core_dense(name: str, a: np.ndarray) -> np.ndarray:
    """Dense ΔX as the core reads it: float64 or float32, C-contiguous (a copy only if not)."""
    if a.dtype in (np.float64, np.float32) and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.float64)


def pairs_arg(dX: Any, n: int, k: int) -> tuple[Any, int]:
    """``(arg, P)``: the form of per-pair ΔX the compiled core reads without an intermediate
    copy (a stacked CSR tuple, a dense (P·n, K) block, or a list of per-pair CSR tuples / dense
    blocks), after the shape and dtype checks that word errors in the caller's terms. Values
    (finite, canonical structure) are checked by the core, in parallel."""
    if sp.issparse(dX):
        _check_dtype("dX", dX.dtype)
        if dX.shape[0] == 0:
            raise EmptyInputError("`dX` holds no pairs")
        if dX.shape[1] != k or dX.shape[0] % n != 0:
            raise ShapeError(f"sparse `dX` must have shape (n, K) = ({n}, {k}) or (P*n, K), got {dX.shape}")
        return _core_csr("dX", dX), dX.shape[0] // n
    if isinstance(dX, np.ndarray) or not isinstance(dX, Sequence):
        a = np.asarray(dX)
        _check_dtype("dX", a.dtype)
        if a.ndim == 2:
            a = a[None]
        if a.ndim != 3 or a.shape[1:] != (n, k):
            raise ShapeError(f"dense `dX` must have shape (P, n, K) with n={n}, K={k}; got {a.shape}")
        if a.shape[0] == 0:
            raise EmptyInputError("`dX` holds no pairs")
        return _core_dense("dX", a).reshape(-1, k), a.shape[0]
    if len(dX) == 0:
        raise EmptyInputError("`dX` holds no pairs")
    items = []
    for i, d in enumerate(dX):
        name = f"dX[{i}]"
        a = d if sp.issparse(d) else np.asarray(d)
        _check_dtype(name, a.dtype)
        if a.shape != (n, k):
            raise ShapeError(f"`{name}` must have shape ({n}, {k}), got {a.shape}")
        items.append(_core_csr(name, a) if sp.issparse(a) else _core_dense(name, a))
    return items, len(items)


def as_dy(dy: Any, n_pairs: int, n: int) -> np.ndarray:
    a = np.asarray(dy)
    _check_dtype("dy", a.dtype)
    if a.ndim == 1:
        a = a[None]
    if a.shape != (n_pairs, n):
        raise ShapeError(f"`dy` must have shape (P, n) = ({n_pairs}, {n}), got {np.asarray(dy).shape}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    bad = np.argwhere(~np.isfinite(a))
    if bad.size:
        raise NonFiniteError(f"`dy` holds a non-finite value at pair {bad[0][0]}, probe {bad[0][1]}")
    return a


def csr_tuple(m: sp.csr_matrix) -> CsrTuple:
    """The core takes int32 or int64 index arrays as they are (no widening copy)."""
    itype = np.int32 if m.indptr.dtype == np.int32 and m.indices.dtype == np.int32 else np.int64
    return (
        np.ascontiguousarray(m.indptr, dtype=itype),
        np.ascontiguousarray(m.indices, dtype=itype),
        np.ascontiguousarray(m.data, dtype=np.float64),
        (int(m.shape[0]), int(m.shape[1])),
    )


def as_codes(name: str, labels: Any, length: int) -> tuple[np.ndarray, list]:
    """Group labels (any hashable values) → uint32 codes in first-seen sorted order, levels."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ShapeError(f"`{name}` must be 1-D of length {length}, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise NonFiniteError(f"`{name}` holds NaN; give every row a group")
    levels, codes = np.unique(arr, return_inverse=True)
    return codes.astype(np.uint32), [lv.item() if hasattr(lv, "item") else lv for lv in levels]
