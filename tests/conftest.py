"""Fixtures for every test folder: local endpoints over real sockets. No pyspark here, so
``tests/unit`` runs where pyspark is not installed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sparkembed.server.launch import LocalEndpoint, start_local_endpoint

# Tests pass keys through the environment, as users should, so they never sit in argv.
TEST_KEY = "test-key-0123456789"

StartEndpoint = Callable[..., LocalEndpoint]
FOLDER_MARKERS = {
    "integration": (pytest.mark.integration,),
    "spark": (pytest.mark.spark,),
    "connect": (pytest.mark.spark, pytest.mark.connect, pytest.mark.integration),
}
"""Every test in tests/integration talks to a local endpoint; every one in tests/spark runs
Spark; every one in tests/connect runs Spark behind a local Spark Connect server.
``-m "not spark"`` leaves the JVM out."""
ALONE = Path(__file__).parent / "connect"
"""Collected only when named (``pytest tests/connect``, as scripts/test.sh does): a local Spark
Connect session (``SparkSession.builder.remote("local[2]")``) cannot start in a process that
has run classic Spark, nor classic Spark after it."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in FOLDER_MARKERS.get(Path(item.fspath).parent.name, ()):
            item.add_marker(marker)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path != ALONE:
        return None
    here = config.invocation_params.dir
    named = [(here / arg.split("::")[0]).resolve() for arg in config.args]
    return None if any(path == ALONE or ALONE in path.parents for path in named) else True


@pytest.fixture(scope="session")
def endpoint_key() -> str:
    """The key endpoints from ``start_endpoint`` accept."""
    return TEST_KEY


@pytest.fixture(scope="session")
def start_endpoint() -> Iterator[StartEndpoint]:
    """Start a local endpoint: ``start_endpoint("--model", "hash", env=None)``.

    The endpoint serves ``TEST_KEY`` (via ``SPARKEMBED_SERVE_KEY``) unless ``env`` says
    otherwise. Every endpoint started is stopped at the end of the session; stop one
    earlier with ``endpoint.stop()``.
    """
    started: list[LocalEndpoint] = []

    def start(*args: str, env: dict[str, str] | None = None) -> LocalEndpoint:
        endpoint = start_local_endpoint(*args, env={"SPARKEMBED_SERVE_KEY": TEST_KEY, **(env or {})})
        started.append(endpoint)
        return endpoint

    yield start
    for endpoint in started:
        endpoint.stop()
