"""Tests for monkestream.bench: the byte scanner, the histogram, and whole runs.

The whole runs drive a small asyncio server defined here (chunked SSE with ids,
comments, retry hints, room events, Last-Event-ID resume, and some events cut
across two chunks) on an ephemeral port, with the load generator in a
subprocess, as a user would run it. The same server, broken on purpose, shows
that the bench reports each kind of flaw on the streams that have it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import selectors
import socket
import subprocess
import sys
import threading

import pytest

from monkestream.bench import main
from monkestream.bench.publisher import PubConn, Publisher
from monkestream.bench.reader import INITIAL, Reader, Share, Target, _Stream
from monkestream.bench.shared import Shared
from monkestream.bench.wire import StreamScanner, hist_index, hist_value, id_number, percentile_us, take_response
from monkestream.sse import EventId, encode_comment, encode_event, encode_retry

EPOCH = 1732660000000
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
RUN_TIMEOUT_S = 20
TOKEN = "s3cret"


def chunk(payload: bytes, extension: bytes = b"") -> bytes:
    return b"%x%b\r\n%b\r\n" % (len(payload), extension, payload)


def price_event(seq: int, price: str | None = None, crlf: bool = False, symbol: str = "BENCH",
                event_id: str | None = None) -> bytes:
    data = json.dumps({"symbol": symbol, "price": seq, "currency": "USD"}, separators=(",", ":"))
    if price is not None:
        data = data.replace(f'"price":{seq}', f'"price":{price}')
    frame = encode_event("price_update", data, event_id or str(EventId(EPOCH, seq)))
    return frame.replace(b"\n", b"\r\n") if crlf else frame


def bench_id(seq: int) -> bytes:
    return str(EventId(EPOCH, seq)).encode()


# ---------------------------------------------------------------- scanner


def _chunked_stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    """A stream in every dialect the scanner must read, and the (seq, id) of each bench event in it."""
    parts = [SSE_HEAD, chunk(encode_retry(1000)), chunk(encode_comment("hello")), chunk(b"id: 0-7\n\n")]
    expected = []
    for seq in range(1, 25):
        frame = price_event(seq, price=f"{seq}.0" if seq % 5 == 0 else None, crlf=seq % 3 == 0)
        if seq % 4 == 0:  # one event cut across two chunks, inside its number
            cut = frame.index(b'"price":') + 9
            parts += [chunk(frame[:cut]), chunk(frame[cut:], b";ext=1")]
        elif seq % 7 == 0:  # two events in one chunk
            frame += encode_comment("beat")
            parts.append(chunk(frame))
        elif seq % 11 == 0:  # lone CRs end its lines
            parts.append(chunk(frame.replace(b"\n", b"\r")))
        else:
            parts.append(chunk(frame))
        expected.append((seq, bench_id(seq)))
    parts.append(chunk(price_event(100_000_001)))
    expected.append((100_000_001, bench_id(100_000_001)))
    return b"".join(parts), expected


def _other_events() -> bytes:
    """Frames that are not bench events, though some look like them, and one that is, without an id."""
    text = json.dumps({"text": '{"symbol":"BENCH","price":777}'})
    return b"".join([
        encode_event("comment_posted", text, "0-50"),
        encode_event("members", json.dumps({"room": "lobby", "users": ["bench"]})),
        price_event(778, symbol="DOGE", event_id="0-51"),
        price_event(779, symbol="BENCHX", event_id="0-52"),
        encode_event("message", '{"symbol":"BENCH","price":780}', "0-53"),
        b'event: price_update\ndata: {"price": 30, "symbol": "BENCH"}\n\n',  # no id: the last one holds
        b"id: 0-54\n\n",
    ])


def _feed_in_pieces(stream: bytes, cuts: list[int]) -> tuple[StreamScanner, list[tuple[int, bytes | None]]]:
    scanner = StreamScanner("BENCH")
    events: list[tuple[int, bytes | None]] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        events += scanner.feed(stream[start:end])
    return scanner, events


def test_bench_rule_1_the_scanner_counts_each_event_once_whatever_the_split():
    stream, expected = _chunked_stream()
    assert _feed_in_pieces(stream, [])[1] == expected
    assert _feed_in_pieces(stream, list(range(1, len(stream))))[1] == expected
    for cut in range(len(stream) + 1):
        scanner, events = _feed_in_pieces(stream, [cut])
        assert events == expected, f"split at {cut}"
        assert scanner.failure is None and scanner.parse_errors == 0
        assert scanner.first_id == b"0-7" and scanner.last_id == bench_id(100_000_001)


def test_bench_rule_1_the_scanner_counts_only_the_symbols_price_updates():
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    stream = head + price_event(29) + _other_events() + price_event(31)
    expected = [(29, bench_id(29)), (30, b"0-53"), (31, bench_id(31))]
    for cut in range(len(head), len(stream) + 1):
        scanner, events = _feed_in_pieces(stream, [cut])
        assert events == expected, f"split at {cut}"
        assert scanner.last_id == bench_id(31)
    scanner, events = _feed_in_pieces(stream[: -len(price_event(31))], [])
    assert scanner.last_id == b"0-54", "an id-only frame moves the last event id"


def test_scanner_reads_close_delimited_streams():
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\r\n"
    stream = head + encode_comment("hi") + b"".join(price_event(s, crlf=s % 2 == 0) for s in range(1, 30))
    for cut in range(len(stream) + 1):
        assert [s for s, _ in _feed_in_pieces(stream, [cut])[1]] == list(range(1, 30))


def test_scanner_keeps_the_last_id_it_resumes_from():
    scanner = StreamScanner("BENCH", last_id=b"0-9")
    assert scanner.feed(SSE_HEAD + chunk(b"retry: 10\n\n")) == [] and scanner.last_id == b"0-9"
    assert scanner.feed(chunk(b'event: price_update\ndata: {"symbol":"BENCH","price":10}\n\n')) == [(10, b"0-9")]


def test_scanner_sees_the_last_chunk():
    scanner, events = _feed_in_pieces(SSE_HEAD + chunk(price_event(1)) + b"0\r\n\r\n", [])
    assert events == [(1, bench_id(1))] and scanner.ended


@pytest.mark.parametrize(
    "head, failure",
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", "status 204"),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/event-stream\r\n\r\n", "status 502"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n", "content-type text/html"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "content-type missing"),
    ],
)
def test_scanner_refuses_what_is_not_an_event_stream(head, failure):
    scanner, events = _feed_in_pieces(head + price_event(1), [])
    assert events == [] and scanner.failure == failure


def test_scanner_drops_a_malformed_price_and_keeps_going():
    stream = SSE_HEAD + chunk(price_event(1, price="1.5") + price_event(2))
    scanner, events = _feed_in_pieces(stream, [])
    assert events == [(2, bench_id(2))] and scanner.failure is None


def test_id_number():
    assert id_number(b"1732660000000-42") == 42
    assert id_number(b"42") == 42
    assert id_number(b"abc") == id_number(b"") == id_number(None) == id_number(b"1-") == 0


# ---------------------------------------------------------------- histogram and responses


def test_histogram_buckets_are_within_two_percent():
    for us in [*range(300), 1000, 12345, 999_999, 10**8, 2**31 - 1]:
        assert abs(hist_value(hist_index(us)) - us) <= max(0.5, us * 0.016)
    assert [hist_index(us) for us in range(2000)] == sorted(hist_index(us) for us in range(2000))


def test_percentiles():
    hist = [0] * 2000
    for us in range(1, 1001):
        hist[hist_index(us * 10)] += 1
    assert percentile_us(hist, 0.5) == pytest.approx(5000, rel=0.02)
    assert percentile_us(hist, 0.99) == pytest.approx(9900, rel=0.02)
    assert percentile_us([0] * 10, 0.5) == 0.0


def test_take_response():
    assert take_response(b"HTTP/1.1 204 No Content\r\n\r\nHTTP") == (204, 27)
    ok = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"
    assert take_response(ok) == (201, len(ok))
    assert take_response(ok[:-1]) is None
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    assert take_response(chunked) == (200, len(chunked))
    assert take_response(chunked[:-2]) is None


# ---------------------------------------------------------------- whole runs


class ContractServer:
    """The wire contract in a few lines: POST publishes to every open event stream, GET resumes.

    Events are numbered here, in the order they are published; a stream on a
    path naming a room also gets a ``members`` event and a room event after
    every third price. ``flaw`` breaks one promise on purpose, for the bench to
    catch: ``dup`` replays to a resuming stream the last price it already had,
    ``skip`` leaves out the first price it missed, ``swap`` replays its first two
    missed prices in the wrong order, ``late_dup`` sends a stream opened while
    publishing its first live price twice, ``late_skip`` never sends it,
    ``lose`` never sends the first stream every fourth price, ``mute`` answers no
    POST and ``silent`` answers nothing at all.
    """

    def __init__(self, token: str, flaw: str | None = None) -> None:
        self.token, self.flaw = token, flaw
        self.streams: dict[asyncio.StreamWriter, dict[str, bool]] = {}
        self.history: list[tuple[int, bool, bytes]] = []  # (id number, a room's?, frame)
        self.seq = 0

    def _numbered(self, name: str, data: str, room: bool) -> bytes:
        self.seq += 1
        frame = encode_event(name, data, str(EventId(EPOCH, self.seq)))
        self.history.append((self.seq, room, frame))
        return frame

    def _replay(self, last_id: str, rooms: bool) -> list[bytes]:
        after = EventId.parse(last_id)
        assert after is not None, last_id
        frames = [f for n, room, f in self.history if n > after.seq and (rooms or not room)]
        prices = [i for i, f in enumerate(frames) if b"price_update" in f]
        if self.flaw == "dup":
            had = [f for n, room, f in self.history if n <= after.seq and not room]
            frames[:0] = had[-1:]
        elif self.flaw == "skip" and prices:
            del frames[prices[0]]
        elif self.flaw == "swap" and len(prices) > 1:
            a, b = prices[:2]
            frames[a], frames[b] = frames[b], frames[a]
        return frames

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str) -> None:
        rooms = "room:" in head.split(" ", 2)[1]
        last_id = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")
                        if line.lower().startswith("last-event-id:")), None)
        writer.write(SSE_HEAD)
        await asyncio.sleep(0.05)  # so the head and the first bytes come in two reads
        frames = [encode_retry(1000), encode_comment("hi")]
        if rooms:
            frames.append(encode_event("members", '{"room":"lobby","users":["bench"]}'))
        if last_id:
            frames += self._replay(last_id, rooms)
        frames.append(b"id: %s\n\n" % str(EventId(EPOCH, self.seq)).encode())
        writer.write(chunk(b"".join(frames)))
        self.streams[writer] = {"rooms": rooms, "fresh": self.seq > 0 and not last_id, "first": not self.streams}
        await reader.read()  # until the client leaves

    def _publish(self, price: int) -> None:
        frame = self._numbered("price_update", json.dumps({"symbol": "BENCH", "price": price}), room=False)
        # every 7th event reaches the wire cut in two chunks, mid-number
        cut = frame.index(b'"price":') + 9 if self.seq % 7 == 0 else len(frame)
        data = chunk(frame[:cut]) + (chunk(frame[cut:]) if cut < len(frame) else b"")
        room = b""
        if self.seq % 3 == 0:
            text = json.dumps({"text": f'"symbol":"BENCH","price":{price}'})
            room = chunk(self._numbered("comment_posted", text, room=True))
        for stream, info in self.streams.items():
            if self.flaw == "lose" and info["first"] and price % 4 == 0:
                continue
            copies = {"late_dup": 2, "late_skip": 0}.get(self.flaw, 1) if info["fresh"] else 1
            info["fresh"] = False
            stream.write(data * copies + (room if info["rooms"] else b""))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.flaw == "silent":
                await reader.read()
                return
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                method = head.split(" ", 1)[0]
                length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                               if line.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length)
                if method != "POST":
                    await self._stream(reader, writer, head)
                    return
                if self.flaw == "mute":
                    await reader.read()
                    return
                if f"authorization: bearer {self.token}\r\n" not in head.lower():
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                    continue
                self._publish(json.loads(body)["price"])
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.streams.pop(writer, None)
            writer.close()


@pytest.fixture
def server_port(request):
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state = {}

    async def serve() -> None:
        contract = ContractServer(TOKEN, getattr(request, "param", None))
        server = await asyncio.start_server(contract.handle, "127.0.0.1", 0)
        state["port"] = server.sockets[0].getsockname()[1]
        state["stop"] = asyncio.Event()
        started.set()
        async with server:
            await state["stop"].wait()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        await asyncio.sleep(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    assert started.wait(5)
    try:
        yield state["port"]
    finally:
        loop.call_soon_threadsafe(state["stop"].set)
        thread.join(10)
        loop.close()


def bench_process(port: int, *extra: str) -> subprocess.CompletedProcess:
    argv = ["--port", str(port), "--clients", "20", "--duration", "1", "--warmup", "0.5",
            "--drain", "3", "--settle", "0.2", "--workers", "2", "--json", "--quiet", *extra]
    return subprocess.run([sys.executable, "-W", "error", "-m", "monkestream", "bench", *argv],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)


def run_bench(port: int, *extra: str) -> dict:
    done = bench_process(port, "--token", TOKEN, *extra)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return json.loads(done.stdout)


def assert_lossless(figures: dict) -> None:
    assert figures["connected"] == 20
    assert figures["published_window"] > 0
    assert figures["deliveries_total"] > 0
    assert figures["missing_total"] == 0
    assert figures["dup_total"] == figures["ooo_total"] == figures["parse_errors"] == 0
    assert figures["drain_complete"]
    assert figures["deliveries_total"] == figures["events_total"] * figures["connected"]
    assert figures["lat_n"] == figures["published_window"] * figures["connected"]
    assert 0 < figures["lat_p50_ms"] <= figures["lat_p99_ms"] <= figures["lat_max_ms"] * 1.02
    assert figures["pub_non2xx"] == 0 and figures["pub_statuses"].keys() == {"201"}


def test_closed_loop_run_is_lossless(server_port):
    figures = run_bench(server_port)
    assert_lossless(figures)
    assert figures["mode"] == "closed_loop"


def test_open_loop_run_keeps_its_rate(server_port):
    figures = run_bench(server_port, "--rate", "200", "--pub-conns", "1")
    assert_lossless(figures)
    assert figures["published_window"] == pytest.approx(200, abs=3)
    assert figures["events_total"] == pytest.approx(300, abs=3)


MULTI_TOPIC = "/events?topic=ticker:%s&topic=room:lobby"


def assert_exact(figures: dict) -> None:
    """No stream, initial, late or resumed, lost, repeated or reordered an event."""
    for key in ("missing_total", "dup_total", "ooo_total", "clients_missing", "streams_dup", "streams_ooo",
                "late_missing", "late_dup", "late_ooo", "resumed_missing", "resumed_dup", "resumed_ooo",
                "parse_errors", "bogus_seq"):
        assert figures[key] == 0, key
    assert figures["worst_stream"] is None
    assert figures["drain_complete"]


def test_late_and_resumed_streams_on_many_topics_get_every_event_once(server_port):
    figures = run_bench(server_port, "--stream-path", MULTI_TOPIC, "--late-clients", "6", "--reconnect", "8")
    assert figures["connected"] == 20 and figures["stream_path"] == MULTI_TOPIC
    assert figures["late_connected"] == 6 and not figures["late_failures"]
    assert figures["reconnects"] == figures["resumed"] == figures["resumed_streams"] == 8
    assert not figures["resume_failures"]
    assert_exact(figures)
    # room events and members never count: each initial stream got each price exactly once
    assert figures["deliveries_total"] > figures["events_total"] * figures["connected"]


@pytest.mark.parametrize(
    "server_port, figure",
    [("dup", "resumed_dup"), ("skip", "resumed_missing"), ("swap", "resumed_ooo"), ("late_dup", "late_dup"),
     ("late_skip", "late_missing")],
    indirect=["server_port"],
)
def test_the_bench_catches_a_flawed_server(server_port, figure):
    figures = run_bench(server_port, "--stream-path", MULTI_TOPIC, "--rate", "300", "--pub-conns", "1",
                        "--late-clients", "4", "--reconnect", "4", "--drain-idle", "1")
    streams = figures["late_connected"] if figure.startswith("late") else figures["resumed_streams"]
    assert streams == 4
    assert figures[figure] == streams, figures
    kind = {"dup": "streams_dup", "ooo": "streams_ooo", "missing": "clients_missing"}[figure.split("_")[1]]
    assert figures[kind] == streams
    worst = figures["worst_stream"]
    if figure.startswith("late"):
        assert worst["stream"].startswith("late ") and worst["cuts"] == 0
    else:
        assert worst["stream"].startswith("stream ") and worst["cuts"] == 1
    others = {"resumed_dup", "resumed_missing", "resumed_ooo", "late_dup", "late_missing", "late_ooo"} - {figure}
    assert all(figures[key] == 0 for key in others), figures


def test_a_refused_publisher_ends_the_run_with_a_hint(server_port):
    done = bench_process(server_port)
    assert done.returncode == 1
    assert "refuses to publish" in done.stderr and "--token" in done.stderr
    assert done.stdout == ""


def test_refuses_addresses_that_are_not_loopback(capsys):
    assert main(["--host", "192.0.2.1", "--duration", "1"]) == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_refuses_settings_out_of_bounds(capsys):
    assert main(["--duration", "100000"]) == 2
    assert "--duration" in capsys.readouterr().err


# ---------------------------------------------------------------- the module's rules

TARGET = Target(("127.0.0.1", 9), socket.AF_INET, "127.0.0.1:9")


class _RecordingSocket:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.sent: list[tuple[float, bytes]] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append((self.shared.sent[1], data))  # what the readers would see for seq 1 by now


def _reader(shared: Shared, streams: int) -> tuple[Reader, list[_Stream]]:
    """A reader process's accounting, without its process: ``streams`` initial streams, live."""
    opts = argparse.Namespace(max_events=64, token=None, stream_path="/ticker/%s/event", symbol="BENCH", pub_conns=1)
    reader = Reader(opts, TARGET, Share(0, streams), None, shared)  # type: ignore[arg-type]
    reader.t0, reader.t1 = 100.0, 200.0
    live = []
    for i in range(streams):
        stream = _Stream(INITIAL, f"stream 0.{i}", "BENCH")
        stream.waiting, stream.live = False, True
        stream.scanner.feed(SSE_HEAD)
        live.append(stream)
    reader.streams, reader.live = live, streams
    return reader, live


