"""Chunk dedup within one task: a chunk's text is sent once, and later chunks with that text copy it.

Whole texts are deduplicated across the run in Spark, by the hash of the full text
(:mod:`sparkembed.spark.dedup`). Chunks are cut in the task that sends them
(:mod:`sparkembed.core.longtext`), so two *different* long texts that share a chunk (a
boilerplate section, a common prefix) can only be matched where both are planned: in one task.
:class:`ChunkDedup` sees every unit of a long text (a chunk, or a truncated prefix) that its
task plans, in stream order; :mod:`sparkembed.spark.chunkgroups` sends texts that share a chunk
to one task. The first unit with a given text is sent and pays; a later unit
with the same text is not sent: it copies the first one's vector, status, error, attempts,
request id, model and deployment, with usage 0, and names the id of the row that paid.

Short (whole) texts are left to the Spark dedup. A copy takes whatever its payer got: a
payer that failed fails it with the same reason, one left unsent by a stopping run leaves it
unsent. Only ``ok`` results are remembered for later batches (a later unit whose payer failed
is sent again), and at most :data:`REMEMBERED_BYTES` of them: the oldest are forgotten
first, so a repeat seen long after its first occurrence may be paid for again.

Example::

    dedup = ChunkDedup()
    split = dedup.split(plan, id_of)             # per planned batch, in stream order
    results = engine.embed(split.send)           # only the units to pay for
    results, dedup_of = dedup.join(split, results)  # one result per unit of plan again
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sparkembed.core.batching import is_blank
from sparkembed.core.longtext import Plan
from sparkembed.core.streaming import EmbedResults
from sparkembed.core.types import Status

REMEMBERED_BYTES = 64 << 20
"""Memory for the paid units a task keeps for later batches to copy (about 10,000 of 1536 floats)."""
_ENTRY_BYTES = 400
"""What a kept unit costs besides its vector: its record, key and dict slot, about."""


class _Paid:
    """A unit that pays for its text: who paid, and its result once its batch is answered."""

    __slots__ = ("key", "owner", "status", "error", "vector", "attempts", "request_id", "model", "deployment")

    def __init__(self, key: bytes, owner: object) -> None:
        self.key = key
        self.owner = owner
        self.status: str = Status.UNSENT
        self.error: str | None = None
        self.vector: np.ndarray | None = None
        self.attempts = 0
        self.request_id: str | None = None
        self.model: str | None = None
        self.deployment: str | None = None

    def take(self, results: EmbedResults, i: int) -> None:
        self.status, self.error = results.status[i], results.error[i]
        if self.status == Status.OK:
            self.vector = results.vectors[i].copy()  # a view would keep the batch's matrix alive
        self.attempts = int(results.attempts[i])
        self.request_id, self.model = results.request_id[i], results.model[i]
        self.deployment = results.deployment[i]


@dataclass(frozen=True)
class Split:
    """One planned batch, split into what to send and what to copy.

    Attributes:
        plan: the batch's full plan (for :func:`~sparkembed.core.longtext.combine`).
        send: the units to send, in order: a plan of ``plan``'s units that are not copies.
        sent: int64 position in ``plan.units`` of each unit of ``send``.
        pays: (position in ``send``, its record) of each unit that is the first with its text.
        copies: (position in ``plan.units``, the record it copies) of each copy.
    """

    plan: Plan
    send: Plan
    sent: np.ndarray
    pays: list[tuple[int, _Paid]]
    copies: list[tuple[int, _Paid]]


class ChunkDedup:
    """Sends each distinct long-text unit once per task; see the module docstring.

    Args:
        remembered_bytes: memory for the ok paid units kept for later batches (their vectors,
            and :data:`_ENTRY_BYTES` each besides), at most.
    """

    __slots__ = ("_known", "_bytes", "_limit")

    def __init__(self, remembered_bytes: int = REMEMBERED_BYTES) -> None:
        self._known: dict[bytes, _Paid] = {}  # insertion order: the oldest is forgotten first
        self._bytes = 0
        self._limit = remembered_bytes

    def split(self, plan: Plan, id_of: Callable[[int], object]) -> Split:
        """Which units of ``plan`` to send; call in stream order, then :meth:`join` its results.

        Args:
            plan: a planned batch.
            id_of: the id of a row of the batch (``Unit.row``), asked for each unit that pays.
        """
        sent: list[int] = []
        pays: list[tuple[int, _Paid]] = []
        copies: list[tuple[int, _Paid]] = []
        for position, unit in enumerate(plan.units):
            text = unit.text
            if unit.start is None or text is None or is_blank(text):  # a whole text, or nothing to send
                sent.append(position)
                continue
            key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            paid = self._known.get(key)
            if paid is not None:
                copies.append((position, paid))
                continue
            paid = self._known[key] = _Paid(key, id_of(unit.row))
            pays.append((len(sent), paid))
            sent.append(position)
        if not copies:
            return Split(plan, plan, np.arange(len(plan.units), dtype=np.int64), pays, copies)
        send = Plan([plan.units[i] for i in sent], strategy=plan.strategy)
        return Split(plan, send, np.array(sent, dtype=np.int64), pays, copies)

    def join(self, split: Split, results: EmbedResults) -> tuple[EmbedResults, list[object]]:
        """One result per unit of ``split.plan``, and per unit the id that paid for its copy.

        ``results`` are the engine's for ``split.send``; the batches of earlier splits must have
        been joined already (the engine yields them in order). A copy gets its payer's result
        with usage 0; its entry in the list is the payer's id, None for a unit that was sent
        (the list is empty when no unit is a copy).
        """
        for i, paid in split.pays:
            paid.take(results, i)
            self._remember(paid)
        if not split.copies:
            return results, []
        n = len(split.plan.units)
        dedup_of: list[object] = [None] * n
        copied = [paid.vector.size for _, paid in split.copies if paid.vector is not None]
        dims = max([results.vectors.shape[1], *copied])
        full = EmbedResults(
            vectors=np.zeros((n, dims), dtype=np.float32),
            status=[Status.FAILED] * n,
            error=[None] * n,
            prompt_tokens=np.zeros(n, dtype=np.int64),
            total_tokens=np.zeros(n, dtype=np.int64),
            attempts=np.zeros(n, dtype=np.int32),
            request_id=[None] * n,
            model=[None] * n,
            deployment=[None] * n,
        )
        if results.vectors.shape[1] == dims:
            full.vectors[split.sent] = results.vectors
        full.prompt_tokens[split.sent] = results.prompt_tokens
        full.total_tokens[split.sent] = results.total_tokens
        full.attempts[split.sent] = results.attempts
        for i, position in enumerate(split.sent.tolist()):
            full.status[position], full.error[position] = results.status[i], results.error[i]
            full.request_id[position], full.model[position] = results.request_id[i], results.model[i]
            full.deployment[position] = results.deployment[i]
        for position, paid in split.copies:
            full.status[position], full.error[position] = paid.status, paid.error
            if paid.vector is not None:
                full.vectors[position] = paid.vector
            full.attempts[position] = paid.attempts
            full.request_id[position], full.model[position] = paid.request_id, paid.model
            full.deployment[position] = paid.deployment
            dedup_of[position] = paid.owner
        return full, dedup_of

    def _remember(self, paid: _Paid) -> None:
        """Keep an ok result for later batches, within the byte limit; forget one that is not ok."""
        if self._known.get(paid.key) is not paid:
            return  # forgotten already
        if paid.vector is None:
            del self._known[paid.key]
            return
        self._bytes += paid.vector.nbytes + _ENTRY_BYTES
        while self._bytes > self._limit and self._known:
            oldest = self._known.pop(next(iter(self._known)))
            if oldest.vector is not None:
                self._bytes -= oldest.vector.nbytes + _ENTRY_BYTES


def dedup_of_rows(plan: Plan, dedup_of: Sequence[object]) -> list[object]:
    """``dedup_of`` per output row of :func:`~sparkembed.core.longtext.combine`, from the units'.

    A unit is one output row, except under ``mean``: there a source row's output row names the
    id that paid for its first unit only when every one of its units is a copy; a row that
    paid for any of its units itself names none (its usage counts what it paid). Empty when
    ``dedup_of`` is (no copies).
    """
    if not dedup_of or plan.strategy != "mean":
        return list(dedup_of)
    rows: list[object] = []
    first = 0
    units = plan.units
    for i in range(1, len(units) + 1):
        if i == len(units) or units[i].row != units[first].row:
            group = dedup_of[first:i]
            rows.append(group[0] if all(owner is not None for owner in group) else None)
            first = i
    return rows
