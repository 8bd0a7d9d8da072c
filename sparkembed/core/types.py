"""The types the core shares with its edges: the backend seam and row statuses.

A :class:`Backend` sends one request and returns its vectors placed by response
``index``, or raises :class:`~sparkembed.errors.ServiceError` /
:class:`~sparkembed.errors.TransportError`. It never retries: the engine owns that.
Implementations live in :mod:`sparkembed.backends`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import numpy as np


@dataclass
class BackendResponse:
    """One successful response.

    Attributes:
        vectors: float32 ``(n, d)``; row ``i`` is the vector the service gave ``index`` ``i``.
        prompt_tokens: reported ``usage.prompt_tokens``.
        total_tokens: reported ``usage.total_tokens``.
        model: model name as reported by the service.
        request_id: the response ``id``, else the client request id.
        remaining_tokens: ``x-ratelimit-remaining-tokens``, if the service sent it.
        remaining_requests: ``x-ratelimit-remaining-requests``, likewise.
    """

    vectors: np.ndarray
    prompt_tokens: int
    total_tokens: int
    model: str | None
    request_id: str | None
    remaining_tokens: int | None = None
    remaining_requests: int | None = None


class Backend(Protocol):
    """Sends one embeddings request. Raises ServiceError or TransportError, never retries."""

    async def embed(self, texts: list[str]) -> BackendResponse: ...

    async def close(self) -> None: ...



class Status(str, Enum):
    """A row's final status: the same strings are in the table's ``status`` column."""

    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"
    UNSENT = "unsent"
    """A stopping run did not send the row: it leaves no output row, so a rerun does it."""

    def __str__(self) -> str:
        return self.value
