"""Networks as they are: refreshes through a real proxy, TLS with a private CA, named failures.

A small forwarding proxy (absolute-form requests and CONNECT tunnels) runs on loopback in
the test; the sandbox serves over TLS with certificates made here with ``cryptography``.
The daemon takes its proxy and CA from the environment, as requests does, so the tests set
the variables exactly as a service unit would.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import selectors
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aac_tokend.core.outcome import UNREACHED_PREFIX, Refreshed, Transient
from aac_tokend.refresh.endpoint import TokenEndpoint, name_network_failure
from aac_tokend.sandbox.server import SandboxServer
from tests.helpers_e2e import E2EHome, e2e_home, import_pair, running_sandbox

#: Variables that would route the tests' requests elsewhere; each test sets its own.
_NETWORK_VARS = (
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
)  # fmt: skip


# -- certificates ---------------------------------------------------------------------------


class CA:
    """A throwaway certificate authority that can issue a certificate for 127.0.0.1."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def write_bundle(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def server_context(self, directory: Path) -> ssl.SSLContext:
        """A server context with a certificate for 127.0.0.1 signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        certfile, keyfile = directory / "server.pem", directory / "server.key"
        certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        keyfile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        return context


# -- a forwarding proxy ---------------------------------------------------------------------


class _ProxyHandler(BaseHTTPRequestHandler):
    server: Proxy

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test reads Proxy.seen instead

    def do_CONNECT(self) -> None:
        self.server.seen.append(f"CONNECT {self.path}")
        if self.server.answer_connect is not None:
            self.send_response(self.server.answer_connect)
            self.send_header("Proxy-Authenticate", 'Basic realm="corp"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        host, _, port = self.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        self._relay(self.connection, upstream)

    @staticmethod
    def _relay(client: socket.socket, upstream: socket.socket) -> None:
        with upstream, selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, upstream)
            sel.register(upstream, selectors.EVENT_READ, client)
            while True:
                for key, _ in sel.select(timeout=10):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)

    def do_POST(self) -> None:
        self.server.seen.append(f"POST {self.path}")
        url = urllib.parse.urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=10)
        try:
            conn.request("POST", url.path + (f"?{url.query}" if url.query else ""), body, headers)
            answer = conn.getresponse()
            data = answer.read()
        finally:
            conn.close()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class Proxy(ThreadingHTTPServer):
    """A loopback HTTP proxy: forwards absolute-form requests and tunnels CONNECT."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.seen: list[str] = []
        self.answer_connect: int | None = None  # a status to refuse CONNECT with

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    server = Proxy()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy or CA variable from the machine running the tests."""
    for name in _NETWORK_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def dead_port() -> int:
    """A loopback port nobody listens on (bound and closed: refused, not filtered)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tls_sandbox(ca: CA, directory: Path) -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=600, tls=ca.server_context(directory)) as server:
        yield server


def refresh(sandbox: SandboxServer) -> object:
    """One refresh of a fresh family through a TokenEndpoint reading the environment."""
    pair = sandbox.generate()
    with requests.Session() as session:  # trust_env: proxies and CA bundle from os.environ
        return TokenEndpoint(session).refresh(
            sandbox.token_endpoint,
            sandbox.client_id,
            str(pair["refresh_token"]),
            now=sandbox.clock(),
        )


# -- the endpoint client --------------------------------------------------------------------


