"""``sparkembed estimate``: rows, tokens, cost and ETA of a run, without embedding anything."""

from __future__ import annotations

from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkembed.config import EmbedConfig
from sparkembed.core.budget import cost_usd, token_cap
from sparkembed.core.context import RunContext
from sparkembed.core.tokenizers import counter_for
from sparkembed.spark import cache
from sparkembed.spark.dedup import COPY_OF, mark_copies
from sparkembed.spark.driver import prepare, refuse_speculation
from sparkembed.spark.migration import plan_migration
from sparkembed.spark.planning import REPLACES, held_texts, plan_work
from sparkembed.spark.sizing import count_work
from sparkembed.spark.sources import check_ids, read_source, select_input


def estimate(spark: SparkSession, config: EmbedConfig, source: DataFrame | None = None) -> dict[str, Any]:
    """What the next run would embed: only rows the target lacks, after dedup, the cache
    (``cache.path``: ``rows_from_cache`` source rows are not sent) and long-text planning;
    its cost, and its duration at the configured quota.

    Nothing is embedded; with a target, one preflight request checks the endpoint.

    Token counts are exact where the model's tokenizer is available offline, else an
    upper bound (UTF-8 bytes); ``tokens_exact`` says which. The ETA counts tokens per
    minute and requests per minute of the quota (None without ``limits.tokens_per_minute``).
    """
    context = RunContext()
    held = None
    if config.target.path:
        # The same checks and preflight as a run (one tiny request), so the fingerprint
        # compared with the target is the one the run would write.
        df, config, context = prepare(spark, config, source)
        migration = plan_migration(spark, config, context)  # a new fingerprint: what staging lacks
        work = migration.staging if migration else config
        plan = plan_work(spark, df, work, context)
        todo, held = plan.todo, held_texts(plan, plan.todo, work)
    else:
        refuse_speculation(spark)
        todo = select_input(
            source if source is not None else read_source(spark, config.source), config.source
        ).withColumn(REPLACES, F.lit(False))
        check_ids(todo, config.source.id_col)
    copied = from_cache = 0
    if config.run.dedup:
        todo = mark_copies(todo, held, config)
    store = cache.read_cache(spark, cache.absolute_cache(config))
    if store is not None:  # rows whose text the cache holds are not sent
        todo = cache.with_keys(todo, config).cache()
        todo = cache.mark_cached(todo, cache.cache_entries(store, todo, config, context)).cache()
        from_cache = todo.filter(F.col(cache.CACHED_FROM).isNotNull()).count()
        todo = todo.filter(F.col(cache.CACHED_FROM).isNull())
    if config.run.dedup:
        todo = todo.cache()
        copied = todo.filter(F.col(COPY_OF).isNotNull()).count()
        todo = todo.filter(F.col(COPY_OF).isNull())
    totals = count_work(todo, config)
    tokens, cap = totals["tokens"], token_cap(config)
    result: dict[str, Any] = {
        "rows_to_embed": totals["rows"] + copied + from_cache,
        "rows_deduplicated": copied,
        "rows_from_cache": from_cache,
        "inputs_to_send": totals["units"],
        "estimated_tokens": tokens,
        "tokens_exact": counter_for(config).exact,
        "estimated_cost_usd": cost_usd(tokens, config),
        "price_per_million_tokens": config.endpoint.price_per_million_tokens,
        "tokens_per_minute": config.quota_tokens_per_minute,
        "eta_seconds": _eta_seconds(tokens, totals["units"], config),
    }
    if cap is not None:
        result |= {"cap_tokens": cap, "cap_usd": cost_usd(cap, config), "over_budget": tokens > cap}
    return result


def _eta_seconds(tokens: int, inputs: int, config: EmbedConfig) -> float | None:
    """Seconds of embedding at the configured quota (tokens, and requests of full batches)."""
    per_minute = config.quota_tokens_per_minute
    if not per_minute:
        return None
    minutes = tokens / per_minute
    requests_per_minute = config.limits.requests_per_minute
    if requests_per_minute and not config.endpoint.pool:
        requests = -(-inputs // config.batching.max_inputs)
        minutes = max(minutes, requests / requests_per_minute)
    return round(minutes * 60, 1)
