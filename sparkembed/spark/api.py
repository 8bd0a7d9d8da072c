"""The notebook API, for Databricks, Synapse and any PySpark session."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.functions import pandas_udf

from sparkembed.backends import make_backend
from sparkembed.config import EmbedConfig, load_config, resolve_endpoint, validate_config
from sparkembed.core.context import RunContext
from sparkembed.core.engine import get_embedder
from sparkembed.core.longtext import Combined, LongTextPlanner, Plan, combine
from sparkembed.core.summary import RunSummary
from sparkembed.core.types import Status
from sparkembed.errors import ConfigError
from sparkembed.spark.driver import default_parallelism, new_run_id, run
from sparkembed.spark.partition import make_job, vectors_to_arrow
from sparkembed.spark.secrets import apply_secret
from sparkembed.spark.sources import select_input

UDF_RETURN = "embedding array<float>, status string, error string, prompt_tokens int, request_id string"
"""What :func:`embedding_udf` returns per text."""
UDF_FIELDS = ["embedding", "status", "error", "prompt_tokens", "request_id"]


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
    merged = base.with_overrides({key: value for key, value in overrides.items() if value is not None})
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
    context = RunContext(run_id=run_id or new_run_id(), workers=default_parallelism(df.sparkSession, cfg))
    selected = select_input(df, cfg.source)
    job, schema = make_job(selected, cfg, context)
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
    allow_partial: bool | None = None,
) -> RunSummary:
    """Embed ``df`` into the Delta ``target`` (path or table) with checks, preflight and waves.

    Keyword arguments left as None keep the config's values (``target.mode`` defaults to upsert).

    Args:
        allow_partial: ``run.allow_partial``: a run estimated over ``run.max_tokens`` or
            ``run.max_cost_usd`` embeds up to the cap (the summary's ``stopped`` is then
            ``budget``) instead of raising :class:`~sparkembed.errors.BudgetError`.
    """
    cfg = _as_config(
        df.sparkSession,
        config, **{"source.text_col": text_col, "source.id_col": id_col,
                   "source.passthrough": passthrough, "target.path": target,
                   "target.mode": mode, "run.allow_partial": allow_partial}
    )  # fmt: skip
    return run(df.sparkSession, cfg, source=df)


def embedding_udf(
    config: EmbedConfig | dict[str, Any] | str | Path | None = None, *, spark: SparkSession | None = None
) -> Any:
    """A vectorized UDF embedding a text column: for your own queries, and for SQL.

    An iterator Arrow UDF on pyspark 4.1 and later, an iterator pandas UDF before. Each text
    becomes a struct of :data:`UDF_RETURN`. Requests are packed across the iterator's Arrow
    batches (up to ``batching.max_inputs`` texts), through the same
    per-process client, pacing, retries and bisection as the job. Blank texts are
    ``skipped``; a refused text is ``failed`` with its reason and never fails its neighbours.
    A text longer than the model's limit becomes the mean of its chunks' vectors
    (``long_text.strategy: chunk`` needs a row per chunk: use :func:`write` for that).

    Example::

        emb = sparkembed.embedding_udf(config="conf/azure-key.yaml")
        df.select("id", emb("body").alias("e")).select("id", "e.embedding", "e.status")
        spark.udf.register("embed_text", emb)
        spark.sql("SELECT id, embed_text(body).embedding AS embedding FROM docs")

    Args:
        config: as for :func:`embed`; the key is read now, on the driver.
        spark: the session (default: the active one), for secrets and its task slots.
    """
    session = spark or SparkSession.getActiveSession()
    if session is None:
        raise ConfigError("embedding_udf needs a Spark session: create one first, or pass spark=")
    cfg = _as_config(session, config)
    share = RunContext(workers=default_parallelism(session, cfg)).quota_share
    if cfg.long_text.strategy == "chunk":  # one value per text
        cfg = cfg.model_copy(update={"long_text": cfg.long_text.model_copy(update={"strategy": "mean"})})

    return _make_udf(cfg, share)


def _make_udf(config: EmbedConfig, share: float) -> Any:
    """An iterator Arrow UDF where pyspark has them (4.1+), else an iterator pandas UDF.

    Both run the same engine. The Arrow one hands Spark the vectors as one float32 buffer per
    batch; a pandas UDF's array<float> goes through pyspark's per-row ``list(value)``, which
    makes 1,536 Python floats of every vector: about half the job's throughput (BENCHMARKS.md).
    """
    try:
        from pyspark.sql.functions import arrow_udf  # type: ignore[attr-defined]
    except ImportError:  # pyspark 3.5 and 4.0

        def embed_series(texts: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
            for out in _embed_texts(config, share, ([_text(t) for t in series] for series in texts)):
                yield _to_pandas(out)

        return pandas_udf(embed_series, UDF_RETURN)  # type: ignore[call-overload]

    def embed_arrays(texts: Iterator[pa.Array]) -> Iterator[pa.Array]:
        for out in _embed_texts(config, share, (array.to_pylist() for array in texts)):
            yield _to_arrow(out)

    return arrow_udf(embed_arrays, UDF_RETURN)  # type: ignore[call-overload]


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def _embed_texts(
    config: EmbedConfig, share: float, batches: Iterator[list[str | None]]
) -> Iterator[Combined]:
    """Executor side of :func:`embedding_udf`: one result per input batch, rows in input order.

    The engine packs requests across batches (up to ``batching.max_inputs`` texts).
    """
    planner = LongTextPlanner(config)
    pending: deque[Plan] = deque()

    def plans() -> Iterator[Plan]:
        for texts in batches:
            plan = planner.plan(texts)
            pending.append(plan)
            yield plan

    for results in get_embedder(config, make_backend, share).embed_stream(plans()):
        yield combine(pending.popleft(), results)


def _to_arrow(out: Combined) -> pa.Array:
    """The :data:`UDF_RETURN` struct of ``out``: vectors in one buffer, null where not ok."""
    status = pa.array(out.status, pa.string())
    ok = pc.equal(status, Status.OK.value).to_numpy(zero_copy_only=False)
    return pa.StructArray.from_arrays(
        [
            vectors_to_arrow(out.vectors, ok),
            status,
            pa.array(out.error, pa.string()),
            pa.array(out.prompt_tokens.astype(np.int32)),
            pa.array(out.request_id, pa.string()),
        ],
        names=UDF_FIELDS,
    )


def _to_pandas(out: Combined) -> pd.DataFrame:
    ok = [status == Status.OK for status in out.status]
    return pd.DataFrame(
        {
            "embedding": [out.vectors[i] if good else None for i, good in enumerate(ok)],
            "status": out.status,
            "error": out.error,
            "prompt_tokens": out.prompt_tokens.astype(np.int32),
            "request_id": out.request_id,
        }
    )
