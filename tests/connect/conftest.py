"""Fixtures of the tests that run over a real local Spark Connect server.

``SparkSession.builder.remote("local[2]")`` starts the server from pyspark's own jars, in this
process's JVM, and talks to it over gRPC as a Databricks serverless notebook does. One session
serves the whole folder: it starts in about ten seconds. No Delta on this server: the auto sink
must find that out from the server, and write through delta-rs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from pyspark.sql import SparkSession
from support import DIMS

from sparkembed.server.launch import LocalEndpoint


@pytest.fixture(scope="session")
def connect() -> Iterator[SparkSession]:
    """The Spark Connect session (local[2] with task retries, as the CLI's own master)."""
    from pyspark import SparkContext

    if SparkContext._active_spark_context is not None:
        pytest.skip("classic Spark runs in this process: run tests/connect in a pytest of its own")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # A free port for the server, which the client then asks the JVM for: 15002, the default,
    # may be another process's Connect server on this machine.
    os.environ["SPARK_TESTING"] = "1"
    session = (
        SparkSession.builder.remote("local[2,4]")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "4096")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def hash_endpoint(start_endpoint) -> LocalEndpoint:
    return start_endpoint("--model", "hash", "--dims", str(DIMS))
