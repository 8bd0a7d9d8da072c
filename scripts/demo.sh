#!/usr/bin/env bash
# The main job on the embedded default: the local endpoint (wordllama), local Spark, Delta output,
# on the bundled sample corpus. Extra arguments go to `sparkembed run`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh
.venv/bin/sparkembed run --config conf/local.yaml "$@"
