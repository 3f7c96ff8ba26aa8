"""Load generator: open N event streams, publish prices, measure what arrives, when, and in what order.

``python -m monkestream bench`` ships with the server, as redis-benchmark ships
with redis, so users can measure their own machine. It speaks the wire contract
only (``POST /ticker/{SYMBOL}/price``, a ``GET`` event stream, ``id:`` lines and
``Last-Event-ID``), so it measures any server that does.

Theory of operation
-------------------
Rule 1: event number ``seq`` is published as ``"price": seq``. Readers split
        each read into SSE frames with one regular expression (the usual
        ``id``/``event``/``data`` frame; anything else field by field) and count
        only dispatched ``price_update`` frames whose data holds
        ``"symbol": SYMBOL`` and ``"price": seq``. Other events (a room's, other
        symbols', ``members``), comments and id-only frames move the stream's
        last event id and nothing else. A frame cut by a read or a chunk
        boundary waits for the next read, so it is counted once.
Rule 2: the publisher writes each seq's send time (``time.monotonic()``, one
        clock for every process on Linux) to shared memory before sending its
        POST. Readers compute latency as they receive and keep histograms only.
Rule 3: an event belongs to the measured window iff it was *sent* inside it.
        Send times grow with seq and publishing stops when the window closes,
        so the window is one seq range ``[w0, w1]``.
Rule 4: each reader reports a seq once all its initial streams have it. With
        ``--rate 0`` the publisher keeps at most ``--window`` events not yet at
        every initial stream; an event still missing somewhere after
        ``--window-timeout`` stops counting, so a lossy server cannot stall the run.
Rule 5: every phase has a deadline: the run ends by itself, and the worker
        processes it started are always reaped.

Streams
-------
``--stream-path TEMPLATE`` (default ``/ticker/%s/event``, one ``%s`` for the
symbol) opens each stream on another path, e.g. a multiplexed one:
``'/events?topic=ticker:%s&topic=room:lobby'``; only Rule 1's events count.

``--late-clients N`` opens N more streams while publishing, spread over the first
80 % of the window. A late stream starts at the first event id it sees (a
replayed event's, or the id-only frame that gives its position): it is owed
every event the server numbered after that, as the initial streams saw them
numbered, once and in order; one published before it was asked for counts out
of order. The publisher does not wait for late streams; at the end they get a
second to catch up.

``--reconnect K`` makes K cuts spread over the same span, round robin over the
initial streams (a stream already closed is skipped): the stream's socket is
closed (unread bytes and a half-read frame are lost with it), and after
``--reconnect-delay MS`` it is reopened with ``Last-Event-ID`` set to the id of
the last frame it dispatched. It must then get exactly the events it missed:
none twice, none lost, in order. Its accounting runs across the cut, so a
replay that repeats, drops or reorders an event shows as such. The publisher's
window waits for a cut stream, and its replayed events' latency includes the cut.

Figures
-------
They follow the kit's C loader (ssebench): ``missing_total`` counts window
events an initial stream never got, and events after its start a late stream
never got; ``dup_total`` and ``ooo_total`` count, over the whole run, events
received twice or after a later event from the same publisher connection (HTTP
orders nothing across connections). Per stream: ``clients_missing``,
``streams_dup`` and ``streams_ooo`` count the streams with at least one, and
``worst_stream`` names the one with the most (missing + duplicated + out of
order). ``late_*`` and ``resumed_*`` repeat the three totals for late streams
and for streams that were cut. They are exact while a stream's unfilled gaps
stay under HOLES_PER_STREAM_MAX events.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
