"""Type stubs of the compiled core (rust/py/src/lib.rs). Matrices are either a C-contiguous
float64 2-D array or a CSR tuple ``(indptr int64, indices int64, data float64, (nrows, ncols))``
with canonical rows (sorted, no duplicate column indices)."""

from typing import Union

import numpy as np
import numpy.typing as npt

_F64 = npt.NDArray[np.float64]
_I64 = npt.NDArray[np.int64]
_I32 = npt.NDArray[np.int32]
_Csr = tuple[_I64, _I64, _F64, tuple[int, int]]
_Csr32or64 = Union[_Csr, tuple[_I32, _I32, _F64, tuple[int, int]]]
_Matrix = Union[_F64, _Csr]

__version__: str

def feature_stats(
    x: _Matrix,
    y: _F64 | None = None,
    groups: npt.NDArray[np.uint32] | None = None,
    n_groups: int = 0,
    threads: int = 0,
) -> dict[str, np.ndarray]:
    """Keys: n_active (uint64), mean, std, corr (NaN where undefined),
    group_means (F, G), group_counts (uint64)."""

def fit_policy(
    x: _Matrix,
    y: _F64,
    lam: float | None = None,
    lam_grid: list[float] | None = None,
    intercept: bool = True,
    standardize: bool = True,
    threads: int = 0,
) -> dict[str, object]:
    """Keys: coef, intercept, lam, scale, solver ('cholesky' | 'eigh-pinv'), dual, df,
    gcv_grid, gcv_score. ``lam=None`` selects lambda by GCV."""

def interference(
    d_coef: _F64, feature_group: _I64, pair_group: _I64
) -> tuple[_I64, _F64, npt.NDArray[np.bool_]]: ...

class Decomposer:
    def __init__(
        self,
        coef: _F64,
        intercept: float,
        lam: float,
        scale: _F64,
        fit_intercept: bool,
        x: _Matrix,
        y: _F64,
        threads: int = 0,
    ) -> None: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    def run(
        self, dx: _Csr32or64, dy: _F64, method: str = "exact", threads: int | None = None
    ) -> dict[str, object]:
        """``dx``: pair-major stacked CSR (P*n, K) with int32 or int64 indices (used without
        copying); ``dy``: (P, n). Keys: d_total, d_x, d_y (P, K), pred_dy (P,), n_fallback."""
