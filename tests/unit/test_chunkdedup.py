"""Chunk dedup within a task: each distinct chunk text is paid once, its copies carry its result."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
from support import build_config

from sparkembed.core.chunkdedup import ChunkDedup, Split, dedup_of_rows
from sparkembed.core.longtext import LongTextPlanner, Plan, Unit, combine
from sparkembed.core.streaming import EmbedResults
from sparkembed.core.types import Status

DIMS = 8
SHARED = "\n\n".join(
    f"Shared section {k}. " + " ".join(f"boiler{i % 37} clause {k}.{i}." for i in range(40)) for k in range(4)
)
TEXT_A = SHARED + "\n\n" + " ".join(f"alpha{i} tail sentence {i}." for i in range(120))
TEXT_B = SHARED + "\n\n" + " ".join(f"beta{i} other ending {i}." for i in range(120))


def planner(strategy: str = "chunk") -> LongTextPlanner:
    config = build_config(
        sets={
            "endpoint.url": "http://127.0.0.1:1/openai/v1",
            "batching.max_input_tokens": 1000,
            "long_text.chunk_tokens": 256,
            "long_text.overlap_tokens": 16,
            "long_text.strategy": strategy,
        }
    )
    return LongTextPlanner(config)


def vector_of(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).normal(size=DIMS).astype(np.float32)
    return vector / np.linalg.norm(vector)


def engine(plan: Plan, *, fail: str = "", unsent: str = "") -> EmbedResults:
    """What the engine answers for a sent plan: a vector per text, usage = the unit's tokens;
    texts containing ``fail`` fail, those containing ``unsent`` are left unsent."""
    n = len(plan.units)
    status = []
    for text in plan.texts:
        assert text is not None
        failed, left = bool(fail) and fail in text, bool(unsent) and unsent in text
        status.append(Status.FAILED if failed else Status.UNSENT if left else Status.OK)
    ok = np.array([s == Status.OK for s in status], dtype=bool)
    vectors = np.stack([vector_of(t or "") for t in plan.texts]) if n else np.zeros((0, DIMS), np.float32)
    vectors[~ok] = 0
    tokens = np.where(ok, plan.tokens, 0)
    return EmbedResults(
        vectors=vectors,
        status=status,
        error=["400 bad input" if s == Status.FAILED else None for s in status],
        prompt_tokens=tokens,
        total_tokens=tokens,
        attempts=np.ones(n, dtype=np.int32),
        request_id=[f"req-{i}" for i in range(n)],
        model=["m"] * n,
        deployment=["d"] * n,
    )


def ids_of(*ids: str) -> Callable[[int], object]:
    """The ``id_of`` of a batch of rows with these ids."""
    return lambda row: ids[row]


def test_two_long_texts_pay_each_shared_chunk_once_and_copies_carry_its_result() -> None:
    plan = planner().plan([TEXT_A, TEXT_B, "a short text"])
    chunks_a = [u.text for u in plan.units if u.row == 0]
    shared = [u.text for u in plan.units if u.row == 1 and u.text in chunks_a]
    assert len(shared) >= 2  # the shared section is cut the same way in both texts

    dedup = ChunkDedup()
    split = dedup.split(plan, ids_of("a", "b", "c"))
    assert len(split.send.units) == len(plan.units) - len(shared)
    assert len(set(split.send.texts)) == len(split.send.units)  # every text sent once
    sent = engine(split.send)
    results, dedup_of = dedup.join(split, sent)

    assert len(results) == len(plan.units)
    assert int(results.prompt_tokens.sum()) == int(sent.prompt_tokens.sum())  # usage sums to the bill
    for i, unit in enumerate(plan.units):
        np.testing.assert_array_equal(results.vectors[i], vector_of(unit.text or ""))
        assert results.status[i] == Status.OK
        copy = unit.row == 1 and unit.text in chunks_a
        assert dedup_of[i] == ("a" if copy else None)
        assert (results.prompt_tokens[i] == 0) == copy and (results.total_tokens[i] == 0) == copy
    out = combine(plan, results)
    assert dedup_of_rows(plan, dedup_of) == dedup_of and len(out.status) == len(plan.units)


def test_a_later_batch_copies_an_earlier_one_and_whole_texts_are_left_to_spark() -> None:
    long_planner, dedup = planner(), ChunkDedup()
    first = long_planner.plan([TEXT_A, "same short text"])
    second = long_planner.plan([TEXT_A + " and a different end.", "same short text"])
    split_1 = dedup.split(first, ids_of("a", "s1"))
    split_2 = dedup.split(second, ids_of("b", "s2"))  # planned before the first is answered
    results_1, dedup_1 = dedup.join(split_1, engine(split_1.send))
    sent_2 = engine(split_2.send)
    results_2, dedup_2 = dedup.join(split_2, sent_2)

    assert dedup_1 == [] and not any(results_1.prompt_tokens == 0)
    copies = [i for i, owner in enumerate(dedup_2) if owner is not None]
    assert copies and set(dedup_2[i] for i in copies) == {"a"}
    assert "same short text" in split_2.send.texts  # a whole text is sent: Spark's dedup owns it
    assert len(split_2.send.units) == len(second.units) - len(copies)
    for i in copies:
        np.testing.assert_array_equal(results_2.vectors[i], vector_of(second.units[i].text or ""))
        assert results_2.prompt_tokens[i] == 0 and results_2.request_id[i] == results_1.request_id[i]
    assert int(results_2.prompt_tokens.sum()) == int(sent_2.prompt_tokens.sum())


def test_a_copy_takes_its_payers_failure_and_a_later_batch_sends_that_text_again() -> None:
    long_planner, dedup = planner(), ChunkDedup()
    plan = long_planner.plan([TEXT_A, TEXT_B])
    poison = "boiler3 clause 0.3."  # in the shared section
    split = dedup.split(plan, ids_of("a", "b"))
    results, dedup_of = dedup.join(split, engine(split.send, fail=poison))
    failed = [i for i, s in enumerate(results.status) if s == Status.FAILED]
    assert failed and all(poison in (plan.units[i].text or "") for i in failed)
    assert {plan.units[i].row for i in failed} == {0, 1}
    for i in failed:
        assert results.error[i] == "400 bad input"
        assert dedup_of[i] == (None if plan.units[i].row == 0 else "a")

    split = dedup.split(long_planner.plan([TEXT_B]), ids_of("c"))
    assert any(poison in (text or "") for text in split.send.texts)  # a failure is not remembered
    assert not any(poison in (unit.text or "") for _, unit in _copied(split))


def _copied(split: Split) -> list[tuple[int, Unit]]:
    return [(i, split.plan.units[i]) for i, _ in split.copies]


def test_a_copy_of_an_unsent_unit_is_unsent() -> None:
    dedup = ChunkDedup()
    plan = planner().plan([TEXT_A, TEXT_B])
    split = dedup.split(plan, ids_of("a", "b"))
    results, _ = dedup.join(split, engine(split.send, unsent="boiler3 clause 0.3."))
    assert [plan.units[i].row for i, s in enumerate(results.status) if s == Status.UNSENT] == [0, 1]


def test_past_the_memory_limit_the_oldest_chunks_are_paid_again() -> None:
    long_planner = planner()
    remembered = ChunkDedup()
    forgetful = ChunkDedup(remembered_bytes=DIMS * 4 + 400)  # one unit
    for dedup in (remembered, forgetful):
        split = dedup.split(long_planner.plan([TEXT_A]), ids_of("a"))
        dedup.join(split, engine(split.send))
    plan = long_planner.plan([TEXT_B])
    assert len(remembered.split(plan, ids_of("b")).send.units) < len(plan.units)
    assert len(forgetful.split(plan, ids_of("b")).send.units) == len(plan.units)


def test_mean_rows_count_only_paid_chunks_and_keep_the_same_vector() -> None:
    plan = planner("mean").plan([TEXT_A, TEXT_B])
    plain = combine(plan, engine(plan))  # without dedup

    dedup = ChunkDedup()
    split = dedup.split(plan, ids_of("a", "b"))
    sent = engine(split.send)
    results, dedup_of = dedup.join(split, sent)
    out = combine(plan, results)

    np.testing.assert_allclose(out.vectors, plain.vectors, rtol=1e-6, atol=1e-7)
    assert out.status == plain.status == [Status.OK] * 2
    assert int(out.prompt_tokens.sum()) == int(sent.prompt_tokens.sum()) < int(plain.prompt_tokens.sum())
    assert out.prompt_tokens[0] == plain.prompt_tokens[0]  # a paid for all its chunks
    assert 0 < out.prompt_tokens[1] < plain.prompt_tokens[1]  # b paid for its own end only
    assert dedup_of_rows(plan, dedup_of) == [None, None]  # a row that paid for any chunk names no payer


def test_a_mean_row_whose_every_chunk_is_a_copy_names_the_first_chunks_payer() -> None:
    long_planner = planner("mean")
    dedup = ChunkDedup()
    first = long_planner.plan([TEXT_A])
    split = dedup.split(first, ids_of("a"))
    dedup.join(split, engine(split.send))
    plan = long_planner.plan([TEXT_A])  # the same text in a later batch (dedup off in Spark, say)
    split = dedup.split(plan, ids_of("b"))
    assert not split.send.units
    results, dedup_of = dedup.join(split, engine(split.send))
    out = combine(plan, results)
    assert dedup_of_rows(plan, dedup_of) == ["a"] and out.prompt_tokens.tolist() == [0]
    np.testing.assert_allclose(out.vectors, combine(first, engine(first)).vectors, rtol=1e-6)
