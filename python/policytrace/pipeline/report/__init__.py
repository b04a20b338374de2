"""The run report: one self-contained HTML page (:mod:`.page`, :mod:`.sections`, :mod:`.html`)
with inline SVG charts (:mod:`.svg`)."""

from .page import write_report

__all__ = ["write_report"]
