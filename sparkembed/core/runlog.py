"""A run's shared folder: what every task attempt has spent, and the driver's stop request.

::

    <run.log_dir>/<run_id>/tasks/w00003-p00001-a0-t42-1f2e3d4c.json   one per task attempt
    <run.log_dir>/<run_id>/STOP                                       the driver asks tasks to stop
    <run.log_dir>/<run_id>/CACHE_DUE                                  waves whose cache appends are due

Each task attempt rewrites its file as soon as a response is counted (and at least every
:data:`WRITE_EVERY_S` seconds, and once more when it ends), so the files count what was
billed even for attempts that crashed, lost a race or were never committed: a killed
attempt leaves out at most the answers that were on the wire when it died (and any it kept
for its retry but had not yet written down: the retry's file names those). The driver
reads them for live progress and for the run's spend, and writes ``STOP`` on Ctrl-C or
SIGTERM: tasks then send no new request, let the ones in flight finish, and end with
what is done.

The files also carry each attempt's pacing: its rate limiter's charges of the last two windows,
per deployment. Every :data:`PACE_EVERY_S` seconds an attempt publishes its own and reads
those of the current and previous wave's attempts, so each pacer knows what its peers sent
and how many of them are sending (:class:`~sparkembed.core.ratelimit.PeerView`).

The folder must be one the driver and the executors both see (local mode, a standalone
worker on the same host, ``/dbfs/...`` on Databricks). Where it is not, tasks write their
files locally and nothing fails: the driver then counts only what committed tasks report,
and a stop waits for the wave in flight. Pure stdlib: no Spark here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from sparkembed.core.metrics import Metrics
from sparkembed.core.ratelimit import Charges, PeerView, RateLimiter

log = logging.getLogger(__name__)

WRITE_EVERY_S = 1.0
"""How often, at least, a task attempt rewrites its spend file and looks for ``STOP``."""
PACE_EVERY_S = 0.25
"""With pacers to publish, how often an attempt rewrites its file and reads its peers'."""
ALIVE_S = 5.0
"""An attempt whose file is older than this, and not final, no longer counts as sending."""
STOP_FILE = "STOP"
CACHE_DUE_FILE = "CACHE_DUE"
"""The driver's mark, from its first wave until its last cache append: a crash leaves it."""
TASKS_DIR = "tasks"


@dataclass(frozen=True)
class Spend:
    """What task attempts reported, summed.

    Attributes:
        attempts: task attempt files read.
        requests: HTTP attempts sent.
        throttled: attempts answered 429.
        tokens_billed: ``usage.prompt_tokens`` of every successful response, whether
            its task attempt committed or not.
        texts_answered: inputs of those responses (a chunk of a long text counts as one).
        rows_done: output rows the attempts finished (ok, skipped or failed).
        tokens_reserved: estimated tokens of requests in flight, when a budget is kept
            (:mod:`sparkembed.core.budget`).
    """

    attempts: int = 0
    requests: int = 0
    throttled: int = 0
    tokens_billed: int = 0
    texts_answered: int = 0
    rows_done: int = 0
    tokens_reserved: int = 0


