"""Bad input never crashes the run: odd Unicode, control characters, 1 MB texts, huge ids,
non-string text columns, null and duplicate ids.

Real Spark (local[2]), the real local endpoint (hash model) over HTTP, real Delta. Each row
ends with a status and, when ok, exactly the vector the service computes for its text;
bad ids fail before any request is sent (the endpoint's counters stay at zero).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession
from support import build_config

from sparkembed.config import EmbedConfig
from sparkembed.errors import InputError
from sparkembed.server.launch import LocalEndpoint
from sparkembed.server.models import HashModel
from sparkembed.sinks import read_table
from sparkembed.spark import driver

pytestmark = [pytest.mark.spark, pytest.mark.integration]

DIMS = 16
HUGE_ID = "x" * 10_000
MEGABYTE_OF_WORDS = " ".join(f"word{i % 1000}" for i in range(125_000))[:1_000_000]

# id -> text: each a way text can be odd. None of them may crash the run.
HOSTILE = {
    "nul": "before\x00after",
    "controls": "".join(chr(c) for c in range(1, 32)) + "\x7f\x80\x9f text",
    "ansi": "\x1b[31mred\x1b[0m \x1b]0;title\x07",
    "rtl": "\u202eevil\u202c مرحبا بالعالم שלום עולם",
    "emoji": "👩‍👩‍👧‍👦 🏳️‍🌈 🤖🦀 \U0001f9ec",
    "combining": "e" + "\u0301\u0302\u0303" * 300,
    "zero_width": "\u200b\u200c\u200d\ufeff\u2060",
    "noncharacters": "\uffff\ufffe\U0010ffff\U0001d11e \ufdd0",
    "json_breaker": '"}]}\\u0000 {"input": ["x"], \\ "\\"',
    "markup": "<script>alert(1)</script> &amp; ' OR 1=1 --",
    "mixed_scripts": "日本語のテキスト 中文 한국어 ελληνικά кириллица देवनागरी",
    "cr_lf_only": "\r\n\t \v\f",
    "unicode_spaces": "\u3000\u2003\u00a0\u2028\u2029",
    "empty": "",
    "null": None,
    "megabyte_of_words": MEGABYTE_OF_WORDS,
    "megabyte_of_one_char": "a" * 1_000_000,
    HUGE_ID: "a row whose id is ten kilobytes long",
}
BLANK = {"cr_lf_only", "unicode_spaces", "empty", "null"}
LONG = {"megabyte_of_words", "megabyte_of_one_char"}


def hash_vectors(texts: list[str]) -> np.ndarray:
    return HashModel(DIMS).embed(texts, [], DIMS, "text")


def write_parquet(path: Path, columns: dict[str, list[Any]], schema: pa.Schema | None = None) -> str:
    pq.write_table(pa.table(columns, schema=schema), path)
    return str(path)


def make_config(endpoint: LocalEndpoint, key: str, source: str, target: Path, **sets: Any) -> EmbedConfig:
    overrides = {
        "endpoint.url": endpoint.url,
        "source.path": source,
        "target.path": str(target),
        "run.log_dir": str(target.parent / "runs"),
        "run.partitions": 2,
        "retry.backoff_initial_s": 0.05,
        **sets,
    }
    return build_config(sets=overrides, key=key)


@pytest.fixture(scope="module")
def endpoint(start_endpoint: Any) -> Iterator[LocalEndpoint]:
    server = start_endpoint("--model", "hash", "--dims", str(DIMS))
    yield server
    server.stop()


@pytest.fixture
def fresh(endpoint: LocalEndpoint) -> LocalEndpoint:
    endpoint.reset()
    return endpoint


def test_every_hostile_row_ends_with_a_status_and_its_own_vector(
    spark: SparkSession, fresh: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    ids, texts = list(HOSTILE), list(HOSTILE.values())
    source = write_parquet(tmp_path / "hostile.parquet", {"id": ids, "text": texts})
    config = make_config(fresh, endpoint_key, source, tmp_path / "out")

    summary = driver.run(spark, config, progress=lambda line: None)

    rows = read_table(str(tmp_path / "out")).to_pylist()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    assert set(by_id) == set(ids)  # no row lost, the 10 KB id intact
    assert {r["status"] for r in rows} <= {"ok", "skipped"}
    assert summary.counts["failed_rows"] == 0
    for row_id, text in HOSTILE.items():
        out = sorted(by_id[row_id], key=lambda r: r["chunk_index"])
        want_hash = None if text is None else hashlib.sha256(text.encode()).hexdigest()
        assert {r["text_hash"] for r in out} == {want_hash}, row_id
        if row_id in BLANK:
            assert [r["status"] for r in out] == ["skipped"], row_id
        elif row_id in LONG:
            # Chunked: many rows, each ok, covering the text end to end.
            assert len(out) > 1 and {r["status"] for r in out} == {"ok"}, row_id
            assert out[0]["chunk_start"] == 0 and out[-1]["chunk_end"] == len(text)
        else:
            assert [r["status"] for r in out] == ["ok"], row_id
            vector = np.array(out[0]["embedding"], dtype=np.float32)
            # The text reached the service byte for byte: its vector is the one for this text.
            assert np.array_equal(vector, hash_vectors([text])[0]), row_id


def test_non_string_text_column_is_cast_with_a_warning(
    spark: SparkSession,
    fresh: LocalEndpoint,
    endpoint_key: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    numbers = [0, -7, 2**62, None]
    source = write_parquet(tmp_path / "ints.parquet", {"id": [1, 2, 3, 4], "text": numbers})
    config = make_config(fresh, endpoint_key, source, tmp_path / "out")

    with caplog.at_level(logging.WARNING, logger="sparkembed"):
        summary = driver.run(spark, config, progress=lambda line: None)

    assert "casting text column 'text' from bigint to string" in caplog.text
    rows = {r["id"]: r for r in read_table(str(tmp_path / "out")).to_pylist()}
    assert {i: r["status"] for i, r in rows.items()} == {1: "ok", 2: "ok", 3: "ok", 4: "skipped"}
    want = hash_vectors(["0", "-7", str(2**62)])
    got = np.array([rows[i]["embedding"] for i in (1, 2, 3)], dtype=np.float32)
    assert np.array_equal(got, want)
    assert summary.counts["ok_rows"] == 3


def test_non_string_text_column_without_cast_fails_before_spending(
    spark: SparkSession, fresh: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    source = write_parquet(tmp_path / "ints.parquet", {"id": [1, 2], "text": [1.5, 2.5]})
    config = make_config(fresh, endpoint_key, source, tmp_path / "out", **{"source.cast_text": False})

    with pytest.raises(InputError, match="text column 'text' is double, not string"):
        driver.run(spark, config, progress=lambda line: None)
    assert fresh.stats(billed=False)["requests"] == 0


def test_null_ids_fail_before_any_request(
    spark: SparkSession, fresh: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    source = write_parquet(tmp_path / "nulls.parquet", {"id": ["a", None, "c"], "text": ["x", "y", "z"]})
    config = make_config(fresh, endpoint_key, source, tmp_path / "out")

    with pytest.raises(InputError) as caught:
        driver.run(spark, config, progress=lambda line: None)

    assert str(caught.value) == "id column 'id' has null values; every row needs an id"
    # The id check runs before the preflight: not even that request was sent.
    assert fresh.stats(billed=False)["requests"] == 0
    assert not (tmp_path / "out").exists()


def test_duplicate_huge_ids_fail_before_any_request(
    spark: SparkSession, fresh: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    ids = [HUGE_ID + "-a", HUGE_ID + "-a", HUGE_ID + "-b", HUGE_ID + "-b", "short"]
    source = write_parquet(tmp_path / "dupes.parquet", {"id": ids, "text": ["t"] * 5})
    config = make_config(fresh, endpoint_key, source, tmp_path / "out")

    with pytest.raises(InputError) as caught:
        driver.run(spark, config, progress=lambda line: None)

    # The ids are named (today in full, 10 KB each: see the issue-7 report).
    assert str(caught.value).startswith("id column 'id' has duplicate values, e.g. 'xxxx")
    assert fresh.stats(billed=False)["requests"] == 0
