"""The run report: one self-contained HTML page (:mod:`.html`) with inline SVG charts (:mod:`.svg`)."""

from .html import write_report

__all__ = ["write_report"]
