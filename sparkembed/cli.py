"""``sparkembed`` command line: run, estimate, serve, report, cache-tokenizer, cache, migrate.

The last line ``run`` prints is a one-line JSON summary. Errors a user can cause end in one
line, ``sparkembed: error: …`` naming the fix, and the exit code of :data:`EXIT_CODES`; a
traceback only with ``--debug`` or ``SPARKEMBED_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparkembed.config import EmbedConfig, load_config, parse_override, resolve_endpoint
from sparkembed.errors import ConfigError, SparkEmbedError

log = logging.getLogger("sparkembed")

COMMANDS = {
    "run": "embed a table's texts into a Delta table (only what the target lacks yet)",
    "estimate": "rows, tokens, cost of the next run: one preflight request, nothing embedded",
    "serve": "start the local Azure-like embeddings endpoint (demos, tests, benchmarks)",
    "report": "write a run's HTML report: throughput against quota, 429s, failures, cost",
    "cache-tokenizer": "copy cl100k_base.tiktoken where offline executors can read it",
    "cache": "the shared embedding cache (cache.path): vacuum --older-than 90d deletes old entries",
    "migrate": "a pending model migration of a target: status (rows done, cost, ETA) or abort",
}
EXIT_CODES = """exit codes:
  0    every row ended ok or skipped
  1    failed rows exceed run.max_failed_fraction (or remain, with --fail-on-existing-failures)
  2    a config, input, endpoint (preflight), budget or concurrent-write error: the message names the fix
  130  stopped by Ctrl-C (143: SIGTERM) after committing what was answered: rerun to continue"""


def _run_parser(prog: str, description: str = COMMANDS["run"]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=description, epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--config", help="YAML config file (see conf/)")
    p.add_argument("--source", help="path (Delta folder, .parquet, .csv, .jsonl) or table name")
    p.add_argument("--target", help="Delta path (./out, /lake/t, abfss://…) or catalog table name")
    p.add_argument("--endpoint", help="endpoint URL, or 'local' (env AZURE_INFERENCE_ENDPOINT)")
    p.add_argument("--model", help="model or deployment name")
    p.add_argument("--id-col", help="id column (default id)")
    p.add_argument("--text-col", help="text column (default text)")
    p.add_argument("--passthrough", help="source columns copied to the output: a,b")
    p.add_argument("--mode", choices=["append", "overwrite", "upsert"], help="target write mode")
    p.add_argument(
        "--prune",
        action="store_true",
        default=None,
        help="delete target rows whose id is gone from the source",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="embed again the rows that failed in earlier runs",
    )
    p.add_argument(
        "--reembed-all",
        action="store_true",
        default=None,
        help="replace a target made with another model, dimensions or input_type",
    )
    p.add_argument(
        "--check-sample",
        type=int,
        metavar="N",
        help="before a migration's switch, report how far N sample ids' nearest neighbours agree "
        "between the old and the new vectors",
    )
    p.add_argument(
        "--no-switch",
        dest="switch",
        action="store_false",
        default=None,
        help="build (and check) a migration's staging table, but leave the target as it is",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        default=None,
        help="start a run estimated over run.max_tokens/run.max_cost_usd: embed up to the cap, "
        "commit it, and leave the rest to a later run",
    )
    p.add_argument(
        "--fail-on-existing-failures",
        action="store_true",
        default=None,
        help="exit 1 while rows that failed in earlier runs remain (without --retry-failed)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set limits.concurrency=8 "
                        "(list keys take a,b)")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="DEBUG logs and tracebacks (or SPARKEMBED_DEBUG=1)")
    return p


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> EmbedConfig:
    """Config file, then flags, then ``--set``; the endpoint falls back to the Azure env var."""
    env = os.environ if environ is None else environ
    overrides: dict[str, Any] = {}
    flag_keys = {
        "source": "source.path", "target": "target.path", "endpoint": "endpoint.url",
        "model": "endpoint.model", "id_col": "source.id_col", "text_col": "source.text_col",
        "mode": "target.mode", "prune": "run.prune", "retry_failed": "run.retry_failed",
        "reembed_all": "run.reembed_all", "fail_on_existing_failures": "run.fail_on_existing_failures",
        "check_sample": "run.check_sample", "switch": "run.switch", "allow_partial": "run.allow_partial",
    }  # fmt: skip
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "passthrough", None) is not None:
        overrides.update([parse_override(f"source.passthrough={args.passthrough}")])
    overrides.update(parse_override(item) for item in args.set)
    return resolve_endpoint(load_config(args.config, overrides), env)


@contextlib.contextmanager
def local_endpoint(config: EmbedConfig) -> Iterator[EmbedConfig]:
    """``endpoint.url: local`` starts the bundled endpoint for the run and stops it afterwards."""
    if config.endpoint.url != "local":
        yield config
        return
    if importlib.util.find_spec("tokenizers") is None or importlib.util.find_spec("safetensors") is None:
        raise ConfigError(
            "endpoint.url 'local' needs the bundled model: pip install 'sparkembed[endpoint]' "
            "(or [local] on a laptop), or give an Azure endpoint URL"
        )
    from sparkembed.server.launch import start_local_endpoint

    with start_local_endpoint("--no-auth", "--model", config.endpoint.local_model) as server:
        log.info("started local endpoint %s (model %s)", server.url, config.endpoint.local_model)
        # Name the model, so the fingerprint stays what it was with url "local", and the
        # openai-v1 route (which needs a model) works too.
        model = config.endpoint.model or config.endpoint.local_model
        endpoint = config.endpoint.model_copy(update={"url": server.url, "model": model})
        auth = config.auth.model_copy(update={"mode": "none"})
        long_text = config.long_text
        if long_text.tokenizer == "auto":  # the local endpoint counts with wordllama's tokenizer
            long_text = long_text.model_copy(update={"tokenizer": "wordllama"})
        yield config.model_copy(update={"endpoint": endpoint, "auth": auth, "long_text": long_text})


def _fail(kind: str, message: str, exc: BaseException | None = None, code: int = 2) -> int:
    """One line on stderr, and the JSON last line with what the run spent."""
    print(f"sparkembed: error: {message}", file=sys.stderr)
    summary = getattr(exc, "run_summary", None)
    spent = summary.to_json() if summary is not None else {}
    print(json.dumps(spent | {"error": message, "error_type": kind}), flush=True)
    return code


def _debugging(args: argparse.Namespace) -> bool:
    """``--debug``, ``SPARKEMBED_DEBUG=1``, or logging already set to DEBUG by the caller."""
    asked = bool(args.debug) or os.environ.get("SPARKEMBED_DEBUG", "") not in ("", "0")
    return asked or logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def check_before_spark(config: EmbedConfig, *, local_session: bool) -> None:
    """What can be checked of the source and target without Spark, before the preflight.

    Raises:
        ConfigError: no source or target, a source path that does not exist or has no known
            format, a target folder that is not ours to write, or a catalog table target
            where a local session has no catalog to hold it.
    """
    from sparkembed.errors import InputError
    from sparkembed.spark.sources import detect_format
    from sparkembed.spark.targets import check_target_location, is_path

    source, target = config.source.path, config.target.path
    if not source:
        raise ConfigError("no source given: pass --source PATH|TABLE or set source.path")
    if not target:
        raise ConfigError("no target given: pass --target PATH|TABLE or set target.path")
    fmt = config.source.format or detect_format(source)  # raises when a path's format is unknown
    local = source.removeprefix("file://")
    if fmt != "table" and "://" not in local and not os.path.exists(local):
        raise InputError(f"source {source} does not exist")
    if not is_path(target) and local_session and config.target.sink != "native":
        raise ConfigError(
            f"target {target!r} names a catalog table, but a local Spark session has no Delta "
            f"catalog: give a path, e.g. --target ./{target}"
        )
    check_target_location(config)


def run_command(argv: list[str], *, prog: str = "sparkembed run", local_master: bool = True) -> int:
    args = _run_parser(prog).parse_args(argv)
    debug = _debugging(args)
    try:
        return _run(args, local_master)
    except KeyboardInterrupt as exc:  # before the first wave, or while Spark started
        if debug:
            raise
        summary = getattr(exc, "run_summary", None)
        print("sparkembed: interrupted before any row was committed; rerun the same command", file=sys.stderr)
        print(json.dumps((summary.to_json() if summary else {}) | {"stopped": "signal"}), flush=True)
        return 130
    except SparkEmbedError as exc:
        if debug:
            log.exception("failed")
        return _fail(type(exc).__name__, str(exc), exc)
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return _fail(
            type(exc).__name__, f"unexpected {type(exc).__name__}: {first} (rerun with --debug for details)",
            exc, code=1,
        )  # fmt: skip


def _run(args: argparse.Namespace, local_master: bool) -> int:
    import signal

    from pyspark.sql import SparkSession

    from sparkembed.spark import driver
    from sparkembed.spark.secrets import apply_secret
    from sparkembed.spark.session import get_spark

    config = config_from_args(args)
    ours = SparkSession.getActiveSession() is None
    master = config.run.spark_master or ""
    check_before_spark(config, local_session=ours and (local_master or master.startswith("local")))
    with local_endpoint(config) as config:
        context = None
        if config.auth.mode != "key" or config.auth.key_source == "env":
            # Fail fast: a wrong key, route or deployment is known before Spark starts.
            context = driver.preflight(apply_secret(config))
        spark_log = None if _debugging(args) else Path(config.run.log_dir) / "spark.log"
        if ours and spark_log is not None:
            print(f"Spark's own log: {spark_log}", flush=True)
        spark = get_spark(config, local_default=local_master, spark_log=spark_log)
        # pyspark's own Ctrl-C handler calls into the JVM from inside a JVM call; a plain
        # KeyboardInterrupt is enough (the run installs its own handler for the waves).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            config = apply_secret(config, spark=spark)
            summary = driver.run(
                spark, config, context=context, progress=lambda line: print(line, flush=True)
            )
        finally:
            if ours:  # a session we built: stop it, so event logs and executors close cleanly
                with contextlib.suppress(Exception):
                    spark.stop()
    if summary.stop_signal is not None:
        done = sum(summary.counts[k] for k in ("ok_rows", "skipped_rows", "failed_rows"))
        print(
            f"sparkembed: interrupted after wave {summary.waves}: {done:,} rows committed; "
            "rerun the same command to continue",
            file=sys.stderr,
        )
        print(json.dumps(summary.to_json()), flush=True)
        return 128 + summary.stop_signal
    if summary.stopped == "budget":
        print(
            f"sparkembed: stopped at the budget's cap after wave {summary.waves}: what was embedded is "
            "committed; rerun to continue",
            file=sys.stderr,
        )
    print(json.dumps(summary.to_json()), flush=True)
    if summary.failed_fraction > config.run.max_failed_fraction:
        return 1
    if summary.migration is not None and summary.migration["state"] in ("incomplete", "failed_rows"):
        print(
            f"sparkembed: the migration of {config.target.path} was not switched; the target keeps its "
            "old vectors (see above)",
            file=sys.stderr,
        )
        return 1
    if config.run.fail_on_existing_failures and summary.failed_before:
        print(
            f"sparkembed: {summary.failed_before} ids still have failed rows from earlier runs "
            "(--fail-on-existing-failures); rerun with --retry-failed to embed them again",
            file=sys.stderr,
        )
        return 1
    return 0


def estimate_command(argv: list[str]) -> int:
    """Rows, tokens and cost of the next run: one preflight request, nothing embedded."""
    args = _run_parser("sparkembed estimate", COMMANDS["estimate"]).parse_args(argv)
    try:
        with local_endpoint(config_from_args(args)) as config:
            from sparkembed.spark.estimate import estimate
            from sparkembed.spark.secrets import apply_secret
            from sparkembed.spark.session import get_spark

            spark = get_spark(config, local_default="DATABRICKS_RUNTIME_VERSION" not in os.environ)
            result = estimate(spark, apply_secret(config, spark=spark))
    except SparkEmbedError as exc:
        if _debugging(args):
            raise
        print(f"sparkembed: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


def cache_tokenizer_command(argv: list[str]) -> int:
    """Copy cl100k_base.tiktoken where offline executors can read it (long_text.tiktoken_file)."""
    p = argparse.ArgumentParser(
        prog="sparkembed cache-tokenizer", description=cache_tokenizer_command.__doc__
    )
    p.add_argument("dest", help="a folder or file path, e.g. /dbfs/sparkembed/ or /lake/cl100k_base.tiktoken")
    args = p.parse_args(argv)
    from sparkembed.core.tokenizers import cache_tiktoken

    try:
        print(cache_tiktoken(args.dest))
    except SparkEmbedError as exc:
        print(f"sparkembed: error: {exc}", file=sys.stderr)
        return 2
    return 0


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_age(text: str) -> float:
    """``90d`` -> seconds; units s, m, h, d, w.

    Raises:
        ConfigError: not a positive number followed by one of those units.
    """
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not found or float(found.group(1)) <= 0:
        raise ConfigError(f"--older-than takes an age such as 90d, 12h or 2w, not {text!r}")
    return float(found.group(1)) * _AGE_UNITS[found.group(2)]


def cache_command(argv: list[str]) -> int:
    """``cache vacuum --older-than AGE``: delete cache entries older than AGE, then the files
    Delta has marked removed for longer than its retention (7 days)."""
    p = argparse.ArgumentParser(prog="sparkembed cache", description=COMMANDS["cache"])
    actions = p.add_subparsers(dest="action", required=True)
    vacuum = actions.add_parser("vacuum", help="delete entries older than --older-than, then unused files")
    vacuum.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 90d, 12h, 2w")
    vacuum.add_argument("--config", help="YAML config file naming cache.path")
    vacuum.add_argument("--path", help="the cache's path (instead of cache.path in --config)")
    vacuum.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    args = p.parse_args(argv)
    from datetime import timedelta

    from sparkembed.spark.targets import is_path

    try:
        age = parse_age(args.older_than)
        path = args.path or load_config(args.config, dict(parse_override(i) for i in args.set)).cache.path
        if not path:
            raise ConfigError("no cache given: pass --path PATH or --config with cache.path")
        if not is_path(path):
            raise ConfigError(
                f"cache vacuum takes path caches; for the catalog table {path}, run in SQL: "
                f"DELETE FROM {path} WHERE created_at < current_timestamp() - INTERVAL {int(age)} SECONDS; "
                f"VACUUM {path}"
            )
        from sparkembed import sinks

        result = sinks.vacuum_cache(path, timedelta(seconds=age))
    except SparkEmbedError as exc:
        print(f"sparkembed: error: {exc}", file=sys.stderr)
        return 2
    print(f"deleted {result.rows_deleted:,} cache rows older than {args.older_than} from {path}; "
          f"removed {len(result.files_removed):,} unused files")  # fmt: skip
    print(json.dumps({"path": path} | result.to_json()), flush=True)
    return 0


def migrate_command(argv: list[str]) -> int:
    """``migrate status TARGET`` and ``migrate abort TARGET``: a pending migration's staging table."""
    p = argparse.ArgumentParser(prog="sparkembed migrate", description=COMMANDS["migrate"])
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("status", help="rows done in staging, cost so far, ETA").add_argument("target")
    actions.add_parser("abort", help="drop the staging table (sparkembed's own files only)").add_argument(
        "target"
    )
    args = p.parse_args(argv)
    from sparkembed import sinks
    from sparkembed.spark.targets import is_path

    target, staging = args.target, sinks.staging_location(args.target)
    if not is_path(target):
        print(
            f"sparkembed: error: migrate reads path targets only; for the catalog table {target}, "
            f"query or DROP TABLE {staging} in SQL",
            file=sys.stderr,
        )
        return 2
    if args.action == "abort":
        if not sinks.exists(staging):
            print(f"no migration pending for {target}")
            return 0
        left = sinks.drop_staging(staging)
        kept = f"; kept {len(left)} entries sparkembed did not write: {', '.join(left[:5])}" if left else ""
        print(f"dropped {staging}; {target} is unchanged{kept}")
        return 0
    status = sinks.migration_status(target)
    if status is None:
        print(f"no migration pending for {target}")
        print(json.dumps({"pending": False}), flush=True)
        return 0
    for line in _describe_migration(status):
        print(line)
    print(json.dumps({"pending": True} | status.to_json()), flush=True)
    return 0


