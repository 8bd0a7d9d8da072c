"""A run's shared folder: task attempts' spend files and the driver's stop request."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

from sparkembed.core.metrics import Metrics, RequestRecord
from sparkembed.core.runlog import (
    CACHE_DUE_FILE,
    TaskLog,
    attempt_name,
    cache_due_runs,
    clear_cache_due,
    mark_cache_due,
    read_peers,
    read_spend,
    read_task_metrics,
    request_stop,
    wave_lock,
)


def test_attempts_that_never_committed_still_count_in_the_spend(tmp_path: Path) -> None:
    crashed, retried = Metrics(prompt_tokens=700, requests=3, ok_rows=70), Metrics(prompt_tokens=1_000)
    with TaskLog(tmp_path, "w00000-p00001-a0-t7", crashed):
        pass  # a crash after its last write leaves the same file as a clean end
    with TaskLog(tmp_path, "w00000-p00001-a1-t9", retried):
        retried.requests, retried.throttled, retried.ok_rows = 4, 1, 100
        retried.timeline += [RequestRecord(0, 1, 60, 600, 200, 1), RequestRecord(0, 1, 40, 0, 429, 1)]
    with TaskLog(tmp_path, "w00001-p00000-a0-t12", Metrics(prompt_tokens=5)):
        pass

    spend = read_spend(tmp_path)
    assert (spend.attempts, spend.tokens_billed, spend.requests, spend.throttled) == (3, 1_705, 7, 1)
    assert (spend.rows_done, spend.texts_answered) == (170, 60)
    assert read_spend(tmp_path, wave=0).tokens_billed == 1_700
    files = sorted(p.name for p in (tmp_path / "tasks").iterdir())
    assert len(files) == 3 and all(name.endswith(".json") for name in files)
    assert json.loads((tmp_path / "tasks" / files[0]).read_text())["final"] is True


def test_a_killed_attempts_kept_answers_count_though_its_file_missed_them(tmp_path: Path) -> None:
    # Attempt 0 wrote 300 tokens down, then kept a 250-token answer for its retry and died.
    with TaskLog(tmp_path, "w00002-p00001-a0-t7", Metrics(prompt_tokens=300)):
        pass
    retry = TaskLog(tmp_path, "w00002-p00001-a1-t9", Metrics(prompt_tokens=40),
                    earlier_billed={attempt_name(2, 1, 0): 550})  # fmt: skip
    with retry:
        pass
    assert read_spend(tmp_path).tokens_billed == 550 + 40
    assert read_spend(tmp_path, wave=2, exclude=retry.path).tokens_billed == 550
    # A file that counted more (a request answered but not yet kept) is not counted again.
    with TaskLog(tmp_path, "w00003-p00000-a0-t11", Metrics(prompt_tokens=900)):
        pass
    with TaskLog(tmp_path, "w00003-p00000-a1-t12", Metrics(), earlier_billed={attempt_name(3, 0, 0): 800}):
        pass
    assert read_spend(tmp_path, wave=3).tokens_billed == 900


def test_a_waves_ended_attempts_give_its_metrics_without_accumulators(tmp_path: Path) -> None:
    """Spark Connect: what each ended attempt counted, timeline included, from its last file."""
    first = Metrics(requests=2, retries=1, throttled=1, prompt_tokens=600, ok_rows=60)
    first.timeline += [RequestRecord(0, 1, 60, 0, 429, 1), RequestRecord(1, 2, 60, 600, 200, 2)]
    second = Metrics(requests=1, prompt_tokens=50, ok_rows=5)
    second.timeline.append(RequestRecord(0, 1, 5, 50, 200, 1))
    for name, metrics in (("w00002-p00000-a0-t1", first), ("w00002-p00001-a0-t2", second),
                          ("w00003-p00000-a0-t3", Metrics(requests=9))):  # fmt: skip
        with TaskLog(tmp_path, name, metrics):
            pass
    merged = read_task_metrics(tmp_path, wave=2)
    assert (merged.requests, merged.retries, merged.throttled, merged.prompt_tokens) == (3, 1, 1, 650)
    assert sorted(r.prompt_tokens for r in merged.timeline) == [0, 50, 600]
    assert read_task_metrics(tmp_path / "nowhere", wave=2).requests == 0


def test_a_live_attempt_rewrites_its_file_and_sees_the_stop(tmp_path: Path) -> None:
    metrics = Metrics()
    with TaskLog(tmp_path, "w00000-p00000-a0-t1", metrics, interval_s=0.05) as task_log:
        assert not task_log.stop_requested()
        metrics.prompt_tokens = 42
        request_stop(tmp_path)
        deadline = time.monotonic() + 5
        while not task_log.stop_requested():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert read_spend(tmp_path).tokens_billed == 42  # written before the task ended


def test_a_task_ignores_the_terminals_ctrl_c_and_restores_the_handler(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGINT)
    with TaskLog(tmp_path, "w00000-p00000-a0-t1", Metrics()):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is before


def test_an_unwritable_folder_never_fails_the_task(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with TaskLog(blocker, "w00000-p00000-a0-t1", Metrics(prompt_tokens=1)) as task_log:
        assert not task_log.stop_requested()
    assert read_spend(blocker).attempts == 0


def test_the_wave_lock_holds_other_attempts_off_until_released(tmp_path: Path) -> None:
    """Two attempts of one wave never read and reserve at once (two open files, as two processes)."""
    order: list[str] = []
    held = threading.Event()

    def second() -> None:
        held.wait()
        with wave_lock(tmp_path, 3):
            order.append("second in")

    thread = threading.Thread(target=second)
    thread.start()
    with wave_lock(tmp_path, 3):
        held.set()
        time.sleep(0.2)
        order.append("first out")
    thread.join(5)
    assert order == ["first out", "second in"]
    with wave_lock(tmp_path, 4):  # another wave's lock is another file
        pass


def test_pacers_publish_their_charges_and_read_their_peers(tmp_path: Path) -> None:
    """Each pacer counts once (its newest file), its own files are left out, and a pacer
    whose task ended, or whose file went stale, holds its charges but no longer sends."""
    from sparkembed.core.ratelimit import HEADROOM, RateLimiter

    def pacer_file(name: str, pacer: str, written: float, final: bool, sent: float) -> None:
        charges = {"tokens": [[written - 1, sent]], "requests": [[written - 1, 1.0]]}
        charges["tokens_bound"] = sent * 10
        data = {"final": final, "written_at": written, "pacing": {"a": {"id": pacer, **charges}}}
        (tmp_path / "tasks" / f"{name}.json").write_text(json.dumps(data))

    (tmp_path / "tasks").mkdir()
    now = 1_000.0
    pacer_file("w00003-p00000-a0-t1", "mine", now, False, 9.0)
    pacer_file("w00002-p00001-a0-t2", "busy", now - 30, True, 100.0)  # its earlier task
    pacer_file("w00003-p00001-a0-t5", "busy", now - 0.2, False, 200.0)
    pacer_file("w00003-p00002-a0-t6", "ended", now - 0.5, True, 300.0)
    pacer_file("w00003-p00003-a0-t7", "dead", now - 60, False, 400.0)
    pacer_file("w00001-p00000-a0-t0", "old", now - 90, True, 500.0)  # two waves back: unread

    # Four attempts of wave 3 published: with more task slots than that, a folder some
    # executors don't see can't be told from a wave still starting, and no view is given.
    assert read_peers(tmp_path, 3, {"a": "mine"}, expected=5, now=now) == {}
    view = read_peers(tmp_path, 3, {"a": "mine", "b": "mine"}, expected=4, now=now)["a"]
    assert (view.workers, view.as_of) == (2, now - 0.2)
    assert view.rank == 1  # "busy" sorts before "mine"; the ended and the dead don't count
    assert read_peers(tmp_path, 3, {"a": "aaa"}, expected=4, now=now)["a"].rank == 0
    assert read_peers(tmp_path, 3, {"a": "zzz"}, expected=4, now=now)["a"].rank == 2  # "busy", "mine"
    assert sorted(amount for _, amount in view.tokens) == [200.0, 300.0, 400.0]
    assert sorted(amount for _, amount in view.ended_tokens) == [300.0, 400.0]
    assert len(view.requests) == 3
    # Each sending one's charges, on its own and by pacer id: one that spent past its part keeps it.
    assert view.each_tokens == (((now - 1.2, 200.0),),) and view.each_requests == (((now - 1.2, 1.0),),)
    each = read_peers(tmp_path, 3, {"a": "aaa"}, expected=4, now=now)["a"].each_tokens
    assert each == (((now - 1.2, 200.0),), ((now - 1, 9.0),))  # "busy", then "mine"
    # The tightest bound the sending ones learned, for a pacer that knows none yet.
    assert (view.tokens_bound, view.requests_bound) == (2_000.0, None)

    # A live attempt publishes its pacer's charges and hands the pacer its peers' view.
    limiter = RateLimiter(None, None)
    limiter._take(700, 0.0, 700)
    limiter._tokens.learn(10_000)
    with TaskLog(tmp_path, "w00003-p00004-a0-t8", Metrics(), pacers={"a": limiter}, wave=3) as task_log:
        assert limiter.peers is not None and limiter.peers() == task_log.peer_view("a")
        view = limiter.peers()
        # By the real clock every file above is stale: their charges are held, none sends.
        assert view is not None and (view.workers, len(view.ended_tokens)) == (1, 4)
    assert limiter.peers is None
    published = json.loads(task_log.path.read_text())["pacing"]["a"]
    assert published["id"] == limiter.id and [amount for _, amount in published["tokens"]] == [700.0]
    assert (published["tokens_bound"], published["requests_bound"]) == (10_000 * (1 - HEADROOM), None)


def test_only_the_runs_that_died_with_their_appends_due_on_this_target_and_cache_are_found(
    tmp_path: Path,
) -> None:
    mine = {"target": "/lake/a", "cache": "/lake/cache"}
    mark_cache_due(tmp_path / "run-1", **mine)  # died
    mark_cache_due(tmp_path / "run-2", **mine)
    clear_cache_due(tmp_path / "run-2")  # made its last append
    mark_cache_due(tmp_path / "run-3", target="/lake/b", cache="/lake/cache")  # another target
    mark_cache_due(tmp_path / "run-4", target="/lake/a", cache="/lake/other")  # another cache
    (tmp_path / "run-5").mkdir()
    (tmp_path / "run-5" / CACHE_DUE_FILE).write_text('{"target": "/lake/a", "ca')  # cut short
    assert cache_due_runs(tmp_path, **mine) == ["run-1"]
    clear_cache_due(tmp_path / "run-2")  # cleared twice: nothing to do
    assert cache_due_runs(tmp_path / "no such folder", **mine) == []
