"""Backends: the HTTP clients behind :class:`sparkembed.core.types.Backend`.

:func:`make_backend` picks one for ``endpoint.route``: the OpenAI-compatible v1 route
(:mod:`.openai_v1`) or the Azure AI model inference API (:mod:`.azure_inference`).
A new backend is a subclass of :class:`.http.HttpBackend` in its own module, chosen here.
"""

from __future__ import annotations

from sparkembed.config import EmbedConfig
from sparkembed.core.types import Backend


def make_backend(config: EmbedConfig) -> Backend:
    """The backend for ``config.endpoint.route``: the Azure AI model inference API or OpenAI v1."""
    if config.endpoint.route == "openai-v1":
        # Imported here: a process loads only the SDK it uses.
        from sparkembed.backends.openai_v1 import OpenAIV1Backend

        return OpenAIV1Backend(config)
    from sparkembed.backends.azure_inference import AzureInferenceBackend

    return AzureInferenceBackend(config)
