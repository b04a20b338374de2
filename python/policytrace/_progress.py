"""Progress bars for every step longer than a few seconds (tqdm; disabled with ``--quiet``)."""

from __future__ import annotations

from typing import Any


def bar(total: int, what: str, enabled: bool = True, initial: int = 0, unit: str | None = None) -> Any:
    """A tqdm bar counting ``what`` (e.g. "pair", "SAE step"); a no-op when not enabled."""
    from tqdm.auto import tqdm

    unit = unit or what
    return tqdm(total=total, initial=initial, desc=f"{what}s", unit=unit, disable=not enabled, dynamic_ncols=True)
