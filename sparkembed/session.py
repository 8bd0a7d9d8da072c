"""Getting a Spark session: the platform's own, or a local one we configure."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

from sparkembed.config import EmbedConfig

LOCAL_MASTER = "local[2]"

# Our own sessions only. On Databricks/Synapse the platform owns the session.
_LOCAL_CONF = {
    "spark.speculation": "false",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "4096",
    "spark.python.worker.reuse": "true",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.driver.memory": "2g",
}


def get_spark(config: EmbedConfig, *, local_default: bool) -> SparkSession:
    """The active session if there is one; otherwise build one.

    Args:
        local_default: with no ``run.spark_master``, use local[2] (the CLI) rather
            than whatever spark-submit was given (the job entry point).
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = SparkSession.builder.appName("sparkembed")
    master = config.run.spark_master or (LOCAL_MASTER if local_default else None)
    if master:
        builder = builder.master(master)
    for key, value in _LOCAL_CONF.items():
        builder = builder.config(key, value)
    # Python workers must run the interpreter that has sparkembed installed.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = builder.config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
