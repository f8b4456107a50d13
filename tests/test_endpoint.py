"""The token endpoint client, against the real sandbox and tiny loopback servers that misbehave."""

from __future__ import annotations

import datetime
import email.utils
import gzip
import ipaddress
import json
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
import requests.adapters
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend import __version__
from aac_tokend.core.importer import MAX_ACCESS_LIFETIME_SECONDS, MIN_ACCESS_LIFETIME_SECONDS
from aac_tokend.core.outcome import (
    UNREACHED_PREFIX,
    FailureKind,
    Refreshed,
    RefreshOutcome,
    Rejected,
    Transient,
)
from aac_tokend.core.policy import apply_outcome
from aac_tokend.core.state import ProfileState, RejectionReason, TokenKind
from aac_tokend.refresh.endpoint import (
    MAX_BODY_BYTES,
    MAX_EXPIRES_IN_SECONDS,
    MAX_RETRY_AFTER_SECONDS,
    MIN_EXPIRES_IN_SECONDS,
    TERMINAL_OAUTH_ERRORS,
    TokenEndpoint,
    classify_response,
    parse_retry_after,
)
from aac_tokend.sandbox.jwt_sign import sign_hs256
from aac_tokend.sandbox.server import SandboxServer

NOW = 1_800_000_000.0
# A handler that stalls waits at most this long (the test's finalizer frees it sooner); it
# only has to outlast the short read timeouts below.
STALL_SECONDS = 10.0
SHORT_READ_TIMEOUT = 0.3
REFRESH = "rt-Old+Token/with=odd&chars"


def access_jwt(exp: float = NOW + 900) -> str:
    return sign_hs256({"exp": exp, "iss": "https://pingauth.alteryxcloud.com/as"}, b"k" * 32)


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # a proxy from the environment must not intercept loopback tests
    return s


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    s = session()
    yield TokenEndpoint(s)
    s.close()


@pytest.fixture
def impatient() -> Iterator[TokenEndpoint]:
    s = session()
    yield TokenEndpoint(s, read_timeout=SHORT_READ_TIMEOUT)
    s.close()


# -- a loopback server with a scripted answer ---------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Answer = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    server: OddServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.server.seen.append(Seen("POST", self.path, dict(self.headers.items()), body))
        self.server.answer(self)

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        self.reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json"}
                   | (headers or {}))  # fmt: skip


