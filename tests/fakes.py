"""Test doubles that Spark executors import too: put this folder on their PYTHONPATH.

``auth.credential_factory: fakes:make_credential`` makes each process build a
:class:`ShortLivedCredential`. Its tokens start with :data:`TOKEN_PREFIX` (the local
endpoint accepts them with ``--accept-token-prefix``) and end in random hex, so every
token is distinct and the server's ``bearer_tokens_seen`` counts them.

When ``$SPARKEMBED_FAKE_ENTRA_EVENTS`` names a file, every process appends one JSON line
per event there: ``{"event": "factory"|"token"|"close", "pid": ..., "scopes": [...]}``.
Tokens themselves are never written anywhere.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from azure.core.credentials import AccessToken

TOKEN_PREFIX = "fake-entra-LEAKCHECK-"
EVENTS_ENV = "SPARKEMBED_FAKE_ENTRA_EVENTS"
LIFETIME_ENV = "SPARKEMBED_FAKE_ENTRA_LIFETIME_S"
DEFAULT_LIFETIME_S = 2.0
"""azure-core refreshes a token within 300 s of expiry: a 2 s token is fresh for one request."""


def record(event: str, **fields: Any) -> None:
    """Append an event line to ``$SPARKEMBED_FAKE_ENTRA_EVENTS`` (if set)."""
    path = os.environ.get(EVENTS_ENV)
    if path:
        line = json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n"
        with open(path, "a", encoding="utf-8") as out:  # one short append: atomic
            out.write(line)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events recorded so far, in order."""
    text = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def _lifetime_s() -> float:
    return float(os.environ.get(LIFETIME_ENV) or DEFAULT_LIFETIME_S)


def _new_token(lifetime_s: float, scopes: tuple[str, ...]) -> AccessToken:
    record("token", scopes=list(scopes))
    return AccessToken(TOKEN_PREFIX + secrets.token_hex(16), int(time.time() + lifetime_s))


class ShortLivedCredential:
    """An async TokenCredential whose tokens live ``lifetime_s`` seconds.

    Attributes:
        issued: tokens handed out by this instance.
        scopes: the scopes of each ``get_token`` call.
    """

    def __init__(self, lifetime_s: float | None = None) -> None:
        self.lifetime_s = _lifetime_s() if lifetime_s is None else lifetime_s
        self.issued = 0
        self.scopes: list[tuple[str, ...]] = []
        self.closed = False

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.issued += 1
        self.scopes.append(scopes)
        return _new_token(self.lifetime_s, scopes)

    async def close(self) -> None:
        self.closed = True
        record("close")

    async def __aenter__(self) -> ShortLivedCredential:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class SyncShortLivedCredential:
    """The same as :class:`ShortLivedCredential`, with a blocking ``get_token``."""

    def __init__(self, lifetime_s: float | None = None) -> None:
        self.lifetime_s = _lifetime_s() if lifetime_s is None else lifetime_s
        self.issued = 0
        self.closed = False

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.issued += 1
        return _new_token(self.lifetime_s, scopes)

    def close(self) -> None:
        self.closed = True
        record("close")


def make_credential() -> ShortLivedCredential:
    """``auth.credential_factory: fakes:make_credential``."""
    record("factory")
    return ShortLivedCredential()


def make_sync_credential() -> SyncShortLivedCredential:
    """``auth.credential_factory: fakes:make_sync_credential``."""
    record("factory")
    return SyncShortLivedCredential()


def broken_factory() -> ShortLivedCredential:
    """A factory that fails, as one with a missing identity would."""
    raise RuntimeError("no identity available on this host")


def not_a_credential() -> object:
    """A factory returning something without ``get_token``."""
    return object()


class UnavailableCredential:
    """An async credential that cannot get a token, as on a host without an identity."""

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        from azure.core.exceptions import ClientAuthenticationError

        raise ClientAuthenticationError(message="ManagedIdentityCredential: no identity endpoint found")

    async def close(self) -> None:
        """Nothing to release."""


def unavailable_credential() -> UnavailableCredential:
    """``auth.credential_factory: fakes:unavailable_credential``."""
    return UnavailableCredential()
