"""In-run dedup: each distinct text is paid for once per run, and not at all when the target holds it.

Among the rows to do, rows with the same text (``sha2(text, 256)``, the ``text_hash`` the
target stores) meet in one partition of a shuffle on that hash; the smallest id of each
group is its representative, and only representatives go to the waves. After the waves,
the other rows copy their representative's rows from the target: every chunk row, whatever
its status (a failed text fails its copies with the same reason), with usage 0 and
``dedup_of`` naming the id that paid. A representative that was never sent (a stop, a
budget) has no rows, so neither do its copies: the next run does them.

A text the target already holds, ``ok`` under this run's fingerprint, for an id this run
leaves alone, is not sent at all: its rows copy the target's (a rerun after a crash between
the waves and the copies, or a new row repeating an old text).

Blank texts are never sent, so never deduplicated. Different texts that share a chunk are
deduplicated later, by the task that cuts and sends them (:mod:`sparkembed.core.chunkdedup`),
which :mod:`sparkembed.spark.chunkgroups` makes one task: a copy of such a text names, per
chunk row, the id that paid for that chunk.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkembed.config import EmbedConfig
from sparkembed.core.context import RunContext
from sparkembed.spark.partition import CACHED_FROM, DEDUP_OF, OUTPUT_FIELDS
from sparkembed.spark.planning import HELD_BY, HELD_HASH, REPLACES

HASH = "_sparkembed_hash"
"""Column of the marked rows: the text's hash, null for a blank text."""
COPY_OF = "_sparkembed_copy_of"
"""Column of the marked rows: the id whose rows this row copies; null for a row to send."""
FROM_TARGET = "_sparkembed_from_target"
"""Column of the marked rows: the id copied is one the target already held before this run."""
_ZERO = ("prompt_tokens", "total_tokens")


def mark_copies(todo: DataFrame, held: DataFrame | None, config: EmbedConfig) -> DataFrame:
    """``todo`` with :data:`HASH`, :data:`COPY_OF` and :data:`FROM_TARGET`.

    Args:
        todo: the rows to do (:class:`~sparkembed.spark.planning.WorkPlan`).
        held: the texts the target holds (:func:`~sparkembed.spark.planning.held_texts`), or
            None (no target, or an overwrite): nothing to reuse.
    """
    id_col, text = config.source.id_col, F.col(config.source.text_col)
    sendable = text.isNotNull() & ~text.rlike(r"^\s*$")
    marked = todo.withColumn(HASH, F.when(sendable, F.sha2(text, 256)))
    first = F.min(id_col).over(Window.partitionBy(HASH))  # the shuffle on the hash
    in_run = F.when(F.col(HASH).isNotNull() & (first != F.col(id_col)), first)
    if held is None:
        return marked.withColumn(COPY_OF, in_run).withColumn(FROM_TARGET, F.lit(False))
    marked = marked.join(held, marked[HASH] == held[HELD_HASH], "left").drop(HELD_HASH)
    return (
        marked.withColumn(COPY_OF, F.coalesce(F.col(HELD_BY), in_run))
        .withColumn(FROM_TARGET, F.col(HELD_BY).isNotNull())
        .drop(HELD_BY)
    )


def copy_rows(
    target: DataFrame, copies: DataFrame, config: EmbedConfig, context: RunContext, schema: T.StructType
) -> DataFrame:
    """The output rows of ``copies`` (marked rows with :data:`COPY_OF` set), from the target's
    rows of the ids they copy, in ``schema`` (the output table's), plus :data:`REPLACES`.

    An id copied from this run must have written its rows in this run; one the target held
    before is copied as it is. ``dedup_of`` names the id that paid: the copied id, or the id
    it copied in its own run; or, for a row that took its vector from the cache, none:
    ``cached_from`` then names the run that paid, as on the row copied.
    """
    id_col, passthrough = config.source.id_col, config.source.passthrough
    paid_by = F.col(id_col)
    if DEDUP_OF in target.columns:
        paid_by = F.coalesce(F.col(DEDUP_OF), paid_by)
    cached_from = F.lit(None).cast("string")
    if CACHED_FROM in target.columns:
        cached_from = F.col(CACHED_FROM)
        paid_by = F.when(cached_from.isNull(), paid_by)
    deployment = F.col("deployment") if "deployment" in target.columns else F.lit(None).cast("string")
    fingerprints = list(config.equivalent_fingerprints(context))
    rows = target.filter(F.col("embedding_fingerprint").isin(fingerprints)).select(
        F.col(id_col).alias("_from_id"),
        paid_by.alias("_paid_by"),
        deployment.alias("_deployment"),
        cached_from.alias("_cached_from"),
        *(F.col(name) for name, _ in OUTPUT_FIELDS),
    )
    wanted = copies.select(id_col, COPY_OF, HASH, FROM_TARGET, REPLACES, *passthrough)
    joined = wanted.join(
        rows,
        (wanted[COPY_OF] == rows["_from_id"])
        & (wanted[HASH] == rows["text_hash"])
        & (wanted[FROM_TARGET] | (rows["run_id"] == context.run_id)),
    )
    made: dict[str, Column] = {
        "run_id": F.lit(context.run_id),
        "embedded_at": F.current_timestamp(),
        "deployment": F.col("_deployment"),
        DEDUP_OF: F.col("_paid_by"),
        CACHED_FROM: F.col("_cached_from"),
        **{name: F.lit(0) for name in _ZERO},
    }
    columns = [
        made.get(field.name, F.col(field.name)).cast(field.dataType).alias(field.name) for field in schema
    ]
    return joined.select(*columns, F.col(REPLACES))
