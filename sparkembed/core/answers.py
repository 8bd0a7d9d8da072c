"""A task attempt's answers, kept as they arrive, so the attempt that retries a crashed one pays
again only for the requests that were in flight.

    <run.log_dir>/.answers/<host>-<pid>.slab     one per Python worker process, reused

Each answered request is appended to the process's slab (text digest, vector, the row's share
of the usage, the request's attempts, id, model and deployment) before its rows count as done, and the
slab's header then records which run and task it holds and how many bytes are complete. When
a Python worker dies, the next attempt of the same task reads the slab the dead process left
(its complete requests) and fills those texts without sending them.

A process writes each task, of every run, from the start of the same file, over pages the
kernel already holds: about 0.5 ms for a 6 MB answer, where a new file's pages cost 17 ms.

Pure numpy: no Spark here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

SUFFIX = ".slab"
_HEADER = struct.Struct("<8sB40siiiq")  # magic, state, run id, wave, partition, attempt, bytes
_ANSWER = struct.Struct("<iiii")  # texts, dimensions, HTTP attempts, bytes of [request id, model]
_HEADER_SIZE = 128
_MAGIC = b"SEANSW03"
_RUNNING, _DONE = 1, 2


class Answer(NamedTuple):
    vector: np.ndarray
    prompt_tokens: int
    total_tokens: int
    attempts: int
    request_id: str | None
    model: str | None
    deployment: str | None = None


class _Slab:
    """This process's file, written at an offset: no truncation, so its pages stay cached."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.position = _HEADER_SIZE

    def header(self, state: int, run_id: str, task: tuple[int, int, int]) -> None:
        os.pwrite(self.fd, _HEADER.pack(_MAGIC, state, run_id.encode()[:40], *task, self.position), 0)


_slabs: dict[tuple[int, str], _Slab] = {}
FOLDER = ".answers"


class AnswerLog:
    """Answers of this attempt (kept) and of a crashed earlier attempt of the same task (looked up).

    Args:
        log_dir: ``run.log_dir``, seen by every process of the run.
        run_id: the run.
        task: (wave, partition, attempt) of this attempt.

    Attributes:
        earlier_billed: prompt tokens of the answers each crashed attempt kept, by its attempt
            number. They were billed to it, whether or not its spend file counted them before
            it died (:func:`sparkembed.core.runlog.read_spend` takes the larger).
    """

    __slots__ = ("_slab", "_run_id", "_task", "_known", "earlier_billed")

    def __init__(self, log_dir: str | Path, run_id: str, task: tuple[int, int, int]) -> None:
        folder = Path(log_dir) / FOLDER
        self._run_id = run_id
        self._task = task
        self._known, self.earlier_billed = _earlier_answers(folder, run_id, task)
        if self._known:
            log.info("reusing %d answers of a crashed attempt of this task", len(self._known))
        self._slab = _process_slab(folder)

    def lookup(self, text: str) -> Answer | None:
        """A crashed attempt's answer for this text, if it had one."""
        if not self._known:
            return None
        return self._known.get(_digest(text))

    def record(
        self,
        texts: list[str],
        vectors: np.ndarray,
        prompt_tokens: np.ndarray,
        total_tokens: np.ndarray,
        *,
        attempts: int,
        request_id: str | None,
        model: str | None,
        deployment: str | None = None,
    ) -> None:
        """Keep one answered request: ``vectors[i]`` and the token shares belong to ``texts[i]``."""
        slab = self._slab
        if slab is None:
            return
        # A fixed head, then digests, vectors and token shares straight from their buffers
        # (no copy in Python), then the request id and model.
        names = json.dumps([request_id, model, deployment]).encode()
        parts: list[bytes | memoryview] = [
            _ANSWER.pack(*vectors.shape, attempts, len(names)),
            b"".join(_digest(t) for t in texts),
            _raw(vectors, np.float32),
            _raw(prompt_tokens, np.int64),
            _raw(total_tokens, np.int64),
            names,
        ]
        try:
            slab.position += os.pwritev(slab.fd, parts, slab.position)
            # After the data: a crash never claims a half-written answer.
            slab.header(_RUNNING, self._run_id, self._task)
        except OSError as exc:  # never fail the task for its safety net
            log.debug("cannot keep answers in %s: %s", slab.path, exc)
            self._slab = None

    def finish(self) -> None:
        """The task ended well: what the slab holds is no longer needed by anyone."""
        if self._slab is not None:
            with contextlib.suppress(OSError):
                self._slab.header(_DONE, self._run_id, self._task)