@contextlib.contextmanager
def wave_lock(run_dir: str | Path, wave: int) -> Iterator[None]:
    """Hold the wave's lock file (``flock``): one task attempt of this machine's executors at
    a time reads the others' spend and reserves. Where the file system has no locks (some
    cloud mounts), nothing is held: attempts checking at the same moment may then both take
    the last room, one request each."""
    path = Path(run_dir) / TASKS_DIR / f"wave-{wave}.lock"
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def request_stop(run_dir: str | Path) -> None:
    """Driver side: ask every task of the run to stop sending."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STOP_FILE).touch()


def attempt_name(wave: int, partition: int, attempt: int) -> str:
    """How a task attempt's spend file starts (Spark's task attempt id and a suffix follow)."""
    return f"w{wave:05d}-p{partition:05d}-a{attempt}"


def read_spend(run_dir: str | Path, *, wave: int | None = None, exclude: Path | None = None) -> Spend:
    """The sum over task attempt files (of one wave, if given; but ``exclude``); unreadable ones count 0.

    An attempt killed between an answer and its next write leaves a file short of that answer.
    Its retry, which reused the answer, says what the dead attempt was answered for
    (``earlier_billed``): the larger of that and the dead attempt's own file counts.
    """
    pattern = "*.json" if wave is None else f"w{wave:05d}-*.json"
    keys = ("requests", "throttled", "tokens_billed", "texts_answered", "rows_done", "tokens_reserved")
    totals = dict.fromkeys(("attempts", *keys), 0)
    billed: dict[str, int] = {}  # by attempt_name
    vouched: dict[str, int] = {}
    for path in (Path(run_dir) / TASKS_DIR).glob(pattern):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a file being replaced right now is read at the next look
        for name, tokens in data.get("earlier_billed", {}).items():
            vouched[name] = max(vouched.get(name, 0), int(tokens))
        if path == exclude:
            continue
        totals["attempts"] += 1
        for key in keys:
            totals[key] += int(data.get(key, 0))
        name = path.name.split("-t", 1)[0]
        billed[name] = billed.get(name, 0) + int(data.get("tokens_billed", 0))
    totals["tokens_billed"] += sum(max(0, tokens - billed.get(name, 0)) for name, tokens in vouched.items())
    return Spend(**totals)


def read_peers(
    run_dir: str | Path, wave: int, mine: dict[str, str], *, expected: int = 1, now: float | None = None
) -> dict[str, PeerView]:
    """What the other pacers of the wave and the one before published, per deployment.

    Args:
        mine: deployment name -> this process's pacer id, left out of its own view.
        expected: task attempts of ``wave`` that must have published before any view is
            given (the task slots): fewer means the folder is not shared by every executor,
            or the wave is still starting, and each pacer keeps to its share instead.
        now: the wall clock (``time.time()``).

    A pacer that moved on to another task attempt is counted once, from its newest file.
    """
    newest: dict[tuple[str, str], tuple[float, bool, dict[str, Any]]] = {}
    published = 0
    for prefix in {wave, max(0, wave - 1)}:
        for path in (Path(run_dir) / TASKS_DIR).glob(f"w{prefix:05d}-*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            published += prefix == wave and "pacing" in data
            written, final = float(data.get("written_at", 0.0)), bool(data.get("final"))
            for route, pacer in (data.get("pacing") or {}).items():
                key = (route, str(pacer.get("id")))
                if key not in newest or newest[key][0] < written:
                    newest[key] = (written, final, pacer)
    if published < expected:
        return {}
    now = time.time() if now is None else now
    views = {}
    for route, own in mine.items():
        workers, rank, as_of = 1, 0, math.inf
        sending: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
        ended: tuple[list[tuple[float, float]], list[tuple[float, float]]] = ([], [])
        each: dict[str, tuple[Charges, Charges]] = {}  # the sending ones', by pacer id
        bounds: dict[str, list[float]] = {"tokens_bound": [], "requests_bound": []}
        for (name, pacer_id), (written, final, pacer) in sorted(newest.items()):
            if name != route or pacer_id == own:
                continue
            alive = not final and now - written < ALIVE_S
            if alive:  # known up to its last write
                workers += 1
                rank += pacer_id < own
                as_of = min(as_of, written)
                for kind, learned in bounds.items():
                    if pacer.get(kind) is not None:
                        learned.append(float(pacer[kind]))
            tokens, requests = (
                tuple((float(when), float(amount)) for when, amount in pacer.get(kind, []))
                for kind in ("tokens", "requests")
            )
            kept = sending if alive else ended
            kept[0].extend(tokens)
            kept[1].extend(requests)
            if alive:
                each[pacer_id] = (tokens, requests)
        views[route] = PeerView(
            workers,
            tuple(sorted(sending[0] + ended[0])),
            tuple(sorted(sending[1] + ended[1])),
            as_of,
            tuple(sorted(ended[0])),
            tuple(sorted(ended[1])),
            min(bounds["tokens_bound"], default=None),
            min(bounds["requests_bound"], default=None),
            rank,
            tuple(tokens for tokens, _ in each.values()),
            tuple(requests for _, requests in each.values()),
        )
    return views


def read_task_metrics(run_dir: str | Path, *, wave: int) -> Metrics:
    """The metrics of the wave's task attempts that ended (their last spend files), merged.

    For a session without accumulators (Spark Connect) whose rows never pass the driver.
    Every attempt that ended counts, failed ones too: their requests were sent and billed.
    """
    total = Metrics()
    for path in (Path(run_dir) / TASKS_DIR).glob(f"w{wave:05d}-*.json"):
        try:
            data = json.loads(path.read_text()).get("metrics")
        except (OSError, ValueError):
            continue
        if data:
            total.merge(Metrics.from_dict(data))
    return total


class TaskLog:
    """Executor side: keeps one task attempt's spend file current; tells whether to stop.

    Never fails the task: a folder that cannot be written only leaves the driver less
    to read.

    Example::

        with TaskLog(run_dir, "w00003-p00001-a0-t42", metrics) as task_log:
            for results in embedder.embed_stream(chunks, metrics, stop=task_log.stop_requested):
                ...

    Args:
        run_dir: the run's folder.
        name: names the wave, partition and task attempt.
        metrics: the attempt's live counters, read every ``interval_s`` seconds.
        interval_s: seconds between writes.
        reserved: tokens of requests in flight (a budget's reservations), written beside the spend.
        pacers: this process's rate limiters by deployment: published, and told their peers'
            view while the attempt runs (then every ``PACE_EVERY_S`` seconds, not ``interval_s``).
        wave: the wave whose peers the pacers count (with the one before).
        expected: the task slots: see :func:`read_peers`.
        earlier_billed: tokens billed to crashed attempts of this task, by :func:`attempt_name`,
            as the answers they kept show (:class:`~sparkembed.core.answers.AnswerLog`).
    """

    __slots__ = (
        "_dir", "_path", "_metrics", "_interval_s", "_stop", "_done", "_wake", "_thread", "_sigint",
        "_seen", "_answered", "_reserved", "_writing", "_pacers", "_wave", "_expected", "_views",
        "_earlier",
    )  # fmt: skip

    def __init__(
        self,
        run_dir: str | Path,
        name: str,
        metrics: Metrics,
        interval_s: float = WRITE_EVERY_S,
        reserved: Callable[[], int] | None = None,
        pacers: dict[str, RateLimiter] | None = None,
        wave: int = 0,
        expected: int = 1,
        earlier_billed: dict[str, int] | None = None,
    ):
        self._earlier = dict(earlier_billed or {})
        self._reserved = reserved
        self._pacers = dict(pacers or {})
        self._wave = wave
        self._expected = expected
        self._views: dict[str, PeerView] = {}
        if self._pacers:
            interval_s = min(interval_s, PACE_EVERY_S)
        self._dir = Path(run_dir)
        self._path = self._dir / TASKS_DIR / f"{name}-{uuid.uuid4().hex[:8]}.json"
        self._metrics = metrics
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._done = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sparkembed-task-log", daemon=True)
        self._sigint: Any = None
        self._seen = 0  # timeline records already summed into _answered
        self._writing = threading.Lock()
        self._answered = 0

    @property
    def path(self) -> Path:
        """This attempt's spend file."""
        return self._path

    def changed(self) -> None:
        """Write the spend file now: a reservation was made, and other attempts must see it
        before they reserve (:class:`~sparkembed.core.budget.BudgetGuard`)."""
        self._write(final=False)

    def peer_view(self, deployment: str) -> PeerView | None:
        """What the other pacers on ``deployment`` sent, as last read; None before the first read."""
        return self._views.get(deployment)

    def stop_requested(self) -> bool:
        """Whether the driver asked the run to stop (seen within ``interval_s``)."""
        return self._stop.is_set()

    def __enter__(self) -> TaskLog:
        # A Ctrl-C in the terminal reaches Spark's Python workers too (same process group):
        # the task must not die with its paid work. The driver's STOP file stops it instead.
        with contextlib.suppress(ValueError):  # not the main thread: signals are not ours
            self._sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._look()
        for name, pacer in self._pacers.items():
            pacer.peers = functools.partial(self.peer_view, name)
        self._metrics.on_record = self._wake.set  # an answer was counted: write it down now
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._wake.set()
        self._thread.join(timeout=self._interval_s + 5)
        for pacer in self._pacers.values():
            pacer.peers = None
        self._metrics.on_record = None
        self._write(final=True)
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._done.is_set():
                return
            self._look()

    def _look(self) -> None:
        self._write(final=False)
        if self._pacers:
            mine = {name: pacer.id for name, pacer in self._pacers.items()}
            with contextlib.suppress(OSError):
                self._views = read_peers(self._dir, self._wave, mine, expected=self._expected)
        if not self._stop.is_set() and (self._dir / STOP_FILE).exists():
            self._stop.set()

    def _write(self, *, final: bool) -> None:
        with self._writing:
            self._write_now(final)

    def _write_now(self, final: bool) -> None:
        m = self._metrics
        records = m.timeline[self._seen :]  # the loop thread only appends
        self._seen += len(records)
        self._answered += sum(r.n_inputs for r in records if r.status == 200)
        data: dict[str, Any] = {
            "requests": m.requests,
            "throttled": m.throttled,
            "tokens_billed": m.prompt_tokens,
            "texts_answered": self._answered,
            "rows_done": m.ok_rows + m.skipped_rows + m.failed_rows,
            "tokens_reserved": self._reserved() if self._reserved is not None else 0,
            "final": final,
            "written_at": time.time(),
        }
        if self._earlier:
            data["earlier_billed"] = self._earlier
        if self._pacers:
            data["pacing"] = {
                name: {"id": p.id, **p.sent(), **p.learned()} for name, p in self._pacers.items()
            }
        if final:  # the whole account, once: for sessions without accumulators (Spark Connect)
            data["metrics"] = m.to_dict(timeline=True)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            partial = self._path.with_suffix(".tmp")
            partial.write_text(json.dumps(data))
            os.replace(partial, self._path)  # readers never see half a file
        except OSError as exc:
            log.debug("cannot write %s: %s", self._path, exc)


def mark_cache_due(run_dir: str | Path, *, target: str, cache: str) -> None:
    """Driver side, before a run's first wave: the appends of its waves to ``cache`` are due."""
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CACHE_DUE_FILE).write_text(json.dumps({"target": target, "cache": cache}))


def clear_cache_due(run_dir: str | Path) -> None:
    """Driver side: every wave of the run that committed has made its cache append."""
    with contextlib.suppress(FileNotFoundError):
        (Path(run_dir) / CACHE_DUE_FILE).unlink()


def cache_due_runs(log_dir: str | Path, *, target: str, cache: str) -> list[str]:
    """The runs under ``log_dir`` whose mark names ``target`` and ``cache``: runs that died (or
    still run) between their first wave and their last cache append."""
    found = []
    for path in sorted(Path(log_dir).glob(f"*/{CACHE_DUE_FILE}")):
        try:
            mark = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a mark cut short: its run died before its first wave
        if mark.get("target") == target and mark.get("cache") == cache:
            found.append(path.parent.name)
    return found
