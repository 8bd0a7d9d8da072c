#!/usr/bin/env bash
# Idempotent setup: a venv in .venv with sparkembed[local,dev] installed, and the sample corpus.
# A second run reuses everything unless pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPARKEMBED_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if ! command -v java >/dev/null 2>&1; then
    echo "sparkembed: Java 17 is required for local Spark (apt-get install openjdk-17-jre-headless)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.sparkembed-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[local,dev]"
    echo "$WANT" > "$STAMP"
fi
if [ ! -f "$ROOT/data/sample.parquet" ]; then
    "$VENV/bin/python" -m sparkembed.corpus "$ROOT/data/sample.parquet"
fi
