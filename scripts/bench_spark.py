"""Spark benchmark (issue 4): the whole job against a floor that only writes vectors (figures, no asserts).

In one local[2] Spark session, on the same source and with the same waves:

- ``floor``: the delta-rs sink's own path (waves of ``run.commit_every_rows`` rows,
  ``mapInArrow``, :func:`sparkembed.sinks.write_part` on the executors, one
  :func:`sparkembed.sinks.commit_files` per wave), but each task writes precomputed random
  1536-d float32 vectors instead of embedding anything.
- ``job``: :func:`sparkembed.job.run` on the local endpoint's ``hash`` model, 1536 dimensions,
  zero latency: preflight, id checks, the engine on every row, and the same sink.

A whole round goes first, untimed, so neither side pays for starting Python workers or for
the JVM compiling its hot paths. Then ``--rounds`` rounds (default 3) each run the floor then
the job into new tables, so a noisy neighbour on this shared machine slows both sides of a
round alike; figures are the median over the rounds, and every round's ratio is printed.
Each phase starts after a ``sync``, and each round's tables are deleted after it: otherwise
the gigabytes written earlier slow the later phases (writeback, then page reclaim), and the
job, which runs second, more than the floor.

Reports rows/s of both, their ratio (target >= 0.5), CPU seconds of the Python workers, the
JVM and the endpoint (and the CPU-time ratio, floor CPU per row over the job's: the ratio at
equal core use), and the peak RSS of the Python workers
(VmHWM of the pyspark daemon and its forked workers under this session's JVM, read from /proc
and reset between phases; target <= 1.5 GiB per worker). Linux only.

Usage::

    python scripts/bench_spark.py                   # 200k rows
    python scripts/bench_spark.py --rows 20000      # a quick smoke
    python scripts/bench_spark.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyspark import TaskContext  # noqa: E402
from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from sparkembed import sinks  # noqa: E402
from sparkembed.config import EmbedConfig, validate_config  # noqa: E402
from sparkembed.core.context import RunContext  # noqa: E402
from sparkembed.core.memory import keep_freed_memory  # noqa: E402
from sparkembed.core.metrics import Metrics  # noqa: E402
from sparkembed.server.launch import start_local_endpoint  # noqa: E402
from sparkembed.sinks.files import conform  # noqa: E402
from sparkembed.spark.driver import run  # noqa: E402
from sparkembed.spark.partition import make_job, vectors_to_arrow  # noqa: E402
from sparkembed.spark.session import default_parallelism, get_spark  # noqa: E402
from sparkembed.spark.sources import read_source, select_input  # noqa: E402
from sparkembed.spark.writers import META_SCHEMA, read_reports, task_report  # noqa: E402

DIMS = 1536
POOL_ROWS = 4096
"""Random vectors each floor task draws once and cycles through (24 MiB)."""
GIB = 1024**3


def write_corpus(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` distinct texts of 20-60 words (windows over Python's help topics)."""
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).split()
    rng = random.Random(seed)
    texts = []
    for i in range(rows):
        size = rng.randint(20, 60)
        start = rng.randrange(len(words) - size)
        texts.append(f"[{i}] " + " ".join(words[start : start + size]))
    pq.write_table(pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts}), path)


# -- the floor: the sink's path with random vectors instead of embeddings ----------------------


