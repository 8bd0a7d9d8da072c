"""Rerun benchmark (issue 18, part 4): bytes a 10 % rerun writes, against the table's size (figures,
no asserts; not run by CI).

1. A source of ``--rows`` rows (default 1M) of short unique texts.
2. A target as the job would have left it, built directly (embedding a million rows through an
   endpoint would take the whole benchmark): the job first embeds 200 rows into a seed table,
   whose schema, fingerprint and other columns the big table copies; then every row gets a
   random unit vector of ``--dims`` (default 256) floats and the sha256 of its text, and files
   of 25,000 rows in random id order are committed as one Delta version, as waves cut by hash
   of id leave them.
3. ``--changed`` (default 10 %) of the texts change, ids drawn at random.
4. For each ``--waves`` count (default 4 and 20), a copy of that target is rerun by the job
   (local[2], the local endpoint's ``hash`` model, ``run.commit_every_rows`` = changed rows /
   waves) and its Delta log read back: bytes added and removed by the rerun's commits, divided
   by the table's size, and by the bytes of the changed rows (the table's size × the changed
   fraction). Every committed version is checked for an (id, chunk_index) shown twice.
5. Before those, ``--rounds`` reruns of the built target with nothing changed, each timed
   against a plain ``count()`` of the source (parquet answers it from file footers) and a scan
   hashing every text, in the same session, one after the other. Each rerun also reports, from
   Spark's SQL status store, its queries (with their seconds), its jobs, and the columns read by
   each scan of the target's files.

"Before" and "after" run this same script against two checkouts of the package::

    python scripts/bench_rerun.py --rows 1000000                        # this checkout
    SPARKEMBED_CODE=/work/main python scripts/bench_rerun.py --rows 1000000   # another one

Usage::

    python scripts/bench_rerun.py --rows 200000 --waves 4 20 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

CODE = os.environ.get("SPARKEMBED_CODE", str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, CODE)
# Spark's Python workers must import the same checkout as the driver.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (CODE, os.environ.get("PYTHONPATH")) if p)

import sparkembed  # noqa: E402
from sparkembed import sinks  # noqa: E402
from sparkembed.config import EmbedConfig, validate_config  # noqa: E402
from sparkembed.server.launch import start_local_endpoint  # noqa: E402
from sparkembed.spark import driver  # noqa: E402
from sparkembed.spark.session import get_spark  # noqa: E402

ROWS_PER_FILE = 25_000
BASE_RUN = "20260101T000000Z-0badbeef"
"""The run id the built target's rows carry (a name sparkembed's vacuum knows)."""


def text_of(i: int, revised: bool = False) -> str:
    return f"Row {i} tells of item {i * 7 % 10007} in lot {i % 97}" + (" (revised)." if revised else ".")


def write_source(path: Path, rows: int, changed: np.ndarray | None = None) -> None:
    revised = np.zeros(rows, dtype=bool)
    if changed is not None:
        revised[changed] = True
    ids = [f"doc-{i:08d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "text": [text_of(i, bool(revised[i])) for i in range(rows)]}), path)


def config_for(url: str, source: Path, target: Path, work: Path, wave_rows: int) -> EmbedConfig:
    return validate_config({
        "endpoint": {"url": url},
        "auth": {"mode": "none"},
        "source": {"path": str(source)},
        "target": {"path": str(target), "mode": "upsert"},
        "batching": {"max_inputs": 1024},
        "run": {"commit_every_rows": wave_rows, "spark_master": "local[2]", "log_dir": str(work / "runs")},
    })  # fmt: skip


def build_target(target: Path, seed: pa.Table, rows: int, dims: int) -> None:
    """``rows`` rows in ``seed``'s schema, with random unit vectors, in files of random ids."""
    schema = seed.schema
    model_row = seed.filter(pc.equal(seed["status"], "ok")).slice(0, 1).to_pylist()[0]
    order = np.random.default_rng(1).permutation(rows)
    rng = np.random.default_rng(2)

    def batches() -> Iterator[pa.RecordBatch]:
        for start in range(0, rows, ROWS_PER_FILE):
            part = order[start : start + ROWS_PER_FILE]
            n = len(part)
            vectors = rng.standard_normal((n, dims), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            columns: dict[str, pa.Array] = {}
            for field in schema:
                name = field.name
                if name == "id":
                    columns[name] = pa.array([f"doc-{i:08d}" for i in part], field.type)
                elif name == "text_hash":
                    hashes = [hashlib.sha256(text_of(int(i)).encode()).hexdigest() for i in part]
                    columns[name] = pa.array(hashes)
                elif name == "embedding":
                    flat = pa.array(vectors.reshape(-1), pa.float32())
                    offsets = pa.array(np.arange(0, (n + 1) * dims, dims, dtype=np.int32))
                    columns[name] = pa.ListArray.from_arrays(offsets, flat).cast(field.type)
                elif name == "run_id":
                    columns[name] = pa.array([BASE_RUN] * n, field.type)
                else:
                    columns[name] = pa.array([model_row[name]] * n, field.type)
            yield from pa.table(columns, schema=schema).to_batches()

    files = sinks.write_part(
        str(target), batches(), schema=schema, file_prefix=f"part-{BASE_RUN}-w00000-p00000-a0",
        max_rows_per_file=ROWS_PER_FILE,
    )  # fmt: skip
    sinks.commit_files(str(target), files, schema=schema, mode="append", app_id=BASE_RUN, version=0)


def log_sizes(target: Path, after: int) -> dict[str, int]:
    """Bytes added and removed, and commits, after version ``after``."""
    added = removed = commits = 0
    for path in sorted((target / "_delta_log").glob("*.json")):
        if int(path.stem) <= after:
            continue
        commits += 1
        for line in path.read_text().splitlines():
            action = json.loads(line) if line.strip() else {}
            added += int(action.get("add", {}).get("size", 0))
            removed += int(action.get("remove", {}).get("size") or 0)
    return {"added_bytes": added, "removed_bytes": removed, "commits": commits}


def duplicated_versions(target: Path, after: int) -> list[int]:
    """Versions after ``after`` that show an (id, chunk_index) twice."""
    from deltalake import DeltaTable

    bad = []
    for version in range(after, DeltaTable(str(target)).version() + 1):
        keys = DeltaTable(str(target), version=version).to_pyarrow_table(columns=["id", "chunk_index"])
        if keys.group_by(["id", "chunk_index"]).aggregate([]).num_rows != keys.num_rows:
            bad.append(version)
    return bad


def table_bytes(target: Path) -> int:
    from deltalake import DeltaTable

    return int(sum(pa.table(DeltaTable(str(target)).get_add_actions(flatten=True))["size_bytes"].to_pylist()))


def nothing_changed(spark: Any, endpoint: Any, config: EmbedConfig, source: Path) -> dict[str, Any]:
    """Seconds of a rerun with nothing to do, of ``count()`` and of a scan hashing every text."""
    from pyspark.sql import functions as F

    t0 = time.monotonic()
    rows = spark.read.parquet(str(source)).count()
    count_s = time.monotonic() - t0
    t0 = time.monotonic()
    spark.read.parquet(str(source)).agg(F.sum(F.length(F.sha2("text", 256)))).collect()
    scan_s = time.monotonic() - t0
    endpoint.reset()
    after = last_execution(spark)
    spark.conf.set("spark.sql.maxMetadataStringLength", "10000")  # plans show whole locations
    t0 = time.monotonic()
    try:
        summary = driver.run(spark, config, progress=lambda _: None)
        seconds = time.monotonic() - t0
    finally:
        spark.conf.unset("spark.sql.maxMetadataStringLength")
    return {
        "seconds": round(seconds, 1), "source_count_s": round(count_s, 2),
        "hash_scan_s": round(scan_s, 2), "rows": rows, "rows_to_do": summary.rows_total,
        "requests": endpoint.stats(billed=False)["requests"],
        **spark_work(spark, str(config.target.path), after),
    }  # fmt: skip


def last_execution(spark: Any) -> int:
    """The id of the last Spark SQL query run so far (-1: none)."""
    spark.sparkContext._jsc.sc().listenerBus().waitUntilEmpty()
    executions = spark._jsparkSession.sharedState().statusStore().executionsList()
    return max((executions.apply(k).executionId() for k in range(executions.size())), default=-1)


def spark_work(spark: Any, target: str, after: int) -> dict[str, Any]:
    """What the Spark queries since execution ``after`` did: queries, jobs, and the scans of the
    target's files, by the columns each read (a checkpoint or a reused exchange reads no file)."""
    spark.sparkContext._jsc.sc().listenerBus().waitUntilEmpty()
    store = spark._jsparkSession.sharedState().statusStore()
    executions = store.executionsList()
    jobs = 0
    queries: list[str] = []
    scans: list[str] = []
    for k in range(executions.size()):
        execution = executions.apply(k)
        if execution.executionId() <= after:
            continue
        ended = execution.completionTime()
        seconds = (ended.get().getTime() - execution.submissionTime()) / 1000 if ended.isDefined() else None
        queries.append(f"{execution.description().split(' at ')[0]} {seconds} s")
        jobs += execution.jobs().size()
        # The plan's details: one block per node, "(3) Scan parquet", then "Location: ...".
        for node in execution.physicalPlanDescription().split("\n\n"):
            lines = node.strip().splitlines()
            fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            if lines and "Scan parquet" in lines[0] and f"{target}/" in fields.get("Location", ""):
                scans.append(fields.get("ReadSchema", ""))
    return {"spark_queries": queries, "spark_jobs": jobs, "target_scans": scans}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, default=256)
    parser.add_argument("--changed", type=float, default=0.10, help="fraction of texts changed")
    parser.add_argument("--waves", type=int, nargs="*", default=[4, 20], help="wave counts to rerun with")
    parser.add_argument("--rounds", type=int, default=1, help="nothing-changed reruns (default 1)")
    parser.add_argument("--workdir", default=None, help="scratch parent folder (default: system temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sparkembed-bench-rerun-", dir=args.workdir)).resolve()
    # Spark's Python workers put their working folder first on sys.path: not a checkout's root,
    # or they would import that checkout instead of SPARKEMBED_CODE.
    os.chdir(work)
    changed = np.random.default_rng(3).choice(args.rows, int(args.rows * args.changed), replace=False)
    figures: dict[str, Any] = {"code": str(Path(sparkembed.__file__).parents[1]), "rows": args.rows,
                               "dims": args.dims, "changed_rows": len(changed), "runs": []}  # fmt: skip
    print(f"bench_rerun: code {figures['code']}, {args.rows} rows x {args.dims} dims, "
          f"{len(changed)} changed; scratch {work}", flush=True)  # fmt: skip
    try:
        started = time.monotonic()
        write_source(work / "seed.parquet", 200)
        write_source(work / "source.parquet", args.rows)
        write_source(work / "rerun.parquet", args.rows, changed)
        with start_local_endpoint("--model", "hash", "--dims", str(args.dims), "--no-auth") as endpoint:
            seed = config_for(endpoint.url, work / "seed.parquet", work / "seed", work, 1000)
            spark = get_spark(seed, local_default=True)
            driver.run(spark, seed, progress=lambda _: None)
            build_target(work / "base", sinks.read_table(str(work / "seed")), args.rows, args.dims)
            size = table_bytes(work / "base")
            figures |= {"table_bytes": size, "changed_bytes": round(size * args.changed),
                        "build_s": round(time.monotonic() - started, 1)}  # fmt: skip
            print(f"target built: {size / 1e6:.0f} MB in {figures['build_s']} s", flush=True)
            source = work / "source.parquet"
            unchanged = config_for(endpoint.url, source, work / "base", work, 50_000)
            figures["nothing_changed"] = [
                nothing_changed(spark, endpoint, unchanged, source) for _ in range(args.rounds)
            ]
            print(json.dumps(figures["nothing_changed"]), flush=True)
            for waves in args.waves:
                target = work / f"rerun-{waves}"
                shutil.copytree(work / "base", target)
                config = config_for(endpoint.url, work / "rerun.parquet", target, work,
                                    math.ceil(len(changed) / waves))  # fmt: skip
                endpoint.reset()
                t0 = time.monotonic()
                summary = driver.run(spark, config, progress=lambda _: None)
                seconds = time.monotonic() - t0
                sizes = log_sizes(target, 0)
                run = {
                    "waves_asked": waves, "waves": summary.waves, "seconds": round(seconds, 1),
                    "texts_billed": endpoint.stats(billed=False)["texts_billed"], **sizes,
                    "added_per_table": round(sizes["added_bytes"] / size, 3),
                    "removed_per_table": round(sizes["removed_bytes"] / size, 3),
                    "added_per_changed": round(sizes["added_bytes"] / figures["changed_bytes"], 2),
                    "versions_with_duplicates": duplicated_versions(target, 0),
                }  # fmt: skip
                figures["runs"].append(run)
                print(json.dumps(run), flush=True)
                shutil.rmtree(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
