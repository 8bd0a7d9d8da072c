"""Fixtures of the tests that run real Spark (local mode, and a standalone cluster)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from pyspark.sql import SparkSession


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
