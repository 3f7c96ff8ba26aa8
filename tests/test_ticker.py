"""Ticker validation: the fast path for plain decimals agrees with the strict one."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monkestream.ticker import InvalidTicker, _parse_price_strictly, parse_price, parse_symbol

plain_text = st.from_regex(r"\A[0-9]{1,22}(\.[0-9]{0,22})?\Z")
decimals = st.decimals(allow_nan=True, allow_infinity=True, places=None)


def outcome(fn, value):
    try:
        return fn(value)
    except InvalidTicker as exc:
        return ("error", str(exc))


@settings(max_examples=400, deadline=None)
@given(st.one_of(plain_text, decimals, st.integers(-10, 10**31), st.text(max_size=12)))
def test_fast_and_strict_price_parsing_agree(value):
    assert outcome(parse_price, value) == outcome(_parse_price_strictly, value)


@pytest.mark.parametrize("given_price, expected", [
    ("0.0800", "0.08"), ("1000", "1000"), (Decimal("1E+3"), "1000"), (7, "7"), ("5.", "5"),
    ("0.1000000000000000055511151231257827", "0.1000000000000000055511151231257827"),
])
def test_prices_are_canonical_and_exact(given_price, expected):
    assert parse_price(given_price) == expected


def test_symbols_are_upper_cased_and_checked_every_time():
    assert parse_symbol("doge") == "DOGE"
    assert parse_symbol("doge") == "DOGE"
    with pytest.raises(InvalidTicker):
        parse_symbol("do ge")
    with pytest.raises(InvalidTicker):
        parse_symbol(5)  # type: ignore[arg-type]
