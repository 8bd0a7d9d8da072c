"""Reading and checking the source table, before any money is spent."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sparkembed.config import SourceConfig
from sparkembed.errors import ConfigError, InputError

log = logging.getLogger(__name__)

_SUFFIX_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def detect_format(location: str) -> str:
    """A folder holding ``_delta_log`` is Delta; files go by suffix; anything else is a table name."""
    path = Path(location.removeprefix("file://"))
    if (path / "_delta_log").is_dir():
        return "delta"
    if path.suffix.lower() in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix.lower()]
    if path.is_dir():
        suffixes = {p.suffix.lower() for p in path.iterdir() if not p.name.startswith((".", "_"))}
        for suffix in suffixes & set(_SUFFIX_FORMATS):
            return _SUFFIX_FORMATS[suffix]
    if "://" in location or location.startswith("/") or path.exists():
        raise ConfigError(
            f"cannot tell the format of {location!r}; set source.format (delta, parquet, csv, jsonl)"
        )
    return "table"


def read_source(spark: SparkSession, source: SourceConfig) -> DataFrame:
    """Read ``source.path`` as Delta, parquet, csv, jsonl or a catalog table."""
    if not source.path:
        raise ConfigError("no source given: pass --source PATH|TABLE or set source.path")
    fmt = source.format or detect_format(source.path)
    if fmt == "table":
        return spark.table(source.path)
    if fmt == "delta":
        return read_delta(spark, source.path)
    if fmt == "csv":
        return spark.read.option("header", True).option("multiLine", True).csv(source.path)
    if fmt == "jsonl":
        return spark.read.json(source.path)
    return spark.read.parquet(source.path)


def read_delta(spark: SparkSession, location: str) -> DataFrame:
    """Delta through Spark when the session has Delta, else the current snapshot's files via delta-rs."""
    from sparkembed.spark.delta_native import native_available

    if native_available(spark):
        return spark.read.format("delta").load(location)
    from deltalake import DeltaTable

    table = DeltaTable(location)
    files = table.file_uris()
    if not files:  # an empty table is a table, not an error
        from pyspark.sql.pandas.types import from_arrow_schema

        return spark.createDataFrame([], from_arrow_schema(pa.schema(table.schema().to_arrow())))
    return spark.read.parquet(*files)


def select_input(df: DataFrame, source: SourceConfig) -> DataFrame:
    """Check and select id, text and passthrough columns: the schema contract of the job.

    Raises:
        InputError: a missing column, or a text column that is not a string when casting is off.
    """
    wanted = [source.id_col, source.text_col, *source.passthrough]
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise InputError(
            f"source has no column(s) {missing}; it has {df.columns}. "
            "Set source.id_col / source.text_col / source.passthrough"
        )
    reserved = set(wanted[2:]) & set(RESERVED_COLUMNS)
    if reserved:
        raise InputError(f"passthrough column(s) {sorted(reserved)} clash with output columns")
    text_type = df.schema[source.text_col].dataType
    text = F.col(source.text_col)
    if not isinstance(text_type, T.StringType):
        if not source.cast_text:
            raise InputError(
                f"text column {source.text_col!r} is {text_type.simpleString()}, not string; "
                "cast it or set source.cast_text: true"
            )
        log.warning("casting text column %r from %s to string", source.text_col, text_type.simpleString())
        text = text.cast("string")
    return df.select(F.col(source.id_col), text.alias(source.text_col), *source.passthrough)


def check_ids(df: DataFrame, id_col: str) -> int:
    """Null or duplicate ids would make rows unaddressable for reruns: refuse them up front.

    Returns:
        The number of rows, counted in the same pass.
    """
    counts = df.groupBy(id_col).count()
    found = counts.agg(  # one pass over the source for both checks and the count
        F.sum(F.when(F.col(id_col).isNull(), F.col("count"))).alias("nulls"),
        F.count(F.when(F.col("count") > 1, True)).alias("repeated"),
        F.sum("count").alias("rows"),
    ).first()
    if found is not None and found["nulls"]:
        raise InputError(f"id column {id_col!r} has null values; every row needs an id")
    if found is not None and found["repeated"]:
        dupes = counts.filter(F.col("count") > 1).limit(5).collect()
        shown = ", ".join(_short(repr(r[id_col])) for r in dupes)
        raise InputError(f"id column {id_col!r} has duplicate values, e.g. {shown}")
    return int(found["rows"] or 0) if found is not None else 0


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


RESERVED_COLUMNS = (
    "chunk_index", "chunk_start", "chunk_end", "text_hash", "embedding", "dimensions", "model",
    "input_type", "prompt_tokens", "total_tokens", "status", "error", "attempts", "request_id",
    "run_id", "embedded_at", "embedding_fingerprint", "deployment", "dedup_of",
    "cached_from",
)  # fmt: skip
