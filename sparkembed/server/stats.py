"""What the local endpoint has served, for tests and benchmarks (``GET /_stats``).

Inputs are recorded by the sha256 of their UTF-8 text, so a test can tell a text billed twice
without the server keeping texts. Bearer tokens are counted by hash, never stored.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any


class Stats:
    """Counters since start or the last :meth:`reset`."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter (requests in flight stay in flight)."""
        self.requests = 0
        self.responses: Counter[int] = Counter()
        self.ok_requests = 0
        self.texts_billed = 0
        self.prompt_tokens = 0
        self.billed: Counter[bytes] = Counter()  # by sha256 digest
        self.connections = 0
        self._connections_seen: weakref.WeakSet[object] = weakref.WeakSet()
        self.max_concurrent = self.in_flight
        self._bearer_token_hashes: set[bytes] = set()

    def request_started(self) -> None:
        """Count a request to an embeddings route and track the peak in flight."""
        self.requests += 1
        self.in_flight += 1
        self.max_concurrent = max(self.max_concurrent, self.in_flight)

    def saw_connection(self, transport: object) -> None:
        """Count a TCP connection the first time it carries an embeddings request.

        Connections that only poll ``/_stats`` are left out, so tests can check reuse.
        """
        if transport is not None and transport not in self._connections_seen:
            self._connections_seen.add(transport)
            self.connections += 1

    def request_finished(self) -> None:
        self.in_flight -= 1

    def responded(self, status: int) -> None:
        self.responses[status] += 1

    def saw_bearer_token(self, token: str) -> None:
        self._bearer_token_hashes.add(hashlib.sha256(token.encode()).digest())

    def billed_ok(self, digests: Sequence[bytes], prompt_tokens: int) -> None:
        """Record a 200 answer: its inputs (the sha256 of each) and tokens are billed."""
        self.responded(200)
        self.ok_requests += 1
        self.texts_billed += len(digests)
        self.prompt_tokens += prompt_tokens
        self.billed.update(digests)

    def to_json(self, *, include_billed: bool = True) -> dict[str, Any]:
        """The ``/_stats`` document; ``include_billed=False`` omits the per-text dict."""
        document: dict[str, Any] = {
            "requests": self.requests,
            "responses": {str(status): n for status, n in sorted(self.responses.items())},
            "ok_requests": self.ok_requests,
            "texts_billed": self.texts_billed,
            "prompt_tokens": self.prompt_tokens,
            "connections": self.connections,
            "bearer_tokens_seen": len(self._bearer_token_hashes),
            "max_concurrent": self.max_concurrent,
        }
        if include_billed:
            document["billed"] = {digest.hex(): n for digest, n in self.billed.items()}
        return document
