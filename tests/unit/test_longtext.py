"""Long texts on the sample corpus: chunk, mean, truncate, fail; combining results back."""

from __future__ import annotations

import numpy as np
import pytest

from sparkembed.config import EmbedConfig
from sparkembed.core import wordllama
from sparkembed.core.longtext import NO_OFFSET, LongTextPlanner, Plan, Unit, combine
from sparkembed.core.streaming import EmbedResults
from sparkembed.core.tokenizers import ByteBound, WordLlamaCounter
from sparkembed.corpus import build_corpus

LONG_IDS = ("topic:specialnames", "module:tkinter")
LIMIT = 8191


def answer(plan: Plan, dims: int = 8, seed: int = 0) -> EmbedResults:
    """What an engine would return: unit vectors for sendable units, skipped for blanks."""
    rng = np.random.default_rng(seed)
    n = len(plan.units)
    vectors = rng.normal(size=(n, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sent = np.array([bool(t and not t.isspace()) for t in plan.texts], dtype=bool)
    vectors[~sent] = 0
    tokens = np.where(sent, plan.tokens, 0)
    return EmbedResults(
        vectors=vectors,
        status=["ok" if s else "skipped" for s in sent],
        error=[None if s else "skipped: empty text" for s in sent],
        prompt_tokens=tokens,
        total_tokens=tokens,
        attempts=np.where(sent, 1 + np.arange(n) % 3, 0).astype(np.int32),
        request_id=[f"req-{i // 4}" if s else None for i, s in enumerate(sent)],
        model=["wordllama" if s else None for s in sent],
        deployment=["a.example/openai/v1" if s else None for s in sent],
    )


@pytest.fixture(scope="module")
def corpus() -> dict[str, str | None]:
    table = build_corpus()
    return dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))


@pytest.fixture(scope="module")
def long_texts(corpus: dict[str, str | None]) -> list[str]:
    texts = [text for i in LONG_IDS if isinstance(text := corpus[i], str)]
    assert len(texts) == len(LONG_IDS)
    assert min(wordllama.count_tokens(texts)) > LIMIT  # really over the model's limit
    return texts


def planner(strategy: str = "chunk", **long_text: object) -> LongTextPlanner:
    config = EmbedConfig.model_validate(
        {"endpoint": {"url": "local"}, "long_text": {"strategy": strategy, **long_text}}
    )
    return LongTextPlanner(config)  # endpoint "local": the wordllama tokenizer


def by_row(plan: Plan) -> dict[int, list[Unit]]:
    rows: dict[int, list[Unit]] = {}
    for unit in plan.units:
        rows.setdefault(unit.row, []).append(unit)
    return rows


def test_the_default_planner_counts_with_the_local_endpoints_tokenizer() -> None:
    assert isinstance(planner().counter, WordLlamaCounter)


def test_chunks_reassemble_the_text(long_texts: list[str]) -> None:
    plan = planner().plan(long_texts)
    rows = by_row(plan)
    assert sorted(rows) == [0, 1]
    for row, text in enumerate(long_texts):
        chunks = rows[row]
        assert [u.chunk_index for u in chunks] == list(range(len(chunks)))
        assert len(chunks) > LIMIT * 2 // 512  # 16k+ tokens in 512-token chunks
        assert all(u.text == text[u.start : u.end] for u in chunks)
        assert chunks[0].start == 0 and chunks[-1].end == len(text)
        for before, after in zip(chunks, chunks[1:], strict=False):
            assert before.start < after.start <= before.end < after.end  # type: ignore[operator]
        pieces = [text[u.start : nxt.start] for u, nxt in zip(chunks, chunks[1:], strict=False)]
        assert "".join(pieces) + chunks[-1].text == text  # type: ignore[operator]


def test_no_chunk_exceeds_chunk_tokens_by_the_models_tokenizer(long_texts: list[str]) -> None:
    plan = planner().plan(long_texts)
    exact = wordllama.count_tokens(plan.texts)  # type: ignore[arg-type]
    assert max(exact) <= 512
    assert exact == plan.tokens.tolist()  # units carry their exact count
    assert np.mean(exact) > 400  # chunks are filled, not needlessly small


