"""In-run dedup (issue 18, part 1) on real Spark, the local endpoint's accounting and real Delta:
each distinct text is billed once per run, its vector copied to every row with that text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import SparkSession
from support import build_config, sha256_hex
from test_spark_job import billed_besides_preflight, expected_vectors

from sparkembed.config import EmbedConfig
from sparkembed.server.launch import LocalEndpoint
from sparkembed.sinks import read_table
from sparkembed.spark import driver

pytestmark = [pytest.mark.spark, pytest.mark.integration]

DIMS = 64
LONG = " ".join(f"clause{i % 89} of the long text, part {i}." for i in range(600))  # a few chunks


def duplicated_rows(n: int = 200) -> dict[str, list[Any]]:
    """``n`` rows, 40 % of which repeat a text of another row (one long, one that fails)."""
    distinct = int(n * 0.6)
    texts = [f"Distinct text {i} on subject {i % 13}." for i in range(distinct)]
    texts[5], texts[14] = LONG, "POISON text"
    texts += [texts[(i * 7) % distinct] for i in range(n - distinct)]
    order = np.random.default_rng(18).permutation(n)  # copies land in other waves and partitions
    ids = [f"r{i:04d}" for i in range(n)]
    return {"id": ids, "text": [texts[k] for k in order], "title": [f"t{i}" for i in range(n)]}


def write_source(tmp_path: Path, rows: dict[str, list[Any]], name: str = "source.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.table(rows), path)
    return str(path)


def make_config(endpoint: LocalEndpoint, key: str, source: str, target: str, **sets: Any) -> EmbedConfig:
    overrides = {
        "endpoint.url": endpoint.url,
        "source.path": source,
        "source.passthrough": ["title"],
        "target.path": target,
        "batching.max_inputs": 16,
        "limits.concurrency": 2,
        "long_text.chunk_tokens": 256,
        "long_text.overlap_tokens": 16,
        "run.commit_every_rows": 40,
        "run.log_dir": str(Path(target).parent / "runs"),
        **sets,
    }
    return build_config(sets=overrides, key=key)


@pytest.fixture()
def endpoint(start_endpoint) -> LocalEndpoint:
    return start_endpoint("--model", "hash", "--dims", str(DIMS), "--fail-text", "POISON")


def test_each_distinct_text_is_billed_once_and_copies_carry_its_vector(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = duplicated_rows()
    target = str(tmp_path / "target")
    config = make_config(endpoint, endpoint_key, write_source(tmp_path, rows), target)

    summary = driver.run(spark, config, progress=lambda _: None)

    table = read_table(target).to_pandas()
    assert set(table["id"]) == set(rows["id"]) and summary.waves > 1
    whole = table[table["chunk_index"] == 0]
    payer = {}  # text -> the smallest id with it: the one that paid
    for i, text in sorted(zip(rows["id"], rows["text"], strict=True)):
        payer.setdefault(text, i)
    text_of = dict(zip(rows["id"], rows["text"], strict=True))
    want = [None if payer[text_of[i]] == i else payer[text_of[i]] for i in whole["id"]]
    assert whole["dedup_of"].tolist() == want
    copies = table[table["dedup_of"].notna()]
    assert len(whole[whole["dedup_of"].notna()]) == 80 and summary.deduplicated == len(copies)
    assert (copies["prompt_tokens"] == 0).all() and (copies["total_tokens"] == 0).all()

    # Billed: each distinct text once (the long one in chunks), and the table sums to the bill.
    long_rows = table[table["text_hash"] == sha256_hex(LONG)]
    chunks = long_rows["chunk_index"].nunique()
    assert chunks > 1 and len(long_rows) == chunks * sum(t == LONG for t in rows["text"])
    texts_billed, tokens = billed_besides_preflight(endpoint)
    assert texts_billed == 120 - 2 + chunks  # the poison text is refused, so never billed
    assert int(table["prompt_tokens"].sum()) == tokens == summary.counts["prompt_tokens"]

    # Exact vectors for every copy, chunk by chunk; a failed text fails its copies alike.
    ok = copies[copies["status"] == "ok"]
    pieces = [
        LONG[int(r.chunk_start) : int(r.chunk_end)] if text_of[r.id] == LONG else text_of[r.id]
        for r in ok.itertuples()
    ]
    np.testing.assert_array_equal(np.stack(ok["embedding"].to_numpy()), expected_vectors(pieces))
    poison = table[table["text_hash"] == sha256_hex("POISON text")]
    assert len(poison) > 1 and (poison["status"] == "failed").all()
    assert poison["error"].nunique() == 1 and poison["error"].iloc[0].startswith("400")
    assert (table["title"] == [f"t{int(i[1:])}" for i in table["id"]]).all()  # each row its own passthrough
    assert not table.duplicated(["id", "chunk_index"]).any()


def test_a_rerun_copies_texts_the_target_holds_and_dedup_false_pays_per_row(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = {"id": [f"a{i}" for i in range(30)], "text": [f"Old text {i}." for i in range(30)]}
    rows["title"] = ["x"] * 30
    target = str(tmp_path / "target")
    driver.run(spark, make_config(endpoint, endpoint_key, write_source(tmp_path, rows), target),
               progress=lambda _: None)  # fmt: skip

    # New rows repeat old texts (and each other): nothing new to pay for.
    more = {key: list(values) for key, values in rows.items()}
    more["id"] += [f"b{i}" for i in range(20)]
    more["text"] += [f"Old text {i % 10}." for i in range(20)]
    more["title"] += ["y"] * 20
    endpoint.reset()
    source = write_source(tmp_path, more, "more.parquet")
    summary = driver.run(spark, make_config(endpoint, endpoint_key, source, target), progress=lambda _: None)
    assert billed_besides_preflight(endpoint) == (0, 0)
    table = read_table(target).to_pandas().set_index("id")
    assert summary.deduplicated == 20
    for i in range(20):
        row = table.loc[f"b{i}"]
        assert row["dedup_of"] == f"a{i % 10}" and row["prompt_tokens"] == 0 and row["status"] == "ok"
        np.testing.assert_array_equal(row["embedding"], table.loc[f"a{i % 10}", "embedding"])

    # run.dedup: false sends every row, duplicates included.
    endpoint.reset()
    plain = make_config(endpoint, endpoint_key, source, str(tmp_path / "plain"), **{"run.dedup": False})
    driver.run(spark, plain, progress=lambda _: None)
    assert billed_besides_preflight(endpoint)[0] == 50
    assert read_table(str(tmp_path / "plain")).to_pandas()["dedup_of"].isna().all()


SHARED = "\n\n".join(
    f"Shared section {k}. " + " ".join(f"boiler{i % 37} clause {k}.{i}." for i in range(40))
    for k in range(12)
)
TEXT_A = SHARED + "\n\n" + " ".join(f"alpha{i} tail sentence {i}." for i in range(300))
TEXT_B = SHARED + "\n\n" + " ".join(f"beta{i} other ending {i}." for i in range(300))


def sharing_rows() -> dict[str, list[Any]]:
    """Two different long texts with a long common section, and short texts around them."""
    texts = [f"Short text {i} about {i % 5}." for i in range(10)]
    texts[3], texts[7] = TEXT_A, TEXT_B
    return {"id": [f"r{i:02d}" for i in range(10)], "text": texts, "title": [f"t{i}" for i in range(10)]}


def one_task(endpoint: LocalEndpoint, key: str, source: str, target: str, **sets: Any) -> EmbedConfig:
    """Both long texts in one task (chunk dedup's scope): one partition, one wave."""
    sets = {"run.partitions": 1, "run.commit_every_rows": 1000, **sets}
    return make_config(endpoint, key, source, target, **sets)


def unit_texts(table: Any, rows: dict[str, list[Any]]) -> list[str]:
    """What each output row stands for: its chunk of the source text, or the whole text."""
    text_of = dict(zip(rows["id"], rows["text"], strict=True))
    return [
        text_of[r.id] if np.isnan(r.chunk_start) else text_of[r.id][int(r.chunk_start) : int(r.chunk_end)]
        for r in table.itertuples()
    ]


def test_long_texts_sharing_chunks_pay_each_distinct_chunk_once_in_a_task(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = sharing_rows()
    source = write_source(tmp_path, rows)
    target = str(tmp_path / "target")
    summary = driver.run(spark, one_task(endpoint, endpoint_key, source, target), progress=lambda _: None)

    table = read_table(target).to_pandas().sort_values(["id", "chunk_index"], ignore_index=True)
    table["unit"] = unit_texts(table, rows)
    assert (table["status"] == "ok").all() and not table.duplicated(["id", "chunk_index"]).any()
    assert sorted(set(table["id"])) == rows["id"]
    of_a = table[table["id"] == "r03"]
    copies = table[(table["id"] == "r07") & table["unit"].isin(set(of_a["unit"]))]
    assert len(copies) >= 3 and len(copies) < (table["id"] == "r07").sum()

    # Billed: each distinct chunk once, and the table's usage sums to the bill.
    billed = endpoint.stats()["billed"]
    assert all(billed.get(sha256_hex(unit)) == 1 for unit in table["unit"])
    texts_billed, tokens = billed_besides_preflight(endpoint)
    assert texts_billed == table["unit"].nunique() == len(table) - len(copies)
    assert int(table["prompt_tokens"].sum()) == tokens == summary.counts["prompt_tokens"]
    assert int(table["total_tokens"].sum()) == summary.counts["total_tokens"]
    assert summary.to_json()["chunks_deduplicated"] == len(copies)

    # The copies: usage 0, dedup_of names the row that paid, its vector exactly.
    assert (copies["dedup_of"] == "r03").all()
    assert (copies["prompt_tokens"] == 0).all() and (copies["total_tokens"] == 0).all()
    assert table.loc[~table.index.isin(copies.index), "dedup_of"].isna().all()
    paid = of_a.set_index("unit")
    for copy in copies.itertuples():
        np.testing.assert_array_equal(copy.embedding, paid.loc[copy.unit, "embedding"])
        assert copy.request_id == paid.loc[copy.unit, "request_id"]
    np.testing.assert_array_equal(
        np.stack(copies["embedding"].to_numpy()), expected_vectors(list(copies["unit"]))
    )

    # run.dedup: false pays for every chunk of both texts.
    endpoint.reset()
    plain_target = str(tmp_path / "plain")
    plain = one_task(endpoint, endpoint_key, source, plain_target, **{"run.dedup": False})
    assert driver.run(spark, plain, progress=lambda _: None).counts["copied_chunks"] == 0
    plain_table = read_table(plain_target).to_pandas()
    texts_billed, tokens = billed_besides_preflight(endpoint)
    assert texts_billed == len(plain_table) == len(table)
    assert int(plain_table["prompt_tokens"].sum()) == tokens
    assert plain_table["dedup_of"].isna().all()
    assert all(endpoint.stats()["billed"][sha256_hex(unit)] == 2 for unit in copies["unit"])


def paragraph(name: str) -> str:
    """About 230 UTF-8 bytes: under the spread test's 256-token chunks (its counter counts bytes)."""
    return f"Paragraph {name} opens here. " + " ".join(f"{name}.{i} sits." for i in range(18))


def spread_sharing_rows() -> dict[str, list[Any]]:
    """Long texts of two paragraphs (two chunks each) that share a chunk, spread over 40 ids:
    a pair sharing its second chunk, and a chain in which the first shares with the second,
    the second with the third, but the first none with the third."""
    texts = [f"Short text {i} about {i % 5}." for i in range(40)]
    texts[5], texts[29] = paragraph("a") + "\n\n" + paragraph("s"), paragraph("b") + "\n\n" + paragraph("s")
    texts[2] = paragraph("x") + "\n\n" + paragraph("xy")
    texts[17] = paragraph("yz") + "\n\n" + paragraph("xy")
    texts[33] = paragraph("yz") + "\n\n" + paragraph("z")
    return {"id": [f"r{i:02d}" for i in range(40)], "text": texts, "title": [f"t{i}" for i in range(40)]}


def test_long_texts_sharing_chunks_pay_once_across_tasks_and_waves(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = spread_sharing_rows()
    source = write_source(tmp_path, rows)
    target = str(tmp_path / "target")
    sets = {
        "run.partitions": 4,
        "run.commit_every_rows": 8,
        "batching.max_input_tokens": 300,
        "long_text.overlap_tokens": 0,
    }
    summary = driver.run(spark, make_config(endpoint, endpoint_key, source, target, **sets), progress=print)

    table = read_table(target).to_pandas().sort_values(["id", "chunk_index"], ignore_index=True)
    table["unit"] = unit_texts(table, rows)
    assert summary.waves > 3 and (table["status"] == "ok").all()
    assert sorted(set(table["id"])) == rows["id"] and not table.duplicated(["id", "chunk_index"]).any()
    assert table.groupby("id").size()[["r02", "r05", "r17", "r29", "r33"]].tolist() == [2] * 5

    # Each distinct chunk billed once, though the rows sharing it had other waves and tasks.
    assert all(n == 1 for n in endpoint.stats()["billed"].values())
    texts_billed, tokens = billed_besides_preflight(endpoint)
    copies = table[table["dedup_of"].notna()]
    assert texts_billed == table["unit"].nunique() == len(table) - 3 and len(copies) == 3
    assert int(table["prompt_tokens"].sum()) == tokens == summary.counts["prompt_tokens"]
    # The smallest id of a group pays: r29 copies r05, the chain r02 <- r17 <- r33 copies r02, r17.
    paid_by = dict(zip(copies["id"], copies["dedup_of"], strict=True))
    assert paid_by == {"r17": "r02", "r29": "r05", "r33": "r17"}
    vectors = np.stack(table["embedding"].to_numpy())
    np.testing.assert_array_equal(vectors, expected_vectors(list(table["unit"])))


def test_a_mean_row_counts_only_the_chunks_it_paid_for_and_keeps_its_vector(
    spark: SparkSession, endpoint: LocalEndpoint, endpoint_key: str, tmp_path: Path
) -> None:
    rows = sharing_rows()
    source = write_source(tmp_path, rows)
    tables = {}
    for dedup in (True, False):
        endpoint.reset()
        target = str(tmp_path / f"mean-{dedup}")
        config = one_task(
            endpoint, endpoint_key, source, target, **{"long_text.strategy": "mean", "run.dedup": dedup}
        )
        driver.run(spark, config, progress=lambda _: None)
        table = tables[dedup] = read_table(target).to_pandas().set_index("id").sort_index()
        assert int(table["prompt_tokens"].sum()) == billed_besides_preflight(endpoint)[1]  # the bill
        assert (table["status"] == "ok").all() and len(table) == 10 and table["dedup_of"].isna().all()

    deduped, plain = tables[True], tables[False]
    for i in rows["id"]:  # the same vectors, with or without dedup
        np.testing.assert_allclose(
            deduped.loc[i, "embedding"], plain.loc[i, "embedding"], rtol=1e-5, atol=1e-6
        )
    # r07 paid for its own chunks only, the shared ones were r03's: a request's usage is shared
    # by its inputs' estimated tokens, so the rows' shares, not their sums, move with the mix.
    assert 0 < deduped.loc["r07", "prompt_tokens"] < plain.loc["r07", "prompt_tokens"] / 2
    assert int(deduped["prompt_tokens"].sum()) < int(plain["prompt_tokens"].sum())
