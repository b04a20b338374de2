#!/usr/bin/env bash
# The project's test command (README "Set up"): build and install the package with its test
# extras, run the Rust core's tests, then the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet ".[test]"
cargo test --quiet -p policytrace-core --release
python3 -m pytest -q -p no:cacheprovider
