"""Typed exceptions. Every bad input raises a subclass of :class:`PolicytraceError` whose
message names the offending argument, shape, row or feature.

Input errors also derive from :class:`ValueError` (or :class:`TypeError` for dtypes) so
generic handlers keep working.
"""

from __future__ import annotations


class PolicytraceError(Exception):
    """Base class of every policytrace error."""


class InputError(PolicytraceError, ValueError):
    """An argument is unusable as given."""


class ShapeError(InputError):
    """Lengths or dimensions disagree (names the argument and both shapes)."""


class NonFiniteError(InputError):
    """NaN or inf in an input (names the argument and the first bad row/column)."""


class EmptyInputError(InputError):
    """No probes, no features or no pairs where some are required."""


class InvalidValueError(InputError):
    """A scalar or option is out of its domain (negative lambda, unknown method, ...)."""


class SparseFormatError(InputError):
    """A sparse matrix is structurally broken (bad indptr, out-of-range index, ...)."""


class DTypeError(PolicytraceError, TypeError):
    """An array has a dtype policytrace cannot compute with (complex, object, strings)."""


class LayoutError(InputError):
    """An array handed to the compiled core directly is not C-contiguous."""


class FeatureMismatchError(InputError):
    """Feature ids disagree: unknown ids, a different set, or a different order."""


class SolverError(PolicytraceError, ArithmeticError):
    """The linear system could not be solved even by the eigendecomposition fallback."""


class ConfigError(PolicytraceError, ValueError):
    """A configuration field is unknown or invalid."""


class DataError(InvalidValueError):
    """A probe or pair file is malformed (names the file and line)."""


class RunFolderError(ConfigError):
    """A run folder cannot be used as it is: another configuration, changed inputs, a damaged
    or missing file (names the file and says how to proceed)."""


__all__ = [
    "PolicytraceError",
    "InputError",
    "ShapeError",
    "NonFiniteError",
    "EmptyInputError",
    "InvalidValueError",
    "SparseFormatError",
    "DTypeError",
    "LayoutError",
    "FeatureMismatchError",
    "SolverError",
    "ConfigError",
    "DataError",
    "RunFolderError",
]
