"""Getting a Spark session: the platform's own, or a local one we configure."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from sparkembed.config import EmbedConfig

log = logging.getLogger(__name__)

LOCAL_MASTER = "local[2]"
TASK_ATTEMPTS = 4
"""As on a cluster (``spark.task.maxFailures``): a crashed Python worker's task runs again."""
_LOCAL_WITHOUT_RETRIES = re.compile(r"^local(?:\[(\d+|\*)\])?$")

# Our own sessions only. On Databricks/Synapse the platform owns the session.
_LOCAL_CONF = {
    "spark.speculation": "false",
    "spark.sql.execution.arrow.maxRecordsPerBatch": "4096",
    "spark.python.worker.reuse": "true",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.driver.memory": "2g",
}


def _launch_jvm_logging_to(path: Path, builder: SparkSession.Builder) -> None:
    """Start the JVM gateway with its stdout and stderr in ``path`` (pyspark's ``popen_kwargs``).

    Only where this process launches the JVM itself; spark-submit and notebooks already have
    one. Falls back to the usual launch if pyspark's hooks differ.
    """
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    if "PYSPARK_GATEWAY_PORT" in os.environ or SparkContext._gateway is not None:
        return
    try:
        conf = SparkConf()
        for key, value in builder._options.items():
            conf.set(key, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        out = open(path, "ab")  # noqa: SIM115 - the JVM holds it for its whole life
        gateway = launch_gateway(conf, popen_kwargs={"stdout": out, "stderr": out})
        SparkContext._ensure_initialized(gateway=gateway, conf=conf)
    except Exception as exc:  # an older or newer pyspark: launch as usual, logs on stderr
        log.debug("could not send Spark's log to %s: %s", path, exc)


def with_task_retries(master: str) -> str:
    """``local[N]`` lets a task fail once only: one killed worker would end the run.

    ``local[N]`` becomes ``local[N,4]``; a master that names its retries, or a cluster's
    (``spark.task.maxFailures``, default 4), is kept.
    """
    found = _LOCAL_WITHOUT_RETRIES.match(master.strip())
    if found is None:
        return master
    return f"local[{found.group(1) or 1},{TASK_ATTEMPTS}]"


def get_spark(config: EmbedConfig, *, local_default: bool, spark_log: Path | None = None) -> SparkSession:
    """The active session if there is one; otherwise build one.

    Args:
        local_default: with no ``run.spark_master``, use local[2] (the CLI) rather
            than whatever spark-submit was given (the job entry point).
        spark_log: where the JVM's own output goes (its startup notices, warnings, task
            stack traces, and local Python workers' output), so the terminal shows only
            sparkembed's lines; None leaves it on this process's stderr.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    remote = os.environ.get("SPARK_REMOTE", "")  # spark-submit --remote, or set by hand
    if remote and not remote.startswith("local"):
        # A Spark Connect server elsewhere (Databricks, a cluster): it owns its configuration.
        return SparkSession.builder.remote(remote).getOrCreate()
    builder = SparkSession.builder.appName("sparkembed")
    master = config.run.spark_master or (LOCAL_MASTER if local_default else None)
    if remote:  # local[N]: pyspark starts a Connect server from its own jars, with these confs
        builder = builder.remote(with_task_retries(remote))
    elif master:
        builder = builder.master(with_task_retries(master))
    for key, value in _LOCAL_CONF.items():
        builder = builder.config(key, value)
    # Python workers must run the interpreter that has sparkembed installed.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = builder.config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
    if spark_log is not None and not remote:  # a Connect server's JVM starts its own way
        _launch_jvm_logging_to(spark_log, builder)
    with warnings.catch_warnings():
        # A local Connect server starts with every conf; the client then tries to set them again.
        warnings.filterwarnings("ignore", message="Failed to set spark", category=UserWarning)
        spark = builder.getOrCreate()
    if not is_connect(spark):
        spark.sparkContext.setLogLevel("WARN")
    return spark


def is_connect(spark: SparkSession) -> bool:
    """A Spark Connect session (``SparkSession.builder.remote(...)``, Databricks serverless and
    shared clusters): no SparkContext, no accumulators, no JVM in this process."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def default_parallelism(spark: SparkSession) -> int:
    """Task slots: how many tasks the session runs at once, which share the quota.

    Classic Spark: ``SparkContext.defaultParallelism``. Spark Connect has no SparkContext: the
    session's ``spark.default.parallelism`` when it is set, else the server is asked with one
    tiny query: ``spark.range`` without a partition count is split into the server's
    ``spark.sql.leafNodeDefaultParallelism``, which defaults to the SparkContext's
    ``defaultParallelism`` (the cores of a local master or of the cluster's executors), and
    every one of those partitions holds rows, so the highest partition id answers.
    """
    if not is_connect(spark):
        return max(1, spark.sparkContext.defaultParallelism)
    try:
        conf = spark.conf.get("spark.default.parallelism", None)
    except Exception:  # a server that does not let this session read the key
        conf = None
    if conf:
        return max(1, int(conf))
    partition = spark.range(0, _PROBE_ROWS).select(F.spark_partition_id().alias("p"))
    found = partition.agg(F.max("p").alias("p")).first()
    return max(1, int(found["p"]) + 1) if found is not None and found["p"] is not None else 1


_PROBE_ROWS = 1 << 20
"""Rows of the parallelism probe: more than any cluster has cores, so no partition is empty."""
