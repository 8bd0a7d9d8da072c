"""The layers hold: the pure core loads no Spark, HTTP client, Azure SDK or Delta.

import-linter (in scripts/test.sh) checks the import graph; this checks what a clean
interpreter really loads.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import sparkembed.core

HEAVY = ("pyspark", "aiohttp", "azure", "openai", "deltalake", "delta", "py4j")


def loaded_by(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_importing_the_whole_core_loads_no_spark_http_client_azure_or_delta() -> None:
    core = [f"sparkembed.core.{m.name}" for m in pkgutil.iter_modules(sparkembed.core.__path__)]
    assert "sparkembed.core.engine" in core and len(core) > 10
    assert loaded_by(core) == []


def test_the_check_sees_a_heavy_import() -> None:
    """The same check, on a module that does load them, so it cannot pass by accident."""
    assert set(loaded_by(["sparkembed.backends.azure_inference"])) >= {"aiohttp", "azure"}
