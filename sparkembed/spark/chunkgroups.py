"""Long texts that share a chunk go to one task, whose chunk dedup then pays for it once.

Whole texts are deduplicated in Spark (:mod:`sparkembed.spark.dedup`); chunks are cut and
deduplicated in the task that sends them (:mod:`sparkembed.core.chunkdedup`). Two different
long texts that share a chunk (a boilerplate section, a common prefix) save it only when one
task plans both. Planning gives them that task: it cuts the long texts once more, on the
executors, exactly as the tasks will, and hashes each unit to send (a chunk, or a truncated
prefix). Rows that share a unit hash get one *group*, the smallest id among them; the waves
and the partitions inside a wave are then cut by the group (by the id for every other row),
and a task reads its rows sorted by group and id, so the smallest id pays.

Groups are found by two rounds of label propagation: rows linked through a chain of more
than two shared units may get different groups, and then pay for a shared unit once per
group. A unit shared by more than :data:`MAX_SHARED` rows does not group them: a boilerplate
chunk in every document would otherwise put every long text in one task. Such a unit is paid
for at most once per task that meets it (the task dedup remembers it), so a few times per
wave. Only texts of more than half ``batching.max_input_tokens`` UTF-8 bytes are cut here:
every tokenizer the job uses counts fewer tokens than that for shorter texts, so they are
sent whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkembed.config import EmbedConfig
from sparkembed.core.longtext import LongTextPlanner

GROUP = "_sparkembed_group"
"""Column of the rows to send: the group of a long text that shares a unit, else null."""
MAX_SHARED = 1000
"""Rows a unit may be shared by and still group them into one task."""
_UNIT = "_sparkembed_unit"
_PLAN_ROWS = 256
"""Long texts planned at once on an executor."""


def find_groups(todo: DataFrame, config: EmbedConfig) -> DataFrame | None:
    """The rows of ``todo`` that share a unit with another: (id, :data:`GROUP`); see the module
    docstring. None under ``long_text.strategy: fail``, which sends no part of a long text."""
    id_col, text_col = config.source.id_col, config.source.text_col
    if config.long_text.strategy == "fail":
        return None
    long = todo.filter(may_be_long(config))
    schema = T.StructType([todo.schema[id_col], T.StructField(_UNIT, T.BinaryType())])
    cut = _unit_hashes(config, id_col, text_col)
    units = long.select(id_col, text_col).mapInPandas(cut, schema).distinct()
    shared = units.groupBy(_UNIT).agg(F.count("*").alias("rows"), F.min(id_col).alias("first"))
    shared = shared.filter((F.col("rows") > 1) & (F.col("rows") <= MAX_SHARED)).drop("rows")
    links = units.join(shared, _UNIT)  # (id, unit, the smallest id sharing the unit)
    first = links.groupBy(id_col).agg(F.min("first").alias("label"))
    # The second round: a unit's label is the smallest of its rows' labels.
    spread = links.join(first, id_col).groupBy(_UNIT).agg(F.min("label").alias("label"))
    return links.join(spread, _UNIT).groupBy(id_col).agg(F.min("label").alias(GROUP))


def may_be_long(config: EmbedConfig) -> Column:
    """True for a text that may be over ``batching.max_input_tokens``: one that planning cuts."""
    return F.octet_length(config.source.text_col) > config.batching.max_input_tokens // 2


def wave_key(config: EmbedConfig) -> Column:
    """What the waves and a wave's partitions are cut by: a row's group, else its id."""
    return F.coalesce(F.col(GROUP), F.col(config.source.id_col))


def _unit_hashes(
    config: EmbedConfig, id_col: str, text_col: str
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The ``mapInPandas`` function: (id, hash) of each unit the tasks will send of a long text."""

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        planner = LongTextPlanner(config)
        for frame in frames:
            for start in range(0, len(frame), _PLAN_ROWS):
                part = frame.iloc[start : start + _PLAN_ROWS]
                ids = part[id_col].tolist()
                plan = planner.plan(part[text_col].tolist())
                found = [
                    (ids[unit.row], _digest(unit.text))
                    for unit in plan.units
                    if unit.start is not None and unit.text is not None
                ]
                if found:
                    yield pd.DataFrame(found, columns=[id_col, _UNIT])

    return run


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
