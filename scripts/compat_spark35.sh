#!/usr/bin/env bash
# Spark 3.5 compatibility run (issue 4) and the wheel-on-a-cluster test (issue 8).
#
# Builds the sparkembed wheel, and installs it into .venv-spark35, where pyspark 3.5 and the
# numpy, pandas and pyarrow it supports were installed first, as on a Synapse 3.5 or Databricks
# LTS cluster. Fails if installing the wheel changed any of them. Then runs the job there with
# `spark-submit jobs/embed_table.py` on local[2] into Delta, and the notebook API
# (`sparkembed.embed`), both against the local endpoint, and checks the results with deltalake
# (tests/compat/run_spark35.py). Prints one line; exits non-zero on any mismatch.
#
# Idempotent: the venv is reused while the pins below are unchanged, and the wheel is rebuilt
# and reinstalled only when pyproject.toml or sparkembed/ changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${SPARKEMBED_SPARK35_VENV:-$ROOT/.venv-spark35}"
PY="${PYTHON:-python3}"
MAIN_PY="$ROOT/.venv/bin/python"

# The cluster's own libraries. pyspark 3.5.9 needs numpy<2; pyarrow 26 needs numpy>=2 but does
# not say so in its metadata, so pip alone picks a pyarrow that cannot import; pandas 3 came
# after Spark 3.5.
CLUSTER=("pyspark==3.5.9" "numpy==1.26.4" "pandas==2.2.3" "pyarrow==25.0.1")

say() { echo "compat_spark35: $*" >&2; }

bash scripts/bootstrap.sh  # the main venv runs the local endpoint and the deltalake checks
mkdir -p dist
exec 9>dist/.compat_spark35.lock
flock 9  # two runs at once would rebuild the same wheel and venv under each other

# 1. The wheel, built from a clean copy so no stale build/ folder can leak old modules into it.
# README.md goes into the wheel too, but only as its description: it does not trigger a rebuild.
SRC_HASH="$(find pyproject.toml sparkembed -type f ! -path '*/__pycache__/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
WHEEL_STAMP="dist/.sparkembed-wheel-src"
if ! ls dist/sparkembed-*.whl >/dev/null 2>&1 || [ "$(cat "$WHEEL_STAMP" 2>/dev/null)" != "$SRC_HASH" ]; then
    say "building the wheel"
    BUILD="$(mktemp -d)"
    trap 'rm -rf "$BUILD"' EXIT
    mkdir -p "$BUILD/src"
    cp -r pyproject.toml README.md sparkembed "$BUILD/src/"
    find "$BUILD/src" -name __pycache__ -prune -exec rm -rf {} +
    "$MAIN_PY" -m pip wheel --quiet --no-deps -w "$BUILD/dist" "$BUILD/src"
    rm -f dist/sparkembed-*.whl
    cp "$BUILD"/dist/sparkembed-*.whl dist/
    echo "$SRC_HASH" >"$WHEEL_STAMP"
fi
WHEEL="$(ls dist/sparkembed-*.whl)"

# 2. The "cluster": a fresh venv with pyspark 3.5 preinstalled.
VENV_WANT="$("$PY" --version 2>&1) ${CLUSTER[*]}"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.sparkembed-cluster" 2>/dev/null)" != "$VENV_WANT" ]; then
    say "creating $VENV with ${CLUSTER[*]}"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "${CLUSTER[@]}"
    echo "$VENV_WANT" >"$VENV/.sparkembed-cluster"
fi

# 3. The wheel on the cluster: its dependencies may come in, the cluster's libraries must stay.
if [ "$(cat "$VENV/.sparkembed-wheel-src" 2>/dev/null)" != "$SRC_HASH" ]; then
    say "installing $WHEEL (+ deltalake for the delta-rs sink)"
    "$VENV/bin/python" -m pip uninstall --quiet --yes sparkembed >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install --quiet "$WHEEL" "deltalake>=1.1,<2"
    "$VENV/bin/python" -m pip check >/dev/null
    echo "$SRC_HASH" >"$VENV/.sparkembed-wheel-src"
fi
WANT="$(printf '%s\n' "${CLUSTER[@]}" | LC_ALL=C sort)"
HAVE="$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null \
    | grep -iE '^(pyspark|numpy|pandas|pyarrow)==' | LC_ALL=C sort || true)"
if [ "$HAVE" != "$WANT" ]; then
    say "FAILED: the cluster's libraries in $VENV are not the ones installed first (did the wheel change them?)"
    say "want: $(echo "$WANT" | tr '\n' ' ')"
    say "have: $(echo "$HAVE" | tr '\n' ' ')"
    exit 1
fi
"$VENV/bin/sparkembed" --help >/dev/null  # the wheel's console script is there and starts

# 4. The job and the notebook API on Spark 3.5, checked against the endpoint.
"$MAIN_PY" tests/compat/run_spark35.py check --venv "$VENV" "$@"
