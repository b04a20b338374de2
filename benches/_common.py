"""What every benchmark script shares: the machine's description and the README section writer."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip()
    except OSError:
        return "?"


def write_readme_section(tag: str, block: str, heading: str, command: str) -> None:
    """Replace ``<!-- tag:begin -->…<!-- tag:end -->`` in benches/README.md with ``block`` (which
    holds the markers), or append it under ``heading`` with the command that makes it."""
    path = HERE / "README.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text += f"\n## {heading}\n\n`{command}`\n\n{block}\n"
    path.write_text(text)
