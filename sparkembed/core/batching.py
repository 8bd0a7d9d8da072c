"""Rows to requests: blank detection, packing, and apportioning usage back to rows.

Packing closes a request when it holds ``max_inputs`` inputs or when the next
input would push its estimated tokens over ``max_request_tokens``. An input that
alone exceeds the token cap still goes, alone: the service, not the packer,
decides whether it is too long.

    >>> packer = Packer(max_inputs=2, max_request_tokens=100)
    >>> [packer.add(row, 5) for row in "abc"], packer.flush()
    ([None, ['a', 'b'], None], ['c'])
    >>> apportion(10, [1, 1, 1]).tolist()
    [4, 3, 3]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")

SKIPPED_EMPTY = "skipped: empty text"


def is_blank(text: object) -> bool:
    """True for None, NaN/NA, and empty or whitespace-only strings: such rows are never sent.

    Other non-string values are not blank; the engine fails them rather than hide them.
    """
    if text is None:
        return True
    if isinstance(text, str):
        return not text or text.isspace()  # isspace() avoids strip()'s copy of long texts
    if isinstance(text, float):
        return math.isnan(text)
    return type(text).__name__ in ("NAType", "NaTType")  # pandas missing values


class Packer(Generic[T]):
    """Incremental packer: feed inputs one at a time, receive the requests they close.

    Example:
        packer = Packer(max_inputs=1024, max_request_tokens=300_000)
        for item, tokens in rows:
            if request := packer.add(item, tokens):
                send(request)
        if last := packer.flush():
            send(last)
    """

    __slots__ = ("max_inputs", "max_request_tokens", "_items", "_tokens")

    def __init__(self, *, max_inputs: int, max_request_tokens: int) -> None:
        if max_inputs < 1 or max_request_tokens < 1:
            raise ValueError("max_inputs and max_request_tokens must be >= 1")
        self.max_inputs = max_inputs
        self.max_request_tokens = max_request_tokens
        self._items: list[T] = []
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, tokens: int) -> list[T] | None:
        """Add one input of ``tokens`` estimated tokens; return the request it closed, if any.

        At most one closes per input: a request closed by the token cap leaves only
        this input open, which reaches ``max_inputs`` only if that is 1, and then the
        open request was already empty.
        """
        if self._items and self._tokens + tokens > self.max_request_tokens:
            closed = self.flush()
            self._items.append(item)
            self._tokens = tokens
            return closed
        self._items.append(item)
        self._tokens += tokens
        return self.flush() if len(self._items) >= self.max_inputs else None

    def flush(self) -> list[T]:
        """Close and return the open request (empty if none)."""
        items, self._items, self._tokens = self._items, [], 0
        return items


def apportion(total: int, weights: Sequence[int] | np.ndarray) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights`` that sum exactly to ``total``.

    Largest-remainder method, in exact integer arithmetic; ties go to the earlier
    position. All-zero weights split evenly.
    """
    w = np.asarray(weights, dtype=np.int64)
    if w.size == 0:
        return np.zeros(0, dtype=np.int64)
    if int(w.sum()) <= 0:
        w = np.ones_like(w)
    denominator = int(w.sum())
    scaled = w * int(total)
    shares = scaled // denominator
    remainders = scaled % denominator
    missing = int(total) - int(shares.sum())
    if missing:
        order = np.argsort(-remainders, kind="stable")
        shares[order[:missing]] += 1
    return shares