def _describe_migration(status: Any) -> list[str]:
    """Human lines of a :class:`sparkembed.sinks.migration.MigrationStatus`."""
    of = f" of {status.source_rows:,}" if status.source_rows is not None else ""
    share = f" ({100 * status.ids_done / status.source_rows:.1f} %)" if status.source_rows else ""
    cost = f", ${status.cost_usd:,.6f}" if status.cost_usd is not None else ""
    if status.eta_seconds is None:
        eta = "unknown"
    elif status.eta_seconds < 120:
        eta = f"{status.eta_seconds:.0f} s of embedding"
    else:
        eta = f"{status.eta_seconds / 60:.0f} min of embedding"
    return [
        f"migration pending: {status.staging} (to fingerprint {status.to_fingerprint})",
        f"  ids done: {status.ids_done:,}{of}{share}; {status.rows:,} rows, {status.failed_rows:,} failed",
        f"  cost so far: {status.prompt_tokens:,} tokens{cost}",
        f"  ETA: {eta}",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("SPARKEMBED_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # Other libraries' INFO is noise here: azure-core dumps every request's headers, py4j
        # announces its shutdown after the run's last line. At DEBUG they stay as asked.
        for noisy in ("azure", "py4j"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        # On a Databricks job cluster the platform's session is the one to use.
        return run_command(rest, local_master="DATABRICKS_RUNTIME_VERSION" not in os.environ)
    if command == "estimate":
        return estimate_command(rest)
    if command == "report":
        from sparkembed.report import main as report_main

        return report_main(rest)
    if command == "cache-tokenizer":
        return cache_tokenizer_command(rest)
    if command == "migrate":
        return migrate_command(rest)
    if command == "cache":
        return cache_command(rest)
    if command == "serve":
        from sparkembed.server.__main__ import main as serve_main

        return serve_main(rest)
    print(f"sparkembed: error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(
        ["usage: sparkembed COMMAND [options]   (sparkembed COMMAND --help for its options)", "",
         "Embed lakehouse text with Azure embeddings, from Spark, into Delta tables.", "",
         "commands:", *lines, "", EXIT_CODES]
    )  # fmt: skip


def console() -> None:
    """Console entry: raise SystemExit so wrappers that ignore return values still see failure."""
    raise SystemExit(main())


if __name__ == "__main__":
    console()
