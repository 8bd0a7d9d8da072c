"""Packing, blank detection, usage apportionment and token estimates (pure)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from sparkembed.core.batching import Packer, apportion, is_blank
from sparkembed.core.tokens import estimate_tokens, utf8_bytes


def pack(token_estimates: list[int], *, max_inputs: int, max_request_tokens: int) -> list[range]:
    """Positions ``0..n-1`` split into requests by one :class:`Packer`, as the engine feeds it."""
    packer: Packer[int] = Packer(max_inputs=max_inputs, max_request_tokens=max_request_tokens)
    requests = [r for position, tokens in enumerate(token_estimates) if (r := packer.add(position, tokens))]
    if last := packer.flush():
        requests.append(last)
    return [range(r[0], r[-1] + 1) for r in requests]


def test_pack_closes_requests_at_max_inputs() -> None:
    assert pack([1] * 10, max_inputs=4, max_request_tokens=1000) == [
        range(0, 4),
        range(4, 8),
        range(8, 10),
    ]


def test_pack_closes_a_request_before_it_would_pass_the_token_cap() -> None:
    assert pack([40, 40, 40, 10, 10], max_inputs=100, max_request_tokens=100) == [
        range(0, 2),
        range(2, 5),
    ]


def test_pack_fills_a_request_exactly_to_the_token_cap() -> None:
    assert pack([50, 50, 1], max_inputs=100, max_request_tokens=100) == [range(0, 2), range(2, 3)]


def test_a_single_input_over_the_token_cap_goes_alone() -> None:
    assert pack([10, 500, 10], max_inputs=100, max_request_tokens=100) == [
        range(0, 1),
        range(1, 2),
        range(2, 3),
    ]


def test_pack_of_nothing_is_no_request() -> None:
    assert pack([], max_inputs=4, max_request_tokens=100) == []


def test_packer_keeps_one_request_open_across_calls() -> None:
    """Inputs fed in separate chunks share requests: only the stream's last is partial."""
    packer: Packer[str] = Packer(max_inputs=4, max_request_tokens=1000)
    closed: list[list[str]] = []
    for chunk in (["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]):
        for item in chunk:
            if request := packer.add(item, 1):
                closed.append(request)
    assert closed == [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    assert len(packer) == 1
    assert packer.flush() == ["i"]
    assert packer.flush() == []


def test_packer_sends_an_input_over_the_cap_alone() -> None:
    packer: Packer[str] = Packer(max_inputs=3, max_request_tokens=10)
    assert packer.add("a", 5) is None
    assert packer.add("b", 20) == ["a"]  # b would pass the cap: a's request closes
    assert packer.add("c", 1) == ["b"]  # b alone is over the cap: nothing joins it
    assert packer.add("d", 1) is None
    assert packer.flush() == ["c", "d"]


def test_packer_with_one_input_per_request() -> None:
    packer: Packer[str] = Packer(max_inputs=1, max_request_tokens=10)
    assert [packer.add(x, 50) for x in "abc"] == [["a"], ["b"], ["c"]]
    assert packer.flush() == []


def test_packer_refuses_zero_limits() -> None:
    with pytest.raises(ValueError):
        Packer(max_inputs=0, max_request_tokens=10)


def test_apportion_gives_the_largest_remainders_the_leftover() -> None:
    assert apportion(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert apportion(10, [1, 2, 2]).tolist() == [2, 4, 4]
    assert apportion(7, [3, 1]).tolist() == [5, 2]  # 5.25 and 1.75: the .75 gets the extra


def test_apportion_sums_exactly_for_random_cases() -> None:
    rng = random.Random(7)
    for _ in range(500):
        weights = [rng.randint(0, 5000) for _ in range(rng.randint(1, 1024))]
        total = rng.randint(0, 2_000_000)
        shares = apportion(total, weights)
        assert shares.dtype == np.int64
        assert int(shares.sum()) == total
        assert (shares >= 0).all()
        exact = np.asarray(weights) * total / max(sum(weights), 1)
        if sum(weights):
            assert np.all(np.abs(shares - exact) < 1)


def test_apportion_with_zero_weights_splits_evenly_and_empty_is_empty() -> None:
    assert apportion(5, [0, 0]).tolist() == [3, 2]
    assert apportion(0, []).tolist() == []


@pytest.mark.parametrize(
    ("text", "blank"),
    [
        (None, True),
        (float("nan"), True),
        ("", True),
        ("   ", True),
        ("\t\n\u00a0\u2003", True),
        ("a", False),
        ("  a  ", False),
        (5, False),
        (1.5, False),
    ],
)
def test_is_blank(text: object, blank: bool) -> None:
    assert is_blank(text) is blank


def test_is_blank_knows_pandas_missing_values() -> None:
    pd = pytest.importorskip("pandas")
    assert is_blank(pd.NA)
    assert is_blank(pd.NaT)


def test_upper_bound_is_the_utf8_length() -> None:
    assert utf8_bytes("hello") == 5
    assert utf8_bytes("héllo") == 6
    assert utf8_bytes("日本") == 6


def test_estimate_is_a_quarter_of_the_bytes_plus_one() -> None:
    assert estimate_tokens("") == 1
    assert estimate_tokens("abcd") == 2
    assert estimate_tokens("abcde") == 3
    assert estimate_tokens("日本") == math.ceil(6 / 4) + 1


def test_a_lone_surrogate_is_estimated_not_raised() -> None:
    """Python strings from Arrow or JSON can hold lone surrogates; they count 3 bytes (U+FFFD)."""
    assert utf8_bytes("lone \ud800 surrogate") == len("lone \ufffd surrogate".encode())
    assert estimate_tokens("lone \ud800 surrogate") == estimate_tokens("lone \ufffd surrogate")


def test_estimate_never_exceeds_the_upper_bound_for_real_text() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert estimate_tokens(text) < utf8_bytes(text) / 3
