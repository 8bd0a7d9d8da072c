"""Embedding models served by the local endpoint.

Both models count tokens exactly as the WordLlama tokenizer does, so ``usage`` is realistic and
the same whichever model is served (and the same as the client's ``wordllama`` counter).

- :class:`WordLlamaModel`: real semantic vectors, 256 dimensions; ``dimensions`` below 256
  truncates and renormalises (as Matryoshka models such as text-embedding-3 do).
- :class:`HashModel`: deterministic unit vectors of any size from a hash of
  ``(text, input_type)``; a smaller ``dimensions`` gives the renormalised prefix of a larger one.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tokenizers import Encoding

from sparkembed.core import wordllama
from sparkembed.server.token_counts import WordLlamaPieceCounter

INPUT_TYPES = ("text", "query", "document")

# splitmix64 constants (Steele, Lea, Flood 2014): a cheap, well-mixed 64-bit hash.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class Prepared:
    """What a model learns from a request's texts before the request is admitted.

    Attributes:
        token_counts: tokens of each text (``usage`` and the per-input limit).
        encodings: what :meth:`EmbeddingModel.embed` needs; empty for the hash model.
        digests: the sha256 of each text's UTF-8, what the endpoint bills it under (and the
            hash model's seed).
    """

    token_counts: list[int]
    encodings: Sequence[Encoding]
    digests: list[bytes]


class EmbeddingModel(Protocol):
    """What the endpoint needs from a model."""

    name: str
    default_dimensions: int
    max_dimensions: int

    def tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        """Tokenize texts with the WordLlama tokenizer; ``len()`` of each is its token count."""
        ...

    def prepare(self, texts: Sequence[str]) -> Prepared:
        """Count the tokens of texts (and tokenize them, if ``embed`` needs it): what the
        endpoint bills. The counts equal :meth:`tokenize`'s."""
        ...

    def embed(
        self,
        texts: Sequence[str],
        encodings: Sequence[Encoding],
        dimensions: int,
        input_type: str,
        digests: Sequence[bytes] | None = None,
    ) -> np.ndarray:
        """Return unit vectors, float32 of shape (len(texts), dimensions); ``digests`` are
        :attr:`Prepared.digests` where known."""
        ...


class WordLlamaModel:
    """WordLlama l2_supercat, 256 dimensions, loaded offline from the installed wheel."""

    name = "wordllama-l2-supercat-256"
    max_dimensions = wordllama.DIMENSIONS

    def __init__(self, default_dimensions: int = wordllama.DIMENSIONS) -> None:
        if not 0 < default_dimensions <= self.max_dimensions:
            raise ValueError(f"wordllama supports 1 to {self.max_dimensions} dimensions")
        self.default_dimensions = default_dimensions
        # Load now, so the first request is not slow and a missing wheel fails at startup.
        wordllama.load_tokenizer()
        wordllama.load_matrix()

    def tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        """Tokenize texts; ``len()`` of each result is its token count."""
        return wordllama.encode(texts)

    def prepare(self, texts: Sequence[str]) -> Prepared:
        encodings = self.tokenize(texts)
        return Prepared([len(encoding) for encoding in encodings], encodings, text_digests(texts))

    def embed(
        self,
        texts: Sequence[str],
        encodings: Sequence[Encoding],
        dimensions: int,
        input_type: str,
        digests: Sequence[bytes] | None = None,
    ) -> np.ndarray:
        # WordLlama has no query/document distinction: every input_type gives the same vector.
        vectors = wordllama.embed_encodings(encodings)
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
        self._counter = WordLlamaPieceCounter()

    def tokenize(self, texts: Sequence[str]) -> list[Encoding]:
        """Tokenize texts with the WordLlama tokenizer (``embed`` needs no tokens)."""
        return wordllama.encode(texts)

    def prepare(self, texts: Sequence[str]) -> Prepared:
        # Counts only: the vectors come from the texts themselves.
        return Prepared(self._counter.count(texts), (), text_digests(texts))

    def embed(
        self,
        texts: Sequence[str],
        encodings: Sequence[Encoding],
        dimensions: int,
        input_type: str,
        digests: Sequence[bytes] | None = None,
    ) -> np.ndarray:
        if digests is None:
            digests = text_digests(texts)
        # A text's seed: the first 8 bytes of its sha256, salted by the input type.
        heads = b"".join([digest[:8] for digest in digests])
        seeds = np.frombuffer(heads, dtype="<u8").astype(np.uint64) ^ _input_type_salt(input_type)
        return hash_vectors(seeds, dimensions)