class TestThroughAProxy:
    """HTTP(S)_PROXY in the environment carry the refresh; a dead proxy is named."""

    @pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
    def test_plain_http_never_goes_through_a_proxy(
        self, clean_env: pytest.MonkeyPatch, proxy: Proxy, variable: str
    ) -> None:
        """A plain-http (loopback) endpoint is asked directly: a proxy would see the refresh
        token in cleartext, and carry it off the machine."""
        with SandboxServer(access_ttl=600) as sandbox:
            clean_env.setenv(variable, proxy.url)
            outcome = refresh(sandbox)
            assert len(sandbox.log()) == 1
        assert isinstance(outcome, Refreshed), outcome
        assert proxy.seen == []

    def test_tls_through_a_connect_tunnel(
        self, clean_env: pytest.MonkeyPatch, proxy: Proxy, tmp_path: Path
    ) -> None:
        """With https_proxy and REQUESTS_CA_BUNDLE set, a CONNECT tunnel carries the refresh."""
        ca = CA("corp root")
        with tls_sandbox(ca, tmp_path) as sandbox:
            clean_env.setenv("https_proxy", proxy.url)
            clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca.write_bundle(tmp_path / "ca.pem")))
            outcome = refresh(sandbox)
        assert isinstance(outcome, Refreshed), outcome
        assert proxy.seen == [f"CONNECT {urllib.parse.urlsplit(sandbox.url).netloc}"]

    @pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY"])
    def test_dead_proxy_is_a_proxy_failure(
        self, clean_env: pytest.MonkeyPatch, variable: str, tmp_path: Path
    ) -> None:
        """A proxy nobody listens on is named a proxy failure that says what to check."""
        with tls_sandbox(CA("corp root"), tmp_path) as sandbox:
            clean_env.setenv(variable, f"http://127.0.0.1:{dead_port()}")
            outcome = refresh(sandbox)
            assert sandbox.log() == []  # nothing reached the token endpoint
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert outcome.reason.startswith(
            f"{UNREACHED_PREFIX}: proxy failure: the proxy refused the connection; "
        )
        assert "HTTPS_PROXY" in outcome.reason and "NO_PROXY" in outcome.reason

    def test_proxy_wanting_credentials(
        self, clean_env: pytest.MonkeyPatch, proxy: Proxy, tmp_path: Path
    ) -> None:
        """A CONNECT refused with 407 says the proxy wants credentials, and how to give them."""
        proxy.answer_connect = 407
        with tls_sandbox(CA("corp root"), tmp_path) as sandbox:
            clean_env.setenv("HTTPS_PROXY", proxy.url)
            outcome = refresh(sandbox)
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert outcome.reason.startswith(
            f"{UNREACHED_PREFIX}: proxy failure: the proxy refused to open a tunnel (HTTP 407): "
            "it wants credentials"
        )

    def test_no_proxy_bypasses(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """NO_PROXY naming the endpoint's host sends the refresh around the proxy."""
        ca = CA("corp root")
        with tls_sandbox(ca, tmp_path) as sandbox:
            clean_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{dead_port()}")
            clean_env.setenv("NO_PROXY", "127.0.0.1")
            clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca.write_bundle(tmp_path / "ca.pem")))
            assert isinstance(refresh(sandbox), Refreshed)


