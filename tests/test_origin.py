"""A token goes only where it is meant to: endpoint URLs are judged as the connecting parser
(urllib3's) reads them, and TokendAuth's bearer token never leaves the origin asked for."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import itertools
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

from aac_tokend import TokendAuth
from aac_tokend.api import run_cli
from aac_tokend.core.importer import ImportRequest, build_state
from aac_tokend.core.origin import AAC_DOMAIN, check_endpoint, is_loopback_host, url_origin
from aac_tokend.errors import EndpointNotAllowedError
from aac_tokend.sandbox.jwt_sign import sign_hs256
from aac_tokend.serve.control_server import ControlServer
from tests.test_network import CA

NOW = 1_800_000_000.0
#: Generous bound of one HTTP exchange on loopback.
TIMEOUT = 10.0

#: Issuers that urllib.parse and urllib3 read differently, or that hide another host in
#: percent-encoding, userinfo, whitespace or look-alike dots. 0.1.0 accepted the first: its
#: check saw a host under alteryxcloud.com, requests connected to evil.com.
CRAFTED_ISSUERS = [
    "https://evil.com\\.alteryxcloud.com/as",
    "https://evil.com\\@pingauth.alteryxcloud.com/as",
    "https://pingauth.alteryxcloud.com:443\\@evil.com/as",
    "https://evil.com%2f.alteryxcloud.com/as",
    "https://evil.com%2523.alteryxcloud.com/as",
    "https://evil.com%00.alteryxcloud.com/as",
    "https://evil.com\t.alteryxcloud.com/as",
    "https://evil.com .alteryxcloud.com/as",
    "https://evil.com\u3002pingauth.alteryxcloud.com/as",
    "https://evil.com\uff0ealteryxcloud.com/as",
    "https://evil.com\u200b.alteryxcloud.com/as",
    "https://user@pingauth.alteryxcloud.com/as",
    "https://pingauth.alteryxcloud.com%40evil.com/as",
]


def _access_token(iss: str) -> str:
    claims = {"iss": iss, "client_id": "c", "sub": "u", "iat": NOW - 60, "exp": NOW + 3540}
    return sign_hs256(claims, b"k" * 32)


def _agree(url: str) -> tuple[str, str, int]:
    """The (scheme, host, port) both parsers read in ``url``; fails if they differ."""
    split, u3 = urlsplit(url), parse_url(url)
    scheme = split.scheme.lower()
    default = 443 if scheme == "https" else 80
    ours = (scheme, (split.hostname or "").rstrip("."), split.port or default)
    theirs = (
        (u3.scheme or "").lower(),
        (u3.host or "").lower().strip("[]").rstrip("."),
        u3.port or default,
    )
    assert ours == theirs, (url, ours, theirs)
    return ours


# Pieces that parsers split differently, mixed into an authority and a path.
_PIECES = st.sampled_from(
    [
        "evil.com", "pingauth.alteryxcloud.com", "alteryxcloud.com", ".alteryxcloud.com",
        "127.0.0.1", "[::1]", "localhost", "xn--bcher-kva.ch", ":443", ":8080", ":", "@", "\\",
        "%2f", "%40", "%2e", "%00", "%5c", "#", "?", "/", " ", "\t", "\n", "\r", "\x00", ".",
        "[", "]", "\u3002", "\uff0e", "\u200b", ";", "user:pw@", "%25", "//", "\\\\", "é",
    ]
)  # fmt: skip
crafted_urls = st.builds(
    lambda scheme, authority, path: f"{scheme}://{''.join(authority)}{''.join(path)}",
    st.sampled_from(["https", "http", "HTTPS", "hTTp", "ftp"]),
    st.lists(_PIECES, min_size=1, max_size=6),
    st.lists(_PIECES, max_size=4),
)


class TestEndpointJudge:
    """check_endpoint judges with urllib3's reading and refuses what parsers could dispute."""

    @pytest.mark.parametrize("issuer", CRAFTED_ISSUERS)
    def test_crafted_issuer_is_refused_at_import(self, issuer: str) -> None:
        """An access token whose iss could lead requests elsewhere is refused at import."""
        request = ImportRequest(
            profile="work", access_token=_access_token(issuer), refresh_token="r" * 20
        )
        with pytest.raises(EndpointNotAllowedError) as info:
            build_state(request, NOW)
        assert "\n" not in str(info.value)

    @pytest.mark.parametrize("issuer", CRAFTED_ISSUERS)
    def test_crafted_url_is_refused_even_when_explicit(self, issuer: str) -> None:
        """--token-endpoint and --base-url go through the same judge."""
        with pytest.raises(EndpointNotAllowedError):
            check_endpoint(issuer + "/token", explicit=True)

    @settings(max_examples=1500, deadline=None)
    @given(url=crafted_urls, explicit=st.booleans())
    def test_accepted_urls_are_read_alike_and_allowed(self, url: str, explicit: bool) -> None:
        """For every accepted URL, urllib.parse, urllib3 and requests' prepared URL agree on
        scheme, host and port, and that host is one the rules allow."""
        try:
            judged = check_endpoint(url, explicit=explicit)
        except EndpointNotAllowedError as exc:
            assert "\n" not in str(exc)
            return
        scheme, host, port = _agree(judged)
        assert (scheme, host, port) == _agree(url.strip()) == url_origin(judged)
        prepared = requests.Request("POST", judged).prepare()
        assert prepared.url is not None
        assert url_origin(prepared.url) == (scheme, host, port)
        assert scheme == "https" or is_loopback_host(host)
        if not explicit:
            assert scheme == "https"
            assert host == AAC_DOMAIN or host.endswith("." + AAC_DOMAIN)

    @settings(max_examples=500, deadline=None)
    @given(text=st.text(max_size=80))
    def test_any_text_is_judged_without_surprise(self, text: str) -> None:
        """Arbitrary text is accepted or refused with the one error class, never a crash."""
        for explicit in (True, False):
            with contextlib.suppress(EndpointNotAllowedError):
                check_endpoint(text, explicit=explicit)