def floor_partition(
    schema: pa.Schema, id_col: str, target: str, run_id: str, wave: int, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    """Executor side: write one 1536-d vector per input row, yield the file metas."""
    keep_freed_memory()  # as the job's executors do: the same allocator on both sides
    ctx = TaskContext.get()
    part, attempt = (ctx.partitionId(), ctx.attemptNumber()) if ctx else (0, 0)
    pool = np.random.default_rng(part).standard_normal((POOL_ROWS, DIMS), dtype=np.float32)

    def rows() -> Iterator[pa.RecordBatch]:
        offset = 0
        for batch in batches:
            n = batch.num_rows
            vectors = pool[(offset + np.arange(n)) % POOL_ROWS]
            offset += n
            ok = np.ones(n, dtype=bool)
            out = pa.RecordBatch.from_pydict(
                {
                    id_col: batch.column(id_col),
                    "chunk_index": pa.array(np.zeros(n, dtype=np.int32)),
                    "embedding": vectors_to_arrow(vectors, ok),
                    "dimensions": pa.array(np.full(n, DIMS, dtype=np.int32)),
                    "status": pa.array(["ok"] * n, pa.string()),
                    "run_id": pa.array([run_id] * n, pa.string()),
                }
            )
            yield conform(out, schema, fill_missing=True)

    prefix = f"part-{run_id}-w{wave:05d}-p{part:05d}-a{attempt}"
    metas = sinks.write_part(target, rows(), schema=schema, file_prefix=prefix)
    yield task_report(metas, Metrics())


def run_floor(spark: SparkSession, config: EmbedConfig, run_id: str, source: DataFrame | None = None) -> int:
    """The delta-rs sink's waves with random vectors; returns the rows committed."""
    df = select_input(source if source is not None else read_source(spark, config.source), config.source)
    total = df.count()
    waves = max(1, math.ceil(total / config.run.commit_every_rows))
    partitions = config.run.partitions or default_parallelism(spark)
    job, _ = make_job(df, config, RunContext(run_id=run_id))
    target, id_col = str(config.target.path), config.source.id_col
    expected = sinks.table_version(target)
    committed = 0
    for wave in range(waves):
        part = df if waves == 1 else df.filter(F.expr(f"pmod(xxhash64(`{id_col}`), {waves})") == wave)
        rows = (
            part.repartition(partitions)
            .mapInArrow(
                functools.partial(floor_partition, job.arrow_schema, id_col, target, run_id, wave),
                META_SCHEMA,
            )
            .collect()
        )
        files, _ = read_reports(rows)
        expected = sinks.commit_files(
            target, files, schema=job.arrow_schema, mode="append", app_id=run_id, version=wave,
            expected_version=expected,
        )  # fmt: skip
        committed += sum(f.num_records for f in files)
    return committed


# -- Python worker memory ---------------------------------------------------------------------


class WorkerMemory:
    """Peak RSS and CPU time of the Python processes under one JVM, sampled from /proc.

    ``phase()`` resets the kernel's peak (VmHWM) of the live workers, so each phase reports
    its own peak; workers that start and exit between two samples are missed.
    """

    def __init__(self, jvm_pid: int, interval_s: float = 0.25) -> None:
        self._jvm_pid = jvm_pid
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_bytes = 0
        self.peak_total_bytes = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, name="worker-memory", daemon=True)
        self._thread.start()

    def phase(self) -> None:
        for pid in self._python_descendants():
            # OSError: the worker exited, or the kernel refuses (then the peak carries over).
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.peak_bytes = self.peak_total_bytes = 0
        self._cpu_last = {}
        self.sample()
        self._cpu_start = dict(self._cpu_last)

    @property
    def cpu_s(self) -> float:
        """CPU seconds the workers used since ``phase()`` (up to the last sample)."""
        return sum(t - self._cpu_start.get(pid, 0.0) for pid, t in self._cpu_last.items())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def sample(self) -> None:
        """Read the peak and current RSS and the CPU time of every live worker now."""
        total = 0
        for pid in self._python_descendants():
            status = _read_status(pid)
            if status:
                self._cpu_last[pid] = cpu_seconds(pid) or self._cpu_last.get(pid, 0.0)
                self.peak_bytes = max(self.peak_bytes, status.get("VmHWM", 0))
                total += status.get("VmRSS", 0)
        self.peak_total_bytes = max(self.peak_total_bytes, total)

    def _python_descendants(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = [], list(children.get(self._jvm_pid, []))
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                if b"python" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
        return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used; 0 if it exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _read_status(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of ``pid`` in bytes; empty if it exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines)
            if k in ("VmHWM", "VmRSS")}  # fmt: skip


