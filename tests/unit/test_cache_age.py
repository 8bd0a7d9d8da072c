"""``sparkembed cache vacuum --older-than AGE``: ages read as a user writes them."""

from __future__ import annotations

import pytest

from sparkembed.cli import parse_age
from sparkembed.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90d", 90 * 86_400),
        ("12h", 43_200),
        ("30m", 1_800),
        ("45s", 45),
        ("2w", 14 * 86_400),
        ("1.5d", 129_600),
    ],
)
def test_an_age_is_a_number_and_a_unit(text: str, seconds: float) -> None:
    assert parse_age(text) == seconds


@pytest.mark.parametrize("text", ["90", "d", "-1d", "0d", "3 months", "soon"])
def test_anything_else_is_refused_naming_the_form(text: str) -> None:
    with pytest.raises(ConfigError, match="such as 90d"):
        parse_age(text)
