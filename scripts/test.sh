#!/usr/bin/env bash
# The whole test suite: unit, integration (real local endpoint over HTTP), Spark (local and a
# standalone master + worker) and Delta. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
.venv/bin/python -m pytest -q -rs "$@"
