"""The driver side of a run: check, preflight, then embed and commit wave by wave."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkembed.backends import make_backend
from sparkembed.backends.transport import check_endpoint_url, hide_bridge_traffic
from sparkembed.config import EmbedConfig
from sparkembed.core.answers import remove_stale
from sparkembed.core.budget import check_estimate, token_cap
from sparkembed.core.context import RunContext
from sparkembed.core.engine import Embedder
from sparkembed.core.pool import check_same_space
from sparkembed.core.runlog import clear_cache_due, read_spend, request_stop
from sparkembed.core.summary import RunSummary
from sparkembed.core.tokens import BYTES_PER_TOKEN
from sparkembed.core.types import Status
from sparkembed.core.waves_plan import BUCKETS, WaveLimits, WavePlanner
from sparkembed.errors import (
    ConfigError,
    EndpointConfigError,
    InputError,
    QuotaExhaustedError,
    SparkConnectError,
    SparkEmbedError,
    TransportError,
)
from sparkembed.spark import cache, chunkgroups, writers
from sparkembed.spark.dedup import COPY_OF, FROM_TARGET, HASH, copy_rows, mark_copies
from sparkembed.spark.migration import (
    Migration,
    drop_switched_staging,
    finish_migration,
    plan_migration,
    record_start,
)
from sparkembed.spark.partition import output_schema
from sparkembed.spark.planning import REPLACES, WorkPlan, held_texts, materialize, plan_work
from sparkembed.spark.session import default_parallelism
from sparkembed.spark.sizing import count_work
from sparkembed.spark.sources import check_ids, read_source, select_input
from sparkembed.spark.targets import check_target_location, is_path, read_target, read_with_pending

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def refuse_speculation(spark: SparkSession) -> None:
    """A speculative copy of a task pays for the same tokens twice."""
    if (spark.conf.get("spark.speculation", "false") or "false").lower() == "true":
        raise ConfigError("spark.speculation is on; it would pay for tokens twice. Set it to false")


def prepare(
    spark: SparkSession,
    config: EmbedConfig,
    source: DataFrame | None = None,
    context: RunContext | None = None,
) -> tuple[DataFrame, EmbedConfig, RunContext]:
    """Validate source and endpoint before any money is spent; hand each task its quota share.

    Args:
        context: what an earlier preflight learned (the CLI's, before Spark starts); without
            it, the preflight is made here.

    Returns:
        The selected source, the config for the run (target made absolute), and the run's
        context: the preflight's findings and the tasks that share the quota.
    """
    refuse_speculation(spark)
    check_endpoint_urls(config)
    hide_bridge_traffic()
    if not config.target.path:
        raise ConfigError("no target given: pass --target PATH|TABLE or set target.path")
    config = cache.absolute_cache(_absolute_target(config))
    check_target_location(config)
    sink = writers.check_sink(spark, config)  # on Spark Connect, asks the server whether it has Delta
    log.debug("sink: %s", "Spark's own Delta" if sink == "native" else "delta-rs (no Delta in this session)")
    cache.check_cache_location(spark, config)
    if source is None:
        source = read_source(spark, config.source)
    df = select_input(source, config.source)
    check_ids(df, config.source.id_col)
    if context is None or context.served_dimensions is None:
        context = replace(preflight(config), run_id=context.run_id if context else "")
    parallelism = default_parallelism(spark)
    workers = min(config.run.partitions or parallelism, parallelism)
    return df, config, replace(context, workers=max(1, workers))


_TASK_ERROR = re.compile(r"^(?:sparkembed\.errors\.)?(\w+): (.+)$", re.M)
_MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


def translate_spark_error(exc: BaseException) -> SparkEmbedError | None:
    """A failure that Spark wrapped, as the one-line sparkembed error it stands for.

    A task that raised one of our errors; Python workers that run another interpreter
    than the driver's; a source or target Spark cannot resolve. None for anything else,
    and for our own errors, which need no translating.
    """
    if isinstance(exc, SparkEmbedError) or not isinstance(exc, Exception):
        return None
    text = str(exc)
    raised = [m for m in _TASK_ERROR.finditer(text) if m.group(1) in _TASK_ERRORS]
    if raised:
        return _TASK_ERRORS[raised[-1].group(1)](raised[-1].group(2).strip())
    missing = _MISSING_MODULE.search(text)
    if missing:
        return ConfigError(
            f"Spark's Python workers cannot import {missing.group(1)}: they run another Python "
            f"than this one. Set PYSPARK_PYTHON={sys.executable} before Spark starts"
        )
    if type(exc).__name__ in ("AnalysisException", "ParseException"):  # pyspark.errors
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return InputError(f"Spark cannot read the source or target: {hide_tokens(first)}")
    if is_connect_error(exc):
        return SparkConnectError(f"Spark Connect: {connect_message(exc)}")
    return None


def is_connect_error(exc: BaseException) -> bool:
    """A Spark Connect client error: pyspark's Connect exceptions (the server's answer), a raw
    ``grpc.RpcError`` (no answer), or the client giving up its retries."""
    modules = [cls.__module__ for cls in type(exc).__mro__]
    connect = any(m.startswith(("pyspark.errors.exceptions.connect", "grpc")) for m in modules)
    return connect or type(exc).__name__ == "RetriesExceeded"


def connect_message(exc: BaseException) -> str:
    """A Connect error in one line: its class and message, without the JVM stack trace; a
    gRPC error's status and details (and what to check when the server is unreachable)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):  # grpc.RpcError
        try:
            name = getattr(code(), "name", str(code()))
            message = f"{name}: {details()}"
        except Exception:  # not a call: an RpcError without status
            message = type(exc).__name__
        if "UNAVAILABLE" in message:
            message += " (is the Spark Connect server running? check SPARK_REMOTE or the connection string)"
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
    return hide_tokens(message[:1000])


