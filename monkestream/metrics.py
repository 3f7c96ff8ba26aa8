"""``GET /metrics``: the server's counters and gauges in the Prometheus text format."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .app import App


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        number = repr(float(value)) if isinstance(value, float) else str(value)
        lines.append(f"{name}{labels} {number}")
    return lines


def render(app: App) -> str:
    """The exposition text for everything the server counts."""
    hub, server, store = app.hub, app.server, app.store
    by_kind: dict[str, int] = {}
    for topic in hub.topics.values():
        kind = topic.name.partition(":")[0]
        by_kind[kind] = by_kind.get(kind, 0) + sum(len(f.writers) for f in topic.fanouts) + len(topic.streams)
    out: list[str] = []
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
    out += _family("monkestream_events_published_total", "counter", "Events published.", [("", hub.published)])
    out += _family("monkestream_events_delivered_total", "counter", "Event deliveries written to streams.",
                   [("", hub.delivered)])
    out += _family("monkestream_events_conflated_total", "counter",
                   "Ticker events a slow stream skipped because a newer price replaced them.", [("", hub.conflated)])
    out += _family("monkestream_streams_closed_total", "counter", "Streams closed, by reason.",
                   [(f'{{reason="{r.value}"}}', n) for r, n in hub.closed_by_reason.items()])
    out += _family("monkestream_sqlite_batches_total", "counter", "SQLite windows written.",
                   [("", store.batches_written)])
    out += _family("monkestream_sqlite_rows_total", "counter", "Tickers written to SQLite.", [("", store.rows_written)])
    out += _family("monkestream_sqlite_last_batch_rows", "gauge", "Rows in the last window written.",
                   [("", store.last_batch_rows)])
    out += _family("monkestream_sqlite_flush_seconds_total", "counter", "Time spent writing windows.",
                   [("", store.flush_seconds_total)])
    out += _family("monkestream_sqlite_pruned_rows_total", "counter", "Tickers deleted past the retention.",
                   [("", store.rows_pruned)])
    out += _family("monkestream_tickers_unpersisted", "gauge", "Tickers accepted and not yet in SQLite.",
                   [("", app.unpersisted)])
    out += _family("monkestream_ingest_requests_total", "counter", "Ingest requests, by status.",
                   [(f'{{status="{s}"}}', n) for s, n in sorted(app.ingest_by_status.items())])
    out += _family("monkestream_http_responses_total", "counter", "HTTP responses, by status.",
                   [(f'{{status="{s}"}}', n) for s, n in sorted(server.requests_by_status.items())])
    out += _family("monkestream_comments_total", "counter", "Chat comments, by action.",
                   [('{action="posted"}', app.chat.comments_posted), ('{action="deleted"}', app.chat.comments_deleted)])
    out += _family("monkestream_errors_total", "counter", "Unexpected errors (each also logged).",
                   [("", server.errors)])
    return "\n".join(out) + "\n"
