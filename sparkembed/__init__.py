"""sparkembed: embed lakehouse text with Azure embeddings, from Spark, into Delta.

The notebook API (``embed``, ``write``, ``embedding_udf``) needs pyspark; the config and
engine do not.
"""

from sparkembed.config import EmbedConfig, load_config

__all__ = ["EmbedConfig", "embed", "embedding_udf", "load_config", "write"]


def __getattr__(name: str):  # lazy: importing sparkembed must not import pyspark
    if name in {"embed", "embedding_udf", "write"}:
        from sparkembed.spark import api

        return getattr(api, name)
    raise AttributeError(name)
