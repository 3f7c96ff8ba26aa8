"""JSON out, the one encoder: compact, ASCII, no NaN, and ``Decimal`` values as exact JSON numbers.

Every JSON text monkestream writes (responses, errors, event data) comes from
this module: ``dumps`` for any value, so no path can emit NaN or Infinity,
which JSON does not have; and, for the one hot path that cannot afford it (a
ticker per published price), ``object_template`` and ``string``, with
``array`` to join texts already made.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Iterable

_encode_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


class _HasDecimal(Exception):
    pass


def _refuse(value: Any) -> Any:
    if isinstance(value, Decimal):
        raise _HasDecimal
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_plain = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=_refuse).encode


def dumps(value: Any) -> str:
    """Compact JSON text; ``Decimal`` becomes a number with exactly its digits; NaN raises ValueError."""
    try:
        return _plain(value)  # the C encoder, for everything without a Decimal
    except _HasDecimal:
        return _exact(value)


def _exact(value: Any) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("non-finite Decimal")
        return format(value, "f")
    if isinstance(value, dict):
        return "{" + ",".join(_encode_str(str(k)) + ":" + _exact(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return array(_exact(v) for v in value)
    return _plain(value)


def string(text: str) -> str:
    """``text`` as a JSON string, escaped to ASCII as ``dumps`` escapes it."""
    return _encode_str(text)


def object_template(*keys: str) -> str:
    """A ``%`` template for a JSON object with these keys, in order.

    Fill it with a tuple of each value's JSON text: ``string(text)``, an
    ``int``, or decimal text already in canonical form (an exact number).
    """
    return "{" + ",".join(_encode_str(key) + ":%s" for key in keys) + "}"


def array(texts: Iterable[str]) -> str:
    """A JSON array of values already encoded here."""
    return "[" + ",".join(texts) + "]"
