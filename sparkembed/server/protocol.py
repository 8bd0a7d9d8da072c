"""The embeddings REST contract: request validation and response bodies, as Azure answers.

Errors are raised as :class:`ApiError` and rendered as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pybase64
from aiohttp import web

from sparkembed.server.models import INPUT_TYPES, EmbeddingModel

KNOWN_FIELDS = frozenset({"input", "dimensions", "encoding_format", "input_type", "model", "user"})
SERVED_ENCODINGS = ("float", "base64")
EXTRA_PARAMETERS_MODES = ("error", "drop", "pass-through")


class ApiError(Exception):
    """An error answer: HTTP status, service error code, message and extra headers."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def to_response(self) -> web.Response:
        body = orjson.dumps({"error": {"code": self.code, "message": self.message}})
        return web.Response(
            status=self.status, body=body, headers=self.headers, content_type="application/json"
        )


@dataclass(frozen=True)
class EmbedRequest:
    """A validated embeddings request.

    Attributes:
        texts: the inputs, in request order.
        dimensions: vector size to return.
        encoding_format: ``float`` or ``base64``.
        input_type: ``text``, ``query`` or ``document``.
        model: model name to echo in the response.
    """

    texts: list[str]
    dimensions: int
    encoding_format: str
    input_type: str
    model: str


def parse_request(
    body: bytes, extra_parameters: str | None, model: EmbeddingModel, max_inputs: int
) -> EmbedRequest:
    """Validate a request body; raise :class:`ApiError` (400 or 422) the way Azure does.

    Args:
        body: the raw JSON body.
        extra_parameters: the ``extra-parameters`` header, if sent.
        model: the served model (for its dimension limits).
        max_inputs: most inputs allowed in one request.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request", f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_request", "The request body must be a JSON object.")
    _check_extra_fields(document, extra_parameters)
    return EmbedRequest(
        texts=_texts(document.get("input"), max_inputs),
        dimensions=_dimensions(document.get("dimensions"), model),
        encoding_format=_encoding_format(document.get("encoding_format")),
        input_type=_input_type(document.get("input_type")),
        model=_model_name(document.get("model"), model),
    )


def _model_name(value: Any, model: EmbeddingModel) -> str:
    if value is None or value == "":
        return model.name
    if not isinstance(value, str):
        raise ApiError(400, "invalid_request", "'model' must be a string.")
    return value


def _check_extra_fields(document: dict[str, Any], extra_parameters: str | None) -> None:
    mode = (extra_parameters or "error").lower()
    if mode not in EXTRA_PARAMETERS_MODES:
        raise ApiError(400, "invalid_request", f"extra-parameters must be one of {EXTRA_PARAMETERS_MODES}.")
    unknown = sorted(set(document) - KNOWN_FIELDS)
    if unknown and mode == "error":
        raise ApiError(
            400,
            "invalid_request",
            f"Extra parameters {unknown} are not allowed when extra-parameters is not set "
            "or set to be 'error'. Set extra-parameters to 'pass-through' or 'drop'.",
        )


def _texts(value: Any, max_inputs: int) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, "invalid_input", "'input' must be a string or a non-empty list of strings.")
    if len(texts) > max_inputs:
        raise ApiError(
            400,
            "too_many_inputs",
            f"Too many inputs. The max number of inputs is {max_inputs}, "
            f"got {len(texts)}. Please reduce the number of inputs.",
        )
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(400, "invalid_input", f"input[{position}] is not a string.")
        if not text:
            raise ApiError(400, "invalid_input", f"input[{position}] is an empty string.")
    return texts


def _dimensions(value: Any, model: EmbeddingModel) -> int:
    if value is None:
        return model.default_dimensions
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, "invalid_request", "'dimensions' must be an integer.")
    if not 1 <= value <= model.max_dimensions:
        raise ApiError(
            422,
            "UnsupportedParameter",
            f"This model does not support dimensions={value}: "
            f"it supports 1 to {model.max_dimensions} dimensions.",
        )
    return value


def _encoding_format(value: Any) -> str:
    if value is None:
        return "float"
    if value not in SERVED_ENCODINGS:
        raise ApiError(
            422,
            "UnsupportedParameter",
            f"This model does not support encoding_format={value!r}; "
            f"supported: {', '.join(SERVED_ENCODINGS)}.",
        )
    return str(value)


def _input_type(value: Any) -> str:
    if value is None:
        return "text"
    if value not in INPUT_TYPES:
        raise ApiError(
            422,
            "UnsupportedParameter",
            f"This model does not support input_type={value!r}; supported: {', '.join(INPUT_TYPES)}.",
        )
    return str(value)


def check_fail_texts(texts: Sequence[str], fail_texts: Sequence[str]) -> None:
    """Reject a request holding an input that contains an injected ``--fail-text``."""
    for needle in fail_texts:
        for position, text in enumerate(texts):
            if needle in text:
                raise ApiError(
                    400,
                    "invalid_input",
                    f"input[{position}] contains the rejected text {needle!r} (--fail-text).",
                )


def check_token_counts(counts: Sequence[int], max_input_tokens: int) -> None:
    """Reject a request holding an input over the model's context, as Azure OpenAI does."""
    for position, count in enumerate(counts):
        if count > max_input_tokens:
            raise ApiError(
                400,
                "context_length_exceeded",
                f"This model's maximum context length is {max_input_tokens} tokens, "
                f"however input[{position}] has {count} tokens. Please reduce your input.",
            )


def response_body(
    request_id: str,
    request: EmbedRequest,
    vectors: np.ndarray,
    order: Sequence[int],
    prompt_tokens: int,
) -> bytes:
    """The JSON success body, with ``data`` items in ``order`` (each carries its ``index``).

    Args:
        request_id: the response ``id``.
        request: the validated request (encoding format and model name).
        vectors: float32 rows, one per input in request order.
        order: input positions in the order to list them.
        prompt_tokens: tokens of all inputs together.
    """
    document: dict[str, Any] = {
        "id": request_id,
        "object": "list",
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    if request.encoding_format == "float":
        # orjson writes float32 arrays natively with the shortest round-tripping digits.
        document["data"] = [{"index": i, "object": "embedding", "embedding": vectors[i]} for i in order]
        return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    # base64 needs no JSON escaping, so the items are joined as bytes, with no str or dict per
    # vector: about a quarter of the CPU of building them for orjson.
    little_endian = vectors.astype("<f4", copy=False)
    items: list[bytes] = []
    for i in order:
        items += (b'{"index":%d,"object":"embedding","embedding":"' % i,
                  pybase64.b64encode(little_endian[i].tobytes()), b'"},')  # fmt: skip
    if items:
        items[-1] = b'"}'  # no comma after the last item
    return b"".join([orjson.dumps(document)[:-1], b',"data":[', *items, b"]}"])
