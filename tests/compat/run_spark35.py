"""Spark 3.5 compatibility run of the built wheel, against the local endpoint (issues 4 and 8).

``scripts/compat_spark35.sh`` builds the wheel, installs it into a venv with pyspark 3.5
preinstalled, then runs this file, which has two roles:

- ``check`` (main venv: it has the local endpoint's model and deltalake): starts the local
  endpoint, writes a small source (null, empty, blank, non-ASCII and one long text), runs
  ``spark-submit jobs/embed_table.py`` with the 3.5 venv's Spark on local[2] into Delta, then
  the ``notebook`` role in that venv, and checks both outputs against the endpoint: rows per
  id, statuses, vectors equal to what the endpoint returns for each text (or chunk), and token
  sums equal to the endpoint's accounting (minus the job's one preflight).
- ``notebook`` (inside the 3.5 venv): ``sparkembed.embed(df, ...)``, which must send nothing,
  then ``collect``; the rows go to a parquet file for ``check``.

Both Spark programs run in a scratch folder, so Python workers import sparkembed from the
installed wheel, never from this checkout; ``notebook`` reports where they found it.
Prints one line; exits 0 when everything matched, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
DIMS = 64
SOURCE_ROWS = 300
COMMIT_EVERY_ROWS = 150  # two waves, two Delta commits
LONG_ID = 6
PREFLIGHT_TEXT = "sparkembed preflight"  # sparkembed.engine.PREFLIGHT_TEXT, not importable in both venvs
NOTEBOOK_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("chunk_index", pa.int32()),
        ("chunk_start", pa.int32()),
        ("chunk_end", pa.int32()),
        ("text_hash", pa.string()),
        ("embedding", pa.list_(pa.float32())),
        ("dimensions", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("run_id", pa.string()),
        ("title", pa.string()),
    ]
)


def source_texts() -> dict[int, str | None]:
    """The source: ordinary texts, plus the edge cases statuses depend on."""
    texts: dict[int, str | None] = {
        i: f"row {i}: Spark 3.5 compatibility text number {i * 7919 % 1000}" for i in range(SOURCE_ROWS)
    }
    texts[3] = None
    texts[4] = ""
    texts[5] = " \t\n "
    # About 25,000 characters: without a tokenizer in the 3.5 venv it is cut by UTF-8 bytes.
    texts[LONG_ID] = " ".join(f"word{i * 7919 % 997}" for i in range(3000))
    texts[7] = "Grüße aus Zürich, 東京からこんにちは 🚀"
    return texts


def write_source(path: Path, texts: dict[int, str | None]) -> None:
    ids = list(texts)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "text": pa.array([texts[i] for i in ids], pa.string()),
            "title": pa.array([f"title {i}" for i in ids], pa.string()),
        }
    )
    pq.write_table(table, path)


# -- the endpoint, queried directly ---------------------------------------------------------


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        document: dict[str, Any] = json.loads(response.read())
    return document


def endpoint_vectors(url: str, texts: list[str]) -> np.ndarray:
    """float32 (len(texts), DIMS): what the endpoint returns for each text, placed by ``index``."""
    out = np.zeros((len(texts), DIMS), dtype=np.float32)
    for start in range(0, len(texts), 1000):
        answer = _post(
            f"{url}/embeddings", {"input": texts[start : start + 1000], "encoding_format": "base64"}
        )
        for item in answer["data"]:
            out[start + item["index"]] = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    return out


def endpoint_tokens(url: str, text: str) -> int:
    return int(_post(f"{url}/embeddings", {"input": [text]})["usage"]["prompt_tokens"])


def endpoint_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_stats", timeout=30) as response:
        document: dict[str, Any] = json.loads(response.read())
    return document


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- checks (main venv) ----------------------------------------------------------------------


def check_rows(table: pa.Table, texts: dict[int, str | None], url: str) -> tuple[list[str], dict[str, int]]:
    """Problems found in an output table, and its counts. Queries the endpoint (it bills that)."""
    problems: list[str] = []
    by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in table.select([f.name for f in NOTEBOOK_SCHEMA]).to_pylist():
        by_id[row["id"]].append(row)
    if set(by_id) != set(texts):
        problems.append(f"ids differ: missing {sorted(set(texts) - set(by_id))[:5]}, "
                        f"extra {sorted(set(by_id) - set(texts))[:5]}")  # fmt: skip
    if len({r["run_id"] for rows in by_id.values() for r in rows}) != 1:
        problems.append("more than one run_id")
    sent: list[tuple[str, list[float] | None]] = []  # (text sent, vector stored)
    for id_, text in texts.items():
        rows = sorted(by_id.get(id_, []), key=lambda r: r["chunk_index"])
        problems += _check_unit(id_, text, rows, sent)
    if sent:
        want = endpoint_vectors(url, [t for t, _ in sent])
        got = [np.asarray(v if v is not None else [], dtype=np.float32) for _, v in sent]
        wrong = sum(not np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        if wrong:
            problems.append(f"{wrong} of {len(sent)} vectors differ from the endpoint's for their text")
    statuses = [r["status"] for rows in by_id.values() for r in rows]
    counts = {
        "rows": len(statuses),
        "ok": statuses.count("ok"),
        "skipped": statuses.count("skipped"),
        "failed": statuses.count("failed"),
        "chunks": len(by_id.get(LONG_ID, [])),
        "prompt_tokens": sum(r["prompt_tokens"] or 0 for rows in by_id.values() for r in rows),
    }
    return problems, counts


def _check_unit(
    id_: int, text: str | None, rows: list[dict[str, Any]], sent: list[tuple[str, list[float] | None]]
) -> list[str]:
    """Problems with one source row's output rows; appends (text, vector) pairs of ok rows to ``sent``."""
    if not rows:
        return []
    problems = []
    if [r["chunk_index"] for r in rows] != list(range(len(rows))):
        problems.append(f"id {id_}: chunk_index {[r['chunk_index'] for r in rows]}")
    if any(r["text_hash"] != (None if text is None else sha256(text)) for r in rows):
        problems.append(f"id {id_}: wrong text_hash")
    if text is None or not text.strip():
        row = rows[0]
        if (
            len(rows) != 1
            or row["status"] != "skipped"
            or row["embedding"] is not None
            or row["prompt_tokens"]
        ):
            problems.append(f"id {id_} ({text!r}): want one skipped row, got {[r['status'] for r in rows]}")
        return problems
    if any(r["status"] != "ok" or r["dimensions"] != DIMS for r in rows):
        problems.append(f"id {id_}: {[(r['status'], r['error']) for r in rows][:3]}")
    if id_ == LONG_ID:
        if len(rows) < 2:
            problems.append(f"the long text gave {len(rows)} row(s), want chunks")
        spans = [(r["chunk_start"], r["chunk_end"]) for r in rows]
        if (
            spans[0][0] != 0
            or spans[-1][1] != len(text)
            or any(
                s is None or e is None or s >= e or (i and s > spans[i - 1][1])
                for i, (s, e) in enumerate(spans)
            )
        ):
            problems.append(f"long text chunks leave gaps or miss an end: {spans[:3]} ... {spans[-1]}")
            return problems
        sent.extend((text[s:e], r["embedding"]) for (s, e), r in zip(spans, rows, strict=True))
    elif len(rows) != 1 or rows[0]["chunk_start"] is not None:
        problems.append(f"id {id_}: a short text gave {len(rows)} rows")
    else:
        sent.append((text, rows[0]["embedding"]))
    return problems