def test_bench_rule_2_the_send_time_is_shared_before_the_post_and_latency_is_taken_on_receipt():
    shared = Shared(64)
    try:
        opts = argparse.Namespace(token=None, symbol="BENCH", pub_conns=1, pipeline=1, connect_timeout=1.0)
        publisher = Publisher(opts, TARGET, selectors.DefaultSelector(), shared)
        sock = _RecordingSocket(shared)
        conn = PubConn(0, sock)  # type: ignore[arg-type]
        publisher.conns.append(conn)
        assert publisher.publish(conn, 150.0) == 1
        ((sent_at, post),) = sock.sent
        assert sent_at == 150.0 and post.startswith(b"POST /ticker/BENCH/price ") and b'"price": 1' in post
        reader, (stream,) = _reader(shared, 1)
        reader._account(stream, chunk(price_event(1)), 150.25)
        assert sum(reader.hist) == 1 and reader.hist[hist_index(250_000)] == 1 and reader.max_us == 250_000
    finally:
        shared.close()


def test_bench_rule_3_an_event_counts_in_the_window_iff_it_was_sent_inside_it():
    shared = Shared(64)
    try:
        reader, (stream,) = _reader(shared, 1)
        for seq, sent in ((1, 99.5), (2, 100.0), (3, 199.5), (4, 200.0)):  # the window is [100, 200)
            shared.sent[seq] = sent
        reader._account(stream, chunk(b"".join(price_event(seq) for seq in range(1, 5))), 250.0)
        assert sum(reader.hist) == 2  # seqs 2 and 3, whenever they were received
        assert reader.hist[hist_index(150_000_000)] == reader.hist[hist_index(50_500_000)] == 1
    finally:
        shared.close()