_TOKEN = re.compile(r"(token=|bearer\s+|authorization[:=]\s*)[^;&\s,]+", re.IGNORECASE)


def hide_tokens(text: str) -> str:
    """Hide credentials a Connect error may quote: ``token=`` of a connection string, bearer
    tokens, and the local server's authentication token."""
    text = _TOKEN.sub(r"\1***", text)
    local = os.environ.get("SPARK_CONNECT_AUTHENTICATE_TOKEN")
    return text.replace(local, "***") if local else text


_TASK_ERRORS: dict[str, type[SparkEmbedError]] = {
    cls.__name__: cls
    for cls in (ConfigError, EndpointConfigError, InputError, QuotaExhaustedError, TransportError)
}


def check_endpoint_urls(config: EmbedConfig) -> None:
    """:func:`check_endpoint_url` for ``endpoint.url``, or each deployment of a pool."""
    for _, one in config.deployments():
        check_endpoint_url(one.endpoint.url, allow_insecure_http=one.endpoint.allow_insecure_http)


def preflight(config: EmbedConfig) -> RunContext:
    """One tiny request, before any money is spent: it checks the key, route, deployment and
    options, and learns what the service runs. Needs no Spark.

    A pool's deployments each embed the same text, and must agree on model, dimensions and
    vector (:func:`~sparkembed.core.pool.check_same_space`): one table never mixes spaces.

    Returns:
        A context holding what the service runs: ``served_model`` and ``served_dimensions``.

    Raises:
        EndpointConfigError: 401/403/404/422, or a host that cannot be reached; names the fix
            (and, in a pool, the deployment).
        ConfigError: the deployments of a pool disagree.
        ServiceError, TransportError, QuotaExhaustedError: the request failed otherwise.
    """
    check_endpoint_urls(config)
    pooled = bool(config.endpoint.pool)
    answers = []
    for name, one in config.deployments():
        embedder = Embedder(one, make_backend(one))
        try:
            answers.append((name, embedder.probe()))
        except EndpointConfigError as exc:
            if not pooled:
                raise
            raise EndpointConfigError(f"deployment {name}: {exc}", status=exc.status) from exc
        finally:
            embedder.close()
    check_same_space([(name, answer.model, answer.vectors[0]) for name, answer in answers])
    first = answers[0][1]
    dims, model = first.vectors.shape[1], first.model
    auto = config.endpoint.api == "auto"
    route = config.endpoint.route + (", picked by endpoint.api: auto" if auto else "")
    if pooled:
        route = f"a pool of {len(answers)} deployments ({', '.join(name for name, _ in answers)})"
    log.info("preflight ok: model %s, %d dimensions; route %s", model, dims, route)
    return RunContext(served_model=model, served_dimensions=dims)