# -- the run ----------------------------------------------------------------------------------


def bench_config(url: str, source: Path, target: Path, work: Path, args: argparse.Namespace) -> EmbedConfig:
    return validate_config(
        {
            "endpoint": {"url": url},
            "auth": {"mode": "none"},
            "source": {"path": str(source)},
            "target": {"path": str(target), "mode": args.mode},
            "run": {
                "commit_every_rows": args.commit_every_rows,
                "spark_master": "local[2]",
                "log_dir": str(work / "runs"),
            },  # fmt: skip
        }
    )


def retarget(config: EmbedConfig, path: Path) -> EmbedConfig:
    """``config`` writing to another Delta folder."""
    return config.model_copy(update={"target": config.target.model_copy(update={"path": str(path)})})


def timed(
    memory: WorkerMemory, jvm_pid: int, server_pid: int, step: Any
) -> tuple[float, dict[str, float], Any]:
    """(seconds, resources, result) of ``step()``: peak worker RSS (GiB), and CPU seconds of the
    Python workers, the JVM and the endpoint."""
    os.sync()  # neither side pays for writing back the other's files
    memory.phase()
    server_cpu, jvm_cpu = cpu_seconds(server_pid), cpu_seconds(jvm_pid)
    started = time.monotonic()
    result = step()
    seconds = time.monotonic() - started
    memory.sample()
    used = {
        "worker_peak_rss_gib": round(memory.peak_bytes / GIB, 3),
        "workers_cpu_s": round(memory.cpu_s, 1),
        "jvm_cpu_s": round(cpu_seconds(jvm_pid) - jvm_cpu, 1),
        "endpoint_cpu_s": round(cpu_seconds(server_pid) - server_cpu, 1),
    }
    used["cpu_s"] = round(used["workers_cpu_s"] + used["jvm_cpu_s"] + used["endpoint_cpu_s"], 1)
    return seconds, used, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="source rows (default 200000)")
    parser.add_argument("--rounds", type=int, default=3, help="floor-then-job rounds (default 3)")
    parser.add_argument("--commit-every-rows", type=int, default=50_000, help="rows per wave")
    parser.add_argument("--mode", choices=["append", "overwrite", "upsert"], default="append",
                        help="the job's target mode (the floor appends)")  # fmt: skip
    parser.add_argument("--workdir", default=None, help="scratch parent folder (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder and its tables")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sparkembed-bench-spark-", dir=args.workdir))
    source = work / "source.parquet"
    write_corpus(source, args.rows)
    print(f"bench_spark: {args.rows} rows, {DIMS} dims, hash model, zero latency, local[2], waves of "
          f"{args.commit_every_rows} rows, {args.rounds} rounds; scratch {work}", flush=True)  # fmt: skip
    rounds: list[dict[str, Any]] = []
    try:
        with start_local_endpoint("--model", "hash", "--dims", str(DIMS), "--no-auth") as endpoint:
            config = bench_config(endpoint.url, source, work / "job", work, args)
            spark = get_spark(config, local_default=True)
            jvm = spark.sparkContext._gateway.proc.pid  # type: ignore[union-attr]
            memory = WorkerMemory(jvm)
            # A whole round, not counted: starts the Python workers, and the JVM compiles the
            # hot paths of both sides (after a small warm-up the first round's floor ran 30 % slow).
            one_round(spark, memory, jvm, endpoint, config, work / "warm-up")
            shutil.rmtree(work / "warm-up")
            for number in range(1, args.rounds + 1):
                endpoint.reset()
                folder = work / f"round-{number}"
                figures = one_round(spark, memory, jvm, endpoint, config, folder)
                rounds.append(figures)
                if not args.keep:
                    # Its 2.5 GB would stay in the page cache: later rounds would write on a
                    # machine with less free memory, and the kernel's reclaim would slow them.
                    shutil.rmtree(folder)
                print(f"round {number}: floor {figures['floor_rows_per_s']:.0f} rows/s, job "
                      f"{figures['job_rows_per_s']:.0f} rows/s, ratio {figures['ratio']:.2f} "
                      f"(CPU-time ratio {figures['cpu_ratio']:.2f})", flush=True)  # fmt: skip
            memory.stop()
            spark.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {key: round(statistics.median(r[key] for r in rounds), 3) for key in MEDIANS}
    for name, label in (
        ("floor", "floor (random vectors -> Delta)"),
        ("job", "job (sparkembed.job.run -> Delta)"),
    ):
        used = {key: round(statistics.median(r[name][key] for r in rounds), 3) for key in rounds[0][name]}
        summary[name] = used
        print(
            f"{label:<36} {summary[f'{name}_rows_per_s']:>8.0f} rows/s; worker peak RSS "
            f"{used['worker_peak_rss_gib']:.2f} GiB; CPU s: Python workers {used['workers_cpu_s']}, "
            f"JVM {used['jvm_cpu_s']}, endpoint {used['endpoint_cpu_s']}, total {used['cpu_s']}"
        )
    each = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
    print(
        f"ratio job/floor, median of {len(rounds)} rounds: {summary['ratio']:.2f} (target >= 0.5; "
        f"rounds {each}; CPU-time ratio "
        f"{summary['cpu_ratio']:.2f}); job worker peak RSS {summary['job']['worker_peak_rss_gib']:.2f} GiB "
        f"(target <= 1.5; all workers together {summary['job']['workers_total_rss_peak_gib']:.2f} GiB). "
        "Shared machine: figures are noisy."
    )
    if args.json:
        args.json.write_text(
            json.dumps({"rows": args.rows, "dims": DIMS, "median": summary, "rounds": rounds}, indent=2)
        )
    return 0