def text_digests(texts: Sequence[str]) -> list[bytes]:
    """The sha256 of each text's UTF-8."""
    return [hashlib.sha256(text.encode()).digest() for text in texts]


@functools.cache
def _input_type_salt(input_type: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(input_type.encode(), digest_size=8).digest(), "little"))


def hash_vectors(seeds: np.ndarray, dimensions: int) -> np.ndarray:
    """Unit vectors, float32 of shape (len(seeds), dimensions), one per uint64 seed.

    A row is cut into blocks of ``_BLOCK`` elements; each block copies a window of a fixed
    random pool (see :func:`_pool_windows`) at an offset hashed from the seed and the block's
    index, and the first block adds a second window, so even a vector of a few dimensions has
    2**36 possible values. Gathering windows costs about a quarter of hashing every element
    (about 0.7 ms instead of 2.4 per 1,024 vectors of 1536 dimensions). The elements before
    normalisation depend only on the seed and their index, so a smaller ``dimensions`` gives
    the renormalised prefix of a larger one.
    """
    windows = _pool_windows()
    blocks = -(-dimensions // _BLOCK)
    # Hash 1 picks the first block's second window, hash j + 2 block j's window: neither
    # depends on ``dimensions``.
    z = seeds[:, None] + np.arange(1, blocks + 2, dtype=np.uint64) * _GOLDEN
    offsets = (_splitmix(z) >> np.uint64(64 - _POOL_BITS)).astype(np.intp)
    gathered = windows[offsets[:, 1:]]  # (rows, blocks, _BLOCK), a fresh array
    gathered[:, 0] += windows[offsets[:, 0]]
    vectors = gathered.reshape(len(seeds), blocks * _BLOCK)
    if dimensions < blocks * _BLOCK:
        vectors = np.ascontiguousarray(vectors[:, :dimensions])
    # einsum's row sums do not depend on a row's place in the batch: a text gets the same
    # vector whatever else is in its request.
    vectors *= (1.0 / np.sqrt(np.einsum("ij,ij->i", vectors, vectors)))[:, None]
    return vectors


# The pool: 2**18 floats (1 MiB, so it stays in cache), read as overlapping windows of _BLOCK.
_POOL_BITS = 18
_BLOCK = 256


@functools.lru_cache(maxsize=1)
def _pool_windows() -> np.ndarray:
    """Every window of ``_BLOCK`` consecutive pool elements, a read-only view of shape
    (2**_POOL_BITS, _BLOCK). Element i is uniform in [-1, 1), from splitmix64 of i: the same in
    every process. Windows at different offsets are uncorrelated. Built once, in about 10 ms."""
    size = (1 << _POOL_BITS) + _BLOCK - 1
    z = _splitmix(np.arange(1, size + 1, dtype=np.uint64) * _GOLDEN)
    pool = (z >> np.uint64(40)).astype(np.float32)  # the top 24 bits
    pool *= np.float32(2.0**-23)
    pool -= np.float32(1.0)
    return np.lib.stride_tricks.sliding_window_view(pool, _BLOCK)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 counters, in place; returns ``z``."""
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def truncate(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Keep the first ``dimensions`` columns and renormalise rows to unit length."""
    if dimensions >= vectors.shape[1]:
        return vectors
    head = np.ascontiguousarray(vectors[:, :dimensions])
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    np.divide(head, norms, out=head, where=norms > 0)
    return head


def load_model(kind: str, dimensions: int | None = None) -> EmbeddingModel:
    """Build the model named ``kind`` (``wordllama`` or ``hash``).

    Args:
        kind: model family.
        dimensions: default vector size (hash: any, default 1536; wordllama: at most 256).
    """
    if kind == "wordllama":
        return WordLlamaModel(default_dimensions=dimensions or wordllama.DIMENSIONS)
    if kind == "hash":
        return HashModel(default_dimensions=dimensions or 1536)
    raise ValueError(f"unknown model {kind!r}; expected 'wordllama' or 'hash'")
