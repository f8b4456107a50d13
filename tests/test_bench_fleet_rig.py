"""The fleet benchmark's counting proxy: every request counted once, each answer matched."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.bench_fleet_rig import CountingProxy


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as etcd's gateway

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[CountingProxy]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    counting = CountingProxy(server.server_address[1])
    try:
        yield counting
    finally:
        counting.close()
        server.shutdown()
        server.server_close()


def _settled(proxy: CountingProxy, count: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if len(proxy.replies) >= count and all(r.answered for r in proxy.replies):
            return
        time.sleep(0.01)


class TestCounting:
    def test_each_request_on_a_kept_alive_connection_is_counted_with_its_answer(
        self, proxy: CountingProxy
    ) -> None:
        """Requests sharing one connection are each counted, by path, and each answered."""
        with requests.Session() as session:
            for path in ("/v3/kv/range", "/v3/kv/txn", "/v3/lease/timetolive"):
                assert session.post(proxy.url + path, json={"key": "L3Yz"}).ok
        _settled(proxy, 3)
        assert [r.path for r in proxy.replies] == [
            "/v3/kv/range",
            "/v3/kv/txn",
            "/v3/lease/timetolive",
        ]
        assert all(r.answered is not None and r.answered >= r.sent for r in proxy.replies)

    def test_a_request_line_split_across_writes_is_counted_once(self, proxy: CountingProxy) -> None:
        """A request line cut in two by the network is still seen, and only once."""
        request = b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(request[:9])
            time.sleep(0.05)
            sock.sendall(request[9:])
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        _settled(proxy, 1)
        assert [r.path for r in proxy.replies] == ["/v3/kv/put"]

    def test_a_body_is_not_taken_for_a_request(self, proxy: CountingProxy) -> None:
        """JSON bodies (base64 keys) never count as requests of their own."""
        with requests.Session() as session:
            session.post(proxy.url + "/v3/watch", json={"create_request": {"key": "AA=="}})
        _settled(proxy, 1)
        assert [r.path for r in proxy.replies] == ["/v3/watch"]
        assert proxy.since(1) == []
