"""Request parameters: read, checked, and refused with an error naming them.

Every handler reads its path segments, query values and JSON body through
these functions, so each kind of input is parsed, and each mistake answered,
the same way on every route. ``http_error`` is the one place where a domain
refusal (``InvalidTicker``, ``IngestRefused``, ``TopicLimit``) becomes an HTTP answer.
"""

from __future__ import annotations

import re
from typing import Any

from .hub import TopicLimit
from .ingest import TOPICS_RETRY_S, IngestRefused
from .routing import Exchange, HTTPError
from .ticker import InvalidTicker, loads, parse_symbol

_INTEGER = re.compile(r"-?[0-9]{1,19}")  # ASCII only; one optional sign
_KIND_NAMES = {"ticker": "symbols", "room": "rooms"}


def http_error(exc: InvalidTicker | IngestRefused | TopicLimit) -> HTTPError:
    """The HTTP answer to a domain refusal: its status, or 503 with Retry-After."""
    if isinstance(exc, TopicLimit):
        return HTTPError(503, f"too many {_KIND_NAMES.get(exc.kind, exc.kind + ' topics')}",
                         [("Retry-After", str(TOPICS_RETRY_S))])
    if isinstance(exc, IngestRefused):
        return HTTPError(503, str(exc), [("Retry-After", str(exc.retry_after))])
    return HTTPError(exc.status, str(exc))


def one(params: dict[str, list[str]], name: str) -> str | None:
    """The last value of query parameter ``name``; None when it is absent."""
    values = params.get(name)
    return values[-1] if values else None


def integer(text: str, name: str, low: int, high: int) -> int:
    """``text`` as an integer from ``low`` to ``high``; HTTPError 400 naming ``name`` otherwise."""
    if _INTEGER.fullmatch(text) is None:
        raise HTTPError(400, f"{name}: must be an integer")
    value = int(text)
    if not low <= value <= high:
        raise HTTPError(400, f"{name}: must be between {low} and {high}")
    return value


def int_param(params: dict[str, list[str]], name: str, default: int | None, low: int, high: int) -> int | None:
    """Query parameter ``name`` as an integer from ``low`` to ``high``; ``default`` when it is absent."""
    text = one(params, name)
    return default if text is None else integer(text, name, low, high)


def symbol(ex: Exchange) -> str:
    """The ``{symbol}`` path segment, upper-cased."""
    try:
        return parse_symbol(ex.params["symbol"])
    except InvalidTicker as exc:
        raise http_error(exc) from None


def json_body(ex: Exchange) -> Any:
    """The request body as strict JSON (``ticker.loads``)."""
    try:
        return loads(ex.request.body)
    except InvalidTicker as exc:
        raise http_error(exc) from None