def test_consecutive_chunks_overlap_by_about_the_configured_tokens(long_texts: list[str]) -> None:
    for overlap in (64, 0, 200):
        plan = planner(overlap_tokens=overlap).plan(long_texts)
        for row, chunks in by_row(plan).items():
            text = long_texts[row]
            shared = [
                text[after.start : before.end] for before, after in zip(chunks, chunks[1:], strict=False)
            ]
            counts = wordllama.count_tokens(shared) if overlap else [len(s) for s in shared]
            # Snapped to a word start within a quarter of the overlap, +-1 for the marker.
            assert all(abs(c - overlap) <= overlap // 4 + 1 for c in counts), (overlap, counts)


def test_chunks_end_at_paragraph_line_or_word_ends_in_prose(long_texts: list[str]) -> None:
    plan = planner().plan(long_texts)
    for row, chunks in by_row(plan).items():
        text = long_texts[row]
        for unit in chunks[:-1]:
            assert text[unit.end].isspace() and not text[unit.end - 1].isspace()  # type: ignore[index,operator]
        for unit in chunks[1:]:
            assert text[unit.start - 1].isspace() and not text[unit.start].isspace()  # type: ignore[index,operator]


def test_text_without_spaces_is_cut_at_token_boundaries() -> None:
    rng = np.random.default_rng(1)
    cjk = "".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, size=20_000))
    blob = "".join(chr(c) for c in rng.integers(0x41, 0x5A, size=60_000))  # no word breaks
    plan = planner().plan([cjk, blob])
    for row, text in enumerate([cjk, blob]):
        chunks = by_row(plan)[row]
        assert chunks[0].start == 0 and chunks[-1].end == len(text)
        assert max(wordllama.count_tokens([u.text for u in chunks])) <= 512  # type: ignore[misc]


def test_mean_plans_the_same_chunks(long_texts: list[str]) -> None:
    chunked = planner("chunk").plan(long_texts)
    averaged = planner("mean").plan(long_texts)
    assert averaged.units == chunked.units and averaged.strategy == "mean"


def test_mean_combines_chunks_into_a_unit_vector_weighted_by_tokens(
    long_texts: list[str],
) -> None:
    texts = ["a short text", *long_texts, None]
    plan = planner("mean").plan(texts)
    results = answer(plan)
    rows = combine(plan, results)
    assert rows.row.tolist() == [0, 1, 2, 3]
    assert rows.chunk_index.tolist() == [0, 0, 0, 0]
    assert rows.chunk_start.tolist() == rows.chunk_end.tolist() == [NO_OFFSET] * 4
    assert rows.status == ["ok", "ok", "ok", "skipped"]
    np.testing.assert_array_equal(rows.vectors[0], results.vectors[0])  # one unit: unchanged
    for out, row in ((1, 1), (2, 2)):
        units = [i for i, u in enumerate(plan.units) if u.row == row]
        weights = plan.tokens[units].astype(np.float64)
        expected = (results.vectors[units] * weights[:, None]).sum(axis=0)
        expected /= np.linalg.norm(expected)
        np.testing.assert_allclose(rows.vectors[out], expected, rtol=1e-5, atol=1e-6)
        assert abs(np.linalg.norm(rows.vectors[out]) - 1) < 1e-5
        assert rows.prompt_tokens[out] == results.prompt_tokens[units].sum()
        assert rows.total_tokens[out] == results.total_tokens[units].sum()
        assert rows.attempts[out] == results.attempts[units].max() == 3
        assert rows.request_id[out] == results.request_id[units[0]]
    assert rows.prompt_tokens.sum() == results.prompt_tokens.sum()  # usage is never lost
    assert not rows.vectors[3].any() and rows.error[3] == "skipped: empty text"


def test_mean_fails_a_row_when_any_chunk_failed(long_texts: list[str]) -> None:
    plan = planner("mean").plan(long_texts)
    results = answer(plan)
    second_row = [i for i, u in enumerate(plan.units) if u.row == 1]
    for position, reason in ((second_row[3], "503 unavailable: busy"), (second_row[5], "later")):
        results.status[position], results.error[position] = "failed", reason
        results.vectors[position] = 0
    rows = combine(plan, results)
    assert rows.status == ["ok", "failed"]
    assert rows.error == [None, "503 unavailable: busy"]
    assert not rows.vectors[1].any()