def _absolute_target(config: EmbedConfig) -> EmbedConfig:
    """Executors may run in other folders: a local target path must be absolute."""

    path = str(config.target.path)
    if "://" in path or not is_path(path) or os.path.isabs(path):
        return config
    target = config.target.model_copy(update={"path": os.path.abspath(path)})
    return config.model_copy(update={"target": target})


def run(
    spark: SparkSession,
    config: EmbedConfig,
    *,
    source: DataFrame | None = None,
    run_id: str | None = None,
    context: RunContext | None = None,
    progress: Callable[[str], None] = print,
) -> RunSummary:
    """Embed ``source`` (default: read ``config.source``) into ``config.target``.

    Only rows the target lacks are embedded (see :mod:`sparkembed.spark.planning`). Waves
    commit on their own and are bounded by rows, tokens and time (``run.commit_every_*``),
    so a crash loses one short wave at most. On SIGINT or SIGTERM (main thread only) tasks
    stop sending, what is done is committed, and the summary says ``stopped``.

    Args:
        context: the findings of a preflight already made (the CLI's); else one is made.

    Raises:
        SparkEmbedError: and any other error; the exception then carries the run's
            summary so far as ``run_summary`` (what was committed and what was billed).
    """
    started = time.monotonic()
    summary = RunSummary(
        run_id=run_id or new_run_id(),
        price_per_million_tokens=config.endpoint.price_per_million_tokens,
        tokens_per_minute=config.quota_tokens_per_minute,
        requests_per_minute=config.limits.requests_per_minute,
        deployment_quotas={name: one.limits.tokens_per_minute for name, one in config.deployments()},
    )
    run_dir = str(Path(config.run.log_dir).absolute() / summary.run_id)
    try:
        with _stop_on_signals(run_dir, progress) as stop:
            context = replace(context or RunContext(), run_id=summary.run_id)
            _run_waves(spark, config, context, source, summary, run_dir, stop, progress)
    except BaseException as exc:
        release_frames(exc)
        ours = translate_spark_error(exc)
        summary.error = f"{type(ours or exc).__name__}: {ours or exc}"
        _finish_summary(summary, run_dir, started, config)
        if ours is not None:
            ours.run_summary = summary  # type: ignore[attr-defined]
            raise ours from exc
        exc.run_summary = summary  # type: ignore[attr-defined]
        raise
    summary.stopped = "signal" if stop.signum else summary.stopped
    summary.stop_signal = stop.signum
    _finish_summary(summary, run_dir, started, config)
    return summary


