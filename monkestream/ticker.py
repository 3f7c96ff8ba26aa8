"""Tickers: validating what feeders send, the one JSON form clients receive, and their topics.

Prices stay exact from end to end: JSON numbers are read as ``Decimal``, kept as
their canonical decimal text, written to SQLite as TEXT and to clients as a
JSON number with exactly those digits. No binary float is ever involved.
"""

from __future__ import annotations

import json
import re
import time
from decimal import Context, Decimal, InvalidOperation
from functools import partial
from typing import Any, Callable, NamedTuple

from .jsontext import object_template, string

SYMBOL_RE = re.compile(r"[A-Za-z0-9._-]{1,20}")
CURRENCY_RE = re.compile(r"[A-Za-z]{3,8}")
MAX_PRICE_DIGITS = 40          # significant digits kept
MAX_PRICE_EXPONENT = 30        # 1e30 > any price; 1e-30 < any tick size
MAX_BULK_TICKERS = 10000
TOPIC_PREFIX = "ticker:"
_EXACT = Context(prec=MAX_PRICE_DIGITS + 1)  # normalize() without rounding any accepted price
# ASCII digits and spaces only: Decimal() would also take "١٢" or full-width digits
_PLAIN_DECIMAL = re.compile(r"([0-9]{1,20})(?:\.([0-9]{0,20}))?")
_CANONICAL_DECIMAL = re.compile(r"[1-9][0-9]{0,19}(?:\.[0-9]{0,19}[1-9])?|0\.[0-9]{0,19}[1-9]")
MEMO_ENTRIES = 4096            # validated symbols and currencies remembered
_symbols: dict[str, str] = {}
_currencies: dict[str, str] = {}
_DECIMAL_TEXT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,4})?\s*", re.ASCII)


_TICKER_JSON = object_template("symbol", "price", "currency", "createdAt")


