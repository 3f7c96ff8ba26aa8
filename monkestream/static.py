"""The web page's files: read once at start-up, answered from memory with ETags and gzip.

Theory of operation
-------------------
Rule 1: the files of ``monkestream/static/`` are read when ``StaticFiles`` is
        built, before the server listens; a request never touches the disk.
Rule 2: only names found in that directory are served, looked up in a dict:
        there is no path to traverse.
Rule 3: each file's ETag and gzip form are computed once. The gzip form has
        its own ETag (RFC 9110 §8.8.3: a strong validator names one
        representation); ``If-None-Match`` matching either one is a 304.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from .routing import Exchange, HTTPError, Response, Router

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = "index.html"
MIN_GZIP_BYTES = 256      # smaller files are not worth a Content-Encoding
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
COMPRESSIBLE = (".html", ".css", ".js", ".json", ".svg", ".txt")
# The page loads nothing from elsewhere, so it can say so; user text can never run as code.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    etag: str
    content_type: str
    gzipped: bytes | None = None
    gzip_etag: str = ""


def load_file(path: Path) -> StaticFile:
    """Read one file and compute its validators and, when it pays, its gzip form."""
    body = path.read_bytes()
    digest = hashlib.sha256(body).hexdigest()[:20]
    suffix = path.suffix.lower()
    content_type = CONTENT_TYPES.get(suffix, "application/octet-stream")
    if suffix in COMPRESSIBLE and len(body) >= MIN_GZIP_BYTES:
        packed = gzip.compress(body, compresslevel=9, mtime=0)
        if len(packed) < len(body):
            return StaticFile(body, f'"{digest}"', content_type, packed, f'"{digest}-gz"')
    return StaticFile(body, f'"{digest}"', content_type)


def accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding value allows gzip (RFC 9110 §12.5.3, q=0 refuses)."""
    if not header:
        return False
    allowed: dict[str, bool] = {}
    for item in header.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        allowed[coding.lower()] = q > 0
    for coding in ("gzip", "x-gzip"):
        if coding in allowed:
            return allowed[coding]
    return allowed.get("*", False)


def _etags(header: str) -> list[str]:
    """The entity tags of an If-None-Match value, weak prefixes dropped (weak comparison)."""
    tags = []
    for item in header.split(","):
        tag = item.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag:
            tags.append(tag)
    return tags


class StaticFiles:
    """The files of a directory, held in memory and served by name."""

    def __init__(self, directory: Path = STATIC_DIR) -> None:
        self.files = {path.name: load_file(path) for path in sorted(directory.iterdir())
                      if path.is_file() and not path.name.startswith(".")}

    def register(self, router: Router) -> None:
        router.add("GET", "/", self.serve, "the live page")
        router.add("GET", "/static/{name}", self.serve, "the page's files (ETag, 304, gzip)")

    def serve(self, ex: Exchange) -> Response:
        """Answer ``GET /`` (the page) and ``GET /static/{name}``."""
        name = ex.params.get("name", INDEX)
        file = self.files.get(name)
        if file is None:
            raise HTTPError(404, "no such file")
        request = ex.request
        use_gzip = file.gzipped is not None and accepts_gzip(request.header("accept-encoding"))
        etag = file.gzip_etag if use_gzip else file.etag
        headers = [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")]
        if file.gzipped is not None:
            headers.append(("Vary", "Accept-Encoding"))
        if name == INDEX:
            headers.append(("Content-Security-Policy", PAGE_POLICY))
        condition = request.header("if-none-match")
        if condition is not None:
            tags = _etags(condition)
            # The client holds one of our forms: it is still current, whichever it is.
            held = [tag for tag in (etag, file.etag, file.gzip_etag) if tag and (tag in tags or "*" in tags)]
            if held:
                return Response(304, b"", file.content_type, [("ETag", held[0]), *headers])
        if use_gzip:
            assert file.gzipped is not None
            return Response(200, file.gzipped, file.content_type,
                            [("ETag", etag), ("Content-Encoding", "gzip"), *headers])
        return Response(200, file.body, file.content_type, [("ETag", etag), *headers])
