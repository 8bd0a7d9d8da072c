"""The hash model's token counts: exactly the WordLlama tokenizer's, counted piece by piece."""

from __future__ import annotations

import random
from pydoc_data.topics import topics

import pytest

from sparkembed.core import wordllama as wordllama_local
from sparkembed.server.models import HashModel
from sparkembed.server.token_counts import WordLlamaPieceCounter

# Every way a text can make the piece-wise count differ from the whole-text one: runs of
# spaces, spaces at either end, the word marker itself, special tokens in the raw text,
# byte-fallback characters, and digits.
HOSTILE_PARTS = [
    *"abcdefghij KLM  ,.\t\n<>/s9",
    "▁",
    "▁▁",
    " ▁",
    "▁ ",
    "<s>",
    "</s>",
    "<unk>",
    "é",
    "日本",
    "😀",
    "\u200b",
    "  ",
    "   ",
]


def hostile_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(HOSTILE_PARTS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def prose_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(topics.values()).split()
    return [f"[{i}] " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1])
def test_counts_equal_the_whole_text_tokenizer_on_hostile_texts(seed: int) -> None:
    texts = hostile_texts(1500, seed)
    # A tiny cache, so eviction and the uncached path run too.
    counter = WordLlamaPieceCounter(max_pieces=200, max_piece_chars=6)
    counted = [n for k in range(0, len(texts), 100) for n in counter.count(texts[k : k + 100])]
    assert counted == wordllama_local.count_tokens(texts)


@pytest.mark.parametrize("max_pieces", [200_000, 30])  # 30: the cache fills up and restarts
def test_counts_equal_the_tokenizer_on_prose_whether_a_request_is_plain_or_not(max_pieces: int) -> None:
    texts = prose_texts(1200, seed=2)
    counter = WordLlamaPieceCounter(max_pieces=max_pieces)
    want = wordllama_local.count_tokens(texts)
    for start in [*range(0, len(texts), 200), *range(0, len(texts), 200)]:  # twice: from the cache
        plain = texts[start : start + 100]  # split as one string
        mixed = [*texts[start + 100 : start + 200], "  odd  spacing ", "", "</s> end"]
        assert counter.count(plain) == want[start : start + 100]
        assert counter.count(mixed) == [*want[start + 100 : start + 200], 5, 0, 3]
    assert wordllama_local.count_tokens(["  odd  spacing ", "", "</s> end"]) == [5, 0, 3]


@pytest.mark.parametrize(
    "odd",
    [" lead", "trail ", "in  side", "", "mark▁er", "▁", "x<s>y", "a </s>", "<unk>", "<", "<<s>"],
)
def test_one_text_that_is_not_plain_sends_its_request_the_exact_way(odd: str) -> None:
    texts = [*prose_texts(50, seed=3), odd, *prose_texts(3, seed=4)]
    assert WordLlamaPieceCounter().count(texts) == wordllama_local.count_tokens(texts)


def test_a_special_token_split_across_two_texts_counts_each_text_alone() -> None:
    texts = ["ends in <", "s> starts", "<", "/s>", "a <un", "k> b", *["<x>"] * 300]
    assert WordLlamaPieceCounter().count(texts) == wordllama_local.count_tokens(texts)


def test_a_special_token_among_much_markup_is_found() -> None:
    texts = [*["<x>"] * 300, "c </s>"]  # over 256 "<": searched for token by token
    assert WordLlamaPieceCounter().count(texts) == wordllama_local.count_tokens(texts)


def spy_on_tokenizer(counter: WordLlamaPieceCounter) -> list[str]:
    """The pieces ``counter`` hands its BPE model from now on, in order."""
    calls: list[str] = []
    bpe = counter._bpe

    class Spy:
        def tokenize(self, piece: str) -> list[object]:
            calls.append(piece)
            return bpe.tokenize(piece)

    counter._bpe = Spy()
    return calls


def test_only_pieces_seen_twice_are_cached() -> None:
    counter = WordLlamaPieceCounter()
    calls = spy_on_tokenizer(counter)
    want = wordllama_local.count_tokens(["common words here [1]", "common words here [2]", "common [3]"])
    assert counter.count(["common words here [1]"]) == want[:1]  # all new: counted, not cached
    assert counter.count(["common words here [2]"]) == want[1:2]  # seen again: cached now
    assert counter.count(["common [3]"]) == want[2:]
    # "common words here" went to the tokenizer twice, then came from the cache; ids once each.
    words = ["▁common", "▁words", "▁here"]
    assert sorted(calls) == sorted([*words, "▁[1]", *words, "▁[2]", "▁[3]"])


def test_a_piece_that_comes_back_only_much_later_is_not_cached() -> None:
    counter = WordLlamaPieceCounter(recent_pieces=3)
    calls = spy_on_tokenizer(counter)
    for text in ["x1 x2 x3 x4", "y1 y2 y3 y4", "x1", "x1", "x1"]:
        assert counter.count([text]) == wordllama_local.count_tokens([text])
    # x1 came back after four other pieces: counted again, then cached when it came back at once.
    assert calls.count("▁x1") == 3


def test_the_hash_model_bills_wordllama_tokens_and_keeps_no_encodings() -> None:
    texts = ["hello world", "a  b ", "<s>x", "日本語 text"]
    prepared = HashModel(16).prepare(texts)
    assert prepared.token_counts == wordllama_local.count_tokens(texts)
    assert list(prepared.encodings) == []
    assert WordLlamaPieceCounter().count([]) == []
    assert WordLlamaPieceCounter().count(["", ""]) == [0, 0]  # no UTF-8 bytes at all
