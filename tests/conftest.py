"""Shared fixtures: local endpoints over real sockets."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from pyspark.sql import SparkSession

from sparkembed.server.launch import LocalEndpoint, start_local_endpoint

# Tests pass keys through the environment, as users should, so they never sit in argv.
TEST_KEY = "test-key-0123456789"

StartEndpoint = Callable[..., LocalEndpoint]


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


@pytest.fixture(scope="session")
def spark() -> Iterator[SparkSession]:
    """One local[2] session for the whole run, built the way the CLI builds its own.

    SPARKEMBED_DELTA_JARS (comma-separated jar paths) adds native Delta, for the
    native-sink test on machines that have the jars.
    """
    from sparkembed.config import EmbedConfig
    from sparkembed.spark.session import get_spark

    jars = os.environ.get("SPARKEMBED_DELTA_JARS")
    if jars:  # SparkSession.builder is one shared object: get_spark picks these up
        SparkSession.builder.config("spark.jars", jars).config(
            "spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension"
        ).config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")

    session = get_spark(EmbedConfig(), local_default=True)
    yield session
    session.stop()