def release_frames(exc: BaseException) -> None:
    """Drop the locals of the frames a failed run left in ``exc``'s tracebacks (its chain too).

    They hold the run's DataFrames. On Spark Connect a checkpointed one releases its cache on
    the server when it is collected; collected only at interpreter exit, its release call
    starts a gRPC thread that never runs, and the process hangs instead of exiting. Dropped
    now, they are released now. Tracebacks still print: they need no locals.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        one = todo.pop()
        if one is None or id(one) in seen:
            continue
        seen.add(id(one))
        traceback.clear_frames(one.__traceback__)  # skips frames still running (this one's callers)
        todo += [one.__cause__, one.__context__]
    gc.collect()  # DataFrames in reference cycles too


def _run_waves(
    spark: SparkSession,
    config: EmbedConfig,
    context: RunContext,
    source: DataFrame | None,
    summary: RunSummary,
    run_dir: str,
    stop: _Stop,
    progress: Callable[[str], None],
) -> None:
    started = time.monotonic()
    df, config, context = prepare(spark, config, source, context)
    # Rows a crashed run left pending go into the target first: planning then finds them done.
    writers.apply_pending(spark, config, context.run_id)
    # A new fingerprint is built in a staging table beside the target, never in the target.
    migration = plan_migration(spark, config, context)
    work = migration.staging if migration else config
    if migration is not None:
        writers.apply_pending(spark, work, context.run_id)
    if migration is None and config.target.mode != "overwrite":
        drop_switched_staging(spark, config, context)
    # What a crashed run committed but never added to the cache goes there now (only after a crash).
    summary.cache_added += cache.add_crashed(spark, work, context)
    # The sink notes the target's version before the plan reads it: a run that commits in
    # between makes this run's commits fail, never repeat rows that run wrote.
    sink = writers.choose_sink(spark, work, run_dir)
    plan = plan_work(spark, df, work, context)
    if migration is not None:
        record_start(migration, config, context, source_rows=df.count())
        progress(f"migration to fingerprint {config.fingerprint(context)}: building {migration.location}; "
                 f"{config.target.path} keeps its vectors until the switch")  # fmt: skip
    summary.failed_before = plan.failed_left
    if plan.failed_left:
        progress(
            f"{plan.failed_left} ids have failed rows from earlier runs; left as they are "
            "(rerun with --retry-failed to embed them again)"
        )
    todo, copies, hits = _split_copies(spark, plan, work, context)
    text = F.col(config.source.text_col)
    sizes = todo.agg(
        F.count("*").alias("rows"),
        F.sum(F.when(text.isNotNull(), F.ceil(F.octet_length(text) / BYTES_PER_TOKEN) + 1)).alias("tokens"),
        F.sum(F.when(chunkgroups.may_be_long(config), 1).otherwise(0)).alias("long"),
    ).first()
    total, tokens = (int(sizes["rows"]), int(sizes["tokens"] or 0)) if sizes else (0, 0)
    copied = copies.count() if copies is not None else 0
    hit_ids = 0
    if hits is not None:
        summary.from_cache = hits.count()  # output rows, chunks included
        hit_ids = hits.select(config.source.id_col).distinct().count()
    summary.rows_total = total + copied + hit_ids
    if not summary.rows_total and not plan.whole_source:
        progress("0 source rows to embed: the target holds every one")
        _finish_idle(spark, df, config, work, plan, migration, context, summary, sink, progress)
        return
    grouped = 0  # long texts that share a chunk: one wave and one task for those that share one
    if config.run.dedup and sizes and (sizes["long"] or 0) > 1:
        groups = chunkgroups.find_groups(todo, config)
        if groups is not None:
            groups = materialize(groups)
            if grouped := groups.count():
                todo = todo.join(groups, config.source.id_col, "left")
    cap = _check_budget(todo, config, progress)
    run_limits = config.run
    planner = WavePlanner(total, tokens, WaveLimits(
        rows=run_limits.commit_every_rows, tokens=run_limits.commit_every_tokens,
        seconds=run_limits.commit_every_seconds, tokens_per_minute=config.quota_tokens_per_minute,
    ))  # fmt: skip
    also = f"; {copied} more copy the vectors of rows with the same text" if copied else ""
    also += f"; {hit_ids} take their vectors from the cache" if hit_ids else ""
    also += f"; {grouped} long texts share chunks, sent in the same task" if grouped else ""
    progress(f"{total} source rows (~{tokens:,} tokens) to embed in {planner.waves_planned} wave(s){also}")
    partitions = config.run.partitions or context.workers  # workers: the session's task slots
    id_col = config.source.id_col
    key = chunkgroups.wave_key(config) if grouped else F.col(id_col)
    bucket = F.pmod(F.xxhash64(key), F.lit(BUCKETS))
    if work.cache.path:
        cache.mark_due(work, run_dir)  # cleared after the last wave's cache append
    while not stop.signum and (buckets := planner.next_wave()) is not None:
        wave = planner.waves_done - 1
        wave_context = context
        if cap is not None:
            left = cap - max(read_spend(run_dir).tokens_billed, summary.counts["prompt_tokens"])
            if left <= 0:
                summary.stopped = "budget"
                break
            wave_context = replace(context, tokens_left=left)
        chosen = todo if planner.whole else todo.filter((bucket >= buckets[0]) & (bucket < buckets[1]))
        part = chosen.repartition(partitions)
        if grouped:  # a group's rows in one task, the smallest id first: it pays for the shared chunks
            part = chosen.repartition(partitions, key).sortWithinPartitions(key, id_col)
            part = part.drop(chunkgroups.GROUP)
        wave_started = time.monotonic()
        with _Ticker(progress, run_dir, wave, planner, summary, config, started):
            metrics = sink.write_wave(part, work, wave_context, wave)
        summary.add(metrics)
        if work.cache.path and metrics.get("ok_rows"):  # as the wave commits: a crash later never pays again
            wave_ids = None if planner.whole else chosen.select(id_col)
            summary.cache_added += cache.add_wave(spark, work, context, wave, wave_ids)
        planner.record(seconds=time.monotonic() - wave_started, tokens=int(metrics.get("prompt_tokens", 0)))
        _report_progress(progress, summary, wave, planner.waves_planned, time.monotonic() - started)
        if cap is not None and metrics.get("unsent_rows", 0) and not stop.signum:
            summary.stopped = "budget"
            break
    summary.waves = version = planner.waves_done
    clear_cache_due(run_dir)
    # The rows copied from may still be pending: read the target as the apply will leave it.
    target = read_with_pending(spark, work) if copies is not None and copied else None
    rows = None
    if copies is not None and target is not None:
        rows = copy_rows(target, copies, work, context, _output_schema(todo, config))
    if hits is not None and summary.from_cache:
        rows = hits if rows is None else rows.unionByName(hits)
    if rows is not None:  # copies and cache hits, in one commit
        summary.add(done := sink.write_rows(rows, work, context.run_id, version))
        written = sum(int(done.get(f"{s.value}_rows", 0)) for s in Status)
        summary.deduplicated = written - summary.from_cache
        version += 1
        if summary.deduplicated:
            progress(f"{summary.deduplicated} rows copied the vectors of rows with the same text")
        if summary.from_cache:
            progress(f"{summary.from_cache} rows took their vectors from the cache {work.cache.path}")
    # One commit replaces the old rows of every id the waves re-embedded (also after a stop).
    sink.apply_pending(work, summary.run_id)
    if work.cache.path:
        cache.finish(spark, work, context.run_id)
    if stop.signum or summary.stopped == "budget":
        if summary.stopped == "budget":
            progress(f"stopped at the budget's cap of {cap:,} tokens: what was embedded is committed; "
                     "rerun to continue")  # fmt: skip
        # Prune and a migration's switch assume every wave ran: both wait for the rerun.
        sink.finish(work, summary.run_id)
        if migration is not None:
            summary.migration = {"staging": migration.location, "state": "stopped"}
        return
    if plan.prune is not None:
        summary.pruned = sink.prune(plan.prune, work, summary.run_id, version=version)
        if summary.pruned:
            progress(f"pruned {summary.pruned} ids that are gone from the source")
    sink.finish(work, summary.run_id)
    if migration is not None:
        summary.migration = finish_migration(spark, df, config, migration, context, progress)
        if summary.migration["state"] == "switched":
            work = config
    if summary.counts["failed_rows"]:
        summary.error_reasons, summary.error_examples = top_errors(spark, work, summary.run_id)


def _finish_idle(
    spark: SparkSession,
    df: DataFrame,
    config: EmbedConfig,
    work: EmbedConfig,
    plan: WorkPlan,
    migration: Migration | None,
    context: RunContext,
    summary: RunSummary,
    sink: writers.WaveSink,
    progress: Callable[[str], None],
) -> None:
    """A rerun with nothing to send, copy or take from the cache: no wave and no commit (the
    pending table, if a crashed run left one, was applied before planning); only what needs no
    wave: a prune, and a migration's check and switch."""
    if plan.prune is not None:
        summary.pruned = sink.prune(plan.prune, work, summary.run_id, version=0)
        if summary.pruned:
            progress(f"pruned {summary.pruned} ids that are gone from the source")
            sink.finish(work, summary.run_id)
    if migration is not None:
        summary.migration = finish_migration(spark, df, config, migration, context, progress)


