"""Sources: formats found from the path, and clear errors before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from pyspark.sql import SparkSession

from sparkembed.config import SourceConfig
from sparkembed.errors import ConfigError, InputError
from sparkembed.sinks import commit_files, write_part
from sparkembed.spark.sources import check_ids, detect_format, read_source, select_input

pytestmark = pytest.mark.spark

ROWS = [{"id": 1, "text": "one", "n": 10}, {"id": 2, "text": "two", "n": 20}]


def write_all_formats(tmp_path: Path) -> dict[str, str]:
    table = pa.Table.from_pylist(ROWS)
    paths = {"jsonl": tmp_path / "src.jsonl", "csv": tmp_path / "src.csv", "delta": tmp_path / "delta"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    paths["csv"].write_text("id,text,n\n1,one,10\n2,two,20\n")
    files = write_part(str(paths["delta"]), table, schema=table.schema, file_prefix="src")
    commit_files(str(paths["delta"]), files, schema=table.schema, mode="append", app_id="t", version=0)
    return {k: str(v) for k, v in paths.items()}


def test_each_format_is_found_from_the_path_and_read(spark: SparkSession, tmp_path: Path) -> None:
    for fmt, path in write_all_formats(tmp_path).items():
        assert detect_format(path) == fmt
        df = read_source(spark, SourceConfig(path=path))
        got = sorted((int(r["id"]), r["text"]) for r in df.collect())
        assert got == [(1, "one"), (2, "two")], fmt
    assert detect_format("main.rag.docs") == "table"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "data.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match="source.format"):
        detect_format(str(odd))  # a folder of nothing recognisable


def test_missing_columns_and_non_string_text_are_named(spark: SparkSession) -> None:
    df = spark.createDataFrame(ROWS)
    with pytest.raises(InputError, match=r"no column\(s\) \['body'\]"):
        select_input(df, SourceConfig(text_col="body"))
    with pytest.raises(InputError, match="text column 'n' is bigint, not string"):
        select_input(df, SourceConfig(text_col="n", cast_text=False))
    cast = select_input(df, SourceConfig(text_col="n", passthrough=("text",)))
    assert cast.schema["n"].dataType.simpleString() == "string"
    assert cast.columns == ["id", "n", "text"]
    with pytest.raises(InputError, match="clash with output columns"):
        select_input(df.withColumnRenamed("n", "status"), SourceConfig(passthrough=("status",)))


def test_null_and_duplicate_ids_are_refused(spark: SparkSession) -> None:
    with pytest.raises(InputError, match="null values"):
        check_ids(spark.createDataFrame([(None, "a"), (2, "b")], "id long, text string"), "id")
    with pytest.raises(InputError, match="duplicate values, e.g. 7"):
        check_ids(spark.createDataFrame([(7, "a"), (7, "b"), (8, "c")], "id long, text string"), "id")
    assert check_ids(spark.createDataFrame(ROWS), "id") == len(ROWS)  # fine, and counted