def _process_slab(folder: Path) -> _Slab | None:
    """This process's slab in ``folder``, ready for a new task from its start.

    A slab still holding a task that did not end well (it raised, and its retry may come) is
    set aside under another name for that retry, and a new one is started.
    """
    key = (os.getpid(), str(folder))
    for other in [k for k in _slabs if k != key]:  # an earlier run's, or a parent process's
        with contextlib.suppress(OSError):
            os.close(_slabs.pop(other).fd)
    slab = _slabs.get(key)
    try:
        if slab is not None and _state(slab.path) == _RUNNING:
            os.close(slab.fd)
            slab.path.rename(slab.path.with_name(f"{slab.path.stem}-kept-{os.urandom(4).hex()}{SUFFIX}"))
            slab = None
        if slab is None:
            slab = _slabs[key] = _Slab(folder / f"{socket.gethostname()}-{os.getpid()}{SUFFIX}")
    except OSError as exc:
        log.debug("cannot keep answers in %s: %s", folder, exc)
        _slabs.pop(key, None)
        return None
    slab.position = _HEADER_SIZE
    return slab


def _state(path: Path) -> int:
    with open(path, "rb") as file:
        head = file.read(_HEADER.size)
    return _HEADER.unpack(head)[1] if len(head) == _HEADER.size else 0


def _earlier_answers(
    folder: Path, run_id: str, task: tuple[int, int, int]
) -> tuple[dict[bytes, Answer], dict[int, int]]:
    """Answers in slabs left running by another attempt of the same run, wave and partition,
    and the prompt tokens each of those attempts was answered for."""
    wave, partition, attempt = task
    found: dict[bytes, Answer] = {}
    billed: dict[int, int] = {}
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            with open(path, "rb") as file:
                magic, state, run, w, p, a, complete = _HEADER.unpack(file.read(_HEADER.size))
                same_task = run.rstrip(b"\0") == run_id.encode()[:40] and (w, p) == (wave, partition)
                if magic != _MAGIC or state != _RUNNING or not same_task or a == attempt:
                    continue
                file.seek(_HEADER_SIZE)
                data = file.read(complete - _HEADER_SIZE)
        except (OSError, struct.error):
            continue
        answers, tokens = _read(data)
        found.update(answers)
        billed[a] = billed.get(a, 0) + tokens
    return found, billed


def _raw(array: np.ndarray, dtype: type) -> memoryview:
    return np.ascontiguousarray(array, dtype=dtype).data.cast("B")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _read(data: bytes) -> tuple[dict[bytes, Answer], int]:
    """Every answer in the complete part of a slab, and their prompt tokens (each request's
    usage, shared over its texts: a text sent twice counts twice)."""
    found: dict[bytes, Answer] = {}
    tokens = 0
    offset = 0
    while offset + _ANSWER.size <= len(data):
        n, dims, attempts, names_size = _ANSWER.unpack_from(data, offset)
        offset += _ANSWER.size
        digests = data[offset : offset + 32 * n]
        offset += 32 * n
        vectors = np.frombuffer(data, np.float32, n * dims, offset).reshape(n, dims)
        offset += 4 * n * dims
        prompt = np.frombuffer(data, np.int64, n, offset)
        total = np.frombuffer(data, np.int64, n, offset + 8 * n)
        tokens += int(prompt.sum())
        offset += 16 * n
        request_id, model, *rest = json.loads(data[offset : offset + names_size])
        deployment = rest[0] if rest else None
        offset += names_size
        for i in range(n):
            found[digests[32 * i : 32 * i + 32]] = Answer(
                vectors[i].copy(), int(prompt[i]), int(total[i]), attempts, request_id, model, deployment
            )
    return found, tokens


def remove_stale(log_dir: str | Path, older_than_s: float = 86_400) -> None:
    """Delete slabs no process has written for a day (their processes are gone)."""
    cutoff = time.time() - older_than_s
    for path in (Path(log_dir) / FOLDER).glob(f"*{SUFFIX}"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