def spark35_env(venv: Path) -> dict[str, str]:
    """The 3.5 venv's Spark and Python, with nothing of the main venv's Spark leaking in."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"SPARK_HOME", "PYTHONPATH", "PYSPARK_DRIVER_PYTHON", "VIRTUAL_ENV"}}  # fmt: skip
    env["PYSPARK_PYTHON"] = str(venv / "bin" / "python")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_logged(cmd: list[str], work: Path, env: dict[str, str], name: str) -> tuple[int, str]:
    """Run ``cmd`` in ``work``; stderr goes to ``work/name.err``. Returns (exit code, stdout)."""
    with open(work / f"{name}.err", "w") as err:
        done = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                              timeout=900, check=False)  # fmt: skip
    return done.returncode, done.stdout


def tail(path: Path) -> str:
    """The end of a log, without Java stack frames."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(line for line in lines if not line.lstrip().startswith("at "))[-4000:]


def check_job(venv: Path, work: Path, url: str, texts: dict[int, str | None]) -> tuple[list[str], str]:
    """``spark-submit jobs/embed_table.py`` from the 3.5 venv into Delta, checked with deltalake."""
    from deltalake import DeltaTable
    from pyarrow import fs as pafs

    target = work / "target"
    config = {
        "endpoint": {"url": url},
        "auth": {"mode": "none"},
        "source": {"path": str(work / "source.parquet"), "passthrough": ["title"]},
        "target": {"path": str(target), "mode": "upsert"},
        "run": {"commit_every_rows": COMMIT_EVERY_ROWS, "log_dir": str(work / "runs")},
    }
    (work / "job.yaml").write_text(json.dumps(config))  # JSON is YAML
    cmd = [str(venv / "bin" / "spark-submit"), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
           str(ROOT / "jobs" / "embed_table.py"), "--config", str(work / "job.yaml")]  # fmt: skip
    code, stdout = run_logged(cmd, work, spark35_env(venv), "spark-submit")
    stats = endpoint_stats(url)
    if code != 0:
        return [f"spark-submit exited {code}:\n{stdout[-2000:]}\n{tail(work / 'spark-submit.err')}"], ""
    summary = json.loads(stdout.strip().splitlines()[-1])
    snapshot = DeltaTable(str(target))
    table = snapshot.to_pyarrow_table(filesystem=pafs.SubTreeFileSystem(str(target), pafs.LocalFileSystem()))
    problems, counts = check_rows(table, texts, url)
    preflights = stats.get("billed", {}).get(sha256(PREFLIGHT_TEXT), 0)
    billed = stats["prompt_tokens"] - preflights * endpoint_tokens(url, PREFLIGHT_TEXT)
    if preflights != 1:
        problems.append(f"the endpoint saw {preflights} preflight requests, want 1")
    if counts["prompt_tokens"] != billed or summary["prompt_tokens"] != billed:
        problems.append(
            f"prompt_tokens: table {counts['prompt_tokens']}, summary {summary['prompt_tokens']}, "
            f"endpoint {billed} (preflight excluded)"
        )
    if summary["requests"] != stats["ok_requests"] - preflights or set(stats["responses"]) != {"200"}:
        problems.append(f"requests: summary {summary['requests']}, endpoint {stats['responses']}")
    if (summary["rows_ok"], summary["rows_skipped"], summary["rows_failed"]) != (
        counts["ok"],
        counts["skipped"],
        counts["failed"],
    ):
        problems.append(f"summary {summary} does not match the table {counts}")
    if snapshot.version() != -(-SOURCE_ROWS // COMMIT_EVERY_ROWS) - 1:
        problems.append(f"table version {snapshot.version()}: want one commit per wave")
    (work / "delta_columns.json").write_text(json.dumps(table.column_names))
    return problems, (
        f"spark-submit: {counts['rows']} rows ({counts['ok']} ok incl. {counts['chunks']} chunks of the long "
        f"text, {counts['skipped']} skipped), {summary['requests']} requests, {billed} tokens = endpoint"
    )


def check_notebook(venv: Path, work: Path, url: str, texts: dict[int, str | None]) -> tuple[list[str], str]:
    """``sparkembed.embed(df)`` inside the 3.5 venv: lazy, then collected and checked."""
    cmd = [str(venv / "bin" / "python"), str(Path(__file__).resolve()), "notebook", "--endpoint", url,
           "--work", str(work)]  # fmt: skip
    code, stdout = run_logged(cmd, work, spark35_env(venv), "notebook")
    stats = endpoint_stats(url)
    if code != 0:
        return [f"notebook role exited {code}:\n{stdout[-2000:]}\n{tail(work / 'notebook.err')}"], ""
    info = json.loads((work / "notebook.json").read_text())
    problems, counts = check_rows(pq.read_table(work / "notebook.parquet"), texts, url)
    if info["requests_before_collect"]:
        problems.append(f"embed() sent {info['requests_before_collect']} requests before any action")
    if stats.get("billed", {}).get(sha256(PREFLIGHT_TEXT)):
        problems.append("embed() sent a preflight")
    if counts["prompt_tokens"] != stats["prompt_tokens"]:
        problems.append(f"prompt_tokens: rows {counts['prompt_tokens']}, endpoint {stats['prompt_tokens']}")
    site = str(venv)
    if not all(path.startswith(site) for path in [info["driver_sparkembed"], *info["worker_sparkembed"]]):
        problems.append(f"sparkembed not imported from the wheel: {info}")
    delta_columns = work / "delta_columns.json"
    if delta_columns.exists() and json.loads(delta_columns.read_text()) != info["columns"]:
        problems.append(f"embed() columns {info['columns']} differ from the job's Delta table")
    return problems, f"embed()+collect: {counts['rows']} rows, lazy, {stats['ok_requests']} requests"


def check(args: argparse.Namespace) -> int:
    from sparkembed.server.launch import start_local_endpoint

    started = time.monotonic()
    venv = Path(args.venv).resolve()
    work = Path(tempfile.mkdtemp(prefix="sparkembed-spark35-"))
    texts = source_texts()
    write_source(work / "source.parquet", texts)
    probe = [str(venv / "bin" / "python"), "-c", "import pyspark; print(pyspark.__version__)"]
    version = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    problems: list[str] = []
    parts: list[str] = []
    try:
        with start_local_endpoint("--model", "hash", "--dims", str(DIMS), "--no-auth") as endpoint:
            for step in (check_job, check_notebook):
                endpoint.reset()
                found, line = step(venv, work, endpoint.url, texts)
                problems += found
                parts.append(line or f"{step.__name__} failed")
    finally:
        keep = args.keep or problems
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"MISMATCH {problem}", file=sys.stderr)
    verdict = "FAILED" if problems else "ok"
    print(f"spark {version} compat {verdict}: " + "; ".join(parts) + f" ({time.monotonic() - started:.0f} s)")
    if keep:
        print(f"scratch folder kept: {work}", file=sys.stderr)
    return 1 if problems else 0


