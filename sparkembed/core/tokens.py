"""Token counts before sending: a safe upper bound and a realistic estimate.

Byte-level BPE tokenizers (cl100k, o200k and their kin) emit at least one UTF-8
byte per token, so the byte length (:func:`utf8_bytes`) is a proven upper bound on the
token count. It overestimates English about four times, which would waste quota if the
rate limiter paced on it; the limiter paces on :func:`estimate_tokens` instead and is
corrected from each response's reported usage.

    >>> utf8_bytes("hello world")
    11
    >>> estimate_tokens("hello world")
    4
"""

from __future__ import annotations

BYTES_PER_TOKEN = 4
"""Typical UTF-8 bytes per token for English under cl100k/o200k."""


def utf8_bytes(text: str) -> int:
    """UTF-8 length of ``text`` in bytes; a lone surrogate counts 3, like the U+FFFD it becomes."""
    # Pure-ASCII strings are the common case: len() is exact and avoids an encode copy.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def estimate_tokens(text: str) -> int:
    """A realistic token estimate for pacing: ``ceil(utf8_bytes / 4) + 1``, at least 1.

    The ``+ 1`` keeps very short texts from being priced at zero.
    """
    return -(-utf8_bytes(text) // BYTES_PER_TOKEN) + 1