def test_bench_rule_4_a_reader_reports_a_seq_once_all_its_initial_streams_have_it():
    shared = Shared(64)
    try:
        reader, (first, second) = _reader(shared, 2)
        reader._account(first, chunk(price_event(1) + price_event(2)), 150.0)
        assert list(reader.done) == []
        reader._account(second, chunk(price_event(2)), 150.0)
        assert list(reader.done) == [2]
        reader._account(second, chunk(price_event(1)), 150.0)
        assert list(reader.done) == [2, 1]
    finally:
        shared.close()


@pytest.mark.parametrize("server_port", ["lose"], indirect=True)
def test_bench_rule_4_a_lossy_server_cannot_stall_a_closed_loop_run(server_port):
    """Every fourth price never reaches one stream; each holds the window of 4 only for --window-timeout."""
    figures = run_bench(server_port, "--window", "4", "--window-timeout", "0.05", "--drain-idle", "0.3")
    assert figures["mode"] == "closed_loop" and figures["connected"] == 20
    assert figures["published_window"] > 50  # stalled, it would be stuck after the first four lost
    assert figures["window_timeouts"] > 0
    assert figures["clients_missing"] == 1 and figures["missing_total"] >= figures["published_window"] // 4 - 1
    assert figures["dup_total"] == figures["ooo_total"] == 0


