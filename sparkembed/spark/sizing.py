"""What rows cost before they are sent: inputs and tokens after long-text planning.

Token counts are exact where the model's tokenizer is available offline, else an upper
bound (UTF-8 bytes). Used by ``sparkembed estimate`` and by a run's budget check.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sparkembed.config import EmbedConfig
from sparkembed.core.longtext import LongTextPlanner

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


def count_work(rows: DataFrame, config: EmbedConfig) -> dict[str, int]:
    """``rows`` (with ``source.text_col``): their number, the inputs they send, and their tokens."""
    totals = (
        rows.select(config.source.text_col)
        .mapInArrow(lambda batches: _count_partition(config, batches), _COUNTS)
        .agg(*(F.sum(c).alias(c) for c in ("rows", "units", "tokens")))
        .collect()[0]
    )
    return {name: int(totals[name] or 0) for name in ("rows", "units", "tokens")}