class InvalidTicker(ValueError):
    """A ticker field is wrong; ``field`` names it and ``status`` is 400 or 422."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


class Ticker(NamedTuple):
    """One price of one symbol at one time, as clients and the database see it."""

    symbol: str
    price: str          # canonical decimal text, e.g. "0.0731"
    currency: str
    created_at: int     # unix seconds

    def to_json(self) -> str:
        return _TICKER_JSON % (string(self.symbol), self.price, string(self.currency), self.created_at)

    def to_dict(self) -> dict[str, Any]:
        return {"symbol": self.symbol, "price": Decimal(self.price),
                "currency": self.currency, "createdAt": self.created_at}


# Ticker(...) runs a generated Python __new__; the tuple constructor gives the same
# object at half the cost, which bulk ingest pays once per ticker.
_new_ticker: Callable[[tuple[str, str, str, int]], Ticker] = partial(tuple.__new__, Ticker)  # type: ignore[assignment]


def parse_symbol(text: str) -> str:
    """The symbol upper-cased, or InvalidTicker."""
    known = _symbols.get(text) if type(text) is str else None
    if known is not None:
        return known
    if not isinstance(text, str) or not SYMBOL_RE.fullmatch(text):
        raise InvalidTicker("symbol", "must be 1-20 characters of A-Z a-z 0-9 . _ -", 400)
    if len(_symbols) >= MEMO_ENTRIES:
        _symbols.clear()
    known = _symbols[text] = text.upper()
    return known


def parse_price(value: Any) -> str:
    """A positive finite price (number or decimal string) as exact canonical text."""
    kind = type(value)
    if kind is str or kind is Decimal:
        plain = _plain_price(value if kind is str else format(value, "f") if value.is_finite()
                             and -MAX_PRICE_EXPONENT <= value.adjusted() <= MAX_PRICE_EXPONENT else "")
        if plain is not None:
            return plain
    elif kind is int and 0 < value < 10**MAX_PRICE_EXPONENT:
        return str(value)
    return _parse_price_strictly(value)


def _plain_price(text: str) -> str | None:
    """The common case without Decimal arithmetic: positive, at most 20 + 20 digits, no exponent."""
    if _CANONICAL_DECIMAL.fullmatch(text) is not None:
        return text  # what feeders usually send: already in canonical form
    m = _PLAIN_DECIMAL.fullmatch(text)
    if m is None:
        return None
    whole = m.group(1).lstrip("0") or "0"
    fraction = (m.group(2) or "").rstrip("0")
    if fraction:
        return f"{whole}.{fraction}"
    return whole if whole != "0" else None  # zero: the strict path says why it is refused


def _parse_price_strictly(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise InvalidTicker("price", "must be a number or a decimal string")
    if isinstance(value, str):
        if not _DECIMAL_TEXT.fullmatch(value):
            raise InvalidTicker("price", "is not a decimal number")
        value = value.strip()
    try:
        number = Decimal(value) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise InvalidTicker("price", "is not a decimal number") from None
    if not number.is_finite():
        raise InvalidTicker("price", "must be finite")
    if number <= 0:
        raise InvalidTicker("price", "must be positive")
    if not -MAX_PRICE_EXPONENT <= number.adjusted() <= MAX_PRICE_EXPONENT:
        raise InvalidTicker("price", "is out of range")
    significant = "".join(map(str, number.as_tuple().digits)).rstrip("0")
    if len(significant) > MAX_PRICE_DIGITS:
        raise InvalidTicker("price", f"has more than {MAX_PRICE_DIGITS} significant digits")
    return format(_EXACT.normalize(number), "f")


def parse_currency(value: Any) -> str:
    if value is None:
        return "USD"
    known = _currencies.get(value) if type(value) is str else None
    if known is not None:
        return known
    if not isinstance(value, str) or not CURRENCY_RE.fullmatch(value):
        raise InvalidTicker("currency", "must be 3-8 letters")
    if len(_currencies) >= MEMO_ENTRIES:
        _currencies.clear()
    known = _currencies[value] = value.upper()
    return known


def parse_ticker(body: Any, symbol: str | None = None, now: float | None = None) -> Ticker:
    """Validate one ticker object; ``symbol`` comes from the path when given."""
    if not isinstance(body, dict):
        raise InvalidTicker("body", "must be a JSON object", 400)
    if symbol is None:
        if "symbol" not in body:
            raise InvalidTicker("symbol", "is required")
        symbol = body["symbol"]
        if not isinstance(symbol, str):
            raise InvalidTicker("symbol", "must be a string")
    if "price" not in body:
        raise InvalidTicker("price", "is required")
    return _new_ticker((parse_symbol(symbol), parse_price(body["price"]),
                        parse_currency(body.get("currency")), int(time.time() if now is None else now)))


def parse_tickers(body: Any, now: float | None = None) -> list[Ticker]:
    """Validate a bulk publish: an array of at most ``MAX_BULK_TICKERS`` tickers, each with its symbol."""
    if not isinstance(body, list):
        raise InvalidTicker("body", "must be a JSON array of tickers", 400)
    if len(body) > MAX_BULK_TICKERS:
        raise InvalidTicker("body", f"holds more than {MAX_BULK_TICKERS} tickers", 413)
    now = time.time() if now is None else now
    tickers = []
    for i, item in enumerate(body):
        try:
            tickers.append(parse_ticker(item, now=now))
        except InvalidTicker as exc:
            raise InvalidTicker(f"[{i}].{exc.field}", str(exc).split(": ", 1)[1], exc.status) from None
    return tickers


def ticker_topic(symbol: str) -> str:
    """The hub topic carrying a symbol's prices."""
    return TOPIC_PREFIX + symbol


def topic_symbol(topic: str) -> str | None:
    """The symbol whose prices ``topic`` carries; None for any other topic."""
    return topic[len(TOPIC_PREFIX):] if topic.startswith(TOPIC_PREFIX) else None


def _reject_constant(name: str) -> Any:
    raise InvalidTicker("body", f"{name} is not valid JSON", 400)


def _decimal(text: str) -> Decimal:
    if len(text) > 100:
        raise InvalidTicker("body", "a number is too long", 400)
    return Decimal(text)


def _int(text: str) -> int | Decimal:
    if len(text) > 100:
        raise InvalidTicker("body", "a number is too long", 400)
    return int(text)


_decoder = json.JSONDecoder(parse_float=_decimal, parse_int=_int, parse_constant=_reject_constant)


def loads(body: bytes) -> Any:
    """Decode a JSON request body strictly: UTF-8, no NaN/Infinity, exact decimals."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidTicker("body", "is not valid UTF-8", 400) from None
    try:
        return _decoder.decode(text)
    except RecursionError:
        raise InvalidTicker("body", "is nested too deeply", 400) from None
    except json.JSONDecodeError as exc:
        raise InvalidTicker("body", f"is not valid JSON ({exc.msg} at {exc.pos})", 400) from None
