"""The shipped cluster site (``examples/deploy/nginx-cluster.conf``) in a real nginx, in front of two real nodes.

The site runs as shipped but for the two upstream ports and the listen line.
"""

from __future__ import annotations

import json
import re
import shutil
import signal

import pytest
from helpers import ROOT, SSEClient, request
from test_broker import cluster, price, redis_server, wait_until  # noqa: F401 - fixtures
from test_nginx import NGINX, Nginx, check, free_port, nginx_conf

SITE = ROOT / "examples" / "deploy" / "nginx-cluster.conf"
pytestmark = pytest.mark.skipif(NGINX is None or shutil.which("redis-server") is None,
                                reason="nginx and redis-server are needed (apt-get install nginx redis-server)")


def cluster_site(ports: list[int], listen: int) -> str:
    text = SITE.read_text()
    for number, port in enumerate(ports, 1):
        text, found = re.subn(rf"server 127\.0\.0\.1:800{number} ", f"server 127.0.0.1:{port} ", text)
        assert found == 1
    text, found = re.subn(r"listen 8000;", f"listen 127.0.0.1:{listen};", text)
    assert found == 1
    return text


def test_a_stream_through_nginx_survives_its_node_being_killed_with_no_gap(tmp_path, cluster):
    one = cluster.node("one", "--trusted-proxies", "127.0.0.1")
    two = cluster.node("two", "--trusted-proxies", "127.0.0.1")
    folder = tmp_path / "nginx"
    folder.mkdir()
    port = free_port()
    conf = nginx_conf(folder, cluster_site([one.port, two.port], port))
    checked = check(folder, conf)
    assert checked.returncode == 0, checked.stderr
    nginx = Nginx(folder, conf, port)
    try:
        with SSEClient(port, "/ticker/DOGE/event") as first:
            for i in range(5):
                assert request(port, "POST", "/ticker/DOGE/price", {"price": f"1.{i}", "currency": "USD"})[0] == 201
            got = first.wait_for(5, name="price_update")
            last = got[-1].last_event_id
            # whichever node holds this stream dies; the other takes the resume and the posts
            victim = one if _holds_stream(one) else two
            survivor = two if victim is one else one
            victim.stop(signal.SIGKILL)
            first.wait_for(99, timeout=5)
            assert first.closed
        for i in range(5, 10):
            status = request(port, "POST", "/ticker/DOGE/price", {"price": f"1.{i}", "currency": "USD"})[0]
            assert status == 201
        with SSEClient(port, "/ticker/DOGE/event", {"Last-Event-ID": last}) as resumed:
            got = resumed.wait_for(5, name="price_update")
            assert [json.loads(e.data)["price"] for e in got] == [1.5, 1.6, 1.7, 1.8, 1.9]
            assert not [e for e in resumed.events if e.type == "reset"]
        assert survivor.proc is not None and survivor.proc.poll() is None
    finally:
        nginx.stop()


def _holds_stream(node) -> bool:
    return json.loads(request(node.port, "GET", "/healthz")[2])["streams"] == 1