def _split_copies(
    spark: SparkSession, plan: WorkPlan, config: EmbedConfig, context: RunContext
) -> tuple[DataFrame, DataFrame | None, DataFrame | None]:
    """The rows to send (computed once); with ``run.dedup`` the rows that copy another's
    result instead (:mod:`sparkembed.spark.dedup`); with ``cache.path`` the output rows of the
    rows whose text the cache holds (:mod:`sparkembed.spark.cache`), computed once too."""
    todo = plan.todo
    if not plan.whole_source:
        # Computed before dedup and the cache: a rerun with nothing to do stops here.
        todo = materialize(todo)
        # Not isEmpty(): Spark Connect's caches its DataFrame for good, and with it the checkpoint.
        if not todo.limit(1).count():
            return todo, None, None
    store = cache.read_cache(spark, config)
    if not config.run.dedup and store is None:
        return (materialize(todo) if plan.whole_source else todo), None, None
    marked = todo
    if config.run.dedup:
        marked = mark_copies(todo, held_texts(plan, todo, config), config)
    marked = materialize(marked if store is None else cache.with_keys(marked, config))
    hits = None
    if store is not None:  # a join of the rows left to do with the cache, on the text hash
        entries = materialize(cache.cache_entries(store, marked, config, context))
        marked = cache.mark_cached(marked, entries)
        found = marked.filter(F.col(cache.CACHED_FROM).isNotNull())
        schema = _output_schema(plan.todo, config)
        hits = materialize(cache.cached_rows(entries, found, config, context, schema))
        marked = marked.filter(F.col(cache.CACHED_FROM).isNull()).drop(cache.CACHED_FROM)
    todo = marked.filter(F.col(COPY_OF).isNull()).drop(COPY_OF, HASH, FROM_TARGET)
    copies = marked.filter(F.col(COPY_OF).isNotNull()) if config.run.dedup else None
    return todo, copies, hits


