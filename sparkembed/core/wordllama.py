"""The WordLlama ``l2_supercat`` model, loaded offline from the files inside the wordllama wheel.

wordllama's own loader looks for the tokenizer in the wrong folder and then tries to download
it, so we never call it (nor import the package, whose ``inference`` module reconfigures
logging on import). We read the two bundled files directly:

- ``wordllama/weights/l2_supercat_256.safetensors``: a (32000, 256) float16 token matrix;
- ``wordllama/tokenizers/l2_supercat_tokenizer_config.json``: a byte-fallback BPE tokenizer,
  so a text has at most one token per UTF-8 byte, plus one for the prepended word marker.

A text's vector is the mean of its token vectors, L2-normalised (what wordllama computes with
``norm=True``). Both files are loaded once per process.

Example::

    counts = count_tokens(["hello world"])      # [2]
    vectors = embed(["hello world", "goodbye"])  # float32, shape (2, 256), unit rows
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

DIMENSIONS = 256
WEIGHTS_FILE = "weights/l2_supercat_256.safetensors"
TOKENIZER_FILE = "tokenizers/l2_supercat_tokenizer_config.json"

# Above this many tokens, pooling by a token histogram times the matrix needs far less
# memory than gathering one 256-float row per token (50k tokens would gather 51 MB).
_HISTOGRAM_POOLING_MIN_TOKENS = 8192


def package_dir() -> Path:
    """Return the installed wordllama package folder without importing the package.

    Raises:
        ModuleNotFoundError: wordllama is not installed (it ships in the ``local`` extra).
    """
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("wordllama is not installed; install sparkembed[local] for the local model")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def load_tokenizer() -> Tokenizer:
    """Load the bundled tokenizer once per process, with no padding and no truncation."""
    tokenizer = Tokenizer.from_file(str(package_dir() / TOKENIZER_FILE))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@lru_cache(maxsize=1)
def load_matrix() -> np.ndarray:
    """Load the token embedding matrix once per process, as float32 of shape (vocab, 256)."""
    from safetensors.numpy import load_file

    weights = load_file(str(package_dir() / WEIGHTS_FILE))
    return np.ascontiguousarray(weights["embedding.weight"], dtype=np.float32)


def encode(texts: Sequence[str]) -> list[Encoding]:
    """Tokenize texts without special tokens, padding or truncation (one Encoding each)."""
    tokenizer = load_tokenizer()
    batch = list(texts)
    # encode_batch_fast skips character offsets, which we never use.
    fast = getattr(tokenizer, "encode_batch_fast", None)
    encode = fast if fast is not None else tokenizer.encode_batch
    encodings: list[Encoding] = encode(batch, add_special_tokens=False)
    return encodings


def count_tokens(texts: Sequence[str]) -> list[int]:
    """Return the number of tokens of each text."""
    return [len(encoding) for encoding in encode(texts)]


def embed(texts: Sequence[str]) -> np.ndarray:
    """Embed texts as unit vectors, float32 of shape (len(texts), 256).

    A text with no tokens (the empty string) gets the zero vector.
    """
    return embed_encodings(encode(texts))


def embed_encodings(encodings: Sequence[Encoding]) -> np.ndarray:
    """Embed already tokenized texts; see :func:`embed`.

    Each text is pooled on its own, so a batch is never padded to its longest text.
    """
    matrix = load_matrix()
    vectors = np.zeros((len(encodings), matrix.shape[1]), dtype=np.float32)
    for row, encoding in enumerate(encodings):
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if ids.size:
            vectors[row] = _mean_token_vector(matrix, ids)
    return _normalize_rows(vectors)


def _mean_token_vector(matrix: np.ndarray, ids: np.ndarray) -> np.ndarray:
    np.clip(ids, 0, matrix.shape[0] - 1, out=ids)
    if ids.size < _HISTOGRAM_POOLING_MIN_TOKENS:
        mean: np.ndarray = matrix[ids].mean(axis=0, dtype=np.float32)
        return mean
    histogram = np.bincount(ids, minlength=matrix.shape[0]).astype(np.float32)
    pooled: np.ndarray = (histogram @ matrix) / np.float32(ids.size)
    return pooled


def _normalize_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    # Zero rows stay zero instead of becoming NaN.
    np.divide(vectors, norms, out=vectors, where=norms > 0)
    return vectors
