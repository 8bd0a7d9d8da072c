"""What several test folders share: the one config builder, and the engine tests' corpus.

Fixtures live in ``conftest.py`` files; this module holds plain functions and constants.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import SecretStr

from sparkembed.config import EmbedConfig, validate_config
from sparkembed.server.launch import LocalEndpoint
from sparkembed.server.models import load_model

DIMS = 64
MAX_INPUT_TOKENS = 64
WORDS = ["spark", "delta", "lake", "vector", "quota", "token", "batch", "retry", "river", "stone"]
AZURE = "azure-ai-inference"
OPENAI_V1 = "openai-v1"
DEPLOYMENT = "hash-embedding"
"""The v1 route names the deployment in ``model``; the local endpoint echoes it back."""


def build_config(
    *trees: Mapping[str, Mapping[str, Any]],
    sets: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> EmbedConfig:
    """The tests' one config builder.

    Args:
        trees: section trees merged in order, key by key (a later tree's ``retry`` keys
            override an earlier one's, its other keys stay).
        sets: dotted keys set afterwards, as ``--set`` does (``{"run.partitions": 2}``).
        key: the API key, as if resolved from the environment.
    """
    tree: dict[str, dict[str, Any]] = {}
    for part in trees:
        for section, values in part.items():
            tree[section] = {**tree.get(section, {}), **values}
    config = validate_config(tree)
    if sets:
        config = config.with_overrides(sets)
    if key is None:
        return config
    return config.model_copy(update={"auth": config.auth.model_copy(update={"key": SecretStr(key)})})


def config_for(
    server: LocalEndpoint, key: str | None, api: str = AZURE, **sections: dict[str, Any]
) -> EmbedConfig:
    """Config for ``server`` through ``api`` with fast retries; ``key=None`` leaves auth as
    ``sections`` say."""
    endpoint: dict[str, Any] = {"url": server.url}
    if api == OPENAI_V1:
        endpoint = {"url": f"{server.url}/openai/v1", "api": OPENAI_V1, "model": DEPLOYMENT}
    retry = {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "max_attempts": 12}
    return build_config({"endpoint": endpoint, "retry": retry}, sections, key=key)


def corpus(n: int) -> list[str]:
    """Distinct texts of 8-14 words."""
    return [
        f"row {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(6 + i % 7)) for i in range(n)
    ]


def expected(texts: list[str]) -> tuple[np.ndarray, int]:
    """The hash model's vectors and the prompt tokens it bills for ``texts``."""
    model = load_model("hash", DIMS)
    encodings = model.tokenize(texts)
    vectors = model.embed(texts, encodings, DIMS, "text")
    return vectors, sum(len(e.ids) for e in encodings)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def die_at_wave(monkeypatch: Any, wave: int) -> None:
    """Kill the driver (a KeyboardInterrupt) as wave ``wave`` would be written by the delta-rs
    sink: the waves before it are committed, the rest never start."""
    from sparkembed.spark import writers  # lazily: unit tests import this module without Spark

    real_write = writers.DeltaRsSink.write_wave

    def write_wave(self: Any, df: Any, config: Any, context: Any, at: int) -> Any:
        if at == wave:
            raise KeyboardInterrupt("driver killed")
        return real_write(self, df, config, context, at)

    monkeypatch.setattr(writers.DeltaRsSink, "write_wave", write_wave)
