"""What the server says about itself: ``GET /healthz``, ``/metrics`` (Prometheus text) and ``/api``.

``/api`` is made from the router's own registry, so it lists every route
there is, with its description, and no other.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .chat import Chat
from .config import Config
from .http11 import Request
from .hub import Hub
from .ingest import Ingest
from .limits import SHORTAGES
from .relay import Relay, RelayReplayer
from .replay import Replayer
from .routing import Exchange, Response, Router, json_response
from .server import Server
from .store import Store
from .supervise import Supervisor
from .tickers import TickerRoutes

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
SHORTAGE_NAMES = [errno.errorcode[number] for number in SHORTAGES]   # accept() failures that pause it


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        number = repr(float(value)) if isinstance(value, float) else str(value)
        lines.append(f"{name}{labels} {number}")
    return lines


@dataclass(kw_only=True)
class Monitor:
    """The health, metrics and route-list routes, on the parts of the server they report."""

    config: Config
    hub: Hub
    server: Server
    store: Store
    ingest: Ingest
    tickers: TickerRoutes
    chat: Chat
    replayer: Replayer | RelayReplayer
    has_token: Callable[[Request], bool]   # whether a request carries the publish token
    supervisor: Supervisor | None = None   # the background pipelines, when they are supervised
    relay: Relay | None = None             # a relay's upstream, follower and forwarder
    started_at: float = field(default_factory=time.time)
    broker: Any = None                     # with --broker: the log in Redis (broker.Broker)

    def register(self, router: Router) -> None:
        add = router.add
        add("GET", "/api", self.get_api, "this list: every route, with what it does")
        add("GET", "/healthz", self.get_healthz,
            '{"status":"ok", ...} with the settings in force (no file paths; with a token set, for its holder only)')
        add("GET", "/metrics", self.get_metrics, "counters and gauges in the Prometheus text format")

    def get_api(self, ex: Exchange) -> Response:
        routes = self.server.router.routes()
        return json_response({
            "name": "monkestream",
            "endpoints": [f"{r.method} {r.path}" for r in routes],
            "routes": [r._asdict() for r in routes],
        })

    def get_healthz(self, ex: Exchange) -> Response:
        """The health, and the settings: never file paths, and with a token set only to its holder."""
        server, hub = self.server, self.hub
        health = {
            "status": "stopping" if not server.accepting else "ok" if self._sound() else "degraded",
            "role": self._role(),
            "worker": self.config.worker,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "streams": len(server.streams),
            "topics": len(hub.topics),
            "lastEventId": str(hub.last_id()),
            "unpersisted": self.ingest.unpersisted,
            "database": "none (a relay)" if self.relay is not None else
                        "ok" if self.store.failing is None else f"failing: {self.store.failing}",
            "accept": "ok" if self._short_of() is None else f"paused: {self._short_of()}",
            "pipelines": {} if self.supervisor is None else
                         {name: p.health() for name, p in self.supervisor.pipelines.items()},
        }
        if self.relay is not None:
            health["upstream"] = self.relay.health()
        if self.broker is not None:
            health["broker"] = self.broker.health()
        if not self.config.token or self.has_token(ex.request):
            health["config"] = self.config.summary(paths=False)
        return json_response(health)

    def _short_of(self) -> str | None:
        acceptor = self.server.acceptor
        return None if acceptor is None else acceptor.short_of

    def _sound(self) -> bool:
        """Whether nothing is failing: database writes, accepting connections, the pipelines."""
        return (self.store.failing is None and self._short_of() is None
                and (self.supervisor is None or self.supervisor.healthy)
                and (self.relay is None or self.relay.follower.connected)
                and (self.broker is None or self.broker.connected))

    def _role(self) -> str:
        return "relay" if self.relay is not None else "origin"

    def get_metrics(self, ex: Exchange) -> Response:
        return Response(200, self.render().encode(), PROMETHEUS_TEXT)

    def render(self) -> str:
        """The exposition text for everything the server counts."""
        hub, server, store = self.hub, self.server, self.store
        by_kind: dict[str, int] = {}
        for topic in hub.topics.values():
            kind = topic.name.partition(":")[0]
            by_kind[kind] = by_kind.get(kind, 0) + sum(len(f.writers) for f in topic.fanouts) + len(topic.streams)
        out: list[str] = []
        out += _family("monkestream_process_info", "gauge", "Which process answered: its role, worker number and pid.",
                       [(f'{{role="{self._role()}",worker="{self.config.worker}",pid="{os.getpid()}"}}', 1)])
        if self.relay is not None:
            out += self._relay_families(self.relay)
        out += _family("monkestream_connections_open", "gauge", "Open client connections, streams included.",
                       [("", len(server.connections))])
        out += _family("monkestream_connections_total", "counter", "Client connections accepted.",
                       [("", server.connections_total)])
        out += _family("monkestream_streams_open", "gauge", "Open event streams.", [("", len(server.streams))])
        out += _family("monkestream_tasks", "gauge", "asyncio tasks alive (a stream costs none).",
                       [("", len(asyncio.all_tasks()))])
        out += _family("monkestream_stream_subscribers", "gauge", "Stream subscriptions per topic kind.",
                       [(f'{{kind="{k}"}}', v) for k, v in sorted(by_kind.items())])
        out += _family("monkestream_subscriptions_open", "gauge", "In-process pull subscriptions.",
                       [("", hub.subscription_count)])
        out += _family("monkestream_topics", "gauge", "Topics held by the hub.", [("", len(hub.topics))])
        out += _family("monkestream_topics_by_kind", "gauge", "Topics held, by kind, against --max-topics/--max-rooms.",
                       [(f'{{kind="{k}"}}', n) for k, n in sorted(hub.topics_by_kind.items())])
        out += _family("monkestream_topics_expired_total", "counter", "Idle topics forgotten (--topic-idle).",
                       [("", hub.topics_expired)])
        out += _family("monkestream_ring_bytes", "gauge",
                       "Bytes the replay rings hold (frames plus a fixed cost per event), against --replay-bytes.",
                       [("", hub.ring_bytes)])
        out += _family("monkestream_pending_bytes", "gauge", "Frames published and not yet written to streams.",
                       [("", hub.pending_bytes())])
        out += _family("monkestream_stream_buffer_bytes", "gauge", "Bytes written to streams and not yet sent.",
                       [("", sum(conn.buffered() for conn in server.streams))])
        out += _family("monkestream_events_published_total", "counter", "Events published.", [("", hub.published)])
        out += _family("monkestream_events_delivered_total", "counter", "Event deliveries written to streams.",
                       [("", hub.delivered)])
        out += _family("monkestream_events_conflated_total", "counter",
                       "Ticker events a slow stream skipped because a newer price replaced them.",
                       [("", hub.conflated)])
        out += _family("monkestream_streams_closed_total", "counter", "Streams closed, by reason.",
                       [(f'{{reason="{r.value}"}}', n) for r, n in hub.closed_by_reason.items()])
        out += _family("monkestream_replay_sqlite_reads_total", "counter",
                       "Resumes that read their gap from SQLite (one read for all of a stream's tickers).",
                       [("", self.replayer.sqlite_reads)])
        out += _family("monkestream_replay_partial_total", "counter",
                       "Backlogs larger than a stream's budget, sent in parts.", [("", self.replayer.partial)])
        out += _family("monkestream_sqlite_batches_total", "counter", "SQLite windows written.",
                       [("", store.batches_written)])
        out += _family("monkestream_sqlite_rows_total", "counter", "Tickers written to SQLite.",
                       [("", store.rows_written)])
        out += _family("monkestream_sqlite_last_batch_rows", "gauge", "Rows in the last window written.",
                       [("", store.last_batch_rows)])
        out += _family("monkestream_sqlite_flush_seconds_total", "counter", "Time spent writing windows.",
                       [("", store.flush_seconds_total)])
        out += _family("monkestream_sqlite_pruned_rows_total", "counter", "Tickers deleted past the retention.",
                       [("", store.rows_pruned)])
        out += _family("monkestream_tickers_unpersisted", "gauge", "Tickers accepted and not yet in SQLite.",
                       [("", self.ingest.unpersisted)])
        out += _family("monkestream_ingest_requests_total", "counter", "Ingest requests, by status.",
                       [(f'{{status="{s}"}}', n) for s, n in sorted(self.tickers.ingest_by_status.items())])
        out += _family("monkestream_http_responses_total", "counter", "HTTP responses, by status.",
                       [(f'{{status="{s}"}}', n) for s, n in sorted(server.requests_by_status.items())])
        chat = self.chat
        out += _family("monkestream_comments_total", "counter", "Chat comments, by action.",
                       [('{action="posted"}', chat.comments_posted), ('{action="deleted"}', chat.comments_deleted)])
        out += _family("monkestream_rate_limited_total", "counter", "Requests refused by a per-client rate limit.",
                       [('{limit="comment"}', chat.comments_refused), ('{limit="join"}', chat.joins_refused)])
        acceptor = server.acceptor
        out += _family("monkestream_accept_pauses_total", "counter",
                       "Episodes of accept() failing for want of descriptors or memory (one log line each).",
                       [(f'{{error="{e}"}}', n) for e, n in sorted(
                           {**dict.fromkeys(SHORTAGE_NAMES, 0), **(acceptor.pauses if acceptor else {})}.items())])
        out += _family("monkestream_accept_paused", "gauge", "1 while accept() fails for want of descriptors or memory.",
                       [("", int(self._short_of() is not None))])
        out += _family("monkestream_accept_refused_total", "counter",
                       "Connections answered and closed at once for want of a descriptor.",
                       [("", acceptor.refused if acceptor else 0)])
        out += _family("monkestream_streams_turned_away_total", "counter",
                       "Stream requests refused at --max-streams or while stopping: come back later (EventSource) or 503.",
                       [(f'{{answer="{a}"}}', n) for a, n in server.turned_away.items()])
        out += _family("monkestream_database_failing", "gauge", "1 while SQLite writes fail (disk full, read-only...).",
                       [("", int(store.failing is not None))])
        out += _family("monkestream_database_write_failures_total", "counter",
                       "Episodes of SQLite writes failing (one log line each).", [("", store.write_failures)])
        pipelines = self.supervisor.pipelines.values() if self.supervisor else ()
        out += _family("monkestream_pipeline_restarts_total", "counter", "Background pipelines restarted after a crash.",
                       [(f'{{pipeline="{p.name}"}}', p.restarts) for p in pipelines])
        out += _family("monkestream_pipeline_up", "gauge", "1 while a background pipeline runs.",
                       [(f'{{pipeline="{p.name}"}}', int(p.state == "running")) for p in pipelines])
        out += _family("monkestream_errors_total", "counter", "Unexpected errors (each also logged).",
                       [("", server.errors)])
        if self.broker is not None:
            for name, kind, help_text, value in self.broker.metrics():
                out += _family(name, kind, help_text, [("", value)])
        return "\n".join(out) + "\n"

    def _relay_families(self, relay: Relay) -> list[str]:
        follower, replayer, forwarder = relay.follower, relay.replayer, relay.forwarder
        out = _family("monkestream_upstream_connected", "gauge", "1 while the relay follows its upstream.",
                      [("", int(follower.connected))])
        out += _family("monkestream_upstream_connects_total", "counter", "Streams opened on the upstream.",
                       [("", follower.connects)])
        out += _family("monkestream_upstream_events_total", "counter", "Events received from the upstream.",
                       [("", follower.events)])
        out += _family("monkestream_upstream_resets_total", "counter",
                       "Gaps the upstream could not cover (reset): their streams started over.", [("", follower.resets)])
        out += _family("monkestream_upstream_resumes_total", "counter",
                       "Resumes fetched from the upstream, beyond the relay's rings.", [("", replayer.fetched)])
        out += _family("monkestream_forwarded_total", "counter", "Requests forwarded to the upstream, by outcome.",
                       [('{outcome="answered"}', forwarder.forwarded), ('{outcome="unreachable"}', forwarder.failed)])
        return out
