"""The notebook API, for Databricks, Synapse and any PySpark session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pyspark.sql import DataFrame, SparkSession

from sparkembed.config import EmbedConfig, load_config, resolve_endpoint, validate_config
from sparkembed.job import RunSummary, default_parallelism, new_run_id, run
from sparkembed.secrets import apply_secret
from sparkembed.sources import select_input
from sparkembed.spark import make_job


def _as_config(
    spark: SparkSession,
    config: EmbedConfig | dict[str, Any] | str | Path | None,
    **overrides: Any,
) -> EmbedConfig:
    if isinstance(config, EmbedConfig):
        base = config
    elif isinstance(config, dict):
        base = validate_config(config)
    else:
        base = load_config(config)
    tree = base.model_dump(exclude={"auth": {"key"}})
    for dotted, value in overrides.items():
        if value is not None:
            section, key = dotted.split(".")
            tree[section][key] = value
    secret = base.auth.key
    merged = validate_config(tree)
    if secret is not None:
        merged = merged.model_copy(update={"auth": merged.auth.model_copy(update={"key": secret})})
    return apply_secret(resolve_endpoint(merged, os.environ), spark=spark)


def embed(
    df: DataFrame,
    *,
    text_col: str | None = None,
    id_col: str | None = None,
    passthrough: tuple[str, ...] | None = None,
    config: EmbedConfig | dict[str, Any] | str | Path | None = None,
    run_id: str | None = None,
) -> DataFrame:
    """Lazily embed ``df``: one output row per input row, with the columns of DESIGN.md.

    Nothing is sent until an action runs. Rows are not checked for duplicate ids
    and no preflight is made: use :func:`write` for the full job. Each task paces
    itself to its share of ``limits.tokens_per_minute`` (quota / task slots).

    Args:
        df: any DataFrame holding ``id_col`` and ``text_col``.
        text_col, id_col, passthrough: override the config's ``source`` keys
            (defaults ``text``, ``id``, none).
        config: an EmbedConfig, a dict of sections, or a YAML path. The API key is
            read on the driver from ``auth.key_env`` and travels inside the task
            closure, never through Spark conf. ``endpoint.url: local`` is for the
            CLI: start ``sparkembed serve`` and give its URL instead.
    """
    cfg = _as_config(
        df.sparkSession,
        config, **{"source.text_col": text_col, "source.id_col": id_col,
                   "source.passthrough": passthrough}
    )  # fmt: skip
    parallelism = default_parallelism(df.sparkSession, cfg)
    cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"workers": parallelism})})
    selected = select_input(df, cfg.source)
    job, schema = make_job(selected, cfg, run_id or new_run_id())
    return selected.mapInArrow(lambda batches: job.embed_batches(batches), schema)


def write(
    df: DataFrame,
    target: str,
    *,
    text_col: str | None = None,
    id_col: str | None = None,
    passthrough: tuple[str, ...] | None = None,
    mode: Literal["append", "overwrite", "upsert"] | None = None,
    config: EmbedConfig | dict[str, Any] | str | Path | None = None,
) -> RunSummary:
    """Embed ``df`` into the Delta ``target`` (path or table) with checks, preflight and waves.

    Keyword arguments left as None keep the config's values (``target.mode`` defaults to upsert).
    """
    cfg = _as_config(
        df.sparkSession,
        config, **{"source.text_col": text_col, "source.id_col": id_col,
                   "source.passthrough": passthrough, "target.path": target,
                   "target.mode": mode}
    )  # fmt: skip
    return run(df.sparkSession, cfg, source=df)
