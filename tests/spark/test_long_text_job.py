"""Each long-text strategy, end to end on the sample corpus with the real wordllama model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr
from pyspark.sql import SparkSession

from sparkembed.config import load_config
from sparkembed.core import wordllama
from sparkembed.corpus import build_corpus
from sparkembed.server.launch import LocalEndpoint
from sparkembed.sinks import read_table
from sparkembed.spark import driver

pytestmark = [pytest.mark.spark, pytest.mark.integration]

LIMIT = 8191


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str | None], set[str]]:
    """The corpus's long texts, 30 short ones and the blank rows, as a parquet source."""
    table = build_corpus()
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    counts = wordllama.count_tokens([t or "" for t in texts])
    long_ids = {i for i, n in zip(ids, counts, strict=True) if n > LIMIT}
    short = [i for i, n, t in zip(ids, counts, texts, strict=True) if 0 < n <= LIMIT and t][:30]
    keep = long_ids | set(short) | {i for i in ids if i.startswith("blank:")}
    subset = table.filter(pa.array([i in keep for i in ids]))
    path = tmp_path_factory.mktemp("corpus") / "subset.parquet"
    pq.write_table(subset, path)
    by_id = dict(zip(subset.column("id").to_pylist(), subset.column("text").to_pylist(), strict=True))
    assert len(long_ids) >= 5
    return str(path), by_id, long_ids


@pytest.fixture(scope="module")
def wordllama_endpoint(start_endpoint) -> LocalEndpoint:
    return start_endpoint("--model", "wordllama")


def run_strategy(
    spark: SparkSession, endpoint: LocalEndpoint, key: str, source: str, tmp_path: Path, strategy: str
) -> tuple[dict, list[dict]]:
    config = load_config(
        None,
        {
            "endpoint.url": endpoint.url,
            "long_text.strategy": strategy,
            "long_text.tokenizer": "wordllama",
            "source.path": source,
            "target.path": str(tmp_path / strategy),
            "run.log_dir": str(tmp_path / "runs"),
        },
    )
    config = config.model_copy(update={"auth": config.auth.model_copy(update={"key": SecretStr(key)})})
    summary = driver.run(spark, config, progress=lambda _: None)
    return summary.to_json(), read_table(str(tmp_path / strategy)).to_pylist()


def no_context_length_errors(endpoint: LocalEndpoint) -> None:
    responses = endpoint.stats(billed=False)["responses"]
    assert set(responses) == {"200"}, responses  # no 400 context_length_exceeded, ever


def test_chunk_rows_reassemble_overlap_and_fit(
    spark, wordllama_endpoint, endpoint_key, corpus, tmp_path: Path
) -> None:
    source, texts, long_ids = corpus
    summary, rows = run_strategy(spark, wordllama_endpoint, endpoint_key, source, tmp_path, "chunk")
    assert summary["rows_failed"] == 0
    for doc in long_ids:
        text = texts[doc]
        chunks = sorted((r for r in rows if r["id"] == doc), key=lambda r: r["chunk_index"])
        assert [r["chunk_index"] for r in chunks] == list(range(len(chunks)))
        assert len(chunks) > 1 and all(r["status"] == "ok" for r in chunks)
        assert chunks[0]["chunk_start"] == 0 and chunks[-1]["chunk_end"] == len(text)
        for a, b in zip(chunks, chunks[1:], strict=False):
            assert b["chunk_start"] < a["chunk_end"]  # overlap, so no gap
            overlap = wordllama.count_tokens([text[b["chunk_start"] : a["chunk_end"]]])[0]
            assert 16 <= overlap <= 128  # configured 64 tokens, cut at word ends
        pieces = [text[r["chunk_start"] : r["chunk_end"]] for r in chunks]
        assert max(wordllama.count_tokens(pieces)) <= 512
    whole = [r for r in rows if r["id"] not in long_ids]
    assert all(r["chunk_index"] == 0 and r["chunk_start"] is None for r in whole)
    no_context_length_errors(wordllama_endpoint)


def test_mean_gives_one_unit_vector_per_row_with_summed_usage(
    spark, wordllama_endpoint, endpoint_key, corpus, tmp_path: Path
) -> None:
    source, texts, long_ids = corpus
    _, chunked = run_strategy(spark, wordllama_endpoint, endpoint_key, source, tmp_path, "chunk")
    _, rows = run_strategy(spark, wordllama_endpoint, endpoint_key, source, tmp_path, "mean")
    assert len(rows) == len(texts)
    for row in (r for r in rows if r["id"] in long_ids):
        assert row["status"] == "ok" and row["chunk_index"] == 0
        assert np.linalg.norm(np.asarray(row["embedding"], dtype=np.float64)) == pytest.approx(1.0, abs=1e-5)
        assert row["prompt_tokens"] == sum(r["prompt_tokens"] for r in chunked if r["id"] == row["id"])
    no_context_length_errors(wordllama_endpoint)


def test_truncate_keeps_the_first_tokens(
    spark, wordllama_endpoint, endpoint_key, corpus, tmp_path: Path
) -> None:
    source, texts, long_ids = corpus
    _, rows = run_strategy(spark, wordllama_endpoint, endpoint_key, source, tmp_path, "truncate")
    assert len(rows) == len(texts)
    for row in (r for r in rows if r["id"] in long_ids):
        assert row["status"] == "ok" and row["chunk_start"] == 0
        kept = texts[row["id"]][: row["chunk_end"]]
        assert LIMIT - 64 <= wordllama.count_tokens([kept])[0] <= LIMIT
    no_context_length_errors(wordllama_endpoint)


def test_fail_marks_long_rows_without_sending_them(
    spark, wordllama_endpoint, endpoint_key, corpus, tmp_path: Path
) -> None:
    source, texts, long_ids = corpus
    wordllama_endpoint.reset()
    summary, rows = run_strategy(spark, wordllama_endpoint, endpoint_key, source, tmp_path, "fail")
    failed = {r["id"]: r for r in rows if r["status"] == "failed"}
    assert set(failed) == long_ids and summary["rows_failed"] == len(long_ids)
    for doc, row in failed.items():
        tokens = wordllama.count_tokens([texts[doc]])[0]
        assert row["error"] == f"input too long: {tokens} tokens > {LIMIT}"
        assert row["embedding"] is None and row["prompt_tokens"] == 0
    billed = wordllama_endpoint.stats()["billed"]
    import hashlib

    assert not {hashlib.sha256(texts[d].encode()).hexdigest() for d in long_ids} & set(billed)
    no_context_length_errors(wordllama_endpoint)
