"""Native Delta sink: Spark's own ``format("delta")`` and ``DeltaTable.merge``.

Used where the session has Delta (Databricks, Synapse, Fabric, or spark-submit with
the Delta package). Kept thin: CI has no Delta jars, so this code runs only in the
test that is skipped without them.

Idempotency: append and overwrite pass ``txnAppId``/``txnVersion`` writer options;
the upsert's MERGE takes the same pair from the session confs
``spark.databricks.delta.write.txnAppId``/``txnVersion`` (Delta >= 2.3), which are
unset again afterwards. Delta skips a write whose version it has already recorded.

The upsert is ONE MERGE, hence one atomic commit: the source is the new rows
(``_sparkembed_op = 'upsert'``) plus one ``'delete'`` row per stale target chunk,
i.e. a target (id, chunk_index) whose id is in the new rows but whose chunk is not.
A run's waves append their replacing rows to the pending table beside the target, and
:func:`apply_pending` MERGEs them in once, so each touched file is rewritten once per run
(with ``delta.enableDeletionVectors`` the MERGE marks rows deleted instead of rewriting).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from sparkembed.spark.targets import is_path

if TYPE_CHECKING:
    from collections.abc import Iterator

    from delta.tables import DeltaTable
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

_OP = "_sparkembed_op"
_TXN_APP_ID = "spark.databricks.delta.write.txnAppId"
_TXN_VERSION = "spark.databricks.delta.write.txnVersion"


def native_available(spark: SparkSession) -> bool:
    """Whether this session can write Delta natively (delta-spark classes and Python API).

    Classic Spark: the Delta classes load in the driver's JVM. Spark Connect (Databricks
    serverless and shared clusters, ``SparkSession.builder.remote(...)``): what the client has
    installed says nothing of the server, so the server is asked once per session
    (:func:`server_has_delta`).
    """
    try:
        import delta.tables  # noqa: F401
    except ImportError:
        return False
    jvm = getattr(spark, "_jvm", None)
    if jvm is None:
        return server_has_delta(spark)
    try:
        jvm.org.apache.spark.util.Utils.classForName("io.delta.tables.DeltaTable", True, False)
    except Exception:  # py4j wraps ClassNotFoundException; any failure means "no"
        return False
    return True


_PROBE_PATH = "/__sparkembed_probe__/no_such_table"
_NO_DELTA = ("NO_HANDLER_FOR_EXTENSION", "DATA_SOURCE_NOT_FOUND", "ClassNotFoundException")
"""What a Connect server without Delta answers a Delta request: it has no handler for Delta
Connect's relations, or no ``delta`` data source."""
_server_delta: dict[str, bool] = {}


def server_has_delta(spark: SparkSession) -> bool:
    """Whether a Spark Connect server runs Delta and its Connect plugin, which the native sink
    uses (``DeltaTable.isDeltaTable``, ``forPath``, ``merge``); asked once per session.

    The probe is Delta's own ``isDeltaTable`` on a path that holds no table: a server with
    Delta answers it (False, or an error of the path, such as a storage that refuses it:
    Delta was there to raise it); a server without answers that it has no handler for Delta.
    """
    session_id = str(getattr(spark, "session_id", id(spark)))
    if session_id in _server_delta:
        return _server_delta[session_id]
    from delta.tables import DeltaTable

    try:
        DeltaTable.isDeltaTable(spark, _PROBE_PATH)
        found = True
    except Exception as exc:
        found = not any(marker in str(exc) for marker in _NO_DELTA)
        if found:
            log.debug("the Delta probe failed, but Delta answered it: %s", str(exc).splitlines()[0])
    log.info("the Spark Connect server %s Delta", "runs" if found else "does not run")
    _server_delta[session_id] = found
    return found


def write_native(
    df: DataFrame,
    target: str,
    *,
    mode: Literal["append", "overwrite", "upsert"],
    id_col: str,
    app_id: str,
    version: int,
) -> None:
    """Write ``df`` to a Delta path or catalog table in one idempotent commit.

    Args:
        df: the rows. Append and overwrite evaluate it once. Upsert persists it
            (memory and disk) and materializes it once before the MERGE, which reads it
            twice; a lost cached block is recomputed, so stage it yourself to rule that out.
        target: a path (contains ``/``) or a catalog table name.
        mode: ``append``, ``overwrite`` or ``upsert`` by (id_col, chunk_index); upsert
            removes every old chunk of each id in ``df``.
        id_col: the id column.
        app_id: idempotency key; version: its counter (e.g. the wave number).
    """
    spark = df.sparkSession
    if mode == "upsert" and table_exists(spark, target):
        _merge(spark, df, target, id_col, app_id, version)
        return
    writer = (
        df.write.format("delta")
        .mode("overwrite" if mode == "overwrite" else "append")
        .option("txnAppId", app_id)
        .option("txnVersion", str(version))
    )
    if mode == "overwrite":
        writer = writer.option("overwriteSchema", "true")  # as the delta-rs overwrite does
    if is_path(target):
        writer.save(target)
    else:
        writer.saveAsTable(target)


def add_columns(spark: SparkSession, target: str, schema: StructType) -> None:
    """Add the columns of ``schema`` an existing table lacks (older releases wrote no
    ``deployment``), after its own: rows written before read null there."""
    if not table_exists(spark, target):
        return
    reader = spark.read.format("delta")
    have = set((reader.load(target) if is_path(target) else spark.table(target)).columns)
    missing = [field for field in schema.fields if field.name not in have]
    if not missing:
        return
    name = f"delta.`{target}`" if is_path(target) else target
    columns = ", ".join(f"`{field.name}` {field.dataType.simpleString()}" for field in missing)
    spark.sql(f"ALTER TABLE {name} ADD COLUMNS ({columns})")


