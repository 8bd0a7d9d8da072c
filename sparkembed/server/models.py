"""Embedding models served by the local endpoint.

Both models count tokens with the WordLlama tokenizer, so ``usage`` is realistic and the same
whichever model is served.

- :class:`WordLlamaModel`: real semantic vectors, 256 dimensions; ``dimensions`` below 256
  truncates and renormalises (as Matryoshka models such as text-embedding-3 do).
- :class:`HashModel`: deterministic unit vectors of any size from a hash of
  ``(text, input_type)``; a smaller ``dimensions`` gives the renormalised prefix of a larger one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from tokenizers import Encoding

from sparkembed import wordllama_local

INPUT_TYPES = ("text", "query", "document")

# splitmix64 constants (Steele, Lea, Flood 2014): a cheap, well-mixed 64-bit hash.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class EmbeddingModel(Protocol):
    """What the endpoint needs from a model."""

    name: str
    default_dimensions: int
    max_dimensions: int

    def tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        """Tokenize texts; ``len()`` of each result is its token count."""
        ...

    def embed(
        self,
        texts: Sequence[str],
        encodings: Sequence[Encoding],
        dimensions: int,
        input_type: str,
    ) -> np.ndarray:
        """Return unit vectors, float32 of shape (len(texts), dimensions)."""
        ...


class WordLlamaModel:
    """WordLlama l2_supercat, 256 dimensions, loaded offline from the installed wheel."""

    name = "wordllama-l2-supercat-256"
    max_dimensions = wordllama_local.DIMENSIONS

    def __init__(self, default_dimensions: int = wordllama_local.DIMENSIONS) -> None:
        if not 0 < default_dimensions <= self.max_dimensions:
            raise ValueError(f"wordllama supports 1 to {self.max_dimensions} dimensions")
        self.default_dimensions = default_dimensions
        # Load now, so the first request is not slow and a missing wheel fails at startup.
        wordllama_local.load_tokenizer()
        wordllama_local.load_matrix()

    def tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        return wordllama_local.encode(texts)

    def embed(
        self,
        texts: Sequence[str],
        encodings: Sequence[Encoding],
        dimensions: int,
        input_type: str,
    ) -> np.ndarray:
        # WordLlama has no query/document distinction: every input_type gives the same vector.
        vectors = wordllama_local.embed_encodings(encodings)
        return truncate(vectors, dimensions)


class HashModel:
    """Deterministic unit vectors, cheap enough never to be the bottleneck.

    Args:
        default_dimensions: vector size when a request gives no ``dimensions``.
        max_dimensions: largest ``dimensions`` accepted (guards the server's memory).
    """

    name = "hash-embedding"

    def __init__(self, default_dimensions: int = 1536, max_dimensions: int = 16384) -> None:
        self.default_dimensions = default_dimensions
        self.max_dimensions = max(max_dimensions, default_dimensions)
        wordllama_local.load_tokenizer()

    def tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        return wordllama_local.encode(texts)

    def embed(
        self,
        texts: Sequence[str],
        encodings: Sequence[Encoding],
        dimensions: int,
        input_type: str,
    ) -> np.ndarray:
        seeds = np.fromiter((_seed(text, input_type) for text in texts), dtype=np.uint64, count=len(texts))
        return hash_vectors(seeds, dimensions)


def hash_vectors(seeds: np.ndarray, dimensions: int) -> np.ndarray:
    """Unit vectors, float32 of shape (len(seeds), dimensions), one per uint64 seed.

    Element j of a row depends only on the seed and j, so vectors of different sizes share
    their prefix. Elements are uniform in [-1, 1) before normalisation.
    """
    pairs = (dimensions + 1) // 2  # each 64-bit hash yields two 32-bit elements
    counters = np.arange(1, pairs + 1, dtype=np.uint64) * _GOLDEN
    z = seeds[:, None] + counters[None, :]
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    halves = z.view(np.uint32)[:, :dimensions]
    vectors = (halves >> np.uint32(8)).astype(np.float32)
    vectors *= np.float32(2.0**-23)
    vectors -= np.float32(1.0)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def truncate(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first ``dimensions`` columns and renormalise rows to unit length."""
    if dimensions >= vectors.shape[1]:
        return vectors
    head = np.ascontiguousarray(vectors[:, :dimensions])
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    np.divide(head, norms, out=head, where=norms > 0)
    return head


def _seed(text: str, input_type: str) -> int:
    # person= keeps input types apart without building a new string per text.
    digest = hashlib.blake2b(text.encode(), digest_size=8, person=input_type.encode()).digest()
    return int.from_bytes(digest, "little")


def load_model(kind: str, dimensions: int | None = None) -> EmbeddingModel:
    """Build the model named ``kind`` (``wordllama`` or ``hash``).

    Args:
        kind: model family.
        dimensions: default vector size (hash: any, default 1536; wordllama: at most 256).
    """
    if kind == "wordllama":
        return WordLlamaModel(default_dimensions=dimensions or wordllama_local.DIMENSIONS)
    if kind == "hash":
        return HashModel(default_dimensions=dimensions or 1536)
    raise ValueError(f"unknown model {kind!r}; expected 'wordllama' or 'hash'")
