"""The Spark glue's Arrow helpers, without Spark."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from sparkembed.spark.partition import text_hashes

TEXTS = ["a", None, "", "émigré 日本 😀", "x" * 1000]


@pytest.mark.parametrize(
    "array",
    [pa.array(TEXTS), pa.array(TEXTS, pa.large_string()), pa.array(["before", *TEXTS]).slice(1)],
    ids=["string", "large_string", "sliced"],
)
def test_text_hashes_are_the_sha256_of_each_texts_utf8(array: pa.Array) -> None:
    want = [None if t is None else hashlib.sha256(t.encode()).hexdigest() for t in TEXTS]
    assert text_hashes(array).to_pylist() == want


def test_text_hashes_of_no_texts_or_only_nulls() -> None:
    assert text_hashes(pa.array([], pa.string())).to_pylist() == []
    assert text_hashes(pa.array([None, None], pa.string())).to_pylist() == [None, None]
