"""One version: Cargo.toml's workspace version is what the package metadata, ``__version__``,
the extension and ``policytrace --version`` report, and the changelog has a section for it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import policytrace
from policytrace import _core

ROOT = Path(__file__).resolve().parents[1]


def cargo_version() -> str:
    return tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]


def test_every_place_reports_cargos_version():
    v = cargo_version()
    assert policytrace.__version__ == v
    assert _core.__version__ == v
    assert "version" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_cli_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "policytrace", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"policytrace {cargo_version()}"


def test_changelog_has_the_version():
    heads = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert heads[0] == cargo_version()
