"""Settings: one frozen dataclass, read from flags and ``MONKESTREAM_*`` variables.

Every limit the server enforces is a field here with a default, so it is
echoed at start-up and on ``/healthz``. A flag wins over its environment
variable, which wins over the default. A bad value stops start-up with one
line naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .clientaddr import parse_networks
from .errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class Config:
    """Everything the server can be told, with its defaults."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)", "min": 0, "max": 65535})
    db: str = field(default="./monkestream.db", metadata={"help": "SQLite file for history and comments", "path": True})
    token: str = field(default="", metadata={"help": "when set, publishing and deleting need 'Authorization: Bearer TOKEN'"})
    no_demo: bool = field(default=False, metadata={"help": "do not run the demo price feed"})
    history_days: float = field(default=30.0, metadata={"help": "days of ticker history kept in SQLite (0: forever)", "min": 0, "max": 36500})
    flush_interval: float = field(default=1.0, metadata={"help": "seconds per SQLite batch window", "min": 0.01, "max": 3600})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error", "choices": LOG_LEVELS})
    log_format: str = field(default="text", metadata={"help": "text, or json: one object per line for log collectors", "choices": LOG_FORMATS})
    log_file: str = field(default="", metadata={"help": "file the log is appended to instead of standard error, reopened on SIGHUP", "path": True})
    access_log: str = field(default="", metadata={"help": "file for a line per request (combined log format and seconds), reopened on SIGHUP; - for standard error; off when empty", "path": True})
    # relays and workers
    upstream: str = field(default="", metadata={"help": "relay mode: serve the events of this monkestream (http://HOST:PORT, https://HOST:PORT or unix:/PATH) instead of taking any; --token is sent to it"})
    unix_socket: str = field(default="", metadata={"help": "also listen on this Unix socket; its peers are trusted like --trusted-proxies (relays on this machine: keep it private)", "path": True})
    reuse_port: bool = field(default=False, metadata={"help": "listen with SO_REUSEPORT, so that several processes share the port"})
    workers: int = field(default=1, metadata={"help": "processes on the port (Linux): the first the origin, the others relays of it over a Unix socket", "min": 1, "max": 256})
    worker: int = field(default=0, metadata={"help": "this process's number among --workers (set by the parent; 0: the origin)", "min": 0, "max": 255})
    # streams
    replay_events: int = field(default=256, metadata={"help": "events kept per topic for Last-Event-ID resume", "min": 1, "max": 1_000_000})
    replay_bytes: int = field(default=64 * 1024 * 1024, metadata={"help": "bytes all topics' replay rings may hold together (frames plus 300 per event)", "min": 4096, "max": 2**40})
    heartbeat: float = field(default=15.0, metadata={"help": "seconds of silence before a stream gets a comment line", "min": 0.05, "max": 3600})
    retry_ms: int = field(default=3000, metadata={"help": "reconnection hint sent to clients (jittered up to +50%%)", "min": 0, "max": 3_600_000})
    full_retry_ms: int = field(default=10000, metadata={"help": "reconnection hint for an EventSource turned away by a full server (jittered up to x3)", "min": 0, "max": 3_600_000})
    max_stream_age: float = field(default=0.0, metadata={"help": "close streams after this many seconds, jittered -20%% (0: never)", "min": 0, "max": 86400 * 7})
    stream_buffer: int = field(default=256 * 1024, metadata={"help": "bytes a stream may have unsent before it counts as slow", "min": 4096, "max": 64 * 1024 * 1024})
    relay_buffer: int = field(default=32 * 1024 * 1024, metadata={"help": "bytes an all-topics stream (a relay's) may have unsent before it is closed to resume", "min": 4096, "max": 2**34})
    stall_timeout: float = field(default=30.0, metadata={"help": "seconds a stream's buffer may stay full before it is closed", "min": 0.05, "max": 3600})
    max_streams: int = field(default=20000, metadata={"help": "open streams in all, capped by the open-file limit (beyond: 503, or come back later for an EventSource)", "min": 1, "max": 10_000_000})
    max_streams_per_client: int = field(default=0, metadata={"help": "open streams per client address, 429 beyond (0: no cap; behind a proxy, set --trusted-proxies first)", "min": 0, "max": 10_000_000})
    trusted_proxies: str = field(default="", metadata={"help": "comma-separated proxy addresses or CIDR networks whose X-Forwarded-For/Forwarded give the client address"})
    max_topics: int = field(default=10000, metadata={"help": "symbols (ticker topics) the hub will hold", "min": 1, "max": 10_000_000})
    max_rooms: int = field(default=1000, metadata={"help": "chat rooms (room topics) the hub will hold, apart from symbols", "min": 1, "max": 10_000_000})
    topic_idle: float = field(default=600.0, metadata={"help": "seconds after which a topic with no stream and no event is forgotten, with its ring", "min": 1, "max": 10_000_000})
    # HTTP
    max_body: int = field(default=1024 * 1024, metadata={"help": "largest request body in bytes (413 beyond)", "min": 1024, "max": 1024 * 1024 * 1024})
    header_timeout: float = field(default=10.0, metadata={"help": "seconds to receive a request's head (408 beyond)", "min": 0.05, "max": 3600})
    keepalive_timeout: float = field(default=75.0, metadata={"help": "seconds an idle keep-alive connection stays open", "min": 0.05, "max": 86400})
    cors_origins: str = field(default="*", metadata={"help": "comma-separated origins allowed to call the API, or *"})
    certfile: str = field(default="", metadata={"help": "TLS certificate (PEM); with --keyfile, serve HTTPS", "path": True})
    keyfile: str = field(default="", metadata={"help": "TLS private key (PEM)", "path": True})
    # chat
    comment_rate: float = field(default=1.0, metadata={"help": "comments per second a client may post (sustained)", "min": 0.001, "max": 100000})
    comment_burst: int = field(default=5, metadata={"help": "comments a client may post in a burst", "min": 1, "max": 100000})
    join_rate: float = field(default=16.0, metadata={"help": "room joins per second a client may make with ?user= (sustained)", "min": 0.001, "max": 100000})
    join_burst: int = field(default=96, metadata={"help": "room joins a client may make in a burst (a stream of more rooms costs all of it)", "min": 1, "max": 100000})
    # scaling out
    broker: str = field(default="", metadata={"help": "redis://[user:password@]host:port/db (or rediss://): nodes sharing this Redis log are one service (needs pip install 'monkestream[redis]')"})
    broker_retention: str = field(default="1000000", metadata={"help": "what the log keeps: N events, or an age like 3600s, 60m, 24h, 7d (Redis trims it)"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low, high = f.metadata.get("min"), f.metadata.get("max")
            if low is not None and value < low or high is not None and value > high:
                raise ConfigError(f"--{flag(f.name)}: {value} is outside {low}..{high}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"--{flag(f.name)}: {value!r} is not one of {', '.join(choices)}")
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("--certfile and --keyfile go together")
        if self.stall_timeout < 0.05:
            raise ConfigError("--stall-timeout is too short")
        if not (self.token.isascii() and self.token.isprintable() and self.token == self.token.strip()):
            # a header carries only these, so any other token could never match
            raise ConfigError("--token: must be printable ASCII with no leading or trailing spaces")
        if self.upstream:
            from .upstream import Upstream
            try:
                Upstream(self.upstream)
            except ValueError as exc:
                raise ConfigError(f"--upstream: {exc}") from None
        if self.workers > 1 and self.upstream:
            raise ConfigError("--workers and --upstream: a relay runs as one process")
        if self.broker:
            from .broker import check_url, import_redis, parse_retention
            check_url(self.broker)
            parse_retention(self.broker_retention)
            import_redis()
        if self.broker and self.upstream:
            raise ConfigError("--broker and --upstream: a relay follows its upstream, which may be a broker node")
        try:
            parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"--trusted-proxies: {exc}") from None

    def summary(self, paths: bool = True) -> dict[str, Any]:
        """The settings, with the token hidden (for logs and /healthz); without file paths unless ``paths``."""
        out = dataclasses.asdict(self)
        out["token"] = "set" if self.token else ""
        if self.broker:
            from .broker import hide_password
            out["broker"] = hide_password(self.broker)
        if not paths:
            for f in dataclasses.fields(self):
                if f.metadata.get("path"):
                    del out[f.name]
        return out

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in self.cors_origins.split(",") if o.strip())


def flag(name: str) -> str:
    return name.replace("_", "-")


def env_name(name: str) -> str:
    return "MONKESTREAM_" + name.upper()


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


def build_parser(prog: str = "monkestream") -> argparse.ArgumentParser:
    """The command line, one flag per Config field."""
    parser = argparse.ArgumentParser(prog=prog, description="A live-event server: prices and chat over Server-Sent Events.")
    for f in dataclasses.fields(Config):
        help_text = f"{f.metadata.get('help', '')} (env {env_name(f.name)}; default {f.default!r})"
        if f.type in ("bool", bool):
            parser.add_argument(f"--{flag(f.name)}", dest=f.name, action="store_const", const="1", default=None, help=help_text)
        else:
            parser.add_argument(f"--{flag(f.name)}", dest=f.name, default=None, metavar=f.name.upper(), help=help_text)
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Config from flags, then environment, then defaults; ConfigError names the bad flag."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        try:
            if kind == "bool":
                values[f.name] = _parse_bool(raw)
            elif kind == "int":
                values[f.name] = int(raw)
            elif kind == "float":
                number = float(raw)
                if number != number or number in (float("inf"), float("-inf")):
                    raise ValueError(raw)
                values[f.name] = number
            else:
                values[f.name] = raw
        except ValueError:
            raise ConfigError(f"--{flag(f.name)}: {raw!r} is not a valid {kind}") from None
    return Config(**values)