class OddServer(ThreadingHTTPServer):
    """A loopback HTTP server answering every request with ``answer``, recording each."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, answer: Answer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer = answer
        self.seen: list[Seen] = []
        self.release = threading.Event()  # stalled handlers wait for this

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/as/token"


@pytest.fixture
def odd() -> Iterator[Callable[[Answer], OddServer]]:
    """Start OddServers on demand; all are stopped (and stalled handlers freed) at the end."""
    servers: list[OddServer] = []

    def start(answer: Answer) -> OddServer:
        server = OddServer(answer)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def call(endpoint: TokenEndpoint, server: OddServer, refresh: str = REFRESH) -> RefreshOutcome:
    return endpoint.refresh(server.url, "client-1", refresh, now=NOW)


# -- against the sandbox -------------------------------------------------------------------


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=600) as server:
        yield server


def sandbox_refresh(
    endpoint: TokenEndpoint, sandbox: SandboxServer, refresh: str, client: str | None = None
) -> RefreshOutcome:
    return endpoint.refresh(
        sandbox.token_endpoint, client or sandbox.client_id, refresh, now=sandbox.clock()
    )


def pair(sandbox: SandboxServer) -> tuple[str, str]:
    generated = sandbox.generate()
    return str(generated["access_token"]), str(generated["refresh_token"])


def state_for(sandbox: SandboxServer, access: str, refresh: str) -> ProfileState:
    return ProfileState(
        profile="work",
        kind=TokenKind.OAUTH,
        access_token=access,
        refresh_token=refresh,
        token_endpoint=sandbox.token_endpoint,
        client_id=sandbox.client_id,
        api_base_url=sandbox.api_url,
        access_obtained_at=NOW,
        access_expires_at=NOW + 600,
    )


class TestAgainstSandbox:
    """A real AAC-like server: rotation, reuse detection, OAuth errors, injected failures."""

    def test_success_rotates(self, endpoint: TokenEndpoint, sandbox: SandboxServer) -> None:
        """A refresh returns a new access token, a new refresh token and expires_in."""
        access, refresh = pair(sandbox)
        outcome = sandbox_refresh(endpoint, sandbox, refresh)
        assert isinstance(outcome, Refreshed)
        assert outcome.access_token != access
        assert outcome.refresh_token not in (None, refresh)
        assert outcome.expires_in == 600
        assert sandbox.log()[-1]["outcome"] == "rotated"

    def test_chain_of_refreshes(self, endpoint: TokenEndpoint, sandbox: SandboxServer) -> None:
        """Feeding each outcome through apply_outcome keeps the chain alive for many rounds."""
        access, refresh = pair(sandbox)
        state = state_for(sandbox, access, refresh)
        for _ in range(5):
            assert state.refresh_token is not None
            outcome = sandbox_refresh(endpoint, sandbox, state.refresh_token)
            assert isinstance(outcome, Refreshed)
            state = apply_outcome(state, outcome, NOW)
        assert state.refresh_count == 5
        assert [e["outcome"] for e in sandbox.log()] == ["rotated"] * 5

    def test_reuse_is_invalid_grant(self, endpoint: TokenEndpoint, sandbox: SandboxServer) -> None:
        """Reusing a rotated refresh token is Rejected(invalid_grant) with the server's words."""
        _, refresh = pair(sandbox)
        assert isinstance(sandbox_refresh(endpoint, sandbox, refresh), Refreshed)
        outcome = sandbox_refresh(endpoint, sandbox, refresh)
        assert outcome == Rejected(
            "invalid_grant", "unknown, invalid, or expired refresh token", 400
        )

    def test_invalid_client(self, endpoint: TokenEndpoint, sandbox: SandboxServer) -> None:
        """A wrong client id is Rejected(invalid_client) with status 401."""
        _, refresh = pair(sandbox)
        outcome = sandbox_refresh(endpoint, sandbox, refresh, client="someone-else")
        assert isinstance(outcome, Rejected)
        assert (outcome.error, outcome.status) == ("invalid_client", 401)
        assert outcome.error_description == "Invalid client or client credentials"

    def test_429_retry_after(self, endpoint: TokenEndpoint, sandbox: SandboxServer) -> None:
        """An injected 429 with Retry-After is Transient with that delay, and ambiguous."""
        _, refresh = pair(sandbox)
        sandbox.fail_next(1, status=429, retry_after=7)
        outcome = sandbox_refresh(endpoint, sandbox, refresh)
        assert outcome == Transient("token endpoint answered HTTP 429", 7.0, FailureKind.AMBIGUOUS)

    def test_503(self, endpoint: TokenEndpoint, sandbox: SandboxServer) -> None:
        """An injected 503 is Transient and ambiguous (a gateway may have forwarded it)."""
        _, refresh = pair(sandbox)
        sandbox.fail_next(1, status=503)
        outcome = sandbox_refresh(endpoint, sandbox, refresh)
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert isinstance(sandbox_refresh(endpoint, sandbox, refresh), Refreshed)

    def test_400_without_oauth_error(self, endpoint: TokenEndpoint, sandbox: SandboxServer) -> None:
        """A 400 whose body is not an OAuth error is Transient (ambiguous), never a rejection."""
        _, refresh = pair(sandbox)
        sandbox.fail_next(1, status=400, body="<html>Bad Request</html>")
        outcome = sandbox_refresh(endpoint, sandbox, refresh)
        assert isinstance(outcome, Transient) and outcome.ambiguous

    def test_dropped_answer_is_ambiguous_then_after_lost_response(
        self, endpoint: TokenEndpoint, sandbox: SandboxServer
    ) -> None:
        """A rotation whose answer is lost is ambiguous; the retry's invalid_grant is then
        classified as our own lost response."""
        access, refresh = pair(sandbox)
        state = state_for(sandbox, access, refresh)
        sandbox.fail_next(1, drop=True)
        lost = sandbox_refresh(endpoint, sandbox, refresh)
        assert isinstance(lost, Transient) and lost.ambiguous
        assert sandbox.log()[-1]["outcome"] == "dropped_after_rotation"
        state = apply_outcome(state, lost, NOW)
        rejected = sandbox_refresh(endpoint, sandbox, refresh)
        assert isinstance(rejected, Rejected)
        state = apply_outcome(state, rejected, NOW)
        assert state.rejection is not None
        assert state.rejection.reason is RejectionReason.AFTER_LOST_RESPONSE

    def test_slow_answer_is_ambiguous(
        self, impatient: TokenEndpoint, sandbox: SandboxServer
    ) -> None:
        """An answer slower than the read timeout is ambiguous: the server did rotate."""
        _, refresh = pair(sandbox)
        sandbox.set_answer_delay(SHORT_READ_TIMEOUT * 5)
        outcome = sandbox_refresh(impatient, sandbox, refresh)
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert sandbox.log()[-1]["outcome"] == "rotated"


# -- odd answers -------------------------------------------------------------------------


