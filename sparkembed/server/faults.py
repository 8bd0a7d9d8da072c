"""Seeded fault draws for the local endpoint: resets, 5xx errors, slow answers, shuffles."""

from __future__ import annotations

import random
import time
from typing import TypeVar

from sparkembed.server.settings import ServerSettings

T = TypeVar("T")


class Faults:
    """Decides, request by request, which fault (if any) to inject.

    Each kind of fault has its own random stream, so turning one on does not change when
    the others happen for the same ``seed``.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self.reseed()

    def reseed(self) -> None:
        """Restart every random stream from the seed (a fresh one when the seed is None)."""
        seed = self._settings.seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        self._reset = random.Random(f"reset:{seed}")
        self._error = random.Random(f"error:{seed}")
        self._slow = random.Random(f"slow:{seed}")
        self._order = random.Random(f"order:{seed}")
        self._errors_injected = 0
        self._outage_until = 0.0

    def start_outage(self, seconds: float) -> None:
        """For the next ``seconds``, every embeddings request loses its connection unanswered."""
        self._outage_until = time.monotonic() + seconds

    def in_outage(self) -> bool:
        return time.monotonic() < self._outage_until

    def drop_connection(self) -> bool:
        """Whether to drop this request's connection without answering."""
        return self._reset.random() < self._settings.reset_rate

    def error_status(self) -> int | None:
        """500 or 503 (alternately) for a request picked to fail, else None."""
        if self._error.random() >= self._settings.error_rate:
            return None
        self._errors_injected += 1
        return 500 if self._errors_injected % 2 else 503

    def slow_delay_s(self) -> float:
        """Seconds to hold this (already billed) answer back; 0 for most requests."""
        if self._slow.random() < self._settings.slow_rate:
            return self._settings.slow_ms / 1000.0
        return 0.0

    def order(self, items: list[T]) -> list[T]:
        """The items in the order to send them: shuffled with ``--shuffle``, else unchanged."""
        if self._settings.shuffle:
            self._order.shuffle(items)
        return items
