"""The web page's files: content types, ETag and 304, gzip, HEAD, and nothing outside the directory."""

from __future__ import annotations

import gzip
import json

import pytest

from monkestream import http11
from monkestream.server import Exchange, HTTPError
from monkestream.static import STATIC_DIR, StaticFiles, accepts_gzip
from helpers import AppThread, raw, request

FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with AppThread(tmp_path_factory.mktemp("static") / "s.db") as s:
        yield s


@pytest.mark.parametrize("path", FILES)
def test_files_are_served_with_their_type_and_validators(server, path):
    name, content_type = FILES[path]
    status, headers, body = request(server.port, "GET", path)
    assert status == 200
    assert headers["content-type"] == content_type
    assert body == (STATIC_DIR / name).read_bytes()
    assert headers["content-length"] == str(len(body))
    assert headers["cache-control"] == "no-cache"
    assert headers["etag"].startswith('"') and headers["etag"].endswith('"')
    assert headers["vary"] == "Accept-Encoding"
    assert headers["x-content-type-options"] == "nosniff"
    assert "content-encoding" not in headers


def test_the_page_refers_only_to_its_own_files(server):
    _, headers, body = request(server.port, "GET", "/")
    page = body.decode()
    assert '<script src="/static/app.js"' in page and 'href="/static/app.css"' in page
    assert "http://" not in page.replace('xmlns=\'http://www.w3.org/2000/svg\'', "") and "https://" not in page
    assert headers["content-security-policy"].startswith("default-src 'self'")


def test_the_json_index_moved_to_api(server):
    status, headers, body = request(server.port, "GET", "/api")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["name"] == "monkestream"


@pytest.mark.parametrize("path", FILES)
def test_if_none_match_answers_304_without_a_body(server, path):
    _, headers, body = request(server.port, "GET", path)
    etag = headers["etag"]
    for condition in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        status, again, rest = request(server.port, "GET", path, headers={"If-None-Match": condition})
        assert status == 304, condition
        assert rest == b""
        assert again["etag"] == etag
        assert again["cache-control"] == "no-cache"
        assert "content-length" not in again
    status, _, rest = request(server.port, "GET", path, headers={"If-None-Match": '"stale"'})
    assert status == 200 and rest == body


@pytest.mark.parametrize("path", FILES)
def test_static_rule_3_the_gzip_form_has_its_own_etag_and_either_is_a_304(server, path):
    name, content_type = FILES[path]
    _, plain, _ = request(server.port, "GET", path)
    status, headers, body = request(server.port, "GET", path, headers={"Accept-Encoding": "gzip, deflate, br"})
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert headers["vary"] == "Accept-Encoding"
    assert headers["content-type"] == content_type
    assert headers["content-length"] == str(len(body))
    assert gzip.decompress(body) == (STATIC_DIR / name).read_bytes()
    assert len(body) < len(gzip.decompress(body))
    assert headers["etag"] != plain["etag"]
    # either representation's tag still validates the other's cache entry
    for etag in (headers["etag"], plain["etag"]):
        status, _, rest = request(server.port, "GET", path,
                                  headers={"Accept-Encoding": "gzip", "If-None-Match": etag})
        assert status == 304 and rest == b""


@pytest.mark.parametrize("accept, gzipped", [
    ("gzip", True), ("GZIP", True), ("x-gzip", True), ("br;q=1.0, gzip;q=0.8", True), ("*", True),
    ("gzip;q=0", False), ("gzip; q=0.000", False), ("*, gzip;q=0", False), ("br", False),
    ("identity", False), ("", False), ("*;q=0", False), ("gzip;q=bogus", False),
])
def test_accept_encoding_is_read_with_its_q_values(server, accept, gzipped):
    assert accepts_gzip(accept) is gzipped
    _, headers, body = request(server.port, "GET", "/static/app.js", headers={"Accept-Encoding": accept})
    assert ("content-encoding" in headers) is gzipped
    assert (body[:2] == b"\x1f\x8b") is gzipped


@pytest.mark.parametrize("accept", ["", "gzip"])
def test_head_gives_the_headers_of_get_without_the_body(server, accept):
    headers_in = {"Accept-Encoding": accept} if accept else {}
    _, got, body = request(server.port, "GET", "/static/app.css", headers=headers_in)
    status, head, rest = request(server.port, "HEAD", "/static/app.css", headers=headers_in)
    assert status == 200 and rest == b""
    for name in ("content-type", "content-length", "etag", "vary", "cache-control"):
        assert head[name] == got[name]
    assert head.get("content-encoding") == got.get("content-encoding")
    assert int(head["content-length"]) == len(body)


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/app.py", "/static/", "/static/.hidden",
                                  "/static/APP.JS", "/index.html"])
def test_unknown_files_are_404_json(server, path):
    status, headers, body = request(server.port, "GET", path)
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert "error" in json.loads(body)


@pytest.mark.parametrize("target", [
    "/static/..%2Fapp.py", "/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/..%2F..%2Fpyproject.toml",
    "/static/..%5Capp.py", "/static/%2Fetc%2Fpasswd", "/static//etc/passwd", "/static/./app.js/../../app.py",
    "/static/..", "/static/%2e%2e",
])
def test_static_rule_2_paths_outside_the_directory_are_refused(server, target):
    answer = raw(server.port, f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 404), answer[:200]
    assert b"import " not in answer and b"root:" not in answer and b"[project]" not in answer


def test_other_methods_are_refused(server):
    status, headers, _ = request(server.port, "POST", "/static/app.js", b"x")
    assert status == 405 and "GET" in headers["allow"]


def _exchange(name: str | None, *headers: tuple[str, str]) -> Exchange:
    req = http11.Request("GET", "/", "/", "", "1.1", list(headers), b"", True)
    return Exchange(req, {} if name is None else {"name": name}, "test")


def test_static_rule_1_files_are_read_once_at_start(tmp_path):
    (tmp_path / "index.html").write_text("<p>first</p>" * 40)
    (tmp_path / "tiny.txt").write_text("hi")
    files = StaticFiles(tmp_path)
    (tmp_path / "index.html").write_text("<p>changed</p>")
    (tmp_path / "late.js").write_text("later")
    assert files.serve(_exchange(None)).body == b"<p>first</p>" * 40
    gz = files.serve(_exchange(None, ("accept-encoding", "gzip")))
    assert gzip.decompress(gz.body) == b"<p>first</p>" * 40
    # too small to be worth compressing: served as is, with no Vary
    tiny = files.serve(_exchange("tiny.txt", ("accept-encoding", "gzip")))
    assert tiny.body == b"hi" and tiny.content_type == "text/plain; charset=utf-8"
    assert not any(name in ("Content-Encoding", "Vary") for name, _ in tiny.headers)
    with pytest.raises(HTTPError) as info:
        files.serve(_exchange("late.js"))
    assert info.value.status == 404
