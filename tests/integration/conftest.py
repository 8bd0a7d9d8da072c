"""Fixtures of the tests that talk to the local endpoint over real HTTP (no Spark)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from support import DIMS, MAX_INPUT_TOKENS

from sparkembed.server.launch import LocalEndpoint


@pytest.fixture(scope="module")
def hash_endpoint(start_endpoint: Any) -> Iterator[LocalEndpoint]:
    endpoint = start_endpoint(
        *("--model", "hash", "--dims", str(DIMS), "--max-input-tokens", str(MAX_INPUT_TOKENS)),
        *("--accept-token-prefix", "entra-"),
    )
    yield endpoint
    endpoint.stop()