def test_truncate_keeps_the_first_max_input_tokens(long_texts: list[str]) -> None:
    plan = planner("truncate").plan(["short", *long_texts])
    assert [u.row for u in plan.units] == [0, 1, 2]
    assert plan.units[0] == Unit(0, 0, None, None, "short", 1)
    for unit, text in zip(plan.units[1:], long_texts, strict=True):
        assert unit.start == 0 and unit.chunk_index == 0
        assert unit.text == text[: unit.end]
        exact = wordllama.count_tokens([unit.text])[0]
        assert LIMIT - 8 <= exact == unit.tokens <= LIMIT
    rows = combine(plan, answer(plan))
    assert rows.chunk_start.tolist() == [NO_OFFSET, 0, 0]
    assert rows.chunk_end.tolist() == [NO_OFFSET, plan.units[1].end, plan.units[2].end]


def test_fail_sends_nothing_and_gives_the_documented_error(long_texts: list[str]) -> None:
    plan = planner("fail").plan(["short", *long_texts])
    assert plan.texts == ["short", None, None]
    counts = wordllama.count_tokens(long_texts)
    assert plan.unit_errors == {
        1: f"input too long: {counts[0]} tokens > {LIMIT}",
        2: f"input too long: {counts[1]} tokens > {LIMIT}",
    }
    results = answer(plan)  # the engine skips None texts; combine marks them failed
    rows = combine(plan, results)
    assert rows.status == ["ok", "failed", "failed"]
    assert rows.error[1] == f"input too long: {counts[0]} tokens > {LIMIT}"
    assert not rows.vectors[1:].any()


def test_fail_says_when_the_count_is_only_a_bound() -> None:
    config = EmbedConfig.model_validate({"long_text": {"strategy": "fail"}})
    plan = LongTextPlanner(config, ByteBound()).plan(["é" * 5000])
    assert plan.unit_errors[0].startswith("input too long: 10000 tokens > 8191 (UTF-8 bytes")


@pytest.mark.parametrize("strategy", ["chunk", "mean", "truncate", "fail"])
def test_short_texts_and_blanks_pass_through_unchanged(strategy: str) -> None:
    short = "Embeddings turn text into vectors."
    texts = [short, None, "", "  \n\t ", "x" * 20_000]  # 20k ASCII chars: ~2.5k tokens
    plan = planner(strategy).plan(texts)
    assert [u.row for u in plan.units] == [0, 1, 2, 3, 4]
    assert all(u.chunk_index == 0 and u.start is None and u.end is None for u in plan.units)
    assert all(got is sent for got, sent in zip(plan.texts, texts, strict=True))
    assert plan.tokens.tolist() == [
        *wordllama.count_tokens([short]),
        0,
        0,
        0,
        *wordllama.count_tokens([texts[4]]),  # type: ignore[list-item]
    ]
    assert plan.unit_errors == {}
    rows = combine(plan, answer(plan))
    assert rows.status == ["ok", "skipped", "skipped", "skipped", "ok"]
    assert rows.row.tolist() == [0, 1, 2, 3, 4]


def test_every_unit_of_the_corpus_fits_the_local_endpoint(corpus: dict[str, str | None]) -> None:
    """The local endpoint answers context_length_exceeded above 8191 of these very counts."""
    texts = list(corpus.values())
    for strategy in ("chunk", "truncate", "fail"):
        plan = planner(strategy).plan(texts)
        sendable = [t for t in plan.texts if t and not t.isspace()]
        assert max(wordllama.count_tokens(sendable)) <= LIMIT
        assert len(by_row(plan)) == len(texts)  # every row is planned


def test_combine_refuses_results_of_another_length(long_texts: list[str]) -> None:
    plan = planner().plan(long_texts)
    results = answer(planner().plan(["one text"]))
    with pytest.raises(ValueError, match=f"expected results for {len(plan.units)} units"):
        combine(plan, results)
