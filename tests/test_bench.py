"""Tests for monkestream.bench: the byte scanner, the histogram, and whole runs.

The whole runs drive a small asyncio server defined here (chunked SSE with ids,
comments, retry hints, and some events cut across two chunks) on an ephemeral
port, with the load generator in a subprocess, as a user would run it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest

from monkestream.bench import main
from monkestream.benchwire import StreamScanner, hist_index, hist_value, percentile_us, take_response
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


def price_event(seq: int, price: str | None = None, crlf: bool = False) -> bytes:
    data = json.dumps({"symbol": "BENCH", "price": seq, "currency": "USD"}, separators=(",", ":"))
    if price is not None:
        data = data.replace(f'"price":{seq}', f'"price":{price}')
    frame = encode_event("price_update", data, str(EventId(EPOCH, seq)))
    return frame.replace(b"\n", b"\r\n") if crlf else frame


# ---------------------------------------------------------------- scanner


def _chunked_stream() -> tuple[bytes, list[int]]:
    """A stream in every dialect the scanner must read, and the seqs in it."""
    parts = [SSE_HEAD, chunk(encode_retry(1000)), chunk(encode_comment("hello"))]
    seqs = []
    for seq in range(1, 25):
        frame = price_event(seq, price=f"{seq}.0" if seq % 5 == 0 else None, crlf=seq % 3 == 0)
        if seq % 4 == 0:  # one event cut across two chunks, inside its number
            cut = frame.index(b'"price":') + 9
            parts += [chunk(frame[:cut]), chunk(frame[cut:], b";ext=1")]
        elif seq % 7 == 0:  # two events in one chunk
            frame += encode_comment("beat")
            parts.append(chunk(frame))
        else:
            parts.append(chunk(frame))
        seqs.append(seq)
    parts.append(chunk(price_event(100_000_001)))
    seqs.append(100_000_001)
    return b"".join(parts), seqs


def _feed_in_pieces(stream: bytes, cuts: list[int]) -> tuple[StreamScanner, list[int]]:
    scanner = StreamScanner()
    seqs: list[int] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        seqs += scanner.feed(stream[start:end])
    return scanner, seqs


def test_scanner_counts_each_event_once_whatever_the_split():
    stream, expected = _chunked_stream()
    assert _feed_in_pieces(stream, [])[1] == expected
    assert _feed_in_pieces(stream, list(range(1, len(stream))))[1] == expected
    for cut in range(len(stream) + 1):
        scanner, seqs = _feed_in_pieces(stream, [cut])
        assert seqs == expected, f"split at {cut}"
        assert scanner.failure is None and scanner.parse_errors == 0


def test_scanner_reads_close_delimited_streams():
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\r\n"
    stream = head + encode_comment("hi") + b"".join(price_event(s, crlf=s % 2 == 0) for s in range(1, 30))
    for cut in range(len(stream) + 1):
        assert _feed_in_pieces(stream, [cut])[1] == list(range(1, 30))


def test_scanner_sees_the_last_chunk():
    scanner, seqs = _feed_in_pieces(SSE_HEAD + chunk(price_event(1)) + b"0\r\n\r\n", [])
    assert seqs == [1] and scanner.ended


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
    scanner, seqs = _feed_in_pieces(head + price_event(1), [])
    assert seqs == [] and scanner.failure == failure


def test_scanner_drops_a_malformed_price_and_keeps_going():
    stream = SSE_HEAD + chunk(price_event(1, price="1.5") + price_event(2))
    scanner, seqs = _feed_in_pieces(stream, [])
    assert seqs == [2] and scanner.failure is None


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
    """The wire contract in a few lines: POST publishes to every open event stream."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.streams: set[asyncio.StreamWriter] = set()
        self.seq = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                method = head.split(" ", 1)[0]
                length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                               if line.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length)
                if method != "POST":
                    writer.write(SSE_HEAD)
                    await asyncio.sleep(0.05)  # so the head and the first bytes come in two reads
                    writer.write(chunk(encode_retry(1000) + encode_comment("hi")))
                    self.streams.add(writer)
                    await reader.read()  # until the client leaves
                    return
                if f"authorization: bearer {self.token}\r\n" not in head.lower():
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                    continue
                self.seq += 1
                frame = price_event(json.loads(body)["price"])
                # every 7th event reaches the wire cut in two chunks, mid-number
                cut = frame.index(b'"price":') + 9 if self.seq % 7 == 0 else len(frame)
                data = chunk(frame[:cut]) + (chunk(frame[cut:]) if cut < len(frame) else b"")
                for stream in self.streams:
                    stream.write(data)
                writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.streams.discard(writer)
            writer.close()


@pytest.fixture
def server_port():
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state = {}

    async def serve() -> None:
        server = await asyncio.start_server(ContractServer(TOKEN).handle, "127.0.0.1", 0)
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
    return subprocess.run([sys.executable, "-W", "error", "-m", "monkestream.bench", *argv],
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