def _merge(spark: SparkSession, df: DataFrame, target: str, id_col: str, app_id: str, version: int) -> None:
    from delta.tables import DeltaTable
    from pyspark import StorageLevel

    table = DeltaTable.forPath(spark, target) if is_path(target) else DeltaTable.forName(spark, target)
    rows = df.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        rows.count()  # evaluate (embed) once; the stale-chunk join and the MERGE reuse it
        _merge_rows(spark, table, rows, id_col, app_id, version)
    finally:
        rows.unpersist()


def _merge_rows(
    spark: SparkSession, table: DeltaTable, df: DataFrame, id_col: str, app_id: str, version: int
) -> None:
    source = merge_source(table.toDF(), df, id_col)
    columns: dict[str, str | Column] = {f"`{c}`": f"s.`{c}`" for c in df.columns}
    on = f"t.`{id_col}` = s.`{id_col}` AND t.chunk_index = s.chunk_index"
    with _txn_confs(spark, app_id, version):
        (
            table.alias("t")
            .merge(source.alias("s"), on)
            .whenMatchedDelete(condition=f"s.{_OP} = 'delete'")
            .whenMatchedUpdate(set=columns)
            .whenNotMatchedInsert(condition=f"s.{_OP} = 'upsert'", values=columns)
            .execute()
        )


def merge_source(target: DataFrame, df: DataFrame, id_col: str) -> DataFrame:
    """The MERGE source: ``df`` marked ``upsert``, plus a ``delete`` row per stale chunk.

    A stale chunk is a target (id, chunk_index) whose id is in ``df`` but whose
    chunk is not, e.g. chunk 2 of an id whose new text has only two chunks.
    """
    from pyspark.sql import functions as F

    keys = [id_col, "chunk_index"]
    stale = (
        target.select(*keys)
        .join(df.select(id_col).distinct(), on=id_col, how="left_semi")
        .join(df.select(*keys), on=keys, how="left_anti")
    )
    return df.withColumn(_OP, F.lit("upsert")).unionByName(
        stale.withColumn(_OP, F.lit("delete")), allowMissingColumns=True
    )


@contextmanager
def _txn_confs(spark: SparkSession, app_id: str, version: int) -> Iterator[None]:
    """Set the DML idempotency confs for one statement, then unset them."""
    spark.conf.set(_TXN_APP_ID, app_id)
    spark.conf.set(_TXN_VERSION, str(version))
    try:
        yield
    finally:
        spark.conf.unset(_TXN_APP_ID)
        spark.conf.unset(_TXN_VERSION)


def table_exists(spark: SparkSession, target: str) -> bool:
    """Whether the Delta path, or the catalog table, ``target`` exists (asked of the session)."""
    if is_path(target):
        from delta.tables import DeltaTable

        return bool(DeltaTable.isDeltaTable(spark, target))
    return bool(spark.catalog.tableExists(target))


def apply_pending(spark: SparkSession, target: str, *, id_col: str) -> None:
    """MERGE the target's pending table (:func:`sparkembed.sinks.pending_location`) into it in
    one commit, then drop the pending table; nothing when there is none.

    Idempotent by ``(sparkembed-apply-<pending table id>, <pending version>)``: after a crash
    between the MERGE and the drop, the next call's MERGE is skipped by Delta.
    """
    from delta.tables import DeltaTable

    from sparkembed.sinks import drop_staging, pending_location

    pending = pending_location(target)
    if not table_exists(spark, pending):
        return
    table = DeltaTable.forPath(spark, pending) if is_path(pending) else DeltaTable.forName(spark, pending)
    detail, last = table.detail().first(), table.history(1).first()
    assert detail is not None and last is not None  # a Delta table has both
    table_id, version = detail["id"], int(last["version"])
    if table_exists(spark, target):
        _merge(spark, table.toDF(), target, id_col, f"sparkembed-apply-{table_id}", version)
    else:
        write_native(table.toDF(), target, mode="append", id_col=id_col,
                     app_id=f"sparkembed-apply-{table_id}", version=version)  # fmt: skip
    if is_path(pending):
        drop_staging(pending)
    else:
        spark.sql(f"DROP TABLE IF EXISTS {pending}")


def replace_native(df: DataFrame, target: str, *, app_id: str, version: int) -> None:
    """Replace every row of an existing Delta table by ``df`` in ONE overwrite commit.

    The table's definition stays: its schema, generated columns and properties (Change Data
    Feed). A migration's switch (:mod:`sparkembed.spark.migration`); idempotent by
    ``(app_id, version)`` like the other writes.
    """
    from pyspark.sql import functions as F

    name = f"delta.`{target}`" if is_path(target) else target
    (
        df.writeTo(name)
        .option("txnAppId", app_id)
        .option("txnVersion", str(version))
        .overwrite(F.lit(True))
    )


def delete_native(ids: DataFrame, target: str, *, id_col: str, app_id: str, version: int) -> None:
    """Delete every target row whose id is in ``ids`` (``--prune``), in one idempotent MERGE."""
    from delta.tables import DeltaTable

    spark = ids.sparkSession
    table = DeltaTable.forPath(spark, target) if is_path(target) else DeltaTable.forName(spark, target)
    with _txn_confs(spark, app_id, version):
        (
            table.alias("t")
            .merge(ids.select(id_col).distinct().alias("s"), f"t.`{id_col}` = s.`{id_col}`")
            .whenMatchedDelete()
            .execute()
        )