# -- TokendAuth against two loopback origins -------------------------------------------------


class _Origin:
    """A loopback HTTP server that records the Authorization header of every request and
    answers by path: /redirect?to=URL is a 302 there, /deny-once?to=URL is 401 the first
    time and a 302 there after, /ok is 200 when the bearer token is the current one (401
    otherwise), anything else is 401."""

    def __init__(self, tokens: _Daemon, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[tuple[str, str | None]] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                origin.seen.append((self.path, auth))
                denied = (
                    self.path.startswith("/deny-once?to=")
                    and [path for path, _ in origin.seen].count(self.path) == 1
                )
                if denied:
                    self.send_response(401)
                elif self.path.startswith(("/redirect?to=", "/deny-once?to=")):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                elif self.path == "/ok" and auth == f"Bearer {tokens.current}":
                    self.send_response(200)
                else:
                    self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        if port:  # the default port, as a user would write it (and requests' check reads it)
            self.url = f"{scheme}://127.0.0.1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Daemon:
    """The daemon's side of the control socket as TokendAuth uses it: ``token`` answers the
    current token, ``refresh`` replaces it with the next one."""

    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.current = "tok-0"
        self.refreshes = 0

    def handle(self, request: dict[str, object]) -> dict[str, object]:
        if request["op"] == "token":
            return {"ok": True, "profile": "default", "token": self.current}
        if request["op"] == "refresh":
            self.refreshes += 1
            self.current = f"tok-{next(self._numbers)}"
            return {"ok": True, "profile": {"profile": "default"}}
        return {"ok": False, "code": "unknown_op", "message": "no such op"}


@pytest.fixture
def daemon(sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Daemon]:
    """A control socket where get_token and request_refresh look for it."""
    run = sockdir / "run"
    run.mkdir(mode=0o700)
    fake = _Daemon()
    server = ControlServer(run / "control.sock", fake)
    server.start()
    monkeypatch.setenv("AAC_TOKEND_HOME", str(sockdir))
    yield fake
    server.stop()


@pytest.fixture
def origins(daemon: _Daemon) -> Iterator[tuple[_Origin, _Origin]]:
    """Two loopback servers on two ports: two origins."""
    first, second = _Origin(daemon), _Origin(daemon)
    yield first, second
    first.close()
    second.close()


@pytest.fixture
def default_ports(daemon: _Daemon, tmp_path: Path) -> Iterator[tuple[_Origin, _Origin, Path]]:
    """http://127.0.0.1 and https://127.0.0.1 on ports 80 and 443, and the CA bundle: the
    one pair of origins requests' own redirect check lets a token cross."""
    ca = CA("test root")
    try:
        plain = _Origin(daemon, 80)
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.1:80 (needs root, port free): {exc}")
    try:
        secure = _Origin(daemon, 443, ca.server_context(tmp_path))
    except OSError as exc:
        plain.close()
        pytest.skip(f"cannot listen on 127.0.0.1:443 (needs root, port free): {exc}")
    yield plain, secure, ca.write_bundle(tmp_path / "ca.pem")
    plain.close()
    secure.close()


def _bearers(origin: _Origin) -> list[str]:
    return [auth for _, auth in origin.seen if auth is not None]


class TestBearerStaysAtItsOrigin:
    """TokendAuth's token reaches the origin asked for, and no other, whatever redirects."""

    def test_redirect_to_another_origin_that_answers_401(
        self, origins: tuple[_Origin, _Origin], daemon: _Daemon
    ) -> None:
        """A 302 to another origin answering 401 gets no token, not even from the retry."""
        home, elsewhere = origins
        response = requests.get(
            f"{home.url}/redirect?to={elsewhere.url}/steal",
            auth=TokendAuth(),
            timeout=TIMEOUT,
        )
        assert response.status_code == 401
        assert elsewhere.seen and _bearers(elsewhere) == []
        assert _bearers(home) == ["Bearer tok-0"]
        assert daemon.refreshes == 0

    def test_401_at_the_origin_is_retried_once_with_a_fresh_token(
        self, origins: tuple[_Origin, _Origin], daemon: _Daemon
    ) -> None:
        """On the origin asked for, a 401 still brings one refresh and one retry."""
        home, _ = origins
        daemon.current = "tok-revoked"
        first = requests.get(f"{home.url}/deny", auth=TokendAuth(), timeout=TIMEOUT)
        assert first.status_code == 401
        assert _bearers(home) == ["Bearer tok-revoked", "Bearer tok-1"]
        assert daemon.refreshes == 1
        ok = requests.get(f"{home.url}/ok", auth=TokendAuth(), timeout=TIMEOUT)
        assert ok.status_code == 200 and ok.history == []

    def test_redirect_within_the_origin_keeps_the_token(
        self, origins: tuple[_Origin, _Origin], daemon: _Daemon
    ) -> None:
        """A redirect to another path of the same origin still carries the token."""
        home, _ = origins
        response = requests.get(f"{home.url}/redirect?to=/ok", auth=TokendAuth(), timeout=TIMEOUT)
        assert response.status_code == 200
        assert _bearers(home) == ["Bearer tok-0", "Bearer tok-0"]
        assert daemon.refreshes == 0

    def test_redirect_answered_to_the_401_retry_leaves_the_origin(
        self, origins: tuple[_Origin, _Origin], daemon: _Daemon
    ) -> None:
        """A 302 to another origin answered to the retry carries no token, old or new."""
        home, elsewhere = origins
        response = requests.get(
            f"{home.url}/deny-once?to={elsewhere.url}/steal", auth=TokendAuth(), timeout=TIMEOUT
        )
        assert response.status_code == 401
        assert elsewhere.seen and _bearers(elsewhere) == []
        assert _bearers(home) == ["Bearer tok-0", "Bearer tok-1"]
        assert daemon.refreshes == 1

    def test_redirect_answered_to_the_401_retry_within_the_origin(
        self, origins: tuple[_Origin, _Origin], daemon: _Daemon
    ) -> None:
        """A 302 within the origin answered to the retry carries the fresh token: no 2nd refresh."""
        home, _ = origins
        response = requests.get(f"{home.url}/deny-once?to=/ok", auth=TokendAuth(), timeout=TIMEOUT)
        assert response.status_code == 200
        assert _bearers(home) == ["Bearer tok-0", "Bearer tok-1", "Bearer tok-1"]
        assert daemon.refreshes == 1

    def test_retry_redirected_from_http_to_https(
        self, default_ports: tuple[_Origin, _Origin, Path], daemon: _Daemon
    ) -> None:
        """http://H/ -> https://H/ answered to the retry is another origin: no token goes."""
        plain, secure, bundle = default_ports
        response = requests.get(
            f"{plain.url}/deny-once?to={secure.url}/landing",
            auth=TokendAuth(),
            timeout=TIMEOUT,
            verify=str(bundle),
        )
        assert response.status_code == 401
        assert secure.seen and _bearers(secure) == []
        assert _bearers(plain) == ["Bearer tok-0", "Bearer tok-1"]

    def test_there_and_back_again(self, origins: tuple[_Origin, _Origin], daemon: _Daemon) -> None:
        """Via another origin and back: the other never sees the token, home gets it again
        (by the 401 retry, the only way back in)."""
        home, elsewhere = origins
        back = f"{home.url}/ok"
        response = requests.get(
            f"{home.url}/redirect?to={elsewhere.url}/redirect?to={back}",
            auth=TokendAuth(),
            timeout=TIMEOUT,
        )
        assert response.status_code == 200
        assert _bearers(elsewhere) == []
        assert _bearers(home)[-1] == f"Bearer {daemon.current}"


class TestApiCommandAvoidsProxies:
    """``aac-tokend api`` on a plain-http (loopback) base never hands the bearer to a proxy."""

    @pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
    def test_plain_http_base_is_asked_directly(
        self,
        origins: tuple[_Origin, _Origin],
        daemon: _Daemon,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        variable: str,
    ) -> None:
        """With a proxy in the environment, the call and its same-origin redirect go direct."""
        home, proxy = origins  # a proxied request would reach `proxy` in absolute form
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(variable, proxy.url)
        args = argparse.Namespace(
            method="GET", path="/redirect?to=/ok", data=None, base_url=home.url, profile="default"
        )
        assert run_cli(args) == 0, capsys.readouterr().err
        assert proxy.seen == []
        assert _bearers(home) == ["Bearer tok-0", "Bearer tok-0"]
