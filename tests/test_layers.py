"""The layers stay visible: what each sub-package may import (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "policytrace"

# sub-package -> sub-packages (and third-party roots) it must never import
FORBIDDEN = {
    "numeric": {"model", "behaviours", "pipeline", "torch", "transformers", "sae_lens"},
    "model": {"pipeline", "behaviours"},
    "behaviours": {"model", "pipeline", "torch"},
    "gradients": {"pipeline", "behaviours"},
}


def _imports(path: Path, layer: str) -> set[str]:
    """Top-level names a module imports, with relative imports resolved inside the package."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                mod = node.module or ""
                out.add(mod.split(".")[1] if mod.startswith("policytrace.") else mod.split(".")[0])
            elif node.level == 1:
                out.add(layer)
            elif node.level == 2 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 2:
                out |= {a.name for a in node.names}
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer):
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        # only direct children of the layer resolve "..x" to a sibling layer
        if path.parent != PKG / layer:
            continue
        hit = _imports(path, layer) & FORBIDDEN[layer]
        if hit:
            bad.append(f"{path.relative_to(PKG)} imports {sorted(hit)}")
    assert not bad, "\n".join(bad)


def test_numeric_api_and_config_load_without_torch():
    code = ("import sys, policytrace, policytrace.pipeline.config as c; c.resolve({}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# The report is being rewritten elsewhere; it still defaults a manifest without a behaviour to
# the shipped default's name.
UNSPELLED = ("refusal", "harmful", "harmless", "compliance")


@pytest.mark.parametrize("layer", ["pipeline", "numeric"])
def test_lower_layers_never_spell_a_behaviour(layer):
    """Behaviours are the seam: the pipeline and numeric layers take the flag's name and the
    label meanings from the behaviour."""
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        if "report" in path.relative_to(PKG).parts:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            bad += [f"{path.relative_to(PKG)}:{lineno}: {w}" for w in UNSPELLED if w in line.lower()]
    assert not bad, "\n".join(bad)
