"""Fixtures of the tests that talk to the local endpoint over real HTTP (no Spark)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import DIMS, MAX_INPUT_TOKENS

from sparkembed.server.launch import LocalEndpoint

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder talks to a local endpoint (``-m "not integration"``)."""
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def hash_endpoint(start_endpoint: Any) -> Iterator[LocalEndpoint]:
    endpoint = start_endpoint(
        *("--model", "hash", "--dims", str(DIMS), "--max-input-tokens", str(MAX_INPUT_TOKENS)),
        *("--accept-token-prefix", "entra-"),
    )
    yield endpoint
    endpoint.stop()
