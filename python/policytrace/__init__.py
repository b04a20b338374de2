"""policytrace: which training examples made a fine-tuned language model adopt a behaviour,
and through which interpretable SAE features (Symbolic Mechanistic Data Attribution).

The package has three layers you can see (docs/design.md):

* :mod:`policytrace.numeric` — the method's arithmetic over the Rust core (no torch);
* :mod:`policytrace.model` — the PyTorch side: loading, probe pass, per-pair update, SAEs;
* :mod:`policytrace.pipeline` — configuration, run folders, stages, validation, report, CLI;

and a seam, :mod:`policytrace.behaviours`, the only code that knows what "refusal" is.
The names below are the stable public API.
"""

from . import errors
from .errors import PolicytraceError
from .numeric import (
    Attributor,
    Policy,
    decompose,
    feature_stats,
    fit_policy,
    interference,
    select_features,
    selected_columns,
)

def _version() -> str:
    # One source: Cargo.toml's workspace version, which maturin writes into the package
    # metadata and compiles into the extension (the fallback for a source tree not installed).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("policytrace")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        from ._core import __version__ as core_version

        return core_version


__version__ = _version()

__all__ = [
    "Attributor",
    "Policy",
    "PolicytraceError",
    "decompose",
    "errors",
    "feature_stats",
    "fit_policy",
    "interference",
    "select_features",
    "selected_columns",
]
