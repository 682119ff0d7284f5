#!/usr/bin/env bash
# Builds the `butler` Python module (debug, into the workspace's target/) in the virtualenv
# .venv, builds the `butler` command (debug), and runs the module's tests: pytest, which also
# runs `mypy.stubtest butler` on the stubs.
# Idempotent: the virtualenv and its tools are made only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${BUTLER_VENV:-$PWD/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    python3 -m venv "$venv"
fi
if [ ! -x "$venv/bin/maturin" ] || ! "$venv/bin/python" -c 'import pytest, mypy' 2>/dev/null; then
    echo "== installing maturin, pytest and mypy"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        'maturin>=1.16,<2' pytest mypy
fi

echo "== maturin develop (butler-py)"
VIRTUAL_ENV="$venv" "$venv/bin/maturin" develop --manifest-path butler-py/Cargo.toml

# The cross-process tests drive Python workers with the `butler` command.
echo "== cargo build -p butler-cli"
cargo build --quiet -p butler-cli
export BUTLER_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/butler"

echo "== pytest butler-py/tests"
"$venv/bin/python" -m pytest butler-py/tests -q "$@"