REAPED = """
import json, os, sys
from monkestream.bench import main
status = main(sys.argv[1:])
children = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        continue
    if ppid == os.getpid():
        children.append(pid)
print("REAPED", json.dumps({"status": status, "children": children}), file=sys.stderr)
"""


@pytest.mark.parametrize(("server_port", "status"), [("silent", 1), ("mute", 0)], indirect=["server_port"])
def test_bench_rule_5_a_run_ends_by_itself_and_reaps_its_workers(server_port, status):
    """A server that never answers a stream (the connect phase's deadline), or never answers a POST (the rest)."""
    argv = ["--port", str(server_port), "--clients", "4", "--workers", "2", "--duration", "0.3", "--warmup", "0",
            "--drain", "0.5", "--drain-idle", "0.2", "--settle", "0", "--connect-timeout", "0.5", "--json",
            "--quiet", "--token", TOKEN]
    done = subprocess.run([sys.executable, "-c", REAPED, *argv], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False, env={**os.environ, "PYTHONPATH": os.getcwd()})
    line = [text for text in done.stderr.splitlines() if text.startswith("REAPED ")]
    assert line, done.stderr
    assert json.loads(line[0].split(" ", 1)[1]) == {"status": status, "children": []}
    if status == 0:
        figures = json.loads(done.stdout)
        assert figures["connected"] == 4 and figures["pub_acked"] == 0 and not figures["drain_complete"]
    else:
        assert "no stream connected" in done.stderr
