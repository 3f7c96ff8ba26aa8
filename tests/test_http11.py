"""Tests for monkestream.http11: vectors fed whole, byte by byte and with garbage."""

from __future__ import annotations

import http.client
import io
import socket
import threading
import urllib.request
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monkestream.errors import ProtocolError
from monkestream.http11 import (
    LAST_CHUNK,
    MAX_BODY_BYTES,
    MAX_CHUNK_EXT_BYTES,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE_BYTES,
    REASONS,
    Request,
    RequestParser,
    chunk,
    response_head,
)

PROPERTY = settings(
    max_examples=200,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
GARBAGE = b"\x00\x01 garbage\r\n\r\n"


# -- harness -----------------------------------------------------------------


def run(chunks, max_body_bytes=MAX_BODY_BYTES):
    """Feed ``chunks`` one by one, draining requests after each feed."""
    parser = RequestParser(max_body_bytes)
    requests = []
    try:
        for piece in chunks:
            parser.feed(piece)
            while (request := parser.next_request()) is not None:
                requests.append(request)
    except ProtocolError as exc:
        return requests, exc.status_hint
    return requests, None


def whole(data, **kwargs):
    return run([data], **kwargs)


def bytewise(data, **kwargs):
    return run([data[i : i + 1] for i in range(len(data))], **kwargs)


def split(data, points):
    edges = [0, *sorted(set(points)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def agreed(data, **kwargs):
    """Parse ``data`` whole and byte by byte, check both agree, return the result."""
    result = whole(data, **kwargs)
    assert bytewise(data, **kwargs) == result
    return result


def one(data, **kwargs) -> Request:
    requests, status = agreed(data, **kwargs)
    assert status is None
    assert len(requests) == 1
    return requests[0]


def get(target="/", *lines: str) -> bytes:
    head = f"GET {target} HTTP/1.1\r\nHost: example.com\r\n" + "".join(
        line + "\r\n" for line in lines
    )
    return (head + "\r\n").encode("latin-1")


def post(body: bytes, *lines: str, method="POST", target="/publish") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: example.com\r\n" + "".join(
        line + "\r\n" for line in lines
    )
    return (head + "\r\n").encode("latin-1") + body


CHUNKED = "Transfer-Encoding: chunked"


# -- valid vectors -----------------------------------------------------------

VALID = {
    "get": get(),
    "get-query": get("/ticker/DOGE/event?x=1&y=2"),
    "post-length": post(b'{"p": 1}', "Content-Length: 8"),
    "post-chunked": post(b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", CHUNKED),
    "post-chunked-trailer": post(
        b"4\r\nabcd\r\n0;done\r\nDigest: x\r\nOther: y\r\n\r\n", CHUNKED
    ),
    "leading-empty-lines": b"\r\n\r\n" + get(),
    "http10-no-host": b"GET /old HTTP/1.0\r\n\r\n",
    "http10-keep-alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "options-asterisk": b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    "absolute-form": b"GET http://example.com:8080/x/y?z=1 HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "absolute-form-no-path": b"GET https://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "head": b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n",
    "delete-empty": b"DELETE /d HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    "ows-and-obs-text": get("/", "X-A: \t spaced \t", "X-B:caf\xe9", "X-Empty:"),
    "get-with-body": post(b"hi", "Content-Length: 2", method="GET"),
    "ipv6-host": b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
    "connection-close": get("/", "Connection: close"),
    "expect-complete": post(b"abc", "Content-Length: 3", "Expect: 100-continue"),
    "percent-path": get("/ticker/%F0%9F%90%B6/a%20b"),
    "many-headers": get("/", *[f"X-{i}: {i}" for i in range(MAX_HEADERS - 1)]),
}


@pytest.mark.parametrize("data", VALID.values(), ids=VALID.keys())
def test_valid_vector_whole_bytewise_and_with_garbage(data):
    requests, status = agreed(data)
    assert status is None and len(requests) == 1
    with_garbage = agreed(data + GARBAGE)
    assert with_garbage[0] == requests
    if requests[0].keep_alive:
        assert with_garbage[1] == 400
    else:
        assert with_garbage[1] is None


def test_simple_get_fields():
    request = one(get("/ticker/DOGE/event?x=1", "Accept: text/event-stream"))
    assert request == Request(
        method="GET",
        target="/ticker/DOGE/event?x=1",
        path="/ticker/DOGE/event",
        query="x=1",
        version="1.1",
        headers=[("host", "example.com"), ("accept", "text/event-stream")],
        body=b"",
        keep_alive=True,
    )
    assert request.header("accept") == "text/event-stream"
    assert request.header("missing") is None


def test_header_names_lowered_values_kept_and_stripped():
    request = one(VALID["ows-and-obs-text"])
    assert request.headers[1:] == [("x-a", "spaced"), ("x-b", "caf\xe9"), ("x-empty", "")]


def test_header_returns_first_of_repeated():
    request = one(get("/", "X-Tag: a", "X-Tag: b"))
    assert request.header("x-tag") == "a"


def test_absolute_form_is_reduced_to_path_and_query():
    request = one(VALID["absolute-form"])
    assert (request.path, request.query) == ("/x/y", "z=1")
    assert request.target == "http://example.com:8080/x/y?z=1"
    assert one(VALID["absolute-form-no-path"]).path == "/"


def test_options_asterisk():
    request = one(VALID["options-asterisk"])
    assert (request.method, request.path, request.query) == ("OPTIONS", "*", "")


def test_percent_decoding_of_path():
    request = one(get("/ticker/%F0%9F%90%B6/a%20b%2Fc"))
    assert request.path == "/ticker/\N{DOG FACE}/a b/c"
    assert request.target == "/ticker/%F0%9F%90%B6/a%20b%2Fc"


def test_content_length_body():
    request = one(post(b"hello world", "Content-Length: 11"))
    assert request.body == b"hello world"
    assert one(post(b"", "Content-Length: 0")).body == b""
    assert one(post(b"x", "Content-Length: 01")).body == b"x"


def test_get_without_framing_has_empty_body():
    for method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        request = one(f"{method} / HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert request.body == b""


# -- chunked -------------------------------------------------------------------


def test_chunked_body_with_extensions_and_trailers():
    body = (
        b"5;name=value;flag\r\nhello\r\n"
        b'1 ; q = "a \\" b"\r\n \r\n'
        b"A\r\n0123456789\r\n"
        b"0\r\nTrailer-One: 1\r\nTrailer-Two: 2\r\n\r\n"
    )
    request = one(post(body, CHUNKED))
    assert request.body == b"hello 0123456789"
    # Trailer fields are discarded.
    assert request.header("trailer-one") is None


@pytest.mark.parametrize("cut", range(1, 60))
def test_chunked_split_anywhere(cut):
    data = post(b"3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n", CHUNKED)
    data += get("/next")
    requests, status = run([data[:cut], data[cut:]])
    assert status is None
    assert [r.body for r in requests] == [b"abc0123456789abcdef", b""]
    assert requests[1].path == "/next"


def test_chunked_size_is_case_insensitive_hex_with_leading_zeros():
    request = one(post(b"0000a\r\n0123456789\r\n00\r\n\r\n", "Transfer-Encoding: CHUNKED"))
    assert request.body == b"0123456789"


def test_chunked_ext_at_bound_is_accepted():
    extension = b";" + b"e" * (MAX_CHUNK_EXT_BYTES - 1)
    request = one(post(b"1" + extension + b"\r\nx\r\n0\r\n\r\n", CHUNKED))
    assert request.body == b"x"


def test_chunked_total_at_max_body_is_accepted():
    body = b"5\r\n12345\r\n5\r\n67890\r\n0\r\n\r\n"
    assert one(post(body, CHUNKED), max_body_bytes=10).body == b"1234567890"


# -- pipelining, keep-alive, progress --------------------------------------------


def test_http11_rule_1_three_pipelined_requests_come_out_one_per_call():
    data = get("/a") + post(b"xyz", "Content-Length: 3") + post(b"1\r\nq\r\n0\r\n\r\n", CHUNKED)
    parser = RequestParser()
    parser.feed(data)
    first, second, third = (parser.next_request() for _ in range(3))
    assert (first.path, second.body, third.body) == ("/a", b"xyz", b"q")
    assert parser.next_request() is None
    assert not parser.in_progress


def test_http11_rule_1_bytes_after_a_request_stay_buffered():
    parser = RequestParser()
    parser.feed(get("/a") + b"GET /b HT")
    assert parser.next_request().path == "/a"
    assert parser.in_progress
    assert parser.next_request() is None
    parser.feed(b"TP/1.1\r\nHost: a\r\n\r\n")
    assert parser.next_request().path == "/b"


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("1.1", None, True),
        ("1.1", "keep-alive", True),
        ("1.1", "close", False),
        ("1.1", "Upgrade, CLOSE", False),
        ("1.1", "keep-alive, close", False),
        ("1.0", None, False),
        ("1.0", "keep-alive", True),
        ("1.0", "Keep-Alive", True),
        ("1.0", "close", False),
        ("1.0", "keep-alive, close", False),
    ],
)
def test_keep_alive(version, connection, keep_alive):
    head = f"GET / HTTP/{version}\r\nHost: a\r\n"
    if connection is not None:
        head += f"Connection: {connection}\r\n"
    assert one((head + "\r\n").encode()).keep_alive is keep_alive


def test_connection_fields_are_combined():
    assert not one(get("/", "Connection: upgrade", "Connection: close")).keep_alive


def test_http11_rule_7_nothing_is_read_after_a_closing_request():
    parser = RequestParser()
    parser.feed(get("/a", "Connection: close") + get("/b"))
    assert parser.next_request().path == "/a"
    assert parser.next_request() is None
    parser.feed(get("/c"))
    assert parser.next_request() is None
    assert not parser.in_progress


def test_in_progress():
    parser = RequestParser()
    assert not parser.in_progress
    parser.feed(b"\r\n")
    assert parser.next_request() is None
    assert not parser.in_progress  # a stray empty line is not a request
    parser.feed(b"G")
    assert parser.in_progress
    parser.feed(get()[1:])
    assert parser.next_request() is not None
    assert not parser.in_progress
    parser.feed(post(b"", "Content-Length: 4"))
    assert parser.next_request() is None
    assert parser.in_progress  # head parsed, body pending


# -- 100-continue ----------------------------------------------------------------


def test_wants_continue_until_sent():
    parser = RequestParser()
    parser.feed(post(b"", "Content-Length: 5", "Expect: 100-continue"))
    assert not parser.wants_continue
    assert parser.next_request() is None
    assert parser.wants_continue
    parser.continue_sent()
    assert not parser.wants_continue
    parser.feed(b"hel")
    assert parser.next_request() is None
    assert not parser.wants_continue
    parser.feed(b"lo")
    assert parser.next_request().body == b"hello"
    assert not parser.wants_continue


def test_wants_continue_cleared_when_body_arrives_unasked():
    parser = RequestParser()
    parser.feed(post(b"", CHUNKED, "Expect: 100-Continue"))
    assert parser.next_request() is None
    assert parser.wants_continue
    parser.feed(b"1\r\nx\r\n0\r\n\r\n")
    assert parser.next_request().body == b"x"
    assert not parser.wants_continue


@pytest.mark.parametrize(
    "data",
    [
        post(b"", "Content-Length: 0", "Expect: 100-continue"),
        b"POST / HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    ],
    ids=["no-body", "http10"],
)
def test_wants_continue_not_raised(data):
    parser = RequestParser()
    parser.feed(data)
    parser.next_request()
    assert not parser.wants_continue


# -- query parameters ------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "params"),
    [
        ("", {}),
        ("a=1&b=2&a=3", {"a": ["1", "3"], "b": ["2"]}),
        ("flag&empty=", {"flag": [""], "empty": [""]}),
        ("q=a+b%20c", {"q": ["a b c"]}),
        ("cur=%E2%82%AC", {"cur": ["\N{EURO SIGN}"]}),
        ("k%3D=v%26", {"k=": ["v&"]}),
    ],
)
def test_query_params(query, params):
    target = "/s?" + query if query else "/s"
    assert one(get(target)).query_params() == params


@pytest.mark.parametrize("query", ["a=%zz", "a=%4", "%", "a=%ff", "a=%C3%28"])
def test_query_params_refuse_bad_encoding(query):
    request = one(get("/s?" + query))
    assert request.query == query
    with pytest.raises(ProtocolError) as info:
        request.query_params()
    assert info.value.status_hint == 400


# -- every error rule, with its status -----------------------------------------------

LONG_LINE = b"GET /" + b"a" * MAX_REQUEST_LINE_BYTES + b" HTTP/1.1\r\nHost: a\r\n\r\n"
BIG_HEAD = get("/", *[f"X-{i}: {'v' * 100}" for i in range(MAX_HEAD_BYTES // 100)])
TOO_MANY = get("/", *[f"X-{i}: v" for i in range(MAX_HEADERS)])
CLIENT_HELLO = bytes.fromhex("1603010200010001fc0303") + b"\x00" * 40

ERRORS = {
    # request line
    "bare-cr-in-line": (b"GET /\rx HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "bare-lf-line-ending": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "lf-only-before-line": (b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "double-space": (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "leading-space": (b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "trailing-space": (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
    "tab-separator": (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "invalid-method-token": (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "unknown-method": (b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    "lowercase-method": (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    "connect-authority-form": (b"CONNECT a.com:443 HTTP/1.1\r\nHost: a.com\r\n\r\n", 501),
    "version-1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    "version-2.0": (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "version-lowercase": (b"GET / http/1.1\r\nHost: a\r\n\r\n", 400),
    "version-garbage": (b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n", 400),
    "version-two-digits": (b"GET / HTTP/11.0\r\nHost: a\r\n\r\n", 400),
    "http09": (b"GET /\r\n", 400),
    "tls-client-hello": (CLIENT_HELLO, 400),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "too-many-empty-lines": (b"\r\n" * 9 + get(), 400),
    "request-line-too-long": (LONG_LINE, 414),
    # request target
    "target-not-origin-form": (b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "asterisk-not-options": (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "target-non-ascii": (b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "target-del": (b"GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "target-fragment": (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "percent-not-hex": (get("/a%zz"), 400),
    "percent-truncated": (get("/a%4"), 400),
    "percent-not-utf8": (get("/a%ff"), 400),
    "percent-nul": (get("/a%00b"), 400),
    "percent-newline": (get("/a%0d%0ab"), 400),
    "absolute-form-userinfo": (b"GET http://u@a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n", 400),
    "absolute-form-empty-host": (b"GET http:///x HTTP/1.1\r\nHost: a.com\r\n\r\n", 400),
    # fields
    "space-before-colon": (get("/", "X-A : 1"), 400),
    "tab-before-colon": (get("/", "X-A\t: 1"), 400),
    "obs-fold": (get("/", "X-A: 1", " continued"), 400),
    "whitespace-first-line": (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    "no-colon": (get("/", "NoColonHere"), 400),
    "empty-name": (get("/", ": v"), 400),
    "invalid-name": (get("/", "X(A): v"), 400),
    "nul-in-value": (get("/", "X-A: a\x00b"), 400),
    "ctl-in-value": (get("/", "X-A: a\x01b"), 400),
    "del-in-value": (get("/", "X-A: a\x7fb"), 400),
    "bare-cr-in-value": (get("/", "X-A: a\rb"), 400),
    "bare-lf-in-fields": (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    "bare-lf-terminator": (b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400),
    "head-too-large": (BIG_HEAD, 431),
    "too-many-headers": (TOO_MANY, 431),
    # Host
    "missing-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (get("/", "Host: example.com"), 400),
    "two-hosts-http10": (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "host-space": (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "host-slash": (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    "host-userinfo": (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    "host-empty": (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
    "host-bad-port": (b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400),
    # framing
    "length-and-chunked": (post(b"0\r\n\r\n", "Content-Length: 5", CHUNKED), 400),
    "chunked-and-length": (post(b"0\r\n\r\n", CHUNKED, "Content-Length: 5"), 400),
    "length-list": (post(b"12345", "Content-Length: 5, 5"), 400),
    "length-repeated": (post(b"12345", "Content-Length: 5", "Content-Length: 5"), 400),
    "length-plus": (post(b"12345", "Content-Length: +5"), 400),
    "length-negative": (post(b"12345", "Content-Length: -5"), 400),
    "length-hex": (post(b"12345", "Content-Length: 0x5"), 400),
    "length-inner-space": (post(b"12345", "Content-Length: 1 2"), 400),
    "length-empty": (post(b"12345", "Content-Length:"), 400),
    "length-superscript": (post(b"12345", "Content-Length: \xb2"), 400),
    "length-too-many-digits": (post(b"", "Content-Length: " + "0" * 19), 400),
    "length-over-max": (post(b"", f"Content-Length: {MAX_BODY_BYTES + 1}"), 413),
    "te-gzip": (post(b"", "Transfer-Encoding: gzip"), 501),
    "te-gzip-chunked": (post(b"", "Transfer-Encoding: gzip, chunked"), 501),
    "te-chunked-not-last": (post(b"", "Transfer-Encoding: chunked, gzip"), 501),
    "te-two-fields": (post(b"", CHUNKED, CHUNKED), 501),
    "te-identity": (post(b"", "Transfer-Encoding: identity"), 501),
    "te-empty": (post(b"", "Transfer-Encoding:"), 400),
    "te-http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "post-no-length": (post(b""), 411),
    "put-no-length": (post(b"", method="PUT"), 411),
    "patch-no-length": (post(b"", method="PATCH"), 411),
    # chunked body
    "chunk-size-not-hex": (post(b"g\r\n", CHUNKED), 400),
    "chunk-size-0x": (post(b"0x5\r\nhello\r\n0\r\n\r\n", CHUNKED), 400),
    "chunk-size-negative": (post(b"-5\r\n", CHUNKED), 400),
    "chunk-size-space": (post(b"5 \r\nhello\r\n0\r\n\r\n", CHUNKED), 400),
    "chunk-size-empty": (post(b"\r\nhello\r\n0\r\n\r\n", CHUNKED), 400),
    "chunk-size-too-many-digits": (post(b"0" * 17 + b"1\r\nx\r\n0\r\n\r\n", CHUNKED), 400),
    "chunk-ext-too-long": (
        post(b"1;" + b"e" * MAX_CHUNK_EXT_BYTES + b"\r\nx\r\n0\r\n\r\n", CHUNKED),
        400,
    ),
    "chunk-line-too-long": (post(b"1;" + b"e" * (MAX_CHUNK_EXT_BYTES + 40), CHUNKED), 400),
    "chunk-ext-invalid": (post(b"1;a=b c\r\nx\r\n0\r\n\r\n", CHUNKED), 400),
    "chunk-size-bare-lf": (post(b"1\nx\r\n0\r\n\r\n", CHUNKED), 400),
    "chunk-data-no-crlf": (post(b"1\r\nxy\r\n0\r\n\r\n", CHUNKED), 400),
    "chunk-data-bare-lf": (post(b"1\r\nx\n0\r\n\r\n", CHUNKED), 400),
    "chunk-over-max": (post(b"100001\r\n", CHUNKED), 413),
    "chunks-sum-over-max": (post(b"80000\r\n" + b"x" * 0x80000 + b"\r\n80001\r\n", CHUNKED), 413),
    "trailer-bad-field": (post(b"0\r\nBad Field: x\r\n\r\n", CHUNKED), 400),
    "trailer-obs-fold": (post(b"0\r\nA: x\r\n y\r\n\r\n", CHUNKED), 400),
    "trailer-too-large": (post(b"0\r\nX: " + b"v" * 5000 + b"\r\n\r\n", CHUNKED), 431),
    "trailer-too-many": (
        post(b"0\r\n" + b"".join(b"T%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n", CHUNKED),
        431,
    ),
    # expectations
    "expect-other": (post(b"abc", "Content-Length: 3", "Expect: 200-ok"), 417),
    "expect-list": (post(b"abc", "Content-Length: 3", "Expect: 100-continue, x"), 417),
}


@pytest.mark.parametrize(("data", "status"), ERRORS.values(), ids=ERRORS.keys())
def test_error_rule(data, status):
    assert agreed(data) == ([], status)
    assert agreed(data + GARBAGE) == ([], status)


@pytest.mark.parametrize(("data", "status"), ERRORS.values(), ids=ERRORS.keys())
def test_error_after_a_valid_request(data, status):
    requests, got = whole(get("/first") + data)
    assert [r.path for r in requests] == ["/first"]
    assert got == status


def test_413_is_raised_from_the_head():
    parser = RequestParser(max_body_bytes=10)
    parser.feed(post(b"", "Content-Length: 11"))
    with pytest.raises(ProtocolError) as info:
        parser.next_request()
    assert info.value.status_hint == 413
    assert agreed(post(b"x" * 10, "Content-Length: 10"), max_body_bytes=10)[1] is None


@pytest.mark.parametrize(
    ("prefix", "status"),
    [
        (CLIENT_HELLO[:1], 400),
        (b"PRI * HTTP/2.0\r\n", 400),
        (b"GET /\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\n", 400),
        (b"GET /" + b"a" * MAX_REQUEST_LINE_BYTES, 414),
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEAD_BYTES // 6), 431),
    ],
    ids=["tls", "h2-preface", "http09", "bare-lf", "long-line", "big-head"],
)
def test_http11_rule_4_errors_are_raised_as_soon_as_detectable(prefix, status):
    parser = RequestParser()
    parser.feed(prefix)
    with pytest.raises(ProtocolError) as info:
        parser.next_request()
    assert info.value.status_hint == status


def test_request_line_at_limit_is_accepted():
    target = b"/" + b"a" * (MAX_REQUEST_LINE_BYTES - len(b"GET  HTTP/1.1") - 1)
    line = b"GET " + target + b" HTTP/1.1"
    assert len(line) == MAX_REQUEST_LINE_BYTES
    assert one(line + b"\r\nHost: a\r\n\r\n").target == target.decode()


def test_head_at_limit_is_accepted():
    head = get("/", "X: ")
    padded = head[:-4] + b"v" * (MAX_HEAD_BYTES - len(head)) + b"\r\n\r\n"
    assert len(padded) == MAX_HEAD_BYTES
    one(padded)
    assert agreed(padded[:-4] + b"v\r\n\r\n")[1] == 431


def test_negative_body_limit_is_refused():
    with pytest.raises(ValueError):
        RequestParser(max_body_bytes=-1)


def test_http11_rule_3_an_error_poisons_the_parser():
    parser = RequestParser()
    parser.feed(post(b"0\r\n\r\n" + get("/smuggled"), "Content-Length: 5", CHUNKED))
    with pytest.raises(ProtocolError) as first:
        parser.next_request()
    for call in (parser.next_request, lambda: parser.feed(get("/next"))):
        with pytest.raises(ProtocolError) as again:
            call()
        assert again.value is first.value
    assert not parser.in_progress


# -- properties ------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING = {"host", "content-length", "transfer-encoding", "connection", "expect"}
names = st.text(TOKEN_CHARS, min_size=1, max_size=12).filter(lambda n: n.lower() not in FRAMING)
values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f")
    | st.just("\t"),
    max_size=24,
).map(lambda v: v.strip(" \t"))
ows = st.sampled_from(["", " ", "\t", "  \t"])
segments = st.lists(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8), max_size=4
)
query_pairs = st.lists(st.tuples(st.text(min_size=1, max_size=6), st.text(max_size=6)), max_size=3)
extensions = st.sampled_from([b"", b";a", b";a=b", b' ; n = "q \\" x"', b";x;y=1"])


@st.composite
def requests(draw):
    """Draw (wire bytes, expected (method, path, query, headers, body))."""
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    framing = draw(st.sampled_from(["length", "chunked", "none"] if version == "1.1" else ["length", "none"]))
    method = draw(
        st.sampled_from(
            ["GET", "HEAD", "DELETE", "OPTIONS"]
            + (["POST", "PUT", "PATCH"] if framing != "none" else [])
        )
    )
    segs = draw(segments)
    path = "/" + "/".join(segs)
    pairs = draw(query_pairs)
    query = urlencode(pairs)
    target = "/" + "/".join(quote(s, safe="") for s in segs) + ("?" + query if query else "")
    fields = [("Host", draw(st.sampled_from(["a", "example.com:8080", "[::1]"])))]
    if version == "1.0":
        fields.append(("Connection", "keep-alive"))
    fields += draw(st.lists(st.tuples(names, values), max_size=5))
    body = b"" if framing == "none" else draw(st.binary(max_size=120))
    if framing == "length":
        fields.append(("Content-Length", str(len(body))))
        wire_body = body
    elif framing == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=4)))
        pieces = [p for p in split(body, [c for c in cuts if c < len(body)]) if p]
        wire_body = b"".join(
            b"%x%s\r\n%s\r\n" % (len(p), draw(extensions), p) for p in pieces
        )
        trailers = draw(st.lists(st.tuples(names, values), max_size=2))
        wire_body += b"0" + draw(extensions) + b"\r\n"
        wire_body += "".join(f"{n}: {v}\r\n" for n, v in trailers).encode("latin-1") + b"\r\n"
    else:
        wire_body = b""
    head = f"{method} {target} HTTP/{version}\r\n"
    head += "".join(f"{n}:{draw(ows)}{v}{draw(ows)}\r\n" for n, v in fields) + "\r\n"
    expected = (method, path, query, [(n.lower(), v) for n, v in fields], body, dict_of(pairs))
    return head.encode("latin-1") + wire_body, expected


def dict_of(pairs):
    out: dict[str, list[str]] = {}
    for key, value in pairs:
        out.setdefault(key, []).append(value)
    return out


@PROPERTY
@given(st.lists(requests(), min_size=1, max_size=3), st.data())
def test_generated_requests_round_trip_split_anywhere(batch, data):
    wire = b"".join(w for w, _ in batch)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    parsed, status = run(split(wire, points))
    assert status is None
    got = [(r.method, r.path, r.query, r.headers, r.body, r.query_params()) for r in parsed]
    assert got == [expected for _, expected in batch]


@PROPERTY
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10))
def test_arbitrary_bytes_only_raise_protocol_error(blob, points):
    result = run(split(blob, [p for p in points if p <= len(blob)]))
    assert result == whole(blob)


MUTATION_BASES = [v for k, v in VALID.items() if k != "many-headers"]


@PROPERTY
@given(
    st.sampled_from(MUTATION_BASES),
    st.lists(st.tuples(st.integers(0, 400), st.sampled_from("rid"), st.binary(min_size=1, max_size=3)), min_size=1, max_size=4),
    st.lists(st.integers(0, 600), max_size=10),
)
def test_http11_rule_5_mutated_requests_agree_however_split(base, mutations, points):
    data = bytearray(base + get("/next"))
    for position, operation, blob in mutations:
        position %= len(data) + 1
        if operation == "r":
            data[position : position + len(blob)] = blob
        elif operation == "i":
            data[position:position] = blob
        else:
            del data[position : position + len(blob)]
    data = bytes(data)
    assert run(split(data, [p for p in points if p <= len(data)])) == whole(data)


SMUGGLED = get("/admin")
AMBIGUOUS = [
    post(b"0\r\n\r\n" + SMUGGLED, f"Content-Length: {5 + len(SMUGGLED)}", CHUNKED),
    post(b"0\r\n\r\n" + SMUGGLED, CHUNKED, "Content-Length: 5"),
    post(b"12345" + SMUGGLED, "Content-Length: 5", "Content-Length: 5"),
    post(b"12345" + SMUGGLED, "Content-Length: 5", f"Content-Length: {5 + len(SMUGGLED)}"),
    post(b"12345" + SMUGGLED, "Content-Length: 5, 5"),
    post(b"12345" + SMUGGLED, "Content-Length: +5"),
    post(b"0\r\n\r\n" + SMUGGLED, CHUNKED, "Transfer-Encoding: identity"),
    post(b"0\r\n\r\n" + SMUGGLED, "Transfer-Encoding : chunked", "Content-Length: 5"),
    post(b"0\r\n\r\n" + SMUGGLED, "Transfer-Encoding:\x0bchunked", "Content-Length: 5"),
    post(b"0\r\n\r\n" + SMUGGLED, "Transfer-Encoding: xchunked", "Content-Length: 5"),
    post(b"0\r\n\r\n" + SMUGGLED, "X: y", " Transfer-Encoding: chunked", "Content-Length: 5"),
    b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    post(b"0\n\n" + SMUGGLED, CHUNKED),
    post(b"5\r\nhello\n0\r\n\r\n" + SMUGGLED, CHUNKED),
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
]


@PROPERTY
@given(st.sampled_from(AMBIGUOUS), st.lists(st.integers(0, 200), max_size=6))
def test_http11_rule_2_ambiguous_framing_never_yields_a_request(data, points):
    requests, status = run(split(data, [p for p in points if p <= len(data)]))
    assert requests == []
    assert status in (400, 501)


# -- responses -------------------------------------------------------------------


def test_response_head():
    head = response_head(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
    assert head == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\n\r\n"
    )
    assert response_head(204, []) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert response_head(418, []) == b"HTTP/1.1 418 I'm a Teapot\r\n\r\n"
    assert response_head(599, []) == b"HTTP/1.1 599 \r\n\r\n"


def test_reasons_cover_the_statuses_the_parser_raises():
    for status in (100, 400, 411, 413, 414, 417, 431, 501, 505):
        assert REASONS[status]


@pytest.mark.parametrize(
    "headers",
    [
        [("X-A", "a\r\nSet-Cookie: x=1")],
        [("X-A", "a\nb")],
        [("X-A", "a\x00b")],
        [("X A", "b")],
        [("X-A:", "b")],
        [("", "b")],
        [("X-A", "\N{SNOWMAN}")],
    ],
)
def test_response_head_refuses_injection(headers):
    with pytest.raises(ValueError):
        response_head(200, headers)


@pytest.mark.parametrize("status", [0, 99, 1000])
def test_response_head_refuses_bad_status(status):
    with pytest.raises(ValueError):
        response_head(status, [])


def test_chunk_framing():
    assert chunk(b"") == b""
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_own_chunks_parse_back():
    wire = b"".join(chunk(p) for p in (b"data: a\n\n", b"", b"data: b\n\n")) + LAST_CHUNK
    assert one(post(wire, CHUNKED)).body == b"data: a\n\ndata: b\n\n"


# -- interop with the stdlib -----------------------------------------------------------


class CaptureSocket:
    """Enough of a socket for http.client to send into."""

    def __init__(self, incoming: bytes = b"") -> None:
        self.sent = bytearray()
        self.incoming = incoming

    def sendall(self, data) -> None:
        self.sent += data

    def makefile(self, mode, *args, **kwargs):
        return io.BytesIO(self.incoming)

    def close(self) -> None:
        pass


def sent_by_http_client(method, url, **kwargs) -> bytes:
    connection = http.client.HTTPConnection("localhost", 8080)
    connection.sock = CaptureSocket()
    connection.request(method, url, **kwargs)
    sent = bytes(connection.sock.sent)
    connection.close()
    return sent


def test_http_client_get():
    wire = sent_by_http_client("GET", "/ticker/DOGE/event?since=5", headers={"Last-Event-ID": "1:42"})
    request = one(wire)
    assert (request.method, request.path, request.query) == ("GET", "/ticker/DOGE/event", "since=5")
    assert request.header("host") == "localhost:8080"
    assert request.header("last-event-id") == "1:42"


def test_http_client_post_with_length():
    wire = sent_by_http_client("POST", "/publish", body=b'{"p":1}', headers={"Content-Type": "application/json"})
    request = one(wire)
    assert request.body == b'{"p":1}'
    assert request.header("content-length") == "7"


@pytest.mark.parametrize(
    "body",
    [lambda: iter([b"abc", b"", b"defg"]), lambda: io.BytesIO(b"abcdefg")],
    ids=["iterable", "file"],
)
def test_http_client_post_chunked(body):
    wire = sent_by_http_client("PUT", "/up", body=body())
    request = one(wire)
    assert request.header("transfer-encoding") == "chunked"
    assert request.body == b"abcdefg"


def test_http_client_reads_our_chunked_response():
    head = response_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
    wire = head + chunk(b"data: 1\n\n") + chunk(b"data: 2\n\n") + LAST_CHUNK
    response = http.client.HTTPResponse(CaptureSocket(wire))
    response.begin()
    assert response.status == 200
    assert response.reason == "OK"
    assert response.getheader("content-type") == "text/event-stream"
    assert response.read() == b"data: 1\n\ndata: 2\n\n"
    response.close()


def test_urllib_against_a_loopback_server():
    seen: list[Request] = []

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            parser = RequestParser()
            while not seen:
                parser.feed(conn.recv(4096))
                request = parser.next_request()
                if request is not None:
                    seen.append(request)
            conn.sendall(
                response_head(201, [("Transfer-Encoding", "chunked"), ("Connection", "close")])
                + chunk(b"got ")
                + chunk(str(len(seen[0].body)).encode())
                + LAST_CHUNK
            )

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        thread = threading.Thread(target=serve, args=(listener,))
        thread.start()
        port = listener.getsockname()[1]
        outgoing = urllib.request.Request(
            f"http://127.0.0.1:{port}/publish?topic=DOGE", data=b"x" * 40, method="POST"
        )
        with urllib.request.urlopen(outgoing, timeout=5) as response:
            assert response.status == 201
            assert response.read() == b"got 40"
        thread.join(5)
    request = seen[0]
    assert (request.path, request.query_params()) == ("/publish", {"topic": ["DOGE"]})
    assert request.body == b"x" * 40
    assert request.header("user-agent").startswith("Python-urllib/")


class _SearchCountingBuffer(bytearray):
    """The parser's buffer, counting the bytes its ``find`` calls search."""

    searched = 0

    def find(self, sub, start=None, end=None):  # type: ignore[override]
        low, high, _ = slice(start, end).indices(len(self))
        self.searched += max(0, high - low)
        return super().find(sub, start, end)


@pytest.mark.parametrize("cut", ["request-line", "fields"])
def test_http11_rule_6_a_head_fed_byte_by_byte_is_searched_once(cut):
    """An 8 KiB head in 8,000 feeds: each search resumes where the last stopped, not from the start (32 MB)."""
    if cut == "request-line":
        data = get("/" + "a" * (MAX_REQUEST_LINE_BYTES - 100))
    else:
        data = get("/", *[f"X-{i}: {'v' * 90}" for i in range(80)])
    parser = RequestParser()
    buffer = parser._buf = _SearchCountingBuffer()
    for i in range(len(data) - 1):
        parser.feed(data[i : i + 1])
        assert parser.next_request() is None
    parser.feed(data[-1:])
    assert parser.next_request().path == "/" + ("a" * (MAX_REQUEST_LINE_BYTES - 100) if cut == "request-line" else "")
    assert len(data) > 7000
    assert buffer.searched < 5 * len(data)  # per feed: its byte and the few before it that a CRLFCRLF may share