# -- the notebook role (3.5 venv) --------------------------------------------------------------


def notebook(args: argparse.Namespace) -> int:
    from pyspark.sql import SparkSession

    import sparkembed

    work = Path(args.work)
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("sparkembed-spark35-notebook")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    df = spark.read.parquet(str(work / "source.parquet")).repartition(2)
    before = endpoint_stats(args.endpoint)["requests"]
    out = sparkembed.embed(
        df, text_col="text", id_col="id", passthrough=("title",),
        config={"endpoint": {"url": args.endpoint}, "auth": {"mode": "none"}},
    )  # fmt: skip
    lazy = endpoint_stats(args.endpoint)["requests"] - before
    rows = [row.asDict() for row in out.collect()]
    pq.write_table(pa.Table.from_pylist(rows, schema=NOTEBOOK_SCHEMA), work / "notebook.parquet")
    workers = spark.sparkContext.parallelize(range(2), 2).map(
        lambda _: str(__import__("sparkembed").__file__)
    )
    info = {
        "spark": spark.version,
        "requests_before_collect": lazy,
        "columns": out.columns,
        "driver_sparkembed": sparkembed.__file__,
        "worker_sparkembed": sorted(set(workers.collect())),
    }
    (work / "notebook.json").write_text(json.dumps(info))
    spark.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    run = roles.add_parser("check", help="run everything from the main venv")
    run.add_argument("--venv", required=True, help="the venv with pyspark 3.5 and the wheel")
    run.add_argument("--keep", action="store_true", help="keep the scratch folder")
    nb = roles.add_parser("notebook", help="inside the 3.5 venv: embed() and collect")
    nb.add_argument("--endpoint", required=True)
    nb.add_argument("--work", required=True)
    args = parser.parse_args()
    return check(args) if args.role == "check" else notebook(args)


if __name__ == "__main__":
    sys.exit(main())
