"""UDF benchmark (issue 16): ``sparkembed.embedding_udf`` against the whole-table job, side by side.

In one local[2] Spark session, against one ``sparkembed serve`` (``hash`` model, 1536
dimensions, ``--latency-ms`` added to every answer, a quota far above what two cores can
send), on the same source rows:

- ``job``: :func:`sparkembed.write` into a new Delta table (preflight, id checks, planning,
  one wave, the delta-rs sink: executors write parquet with pyarrow, the driver commits).
- ``udf``: ``df.repartition(slots).select("id", emb("text").alias("e")).select("id", "e.*")``
  written by Spark as parquet into a new folder (pip-installed Spark has no Delta jars),
  dictionary encoding off as the job's sink has it for vectors, with
  ``emb = sparkembed.embedding_udf(config=...)`` on the same config.
- ``udf-noop``: the same query into Spark's ``noop`` sink: the UDF's own throughput, without
  Spark's JVM parquet writer (which encodes the 1,536 floats of each row one by one).

Both run with as many partitions as task slots, so each sees the same concurrency per task.
A whole round goes first, untimed (Python workers start, the JVM compiles its hot paths).
Then ``--rounds`` rounds each run every side, rotating which goes first, so a noisy
neighbour on this shared machine slows all alike. Reports rows/s of each (median over
rounds) and the ratios udf/job and udf-noop/job per round and their medians (target >=
0.95). Figures only, no asserts; never run in CI.

Usage::

    python scripts/bench_udf.py                       # 30000 rows, 50 ms latency, 4 rounds
    python scripts/bench_udf.py --rows 10000 --rounds 2
    python scripts/bench_udf.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.parquet as pq  # noqa: E402
from bench_spark import WorkerMemory, cpu_seconds, write_corpus  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402

import sparkembed  # noqa: E402
from sparkembed.config import EmbedConfig, validate_config  # noqa: E402
from sparkembed.server.launch import start_local_endpoint  # noqa: E402
from sparkembed.spark.session import get_spark  # noqa: E402

DIMS = 1536
QUOTA_TPM = 100_000_000
QUOTA_RPM = 1_000_000
"""A quota no two cores can reach: pacing never binds, only latency and CPU do."""


def bench_config(url: str, work: Path, args: argparse.Namespace) -> EmbedConfig:
    return validate_config(
        {
            "endpoint": {"url": url},
            "auth": {"mode": "none"},
            "limits": {"tokens_per_minute": QUOTA_TPM, "requests_per_minute": QUOTA_RPM},
            "run": {
                "commit_every_rows": args.rows * 2,  # one wave: the UDF has no waves either
                "spark_master": "local[2]",
                "log_dir": str(work / "runs"),
            },
        }
    )


def run_job(spark: SparkSession, config: EmbedConfig, source: Path, target: Path) -> int:
    """sparkembed.write into a new Delta table; the rows it holds."""
    from deltalake import DeltaTable

    sparkembed.write(spark.read.parquet(str(source)), str(target), mode="append", config=config)
    return DeltaTable(str(target)).count()


def run_udf(spark: SparkSession, config: EmbedConfig, source: Path, target: Path | None, slots: int) -> int:
    """The UDF over the same rows, written as parquet (``target``) or to ``noop`` (None)."""
    emb = sparkembed.embedding_udf(config=config, spark=spark)
    df = spark.read.parquet(str(source)).repartition(slots)
    out = df.select("id", emb("text").alias("e")).select("id", "e.*")
    if target is None:
        out.write.format("noop").mode("overwrite").save()
        return int(pq.read_metadata(str(source)).num_rows)
    out.write.option("parquet.enable.dictionary", "false").parquet(str(target))
    table = pq.read_table(str(target), columns=["status"])
    failed = len(table) - table.column("status").to_pylist().count("ok")
    if failed:
        raise RuntimeError(f"the UDF left {failed} rows not ok")
    return len(table)


def timed(memory: WorkerMemory, jvm_pid: int, step: Callable[[], int]) -> dict[str, float]:
    """Rows, seconds and rows/s of ``step()``, and CPU seconds of the Python workers and the JVM."""
    os.sync()  # neither side pays for writing back the other's files
    memory.phase()
    jvm_cpu = cpu_seconds(jvm_pid)
    started = time.monotonic()
    rows = step()
    seconds = time.monotonic() - started
    memory.sample()
    workers_cpu, jvm_cpu = memory.cpu_s, cpu_seconds(jvm_pid) - jvm_cpu
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1),
        "workers_cpu_s": round(workers_cpu, 1),
        "jvm_cpu_s": round(jvm_cpu, 1),
        # Rows per CPU second of this session (workers and JVM): steadier than wall time on a
        # shared machine, where other jobs take the cores for seconds at a time.
        "rows_per_cpu_s": round(rows / max(workers_cpu + jvm_cpu, 1e-9), 1),
    }


SIDES = ("job", "udf", "udf-noop")
LABELS = {
    "job": "job (sparkembed.write -> Delta)",
    "udf": "udf (select(emb(text)) -> parquet)",
    "udf-noop": "udf-noop (select(emb(text)) -> noop)",
}


def one_round(
    spark: SparkSession,
    memory: WorkerMemory,
    endpoint: Any,
    config: EmbedConfig,
    source: Path,
    folder: Path,
    first: int,
) -> dict[str, Any]:
    slots = spark.sparkContext.defaultParallelism
    jvm = spark.sparkContext._gateway.proc.pid  # type: ignore[union-attr]
    steps: dict[str, Callable[[], int]] = {
        "job": lambda: run_job(spark, config, source, folder / "job"),
        "udf": lambda: run_udf(spark, config, source, folder / "udf", slots),
        "udf-noop": lambda: run_udf(spark, config, source, None, slots),
    }
    figures: dict[str, Any] = {"order": SIDES[first:] + SIDES[:first]}
    for name in figures["order"]:
        endpoint.reset()
        figures[name] = timed(memory, jvm, steps[name])
        figures[name]["requests"] = endpoint.stats(billed=False)["requests"]
    for name in ("udf", "udf-noop"):
        figures[f"{name}/job"] = round(figures[name]["rows_per_s"] / figures["job"]["rows_per_s"], 3)
        cpu = figures[name]["rows_per_cpu_s"] / figures["job"]["rows_per_cpu_s"]
        figures[f"{name}/job cpu"] = round(cpu, 3)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30_000, help="source rows (default 30000)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (default 4)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added to every answer (default 50)")
    parser.add_argument("--workdir", default=None, help="scratch parent folder (default: system temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sparkembed-bench-udf-", dir=args.workdir))
    source = work / "source.parquet"
    write_corpus(source, args.rows)
    print(f"bench_udf: {args.rows} rows of 20-60 words, {DIMS} dims, hash model, {args.latency_ms:g} ms "
          f"latency, quota {QUOTA_TPM} TPM (never binds), local[2], {args.rounds} rounds; scratch {work}",
          flush=True)  # fmt: skip
    rounds: list[dict[str, Any]] = []
    endpoint_args = ["--model", "hash", "--dims", str(DIMS), "--no-auth", "--latency-ms",
                     str(args.latency_ms), "--tpm", str(QUOTA_TPM), "--rpm", str(QUOTA_RPM)]  # fmt: skip
    try:
        with start_local_endpoint(*endpoint_args) as endpoint:
            config = bench_config(endpoint.url, work, args)
            spark = get_spark(config, local_default=True)
            memory = WorkerMemory(spark.sparkContext._gateway.proc.pid)  # type: ignore[union-attr]
            one_round(spark, memory, endpoint, config, source, work / "warm-up", first=0)
            shutil.rmtree(work / "warm-up")
            for number in range(1, args.rounds + 1):
                folder = work / f"round-{number}"
                first = number % len(SIDES)
                figures = one_round(spark, memory, endpoint, config, source, folder, first)
                rounds.append(figures)
                shutil.rmtree(folder)
                each = ", ".join(
                    f"{n} {figures[n]['rows_per_s']:.0f} rows/s ({figures[n]['rows_per_cpu_s']:.0f}/CPU-s)"
                    for n in figures["order"]
                )
                print(f"round {number}: {each}; udf/job {figures['udf/job']:.3f} (CPU "
                      f"{figures['udf/job cpu']:.3f}), udf-noop/job {figures['udf-noop/job']:.3f} (CPU "
                      f"{figures['udf-noop/job cpu']:.3f})", flush=True)  # fmt: skip
            memory.stop()
            spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, float] = {}
    for name in SIDES:
        for key in ("rows_per_s", "rows_per_cpu_s", "workers_cpu_s", "jvm_cpu_s"):
            summary[f"{name} {key}"] = round(statistics.median(r[name][key] for r in rounds), 3)
    ratios = ("udf/job", "udf/job cpu", "udf-noop/job", "udf-noop/job cpu")
    for ratio in ratios:
        summary[ratio] = round(statistics.median(r[ratio] for r in rounds), 3)
    for name, label in LABELS.items():
        rate, per_cpu = summary[f"{name} rows_per_s"], summary[f"{name} rows_per_cpu_s"]
        workers, jvm = summary[f"{name} workers_cpu_s"], summary[f"{name} jvm_cpu_s"]
        print(f"{label:<38} {rate:>6.0f} rows/s, {per_cpu:>6.0f}/CPU-s (CPU s: workers {workers}, JVM {jvm})")
    for ratio in ratios:
        each = ", ".join(f"{r[ratio]:.3f}" for r in rounds)
        print(f"{ratio + ',':<18} median of {len(rounds)} rounds: {summary[ratio]:.3f} (rounds {each})")
    print("Target >= 0.95. Shared machine: wall-time figures are noisy; CPU ones steadier.")
    if args.json:
        args.json.write_text(json.dumps({"rows": args.rows, "median": summary, "rounds": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
