#!/usr/bin/env bash
# The whole test suite: unit, integration (real local endpoint over HTTP), Spark (local and a
# standalone master + worker) and Delta, Spark Connect (a local server), then a Spark 3.5 run of
# the built wheel.
# Extra arguments go to pytest and skip the Spark Connect suite and the Spark 3.5 run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
# Lint and type-check everything; the import contract keeps the layers apart (docs/architecture.md).
.venv/bin/ruff check .
.venv/bin/mypy sparkembed
.venv/bin/mypy --strict --follow-imports=silent sparkembed/core
.venv/bin/lint-imports
.venv/bin/python -m pytest -q -rs "$@"
# Spark Connect (a local server from pyspark's own jars) in a process of its own: a Connect
# session cannot start where classic Spark ran (tests/conftest.py collects it only when named).
if [ "$#" -eq 0 ]; then
    .venv/bin/python -m pytest -q -rs tests/connect
fi
# The built wheel in a venv with pyspark 3.5 preinstalled (Synapse, Databricks LTS): a real run.
if [ "$#" -eq 0 ]; then
    bash scripts/compat_spark35.sh
fi
