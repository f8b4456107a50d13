"""The fleet courier's prepared request: the connection first, the POST later, on real sockets.

Against the real sandbox on loopback and against bare listening sockets that refuse or say
nothing; no mocks.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aac_tokend.core.outcome import FailureKind, Refreshed, Transient
from aac_tokend.fleet.connection import PreparedRequest, RequestTimeouts, open_request
from aac_tokend.sandbox.server import SandboxServer

from .test_network import _NETWORK_VARS, CA, Proxy

TIMEOUTS = RequestTimeouts(connect=2.0, send=2.0, deadline=2.0)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=60) as server:
        yield server


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy or CA variable from the machine running the tests."""
    for name in _NETWORK_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    """test_network's loopback proxy (it tunnels CONNECT), serving in a thread."""
    server = Proxy()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _form(sandbox: SandboxServer) -> dict[str, str]:
    pair = sandbox.generate()
    return {
        "grant_type": "refresh_token",
        "refresh_token": str(pair["refresh_token"]),
        "client_id": sandbox.client_id,
    }


class TestOpening:
    """Opening connects and shakes hands, and its failures sent nothing."""

    def test_a_refused_connection_is_unreached(self) -> None:
        """Nothing listening: an UNREACHED transient, no request object to send."""
        got = open_request(f"http://127.0.0.1:{_closed_port()}/token", TIMEOUTS)
        assert isinstance(got, Transient)
        assert got.failure is FailureKind.UNREACHED

    def test_plain_http_beyond_loopback_is_refused_before_connecting(self) -> None:
        """http to a non-loopback host is never opened (origin rules), and counts unreached."""
        got = open_request("http://192.0.2.1/token", TIMEOUTS)
        assert isinstance(got, Transient)
        assert got.failure is FailureKind.UNREACHED

    def test_opening_sends_no_request(self, sandbox: SandboxServer) -> None:
        """A connection opened and closed unsent leaves the token server's log empty."""
        got = open_request(sandbox.token_endpoint, TIMEOUTS)
        assert isinstance(got, PreparedRequest)
        got.close()
        time.sleep(0.1)
        assert sandbox.log() == []


class TestSending:
    """Sending writes one POST on the opened connection and judges the answer."""

    def test_a_refresh_rotates(self, sandbox: SandboxServer) -> None:
        """The sandbox rotates the pair and the answer is a Refreshed outcome."""
        form = _form(sandbox)
        request = open_request(sandbox.token_endpoint, TIMEOUTS)
        assert isinstance(request, PreparedRequest)
        outcome = request.send(form, now=time.time())
        assert isinstance(outcome, Refreshed)
        assert outcome.refresh_token and outcome.refresh_token != form["refresh_token"]
        assert [entry["outcome"] for entry in sandbox.log()] == ["rotated"]

    def test_a_request_is_sent_once(self, sandbox: SandboxServer) -> None:
        """A second send on the same prepared request is refused, never written."""
        request = open_request(sandbox.token_endpoint, TIMEOUTS)
        assert isinstance(request, PreparedRequest)
        request.send(_form(sandbox), now=time.time())
        with pytest.raises(RuntimeError):
            request.send(_form(sandbox), now=time.time())
        assert len(sandbox.log()) == 1

    def test_a_silent_server_is_ambiguous_within_the_deadline(self) -> None:
        """A server that reads the request and never answers: AMBIGUOUS, at the deadline."""
        listener = socket.create_server(("127.0.0.1", 0))
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
        try:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/token"
            request = open_request(url, RequestTimeouts(connect=2.0, send=2.0, deadline=0.5))
            assert isinstance(request, PreparedRequest)
            started = time.monotonic()
            outcome = request.send({"refresh_token": "r" * 20}, now=time.time())
            took = time.monotonic() - started
        finally:
            listener.close()
            for conn in accepted:
                conn.close()
        assert isinstance(outcome, Transient)
        assert outcome.failure is FailureKind.AMBIGUOUS
        assert 0.4 <= took < 1.9
        assert "r" * 20 not in outcome.reason


class TestTls:
    """https: the environment's CA bundle is trusted, a certificate it does not vouch for
    fails the opening (nothing written), and an http proxy tunnels the connection."""

    def test_the_environments_ca_bundle_is_trusted(
        self, clean_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """REQUESTS_CA_BUNDLE names the CA that signed the server: the refresh goes through."""
        ca = CA("corp root")
        clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca.write_bundle(tmp_path / "ca.pem")))
        with SandboxServer(access_ttl=600, tls=ca.server_context(tmp_path)) as sandbox:
            request = open_request(sandbox.token_endpoint, TIMEOUTS)
            assert isinstance(request, PreparedRequest), request
            assert isinstance(request.send(_form(sandbox), now=time.time()), Refreshed)

    def test_an_unknown_certificate_fails_the_opening(
        self, clean_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A server certificate no trusted CA signed: UNREACHED, a TLS failure, no request."""
        with SandboxServer(access_ttl=600, tls=CA("stranger").server_context(tmp_path)) as sb:
            got = open_request(sb.token_endpoint, TIMEOUTS)
            assert isinstance(got, Transient)
            assert got.failure is FailureKind.UNREACHED
            assert "TLS failure" in got.reason
            assert sb.log() == []

    def test_tunnels_through_the_environments_proxy(
        self, clean_env: pytest.MonkeyPatch, proxy: Proxy, tmp_path: Path
    ) -> None:
        """https_proxy set: the opening is a CONNECT through it, and the refresh goes through."""
        ca = CA("corp root")
        clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca.write_bundle(tmp_path / "ca.pem")))
        clean_env.setenv("https_proxy", proxy.url)
        with SandboxServer(access_ttl=600, tls=ca.server_context(tmp_path)) as sandbox:
            request = open_request(sandbox.token_endpoint, TIMEOUTS)
            assert isinstance(request, PreparedRequest), request
            assert proxy.seen == [f"CONNECT {sandbox.url.split('://')[1]}"]
            assert isinstance(request.send(_form(sandbox), now=time.time()), Refreshed)
            assert len(sandbox.log()) == 1

    def test_a_dead_proxy_is_unreached(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """A proxy nobody listens on fails the opening as a proxy failure, nothing sent."""
        clean_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{_closed_port()}")
        with SandboxServer(access_ttl=600, tls=CA("corp").server_context(tmp_path)) as sandbox:
            got = open_request(sandbox.token_endpoint, TIMEOUTS)
            assert isinstance(got, Transient) and got.failure is FailureKind.UNREACHED
            assert "proxy failure" in got.reason
            assert sandbox.log() == []

    def test_plain_http_never_uses_the_proxy(
        self, clean_env: pytest.MonkeyPatch, proxy: Proxy, sandbox: SandboxServer
    ) -> None:
        """http (loopback only) goes direct even with HTTP_PROXY set: no cleartext via a proxy."""
        clean_env.setenv("HTTP_PROXY", proxy.url)
        clean_env.setenv("http_proxy", proxy.url)
        request = open_request(sandbox.token_endpoint, TIMEOUTS)
        assert isinstance(request, PreparedRequest)
        assert isinstance(request.send(_form(sandbox), now=time.time()), Refreshed)
        assert proxy.seen == []