def _output_schema(todo: DataFrame, config: EmbedConfig) -> T.StructType:
    source = config.source
    return output_schema(todo.drop(REPLACES).schema, source.id_col, source.passthrough)


def _check_budget(todo: DataFrame, config: EmbedConfig, progress: Callable[[str], None]) -> int | None:
    """The run's token cap, once the rows to send fit it; None without a cap.

    Raises:
        BudgetError: over the cap, without ``run.allow_partial``: before any request.
    """
    cap = token_cap(config)
    if cap is None:
        return None
    estimated = count_work(todo, config)["tokens"]
    if not check_estimate(estimated, config):
        progress(f"estimated {estimated:,} tokens, over the cap of {cap:,}: embedding up to the cap "
                 "(--allow-partial); a rerun continues")  # fmt: skip
    return cap


def _finish_summary(summary: RunSummary, run_dir: str, started: float, config: EmbedConfig) -> None:
    """What was billed (every task attempt, committed or not), the time, and the run log."""
    spend = read_spend(run_dir)
    summary.tokens_billed = max(spend.tokens_billed, summary.counts["prompt_tokens"])
    summary.count_deployments()
    remove_stale(Path(run_dir).parent)  # answer slabs of processes gone for a day
    summary.seconds = time.monotonic() - started
    try:
        save_run_log(config, summary)
    except OSError as exc:  # a run log that cannot be written must not hide the run's outcome
        log.warning("could not write the run log: %s", exc)


@dataclass
class _Stop:
    signum: int | None = None


