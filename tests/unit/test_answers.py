"""A crashed attempt's answers, kept for the attempt that retries it (the engine's use of them is
tested in test_engine.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparkembed.core.answers import AnswerLog


def vector_for(text: str) -> np.ndarray:
    return np.frombuffer(text.encode().ljust(16, b"."), dtype=np.uint8)[:16].astype(np.float32) / 7


def answer(log: AnswerLog, batch: list[str], request_id: str) -> None:
    vectors = np.stack([vector_for(t) for t in batch])
    tokens = np.arange(1, len(batch) + 1, dtype=np.int64)
    log.record(batch, vectors, tokens, tokens + 1, attempts=2, request_id=request_id, model="m")


def slabs(run: Path) -> list[Path]:
    return sorted((run / ".answers").glob("*.slab"))


def test_a_crashed_attempts_complete_answers_are_found_by_its_retry(tmp_path: Path) -> None:
    crashed = AnswerLog(tmp_path, "run-1", (3, 1, 0))
    answer(crashed, ["a", "b"], "req-1")
    answer(crashed, ["c", "d"], "req-2")
    [slab] = slabs(tmp_path)
    with open(slab, "ab") as file:  # the kill came while a third answer was being written
        file.write(b"\x00half an answer")

    retry = AnswerLog(tmp_path, "run-1", (3, 1, 1))
    found = retry.lookup("d")
    assert found is not None
    np.testing.assert_array_equal(found.vector, vector_for("d"))
    assert (found.prompt_tokens, found.total_tokens, found.attempts) == (2, 3, 2)
    assert (found.request_id, found.model) == ("req-2", "m")
    assert retry.lookup("z") is None
    assert retry.earlier_billed == {0: 1 + 2 + 1 + 2}  # what attempt 0 was answered for, whole answers only
    assert AnswerLog(tmp_path, "run-1", (3, 2, 1)).lookup("a") is None  # another partition's task
    assert AnswerLog(tmp_path, "run-2", (3, 1, 1)).lookup("a") is None  # another run's
    assert len(slabs(tmp_path)) == 2  # the crashed one set aside, a new one for the retry


def test_answers_of_a_task_that_ended_well_are_not_reused(tmp_path: Path) -> None:
    done = AnswerLog(tmp_path, "run-1", (0, 0, 0))
    answer(done, ["a"], "req-1")
    done.finish()
    assert AnswerLog(tmp_path, "run-1", (0, 0, 1)).lookup("a") is None
    # The next task of this process writes over the same file: its pages are reused.
    following = AnswerLog(tmp_path, "run-1", (0, 1, 0))
    answer(following, ["b"], "req-2")
    assert len(slabs(tmp_path)) == 1
    assert AnswerLog(tmp_path, "run-1", (0, 1, 1)).lookup("b") is not None
