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

from .errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Config:
    """Everything the server can be told, with its defaults."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one)", "min": 0, "max": 65535})
    db: str = field(default="./monkestream.db", metadata={"help": "SQLite file for history and comments"})
    token: str = field(default="", metadata={"help": "when set, publishing and deleting need 'Authorization: Bearer TOKEN'"})
    no_demo: bool = field(default=False, metadata={"help": "do not run the demo price feed"})
    history_days: float = field(default=30.0, metadata={"help": "days of ticker history kept in SQLite (0: forever)", "min": 0, "max": 36500})
    flush_interval: float = field(default=1.0, metadata={"help": "seconds per SQLite batch window", "min": 0.01, "max": 3600})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error", "choices": LOG_LEVELS})
    # streams
    replay_events: int = field(default=256, metadata={"help": "events kept per topic for Last-Event-ID resume", "min": 1, "max": 1_000_000})
    heartbeat: float = field(default=15.0, metadata={"help": "seconds of silence before a stream gets a comment line", "min": 0.05, "max": 3600})
    retry_ms: int = field(default=3000, metadata={"help": "reconnection hint sent to clients (jittered up to +50%%)", "min": 0, "max": 3_600_000})
    max_stream_age: float = field(default=0.0, metadata={"help": "close streams after this many seconds, jittered -20%% (0: never)", "min": 0, "max": 86400 * 7})
    stream_buffer: int = field(default=256 * 1024, metadata={"help": "bytes a stream may have unsent before it counts as slow", "min": 4096, "max": 64 * 1024 * 1024})
    stall_timeout: float = field(default=30.0, metadata={"help": "seconds a stream's buffer may stay full before it is closed", "min": 0.05, "max": 3600})
    max_streams: int = field(default=20000, metadata={"help": "open streams in all (503 beyond)", "min": 1, "max": 10_000_000})
    max_streams_per_client: int = field(default=0, metadata={"help": "open streams per client address, 429 beyond (0: no cap; behind a proxy every client has its address)", "min": 0, "max": 10_000_000})
    max_topics: int = field(default=10000, metadata={"help": "distinct topics the hub will hold", "min": 1, "max": 10_000_000})
    # HTTP
    max_body: int = field(default=1024 * 1024, metadata={"help": "largest request body in bytes (413 beyond)", "min": 1024, "max": 1024 * 1024 * 1024})
    header_timeout: float = field(default=10.0, metadata={"help": "seconds to receive a request's head (408 beyond)", "min": 0.05, "max": 3600})
    keepalive_timeout: float = field(default=75.0, metadata={"help": "seconds an idle keep-alive connection stays open", "min": 0.05, "max": 86400})
    cors_origins: str = field(default="*", metadata={"help": "comma-separated origins allowed to call the API, or *"})
    certfile: str = field(default="", metadata={"help": "TLS certificate (PEM); with --keyfile, serve HTTPS"})
    keyfile: str = field(default="", metadata={"help": "TLS private key (PEM)"})
    # chat
    comment_rate: float = field(default=1.0, metadata={"help": "comments per second a client may post (sustained)", "min": 0.001, "max": 100000})
    comment_burst: int = field(default=5, metadata={"help": "comments a client may post in a burst", "min": 1, "max": 100000})

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

    def summary(self) -> dict[str, Any]:
        """The settings, with the token hidden (for logs and /healthz)."""
        out = dataclasses.asdict(self)
        out["token"] = "set" if self.token else ""
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