@contextlib.contextmanager
def _stop_on_signals(run_dir: str, progress: Callable[[str], None]) -> Iterator[_Stop]:
    """First SIGINT/SIGTERM: ask tasks to stop sending (see :mod:`sparkembed.core.runlog`); second: exit."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach only the main thread (a notebook's cell runs there)
        return

    def handle(signum: int, frame: object) -> None:
        if stop.signum is not None:
            os._exit(128 + signum)  # asked twice: at once, uncommitted work lost
        stop.signum = signum
        request_stop(run_dir)
        # Not print(): the main thread may be inside a write to stdout right now.
        os.write(2, (
            f"sparkembed: {signal.Signals(signum).name}: no new requests; finishing those in flight "
            "and committing what is done (press Ctrl-C again to exit at once)\n"
        ).encode())  # fmt: skip

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Ticker:
    """Prints progress inside a wave at least every :data:`PROGRESS_EVERY_S` seconds."""

    def __init__(
        self,
        progress: Callable[[str], None],
        run_dir: str,
        wave: int,
        planner: WavePlanner,
        summary: RunSummary,
        config: EmbedConfig,
        started: float,
    ) -> None:
        self._args = (progress, run_dir, wave, planner, summary, config, started)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sparkembed-progress", daemon=True)
        self._wave_started = time.monotonic()

    def __enter__(self) -> _Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        progress, run_dir, wave, planner, summary, config, started = self._args
        while not self._done.wait(PROGRESS_EVERY_S):
            spend = read_spend(run_dir, wave=wave)
            elapsed = time.monotonic() - self._wave_started
            rate = spend.tokens_billed / elapsed * 60 if elapsed else 0.0
            quota = config.quota_tokens_per_minute
            of_quota = f" ({100 * rate / quota:.0f} % of quota)" if quota else ""
            committed = sum(summary.counts[k] for k in ("ok_rows", "skipped_rows", "failed_rows"))
            done = committed + spend.texts_answered
            run_elapsed = time.monotonic() - started
            eta = (summary.rows_total - done) * run_elapsed / done if done else float("nan")
            progress(
                f"wave {wave + 1}/{planner.waves_planned} running: {spend.texts_answered:,} texts answered, "
                f"{spend.tokens_billed:,} tokens, {rate:,.0f} tokens/min{of_quota}, "
                f"{spend.throttled} answered 429, ETA {_duration(eta)}"
            )


def _report_progress(
    progress: Callable[[str], None], summary: RunSummary, wave: int, waves: int, elapsed: float
) -> None:
    done = sum(summary.counts[k] for k in ("ok_rows", "skipped_rows", "failed_rows"))
    eta = elapsed / (wave + 1) * (waves - wave - 1)  # waves are about equal in size
    progress(
        f"wave {wave + 1}/{waves} committed: {done} output rows (chunks included) from "
        f"{summary.rows_total} source rows, {summary.counts['prompt_tokens']} tokens, "
        f"{done / elapsed if elapsed else 0:.0f} rows/s, ETA {_duration(eta)}"
    )


def _duration(seconds: float) -> str:
    if math.isnan(seconds) or seconds < 0:
        return "unknown"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def top_errors(
    spark: SparkSession, config: EmbedConfig, run_id: str, limit: int = 10
) -> tuple[dict[str, int], dict[str, str]]:
    """The most common reasons this run's rows failed, read back from the target.

    Returns:
        Rows per reason, and one full example message per reason.
    """
    table = read_target(spark, config)
    if table is None:
        return {}, {}
    failed = table.filter((F.col("run_id") == run_id) & (F.col("status") == Status.FAILED.value))
    return error_groups(failed, limit)


def error_groups(failed: DataFrame, limit: int = 10) -> tuple[dict[str, int], dict[str, str]]:
    """Group error messages by cause: numbers (waits, sizes, positions) do not split a group.

    A leading HTTP status stays: ``429 … retry after 167.478 s`` and ``… 167.829 s`` are one
    reason, ``429 … retry after N s``; a 400 and a 429 are two.
    """
    error = F.coalesce(F.col("error"), F.lit(""))
    status = F.regexp_extract(error, r"^\d{3}\b", 0)
    rest = F.substring(error, F.length(status) + 1, 1_000_000)
    key = F.concat(status, F.regexp_replace(rest, r"\d+(\.\d+)?", "N"))
    rows = (
        failed.groupBy(key.alias("reason"))
        .agg(F.count("*").alias("rows"), F.min(error).alias("example"))
        .orderBy(F.desc("rows"), "reason")
        .limit(limit)
        .collect()
    )
    return {r["reason"]: int(r["rows"]) for r in rows}, {r["reason"]: r["example"] for r in rows}


def save_run_log(config: EmbedConfig, summary: RunSummary) -> Path:
    """The summary and per-request timeline, for ``sparkembed report``."""
    folder = Path(config.run.log_dir) / summary.run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary.to_file(), indent=2))
    (folder / "timeline.json").write_text(json.dumps(summary.timeline))
    return folder
