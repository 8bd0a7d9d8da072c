"""``sparkembed estimate``: rows, tokens and cost of a run, without embedding anything."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from sparkembed.config import EmbedConfig
from sparkembed.core.longtext import LongTextPlanner
from sparkembed.core.tokenizers import counter_for
from sparkembed.spark.driver import prepare, refuse_speculation
from sparkembed.spark.migration import plan_migration
from sparkembed.spark.planning import plan_work
from sparkembed.spark.sources import check_ids, read_source, select_input

_COUNTS = "rows long, units long, tokens long"


def _count_partition(config: EmbedConfig, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    planner = LongTextPlanner(config)
    rows = units = tokens = 0
    for batch in batches:
        plan = planner.plan(batch.column(0).to_pylist())
        sendable = [
            i for i, u in enumerate(plan.units) if u.text and u.text.strip() and i not in plan.unit_errors
        ]
        rows += batch.num_rows
        units += len(sendable)
        tokens += sum(plan.units[i].tokens for i in sendable)
    yield pa.RecordBatch.from_pydict({"rows": [rows], "units": [units], "tokens": [tokens]})


def estimate(spark: SparkSession, config: EmbedConfig, source: DataFrame | None = None) -> dict[str, Any]:
    """What the next run would embed: only rows the target lacks, after long-text planning.

    Nothing is embedded; with a target, one preflight request checks the endpoint.

    Token counts are exact where the model's tokenizer is available offline, else an
    upper bound (UTF-8 bytes); ``tokens_exact`` says which.
    """
    if config.target.path:
        # The same checks and preflight as a run (one tiny request), so the fingerprint
        # compared with the target is the one the run would write.
        df, config, context = prepare(spark, config, source)
        migration = plan_migration(spark, config, context)  # a new fingerprint: what staging lacks
        todo = plan_work(spark, df, migration.staging if migration else config, context).todo
    else:
        refuse_speculation(spark)
        todo = select_input(
            source if source is not None else read_source(spark, config.source), config.source
        )
        check_ids(todo, config.source.id_col)
    totals = (
        todo.select(config.source.text_col)
        .mapInArrow(lambda batches: _count_partition(config, batches), _COUNTS)
        .agg(*(F.sum(c).alias(c) for c in ("rows", "units", "tokens")))
        .collect()[0]
    )
    tokens = int(totals["tokens"] or 0)
    return {
        "rows_to_embed": int(totals["rows"] or 0),
        "inputs_to_send": int(totals["units"] or 0),
        "estimated_tokens": tokens,
        "tokens_exact": counter_for(config).exact,
        "estimated_cost_usd": round(tokens * config.endpoint.price_per_million_tokens / 1e6, 6),
        "price_per_million_tokens": config.endpoint.price_per_million_tokens,
    }
