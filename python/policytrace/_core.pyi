"""Type stubs of the compiled core (rust/py/src). Matrices are either a C-contiguous float64 2-D
array or a CSR tuple ``(indptr int64, indices int64, data float64, (nrows, ncols))`` with
canonical rows (sorted, no duplicate column indices). Every function raises the classes of
:mod:`policytrace.errors` (ShapeError, NonFiniteError, SparseFormatError, DTypeError, ...).
``tests/numeric/test_stubs.py`` runs ``mypy.stubtest`` so this file cannot drift."""

from typing import Union, final

import numpy as np
import numpy.typing as npt

_F64 = npt.NDArray[np.float64]
_I64 = npt.NDArray[np.int64]
_I32 = npt.NDArray[np.int32]
_U64 = npt.NDArray[np.uint64]
_Csr = tuple[_I64, _I64, _F64, tuple[int, int]]
_Csr32or64 = Union[_Csr, tuple[_I32, _I32, _F64, tuple[int, int]]]
_Matrix = Union[_F64, _Csr]
_DenseDx = Union[_F64, npt.NDArray[np.float32]]
_PairsDx = Union[_Csr32or64, _DenseDx, list[Union[_Csr32or64, _DenseDx]]]

__all__ = [
    "feature_stats",
    "fit_policy",
    "interference",
    "gradient_scores",
    "Decomposer",
    "FeatureStats",
    "FitResult",
    "SplitResult",
    "InterferenceResult",
    "__version__",
    "PIVOT_RATIO_MIN",
    "MAX_THREADS",
    "REFIT_TOLERANCE",
    "GCV_GRID_POINTS",
    "GCV_GRID_LO",
    "GCV_GRID_HI",
]

__version__: str

@final
class FeatureStats:
    """Per-feature statistics of :func:`feature_stats`."""

    @property
    def n_active(self) -> _U64: ...
    @property
    def mean(self) -> _F64: ...
    @property
    def std(self) -> _F64: ...
    @property
    def corr(self) -> _F64:
        """Pearson correlation with y; NaN where undefined."""
    @property
    def group_means(self) -> _F64:
        """(F, G) means within each probe group."""
    @property
    def group_counts(self) -> _U64: ...

@final
class FitResult:
    """A fitted ridge policy (:func:`fit_policy`)."""

    @property
    def coef(self) -> _F64: ...
    @property
    def intercept(self) -> float: ...
    @property
    def lam(self) -> float: ...
    @property
    def scale(self) -> _F64: ...
    @property
    def solver(self) -> str:
        """'cholesky' or 'eigh-pinv'."""
    @property
    def dual(self) -> bool: ...
    @property
    def df(self) -> float: ...
    @property
    def gcv_grid(self) -> _F64: ...
    @property
    def gcv_score(self) -> _F64: ...

@final
class SplitResult:
    """Per-pair coefficient shifts of :meth:`Decomposer.run`, (P, K) each."""

    @property
    def d_total(self) -> _F64: ...
    @property
    def d_x(self) -> _F64: ...
    @property
    def d_y(self) -> _F64: ...
    @property
    def pred_dy(self) -> _F64: ...
    @property
    def n_fallback(self) -> int: ...
    @property
    def predicted(self) -> _F64:
        """The policy's predicted change per probe, (P, n)."""
    @property
    def mean_dx(self) -> _F64:
        """Mean ΔX over probes per feature (unscaled), (P, K)."""

@final
class InterferenceResult:
    """Dominant feature (-1 when nothing moved), off-target share and flag per pair."""

    @property
    def dominant(self) -> _I64: ...
    @property
    def off_target_share(self) -> _F64: ...
    @property
    def flag(self) -> npt.NDArray[np.bool_]: ...

def feature_stats(
    x: _Matrix,
    y: _F64 | None = None,
    groups: npt.NDArray[np.uint32] | None = None,
    n_groups: int = 0,
    threads: int = 0,
) -> FeatureStats: ...
def fit_policy(
    x: _Matrix,
    y: _F64,
    lam: float | None = None,
    lam_grid: list[float] | None = None,
    intercept: bool = True,
    standardize: bool = True,
    threads: int = 0,
) -> FitResult:
    """``lam=None`` selects lambda by GCV over ``lam_grid`` (or the default grid)."""

def interference(d_coef: _F64, feature_group: _I64, pair_group: _I64) -> InterferenceResult: ...
def gradient_scores(
    pairs: npt.NDArray[np.float32], concepts: npt.NDArray[np.float32], threads: int = 0
) -> _F64:
    """(p, d) stored pair gradients x (c, d) concept gradients -> (p, c), accumulated in float64;
    a memory-mapped (read-only) store is read in place."""
@final
class Decomposer:
    def __new__(
        cls,
        coef: _F64,
        intercept: float,
        lam: float,
        scale: _F64,
        fit_intercept: bool,
        x: _Matrix,
        y: _F64,
        threads: int = 0,
    ) -> Decomposer: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    def run(
        self, dx: _PairsDx, dy: _F64, method: str = "exact", threads: int | None = None
    ) -> SplitResult:
        """``dx``: a pair-major stacked CSR (P*n, K) with int32 or int64 indices, a
        C-contiguous float64/float32 array (P, n, K) or (P*n, K), or a list with one CSR or
        (n, K) array per pair (all used without copying); ``dy``: (P, n)."""

# Constants shared with the float64 reference (policytrace.numeric._reference reads them).
PIVOT_RATIO_MIN: float
MAX_THREADS: int
REFIT_TOLERANCE: float
GCV_GRID_POINTS: int
GCV_GRID_LO: float
GCV_GRID_HI: float