MEDIANS = ("floor_rows_per_s", "job_rows_per_s", "ratio", "cpu_ratio", "floor_seconds", "job_seconds")
"""Figures reported as the median over rounds."""


def one_round(
    spark: SparkSession, memory: WorkerMemory, jvm: int, endpoint: Any, config: EmbedConfig, folder: Path
) -> dict[str, Any]:
    """The floor then the job, each into a new table under ``folder``; their figures."""
    server = endpoint.process.pid
    floor_s, floor_used, floor_rows = timed(
        memory, jvm, server, lambda: run_floor(spark, retarget(config, folder / "floor"), "floor")
    )
    job_s, job_used, summary = timed(memory, jvm, server, lambda: run(spark, retarget(config, folder / "job"),
                                                                        progress=lambda _: None))  # fmt: skip
    job_used["workers_total_rss_peak_gib"] = round(memory.peak_total_bytes / GIB, 3)
    from deltalake import DeltaTable

    job_rows = DeltaTable(str(folder / "job")).count()
    if DeltaTable(str(folder / "floor")).count() != floor_rows:
        raise RuntimeError("the floor table does not hold the rows its commits reported")
    stats = endpoint.stats(billed=False)
    return {
        "floor_rows_per_s": round(floor_rows / floor_s, 1),
        "job_rows_per_s": round(job_rows / job_s, 1),
        "ratio": round((job_rows / job_s) / (floor_rows / floor_s), 3),
        # What the ratio would be at equal core use: steadier than wall time on a shared box.
        "cpu_ratio": round((floor_used["cpu_s"] / floor_rows) / (job_used["cpu_s"] / job_rows), 3),
        "floor_seconds": round(floor_s, 2),
        "job_seconds": round(job_s, 2),
        "floor": floor_used,
        "job": job_used,
        "job_rows_in_delta": job_rows,
        "job_requests": summary.counts["requests"],
        "job_prompt_tokens": summary.counts["prompt_tokens"],
        "endpoint_requests": stats["requests"],
        "job_summary": summary.to_json(),
    }


if __name__ == "__main__":
    sys.exit(main())