class TestRequestShape:
    """One form-encoded POST with the three refresh parameters and our User-Agent."""

    def test_form_and_headers(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """The body is form-encoded grant_type/refresh_token/client_id; UA names the version."""
        server = odd(lambda h: h.reply_json(200, {"access_token": access_jwt()}))
        call(endpoint, server)
        (seen,) = server.seen
        assert (seen.method, seen.path) == ("POST", "/as/token")
        assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert seen.headers["User-Agent"] == f"aac-tokend/{__version__}"
        assert seen.headers["Accept"] == "application/json"
        assert "Authorization" not in seen.headers
        assert parse_qs(seen.body.decode(), strict_parsing=True) == {
            "grant_type": ["refresh_token"],
            "refresh_token": [REFRESH],
            "client_id": ["client-1"],
        }

    @pytest.mark.parametrize(
        "answer",
        [
            lambda h: h.reply(503, b"down"),
            lambda h: h.reply(500, b""),
            lambda h: h.reply_json(400, {"error": "invalid_grant"}),
            lambda h: setattr(h, "close_connection", True),
            lambda h: h.reply(302, b"", {"Location": "/as/token"}),
        ],
        ids=["503", "500", "invalid_grant", "closed", "redirect"],
    )
    def test_never_retries(self, endpoint: TokenEndpoint, odd: Any, answer: Answer) -> None:
        """Whatever the answer, the server sees exactly one request per refresh call."""
        server = odd(answer)
        call(endpoint, server)
        assert len(server.seen) == 1

    def test_token_not_in_reason(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A failure's reason never carries the refresh token that was sent."""
        server = odd(lambda h: h.reply(503, REFRESH.encode()))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Transient)
        assert REFRESH not in outcome.reason


class TestOddAnswers:
    """Every odd answer becomes an outcome; ambiguous exactly when the server may have rotated."""

    def test_missing_refresh_token_keeps_old(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A success without refresh_token keeps the old one in force (RFC 6749 s6)."""
        access = access_jwt()
        server = odd(lambda h: h.reply_json(200, {"access_token": access, "expires_in": 300}))
        outcome = call(endpoint, server)
        assert outcome == Refreshed(access, None, 300.0)
        state = ProfileState(
            profile="p", kind=TokenKind.OAUTH, access_token="old", refresh_token=REFRESH,
            token_endpoint=server.url, client_id="client-1", api_base_url="https://x",
            access_obtained_at=NOW - 600, access_expires_at=NOW + 10,
        )  # fmt: skip
        after = apply_outcome(state, outcome, NOW)
        assert (after.access_token, after.refresh_token) == (access, REFRESH)

    def test_expiry_from_jwt_without_expires_in(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """Without expires_in, the lifetime is the JWT's exp minus now."""
        server = odd(lambda h: h.reply_json(200, {"access_token": access_jwt(NOW + 1234)}))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Refreshed) and outcome.expires_in == 1234

    def test_opaque_without_expires_in(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """An opaque token without expires_in gets the short assumed lifetime."""
        server = odd(lambda h: h.reply_json(200, {"access_token": "opaque-access-token"}))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Refreshed) and outcome.expires_in == 300

    def test_invalid_grant_description_kept(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """invalid_grant keeps the error and its description."""
        body = {"error": "invalid_grant", "error_description": "token revoked by admin"}
        server = odd(lambda h: h.reply_json(400, body))
        assert call(endpoint, server) == Rejected("invalid_grant", "token revoked by admin", 400)

    def test_invalid_client_401(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A 401 invalid_client is Rejected with status 401."""
        server = odd(lambda h: h.reply_json(401, {"error": "invalid_client"}))
        assert call(endpoint, server) == Rejected("invalid_client", None, 401)

    @pytest.mark.parametrize(
        "answer",
        [
            lambda h: h.reply(400, b"<html>bad request</html>", {"Content-Type": "text/html"}),
            lambda h: h.reply_json(400, {"message": "bad"}),
            lambda h: h.reply_json(400, {"error": 42}),
            lambda h: h.reply_json(403, {"error": "access_denied"}),
        ],
        ids=["html", "no error field", "error not a string", "403"],
    )
    def test_not_an_oauth_rejection(
        self, endpoint: TokenEndpoint, odd: Any, answer: Answer
    ) -> None:
        """A 4xx without a proper OAuth error (or not 400/401) is Transient and ambiguous."""
        outcome = call(endpoint, odd(answer))
        assert isinstance(outcome, Transient) and outcome.ambiguous

    def test_429_retry_after_seconds(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """Retry-After in seconds is kept."""
        server = odd(lambda h: h.reply(429, b"slow down", {"Retry-After": "42"}))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Transient) and outcome.retry_after == 42

    def test_429_retry_after_http_date(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """Retry-After as an HTTP date becomes seconds from now."""
        when = email.utils.formatdate(NOW + 120, usegmt=True)
        server = odd(lambda h: h.reply(429, b"", {"Retry-After": when}))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Transient) and outcome.retry_after == 120

    def test_503(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A 503 is Transient and ambiguous: the server behind a gateway may have rotated."""
        outcome = call(endpoint, odd(lambda h: h.reply(503, b"maintenance")))
        assert outcome == Transient("token endpoint answered HTTP 503", None, FailureKind.AMBIGUOUS)

    @pytest.mark.parametrize(
        "answer",
        [
            lambda h: h.reply(200, b"<html>welcome</html>"),
            lambda h: h.reply(200, b""),
            lambda h: h.reply_json(200, {"refresh_token": ""}),
            lambda h: h.reply_json(200, {"access_token": ""}),
            lambda h: h.reply_json(200, {"access_token": 12345}),
            lambda h: h.reply_json(200, {"access_token": "has space inside"}),
            lambda h: h.reply_json(200, {"access_token": "ctrl\u0007char"}),
            lambda h: h.reply_json(200, [{"access_token": "x"}]),
            lambda h: h.reply(200, b"\xff\xfe{}"),
        ],
        ids=["html", "empty", "no access_token", "blank", "number", "space", "control",
             "array", "not utf8"],
    )  # fmt: skip
    def test_garbled_success_is_ambiguous(
        self, endpoint: TokenEndpoint, odd: Any, answer: Answer
    ) -> None:
        """A 200 without a usable access token is ambiguous: the server may have rotated."""
        outcome = call(endpoint, odd(answer))
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert outcome.rotated_refresh_token is None

    @pytest.mark.parametrize(
        "access", [None, "", 12345, "has space inside", "ctrl\u0007char"], ids=repr
    )
    def test_new_refresh_token_without_access_token_is_kept(
        self, endpoint: TokenEndpoint, odd: Any, access: object
    ) -> None:
        """A 200 with a new refresh token but no usable access token keeps the new one."""
        body: dict[str, Any] = {"refresh_token": " new-rt ", "expires_in": 3600}
        if access is not None:
            body["access_token"] = access
        outcome = call(endpoint, odd(lambda h: h.reply_json(200, body)))
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert outcome.rotated_refresh_token == "new-rt"
        assert "new-rt" not in repr(outcome)

    @pytest.mark.parametrize("refresh", [None, "", "   ", 7, "two words"], ids=repr)
    def test_success_without_usable_refresh_token(
        self, endpoint: TokenEndpoint, odd: Any, refresh: object
    ) -> None:
        """A 200 whose refresh token is absent, null, empty or garbled carries none."""
        body: dict[str, Any] = {"access_token": "good-at", "expires_in": 3600}
        if refresh is not None:
            body["refresh_token"] = refresh
        outcome = call(endpoint, odd(lambda h: h.reply_json(200, body)))
        assert isinstance(outcome, Refreshed) and outcome.refresh_token is None

    def test_closed_without_answer(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A server that reads the request and closes without answering: ambiguous."""
        server = odd(lambda h: setattr(h, "close_connection", True))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert len(server.seen) == 1

    def test_read_timeout(self, impatient: TokenEndpoint, odd: Any) -> None:
        """No answer within the read timeout: ambiguous."""
        server = odd(lambda h: h.server.release.wait(STALL_SECONDS))
        outcome = call(impatient, server)
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert "Timeout" in outcome.reason

    def test_timeout_inside_body(self, impatient: TokenEndpoint, odd: Any) -> None:
        """Headers arrive, then the body stalls past the read timeout: ambiguous."""

        def stall(h: _Handler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", "100")
            h.end_headers()
            h.wfile.write(b'{"access_token": "')
            h.wfile.flush()
            h.server.release.wait(STALL_SECONDS)

        outcome = call(impatient, odd(stall))
        assert isinstance(outcome, Transient) and outcome.ambiguous

    def test_body_cut_short(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A body shorter than its Content-Length: ambiguous."""

        def cut(h: _Handler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", "100")
            h.end_headers()
            h.wfile.write(b'{"access_token": "')
            h.close_connection = True

        outcome = call(endpoint, odd(cut))
        assert isinstance(outcome, Transient) and outcome.ambiguous

    def test_undecodable_gzip(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A body claiming gzip that is not gzip: ambiguous."""
        server = odd(lambda h: h.reply(200, b"not gzip at all", {"Content-Encoding": "gzip"}))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Transient) and outcome.ambiguous

    def test_gzip_success(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A gzip-encoded success is decoded."""
        body = gzip.compress(json.dumps({"access_token": "tok", "expires_in": 60}).encode())
        server = odd(lambda h: h.reply(200, body, {"Content-Encoding": "gzip"}))
        assert call(endpoint, server) == Refreshed("tok", None, 60.0)

    def test_not_http(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """Garbage instead of a status line: ambiguous (the request was sent)."""

        def garbage(h: _Handler) -> None:
            h.wfile.write(b"\x00\x01 this is not HTTP\r\n\r\n")
            h.close_connection = True

        outcome = call(endpoint, odd(garbage))
        assert isinstance(outcome, Transient) and outcome.ambiguous

    def test_connection_refused(self, endpoint: TokenEndpoint) -> None:
        """A closed port: nothing was sent, so not ambiguous."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        outcome = endpoint.refresh(f"http://127.0.0.1:{port}/as/token", "c", REFRESH, now=NOW)
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert outcome.reason.startswith("cannot reach the token endpoint")

    def test_invalid_url(self, endpoint: TokenEndpoint) -> None:
        """A URL requests cannot use: nothing was sent, not ambiguous."""
        outcome = endpoint.refresh("nota://url", "c", REFRESH, now=NOW)
        assert isinstance(outcome, Transient) and not outcome.ambiguous

    @pytest.mark.parametrize("status", [200, 400, 503])
    def test_body_over_64k(self, endpoint: TokenEndpoint, odd: Any, status: int) -> None:
        """A body over 64 KiB is not read as a token response: Transient and ambiguous."""
        big = json.dumps({"access_token": "tok", "error": "invalid_grant",
                          "pad": "x" * MAX_BODY_BYTES}).encode()  # fmt: skip
        outcome = call(endpoint, odd(lambda h: h.reply(status, big)))
        assert isinstance(outcome, Transient) and outcome.ambiguous

    def test_redirect_not_followed(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A redirect is not followed: the refresh token goes nowhere else."""
        target = odd(lambda h: h.reply_json(200, {"access_token": "stolen"}))
        server = odd(lambda h: h.reply(307, b"", {"Location": target.url}))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert target.seen == []
        assert len(server.seen) == 1


# -- OAuth errors that mean "try again" ---------------------------------------------------


class TestRetryableOAuthErrors:
    """Only an OAuth error that says the grant, client or request is bad ends a chain."""

    @pytest.mark.parametrize(
        "error", ["server_error", "temporarily_unavailable", "invalid_request", "slow_down"]
    )
    @pytest.mark.parametrize("status", [400, 401])
    def test_retry_codes_are_transient(
        self, endpoint: TokenEndpoint, odd: Any, error: str, status: int
    ) -> None:
        """A retryable OAuth error in a 400/401 is the server's own: transient, not ambiguous."""
        server = odd(lambda h: h.reply_json(status, {"error": error}, {"Retry-After": "30"}))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert outcome.retry_after == 30 and error in outcome.reason

    @pytest.mark.parametrize("error", ["server_error", "temporarily_unavailable", "invalid_grant"])
    @pytest.mark.parametrize("status", [403, 429, 500, 502, 503])
    def test_other_statuses_stay_ambiguous(
        self, endpoint: TokenEndpoint, odd: Any, error: str, status: int
    ) -> None:
        """The same JSON under another status may be a gateway's: retried, ambiguous."""
        outcome = call(endpoint, odd(lambda h: h.reply_json(status, {"error": error})))
        assert isinstance(outcome, Transient) and outcome.ambiguous

    def test_empty_error_stays_ambiguous(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A 400 whose error is empty is no OAuth answer: who wrote it is unknown."""
        outcome = call(endpoint, odd(lambda h: h.reply_json(400, {"error": " "})))
        assert isinstance(outcome, Transient) and outcome.ambiguous

    @pytest.mark.parametrize("error", sorted(TERMINAL_OAUTH_ERRORS))
    def test_grant_codes_are_rejections(
        self, endpoint: TokenEndpoint, odd: Any, error: str
    ) -> None:
        """invalid_grant, invalid_client and the other RFC 6749 verdicts stay rejections."""
        outcome = call(endpoint, odd(lambda h: h.reply_json(400, {"error": error})))
        assert outcome == Rejected(error, None, 400)


# -- did the request leave? ---------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _BrokenTLSServer:
    """Completes the TLS handshake, reads the whole request, then breaks the TLS stream."""

    def __init__(self, cert: Path, key: Path, *, stall: bool = False) -> None:
        self.stall = stall  # stay silent after the request instead of breaking the stream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.listener.getsockname()[1]}/as/token"

    def _serve(self) -> None:
        raw, _ = self.listener.accept()
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                data = b""
                while b"refresh_token=" not in data:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                self.requests.append(data)
                if self.stall:
                    time.sleep(3.0)
                    return
                # A TLS record of garbage under the encryption: the client's read fails with
                # an SSL error, after the whole request has arrived.
                os.write(tls.fileno(), b"\x17\x03\x03\x00\x10" + b"\x00" * 16)
                time.sleep(0.5)
        except (ssl.SSLError, OSError):
            pass  # the client refused the handshake: that is the test's point

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


class TestDidTheRequestLeave:
    """A failure is 'unreached' only if no byte of the request went out; else ambiguous."""

    def test_tls_handshake_refused_is_unreached(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """https:// to a plain HTTP server fails in the handshake: nothing was sent."""
        server = odd(lambda h: h.reply_json(200, {"access_token": "x"}))
        url = server.url.replace("http://", "https://")
        outcome = endpoint.refresh(url, "c", REFRESH, now=NOW)
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert outcome.reason.startswith(UNREACHED_PREFIX)
        assert server.seen == []

    def test_untrusted_certificate_is_unreached(self, tmp_path: Path) -> None:
        """A certificate the client refuses ends the handshake: nothing was sent."""
        cert, key = _self_signed(tmp_path)
        server = _BrokenTLSServer(cert, key)
        try:
            outcome = TokenEndpoint(session()).refresh(server.url, "c", REFRESH, now=NOW)
        finally:
            server.close()
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert server.requests == []

    def test_tls_broken_after_sending_is_ambiguous(self, tmp_path: Path) -> None:
        """A TLS error after the request went out is ambiguous, not 'cannot reach'."""
        cert, key = _self_signed(tmp_path)
        server = _BrokenTLSServer(cert, key)
        tls_session = session()
        tls_session.verify = str(cert)
        try:
            outcome = TokenEndpoint(tls_session).refresh(server.url, "c", REFRESH, now=NOW)
        finally:
            server.close()
        assert len(server.requests) == 1
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert not outcome.reason.startswith(UNREACHED_PREFIX)


class _OwnAdapter(requests.adapters.HTTPAdapter):
    """A caller's own adapter: the endpoint keeps it, and judges its failures by type."""


class TestFailuresJudgedByType:
    """Through an adapter that is not ours, only pre-socket failures count as unreached."""

    def own(self) -> TokenEndpoint:
        s = session()
        s.mount("http://", _OwnAdapter())
        return TokenEndpoint(s, read_timeout=SHORT_READ_TIMEOUT)

    def test_refused_is_unreached(self) -> None:
        """A refused connect is provably unsent, by its type alone."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        outcome = self.own().refresh(f"http://127.0.0.1:{port}/as/token", "c", REFRESH, now=NOW)
        assert isinstance(outcome, Transient) and not outcome.ambiguous

    def test_cut_after_sending_is_ambiguous(self, odd: Any) -> None:
        """A connection closed without an answer may have delivered the request."""
        server = odd(lambda h: setattr(h, "close_connection", True))
        outcome = call(self.own(), server)
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert len(server.seen) == 1


class TestOneDeadline:
    """The whole refresh has one deadline, however the server spreads its answer."""

    def test_stalled_tls_answer_is_cut_and_ambiguous(self, tmp_path: Path) -> None:
        """A TLS server silent after the request: cut at the deadline, ambiguous."""
        cert, key = _self_signed(tmp_path)
        server = _BrokenTLSServer(cert, key, stall=True)
        tls_session = session()
        tls_session.verify = str(cert)
        started = time.monotonic()
        try:
            outcome = TokenEndpoint(tls_session, read_timeout=10.0, deadline=0.5).refresh(
                server.url, "c", REFRESH, now=NOW
            )
            took = time.monotonic() - started
        finally:
            server.close()
        assert len(server.requests) == 1
        assert outcome == Transient("no complete answer within 0.5 s", None, FailureKind.AMBIGUOUS)
        assert took < 2.0

    def test_stalled_proxy_tunnel_is_cut_and_unreached(self) -> None:
        """A proxy that never answers CONNECT: cut at the deadline, and nothing was sent."""
        listener = socket.create_server(("127.0.0.1", 0))
        held: list[socket.socket] = []
        threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
        s = session()
        s.proxies = {"https": f"http://127.0.0.1:{listener.getsockname()[1]}"}
        started = time.monotonic()
        outcome = TokenEndpoint(s, read_timeout=10.0, deadline=0.5).refresh(
            "https://127.0.0.1:9/as/token", "c", REFRESH, now=NOW
        )
        took = time.monotonic() - started
        for conn in held:
            conn.close()
        listener.close()
        assert isinstance(outcome, Transient) and not outcome.ambiguous
        assert outcome.reason == f"{UNREACHED_PREFIX} within 0.5 s"
        assert took < 2.0

    def test_dripping_answer_is_cut_at_the_deadline(self, odd: Any) -> None:
        """A byte every 0.2 s never trips the read timeout; the total deadline cuts it."""

        def drip(h: _Handler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            for _ in range(100):
                if h.server.release.wait(0.2):
                    return
                h.wfile.write(b" ")
                h.wfile.flush()

        s = session()
        endpoint = TokenEndpoint(s, read_timeout=5.0, deadline=1.0)
        started = time.monotonic()
        outcome = call(endpoint, odd(drip))
        took = time.monotonic() - started
        s.close()
        assert isinstance(outcome, Transient) and outcome.ambiguous
        assert outcome.reason == "no complete answer within 1 s"
        assert 0.9 < took < 2.5

    def test_stalled_headers_are_cut_at_the_deadline(self, odd: Any) -> None:
        """No status line at all: the deadline, shorter than the read timeout, ends it."""
        s = session()
        endpoint = TokenEndpoint(s, read_timeout=10.0, deadline=0.5)
        started = time.monotonic()
        outcome = call(endpoint, odd(lambda h: h.server.release.wait(STALL_SECONDS)))
        s.close()
        assert time.monotonic() - started < 2.0
        assert isinstance(outcome, Transient) and outcome.ambiguous


# -- classify_response, fuzzed ------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=10,
)
field_values = (
    json_values
    | st.text(max_size=300)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.from_regex(r"\s*[0-9\u00b2\u0661]{1,30}\s*", fullmatch=True)
    | st.sampled_from([*sorted(TERMINAL_OAUTH_ERRORS), "server_error", "temporarily_unavailable"])
)
oauth_like = st.dictionaries(
    st.sampled_from(["access_token", "refresh_token", "expires_in", "error", "error_description",
                     "token_type"]),
    field_values,
)  # fmt: skip
encodings = st.sampled_from(["utf-8", "utf-16", "latin-1", "utf-8-sig"])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["oauth", "json", "bytes", "huge", "deep"]))
    if kind == "oauth":
        text = json.dumps(draw(oauth_like), ensure_ascii=draw(st.booleans()))
        return text.encode(draw(encodings), errors="replace")
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "huge":
        return b'{"access_token": "' + b"a" * (MAX_BODY_BYTES + draw(st.integers(-20, 20))) + b'"}'
    return b"[" * draw(st.integers(1, 100_000))


retry_after_values = (
    st.text(max_size=40)
    | st.integers(min_value=-(10**30), max_value=10**30).map(str)
    | st.datetimes(timezones=st.timezones() | st.none()).map(
        lambda d: email.utils.format_datetime(d) if d.tzinfo else d.isoformat()
    )
    | st.floats().map(lambda f: email.utils.formatdate(f) if math.isfinite(f) and
                      abs(f) < 2e11 else str(f))
)  # fmt: skip
header_maps = st.dictionaries(
    st.sampled_from(["Retry-After", "Content-Type", "WWW-Authenticate"]), retry_after_values
)


def one_clean_line(text: str) -> bool:
    return text.isprintable() and len(text) <= 200


def _usable(token: str) -> bool:
    """What a token must be to go on the wire again: printable ASCII without spaces."""
    token = token.strip()
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


class TestServerExpiresIn:
    """The server's expires_in is trusted only within import's bounds; the answer is never lost."""

    @pytest.mark.parametrize("raw", [0.001, 0.5, 0, -1, 366 * 86400 + 1, 10**20])
    def test_out_of_bounds_falls_back_to_the_jwt_exp(self, raw: float) -> None:
        """expires_in out of 1 s .. 366 days: the lifetime is the JWT's exp minus now."""
        access = access_jwt(NOW + 3600)
        body = json.dumps({"access_token": access, "refresh_token": "r-2", "expires_in": raw})
        assert classify_response(200, {}, body.encode(), NOW) == Refreshed(access, "r-2", 3600.0)

    def test_bounds_match_import(self) -> None:
        """The endpoint and import refuse the same expires_in values."""
        assert (MIN_EXPIRES_IN_SECONDS, MAX_EXPIRES_IN_SECONDS) == (
            MIN_ACCESS_LIFETIME_SECONDS,
            MAX_ACCESS_LIFETIME_SECONDS,
        )

    @pytest.mark.parametrize("refresh", ["r 2", "r\t2", "r\n2", "r\x002", "r\u00e92"])
    def test_garbled_refresh_token_is_no_refresh_token(self, refresh: str) -> None:
        """A rotated refresh token with spaces or control characters is not taken: the answer
        counts as one without a refresh token, which keeps the token sent in doubt."""
        body = json.dumps({"access_token": access_jwt(), "refresh_token": refresh})
        outcome = classify_response(200, {}, body.encode(), NOW)
        assert isinstance(outcome, Refreshed) and outcome.refresh_token is None


class TestClassifyFuzzed:
    """classify_response always returns an outcome, with clean strings, for any answer."""

    @given(st.integers(min_value=100, max_value=599), header_maps, bodies())
    @settings(max_examples=500)
    def test_always_an_outcome(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Any status, headers and body give an outcome, never an exception."""
        outcome = classify_response(status, headers, body, NOW)
        if isinstance(outcome, Rejected):
            assert status in (400, 401)
            assert one_clean_line(outcome.error) and outcome.error
            assert outcome.error_description is None or one_clean_line(outcome.error_description)
        elif isinstance(outcome, Refreshed):
            assert status == 200
            token = outcome.access_token
            assert token and token.isascii() and token.isprintable() and " " not in token
            assert 1 <= outcome.expires_in <= 366 * 86400
            refresh = outcome.refresh_token
            assert refresh is None or (refresh.isascii() and refresh.isprintable())
            assert refresh is None or (refresh and " " not in refresh)
        else:
            assert isinstance(outcome, Transient)
            assert "\n" not in outcome.reason
            # An answer came: the request reached something, and may have rotated, unless
            # the server itself said it did not (an OAuth error in a 400/401) or did (a new
            # refresh token came with it).
            assert outcome.ambiguous is not (
                (
                    status in (400, 401)
                    and "not a verdict on the grant" in outcome.reason
                    and "with an empty error" not in outcome.reason
                )
                or outcome.rotated_refresh_token is not None
            )
            assert outcome.retry_after is None or 0 <= outcome.retry_after <= 3600

    @given(
        st.one_of(st.none(), json_values, st.text(max_size=40)),
        st.one_of(st.none(), json_values, st.text(max_size=40)),
    )
    @settings(max_examples=300)
    def test_success_keeps_only_a_usable_refresh_token(
        self, access: object, refresh: object
    ) -> None:
        """A 200's refresh token is kept only when it can be sent again; else the doubt stays."""
        body = {"access_token": access, "refresh_token": refresh, "expires_in": 60}
        outcome = classify_response(200, {}, json.dumps(body).encode(), NOW)
        usable = isinstance(refresh, str) and _usable(refresh)
        kept = refresh.strip() if isinstance(refresh, str) and usable else None
        if isinstance(outcome, Refreshed):
            assert outcome.refresh_token == kept
        else:
            assert isinstance(outcome, Transient)
            assert outcome.rotated_refresh_token == kept
            assert outcome.ambiguous is (kept is None)

    @given(st.sampled_from([400, 401]), oauth_like)
    @settings(max_examples=300)
    def test_oauth_errors_cleaned(self, status: int, payload: dict[str, Any]) -> None:
        """OAuth error strings from the server become one printable line of at most 200."""
        outcome = classify_response(status, {}, json.dumps(payload).encode(), NOW)
        error = payload.get("error")
        if isinstance(error, str) and error in TERMINAL_OAUTH_ERRORS:
            assert isinstance(outcome, Rejected)
            assert one_clean_line(outcome.error)
            assert outcome.error_description is None or one_clean_line(outcome.error_description)
        else:
            assert isinstance(outcome, Transient)
            said = isinstance(error, str) and "".join(c for c in error if c.isprintable()).strip()
            assert outcome.ambiguous is not bool(said)
            assert one_clean_line(outcome.reason)

    @given(retry_after_values, st.floats(min_value=0, max_value=4e9))
    @settings(max_examples=300)
    def test_retry_after_bounded(self, value: str, now: float) -> None:
        """parse_retry_after gives None or a delay within [0, the cap]."""
        seconds = parse_retry_after(value, now)
        assert seconds is None or 0 <= seconds <= MAX_RETRY_AFTER_SECONDS

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [("0", 0.0), ("30", 30.0), (" 30 ", 30.0), ("999999", MAX_RETRY_AFTER_SECONDS),
         ("\u00b2", None), ("-5", None), ("1.5", None), ("soon", None), ("", None), (None, None),
         (email.utils.formatdate(NOW - 60, usegmt=True), 0.0),
         (email.utils.formatdate(NOW + 60, usegmt=True), 60.0)],
    )  # fmt: skip
    def test_retry_after_examples(self, value: str | None, seconds: float | None) -> None:
        """Delta-seconds and HTTP dates are read; anything else is ignored."""
        assert parse_retry_after(value, NOW) == seconds

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [(3600, 3600.0), ("120", 120.0), (1.5, 1.5), (1, 1.0), (366 * 86400, 366 * 86400.0),
         (10**400, 300.0), (1e300, 300.0), ("\u00b2", 300.0), ("9" * 5000, 300.0), (0, 300.0),
         (0.001, 300.0), (0.999, 300.0), (366 * 86400 + 1, 300.0), (-5, 300.0), (True, 300.0),
         (None, 300.0), ("soon", 300.0)],
    )  # fmt: skip
    def test_expires_in_examples(self, raw: object, expected: float) -> None:
        """expires_in is read within 1 s .. 366 days (import's bounds), else the assumed 300 s."""
        body = json.dumps({"access_token": "opaque-token", "expires_in": raw}).encode()
        outcome = classify_response(200, {}, body, NOW)
        assert outcome == replace(Refreshed("opaque-token", None, 0.0), expires_in=expected)


#: An opaque refresh token as AAC issues them: 43 base64url characters.
OPAQUE = "YFY0w1ocUd3va2YtmqBf22TugJeHaHG4ikasrFugWW0"


def no_part_of(secret: str, text: str) -> bool:
    """True if no 12-character piece of ``secret`` (what a cut can leave) is in ``text``."""
    return all(secret[i : i + 12] not in text for i in range(max(len(secret) - 11, 1)))


class TestServerTextMasked:
    """Tokens echoed in the server's error text are masked before it is cut and stored."""

    def test_refresh_token_just_sent_is_masked(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """invalid_grant naming the refresh token sent keeps the sentence, not the token."""
        desc = f"refresh token {REFRESH} not accepted"
        server = odd(
            lambda h: h.reply_json(400, {"error": "invalid_grant", "error_description": desc})
        )
        outcome = call(endpoint, server)
        assert isinstance(outcome, Rejected) and outcome.error_description is not None
        assert (
            REFRESH not in outcome.error_description
            and "+Token/with" not in outcome.error_description
        )
        assert outcome.error_description.startswith("refresh token <token:")
        assert outcome.error_description.endswith("> not accepted")

    def test_token_at_the_cut_leaves_no_prefix(self, endpoint: TokenEndpoint, odd: Any) -> None:
        """A token straddling the 200-character cut leaves none of itself behind."""
        desc = "x" * 170 + " token=" + OPAQUE
        server = odd(
            lambda h: h.reply_json(400, {"error": "invalid_grant", "error_description": desc})
        )
        outcome = call(endpoint, server, refresh=OPAQUE)
        assert isinstance(outcome, Rejected) and outcome.error_description is not None
        assert no_part_of(OPAQUE, outcome.error_description)

    @pytest.mark.parametrize(
        "token",
        [access_jwt(), access_jwt() + "==", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0=.c2ln", OPAQUE,
         access_jwt()[:60]],
    )  # fmt: skip
    def test_token_shaped_text_is_masked(self, token: str) -> None:
        """JWTs (padded or cut) and long base64url runs are masked though never sent by us."""
        body = json.dumps({"error": "invalid_grant", "error_description": f"bad: {token} (x)"})
        outcome = classify_response(400, {}, body.encode(), NOW)
        assert isinstance(outcome, Rejected) and outcome.error_description is not None
        assert no_part_of(token, outcome.error_description)
        assert outcome.error_description.startswith("bad: <token:")
        assert outcome.error_description.endswith("> (x)")

    def test_ordinary_text_kept(self) -> None:
        """Words, codes and URLs in the server's text stay readable."""
        desc = "grant expired; see https://pingauth.alteryxcloud.com/as/token (code 4001-b)"
        body = json.dumps({"error": "invalid_grant", "error_description": desc})
        outcome = classify_response(400, {}, body.encode(), NOW)
        assert isinstance(outcome, Rejected) and outcome.error_description == desc

    def test_error_code_of_a_retryable_answer_is_masked(
        self, endpoint: TokenEndpoint, odd: Any
    ) -> None:
        """A non-terminal error code echoing the token reaches the reason masked."""
        server = odd(lambda h: h.reply_json(400, {"error": f"bad_token_{REFRESH}"}))
        outcome = call(endpoint, server)
        assert isinstance(outcome, Transient) and REFRESH not in outcome.reason
        assert "bad_token_<token:" in outcome.reason

    @given(
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=",
                min_size=16, max_size=300),
        st.text(max_size=250), st.text(max_size=50),
    )  # fmt: skip
    @settings(max_examples=300)
    def test_any_secret_anywhere(self, secret: str, before: str, after: str) -> None:
        """No 12-character piece of the refresh token sent survives, wherever the server puts it."""
        body = json.dumps({"error": "invalid_grant", "error_description": before + secret + after})
        outcome = classify_response(400, {}, body.encode(), NOW, secrets=(secret,))
        assert isinstance(outcome, Rejected) and outcome.error_description is not None
        assert one_clean_line(outcome.error_description)
        assert no_part_of(secret, outcome.error_description)