class TestTLS:
    """A certificate the CA bundle does not vouch for is named a TLS failure."""

    def test_wrong_ca_is_a_tls_failure(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """REQUESTS_CA_BUNDLE naming another CA: a TLS failure that says what to check."""
        with tls_sandbox(CA("real root"), tmp_path) as sandbox:
            other = CA("other root").write_bundle(tmp_path / "other.pem")
            clean_env.setenv("REQUESTS_CA_BUNDLE", str(other))
            outcome = refresh(sandbox)
            assert sandbox.log() == []
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert outcome.reason.startswith(
            f"{UNREACHED_PREFIX}: TLS failure: the token endpoint's certificate was not accepted ("
        )
        assert "REQUESTS_CA_BUNDLE" in outcome.reason

    def test_right_ca_succeeds(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """The same server with its own CA in REQUESTS_CA_BUNDLE refreshes (the check is fair)."""
        ca = CA("real root")
        with tls_sandbox(ca, tmp_path) as sandbox:
            clean_env.setenv("REQUESTS_CA_BUNDLE", str(ca.write_bundle(tmp_path / "ca.pem")))
            assert isinstance(refresh(sandbox), Refreshed)


class TestNaming:
    """name_network_failure names only what it recognises."""

    def test_other_failures_are_not_named(self) -> None:
        """A refused connection without a proxy is neither a proxy nor a TLS failure."""
        with pytest.raises(requests.ConnectionError) as caught, requests.Session() as session:
            session.trust_env = False
            session.post(f"http://127.0.0.1:{dead_port()}/as/token", timeout=5)
        assert name_network_failure(caught.value) is None

    def test_no_url_in_the_text(self, clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """A proxy URL's credentials never reach the reason (it goes to status and the log)."""
        with tls_sandbox(CA("corp root"), tmp_path) as sandbox:
            clean_env.setenv("HTTPS_PROXY", f"http://alice:s3cret@127.0.0.1:{dead_port()}")
            outcome = refresh(sandbox)
        assert isinstance(outcome, Transient)
        assert "s3cret" not in outcome.reason and "alice" not in outcome.reason


# -- the daemon: what `aac-tokend status` says ----------------------------------------------


@pytest.fixture
def home() -> Iterator[E2EHome]:
    with e2e_home() as instance:
        for name in _NETWORK_VARS:
            instance.env.pop(name, None)
        yield instance


def status_after_refresh(home: E2EHome) -> str:
    """Run the daemon, ask it to refresh, and return `aac-tokend status`'s text."""
    home.daemon().start()
    home.cli("refresh", "--profile", "default")
    result = home.cli("status")
    assert result.returncode == 0, str(result)
    return result.stdout


class TestStatusNamesTheFailure:
    """The daemon, run with the variables a service unit would give it, says what broke."""

    def test_refresh_through_a_proxy(self, home: E2EHome, proxy: Proxy, tmp_path: Path) -> None:
        """The daemon's courier refreshes through HTTPS_PROXY; status shows no error."""
        ca = CA("corp root")
        with tls_sandbox(ca, tmp_path) as sandbox:
            import_pair(home, sandbox)
            home.env["HTTPS_PROXY"] = proxy.url
            home.env["REQUESTS_CA_BUNDLE"] = str(ca.write_bundle(tmp_path / "ca.pem"))
            text = status_after_refresh(home)
        assert f"CONNECT {urllib.parse.urlsplit(sandbox.url).netloc}" in proxy.seen
        assert "refresh_count: 1" in text and "last_error" not in text

    def test_plain_http_refresh_bypasses_the_proxy(self, home: E2EHome, proxy: Proxy) -> None:
        """With HTTP_PROXY set, the courier asks a plain-http loopback endpoint directly."""
        with running_sandbox(access_ttl=600) as sandbox:
            import_pair(home, sandbox)
            home.env["HTTP_PROXY"] = proxy.url
            text = status_after_refresh(home)
        assert proxy.seen == []
        assert "refresh_count: 1" in text and "last_error" not in text

    def test_wrong_ca_in_status(self, home: E2EHome, tmp_path: Path) -> None:
        """With REQUESTS_CA_BUNDLE naming another CA, status names a TLS failure and the fix."""
        with tls_sandbox(CA("real root"), tmp_path) as sandbox:
            import_pair(home, sandbox)
            home.env["REQUESTS_CA_BUNDLE"] = str(CA("other").write_bundle(tmp_path / "o.pem"))
            text = status_after_refresh(home)
        assert (
            f"last_error: {UNREACHED_PREFIX}: TLS failure: the token endpoint's certificate" in text
        )
        assert "set REQUESTS_CA_BUNDLE to your organisation's CA bundle" in text

    def test_dead_proxy_in_status(self, home: E2EHome, tmp_path: Path) -> None:
        """With HTTPS_PROXY pointing at nothing, status names a proxy failure and what to check."""
        with tls_sandbox(CA("corp root"), tmp_path) as sandbox:
            import_pair(home, sandbox)
            home.env["HTTPS_PROXY"] = f"http://127.0.0.1:{dead_port()}"
            text = status_after_refresh(home)
        assert (
            f"last_error: {UNREACHED_PREFIX}: proxy failure: the proxy refused the connection"
            in text
        )
