"""A local AAC-like OAuth 2.0 authorization server on loopback, for tests, demos and trials.

It behaves like PingFederate behind AAC's token endpoint wherever aac-tokend can tell:
refresh-token rotation, revocation of the whole family when a used refresh token comes
back, a family lifetime that rotation does not extend, and the same OAuth error bodies.
It also serves the one AAC API call used to check an access token, and /sandbox/*
control endpoints (generate a family, read the request log, revoke, inject failures).

State lives in memory, refresh tokens only as hashes; nothing is printed per request.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import ipaddress
import json
import math
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

from .errors import AacTokendError, InputError
from .jwt_sign import sign_hs256, verify_hs256
from .tokens import token_hash

__all__ = ["MAX_BODY_BYTES", "SandboxServer", "add_arguments", "main", "run_cli"]

# A token request is well under 1 KiB; anything this big is refused before it is read.
MAX_BODY_BYTES = 64 * 1024
# parse_qs would otherwise build a list for every '&' in the body; a token request has 3.
_MAX_FORM_FIELDS = 64
# stop() waits for the serve loop to notice its flag, which it polls this often: short, as
# test suites start and stop a server per test; 20 idle wake-ups a second cost nothing.
_POLL_INTERVAL = 0.05
# A client that stalls mid-request must not hold a handler thread (and its socket) for ever.
_READ_TIMEOUT = 10.0
_WORKSPACE_ID = 1
_INVALID_GRANT = ("invalid_grant", "unknown, invalid, or expired refresh token")
_INVALID_CLIENT = ("invalid_client", "Invalid client or client credentials")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class _Family:
    """One chain of refresh tokens from one Generate; only its current token may rotate."""

    id: str
    client_id: str
    sub: str
    refresh_expires_at: float
    current: str  # full sha256 of the current refresh token; the token itself is not kept
    revoked: bool = False


@dataclass(frozen=True)
class _Injection:
    status: int
    retry_after: float | None
    body: str | None
    drop: bool


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer decided before it is sent; ``drop`` closes the connection instead."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    delay: float = 0.0


_DROP = _Answer(0, drop=True)


def _json_answer(status: int, obj: object, *headers: tuple[str, str]) -> _Answer:
    base = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
    return _Answer(status, json.dumps(obj).encode("utf-8"), base + headers)


def _oauth_error(status: int, error: str, description: str) -> _Answer:
    return _json_answer(status, {"error": error, "error_description": description})


def _injected_answer(injection: _Injection) -> _Answer:
    headers: tuple[tuple[str, str], ...] = ()
    if (value := injection.retry_after) is not None:
        # Whole seconds per RFC 9110; a fraction is sent as is, to test a client's tolerance.
        headers = (("Retry-After", str(int(value)) if value.is_integer() else repr(value)),)
    if injection.body is None:
        phrase = http.client.responses.get(injection.status, "injected failure")
        return _json_answer(injection.status, {"message": phrase}, *headers)
    try:
        json.loads(injection.body)
        content_type = "application/json"
    except ValueError:
        content_type = "text/plain; charset=utf-8"
    base = (("Content-Type", content_type), ("Cache-Control", "no-store"))
    return _Answer(injection.status, injection.body.encode("utf-8"), base + headers)


def _loopback(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is None or not ip.is_loopback:
        raise InputError(f"sandbox host {host!r} is not a loopback address; use 127.0.0.1 or ::1")
    return ip


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck on a client's socket must not keep us alive
    block_on_close = False  # and stop() must not wait for one, e.g. inside its answer delay
    sandbox: SandboxServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn) we have no use for.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class SandboxServer:
    """An in-memory authorization server plus AAC API stub, serving on loopback.

    Token-request log outcomes: rotated, reuse_revoked, unknown, revoked, expired,
    invalid_client, invalid_request, failed_injected, dropped_after_rotation.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_ttl: float = 3600.0,
        refresh_ttl: float = 30 * 86400.0,
        answer_delay: float = 0.0,
        clock: Callable[[], float] = time.time,
        client_id: str = "aac-sandbox-client",
    ) -> None:
        ip = _loopback(host)
        if not 0 <= port <= 65535:
            raise InputError(f"sandbox port {port} is out of range; use 0..65535 (0: any)")
        if not (0 < access_ttl < math.inf and 0 < refresh_ttl < math.inf):
            raise InputError("sandbox TTLs must be positive numbers of seconds")
        self.clock = clock
        self.client_id = client_id
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._answer_delay = 0.0
        self.set_answer_delay(answer_delay)
        self._key = secrets.token_bytes(32)  # per server: its tokens mean nothing elsewhere
        self._lock = threading.Lock()  # guards everything below
        self._families: dict[str, _Family] = {}
        self._by_token: dict[str, str] = {}  # sha256 of every refresh token issued -> family
        self._clients = {client_id}
        self._revoked_access: set[str] = set()
        self._injections: deque[tuple[_Injection, int]] = deque()  # (what, how many more)
        self._log: list[dict[str, object]] = []
        self._stopping = threading.Event()
        self._life_lock = threading.Lock()  # start/serve/stop
        self._thread: threading.Thread | None = None
        self._serving = False
        try:
            self._httpd = (_HTTPServer6 if ip.version == 6 else _HTTPServer)((host, port), _Handler)
        except OSError as exc:
            raise InputError(
                f"sandbox cannot listen on {host} port {port} ({exc.strerror}); pick another port"
            ) from exc
        self._httpd.sandbox = self
        netloc = f"[{host}]" if ip.version == 6 else host
        self._url = f"http://{netloc}:{self._httpd.server_address[1]}"

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Serve in a daemon thread; the socket is already listening when this returns."""
        with self._life_lock:
            if self._serving or self._stopping.is_set():
                return
            self._serving = True
            self._thread = threading.Thread(target=self._serve, name="aac-sandbox", daemon=True)
            self._thread.start()

    def serve_forever(self) -> None:
        """Serve in this thread until stop() is called from another thread."""
        with self._life_lock:
            if self._serving or self._stopping.is_set():
                return
            self._serving = True
        self._serve()

    def _serve(self) -> None:
        self._httpd.serve_forever(poll_interval=_POLL_INTERVAL)

    def stop(self) -> None:
        """Stop serving and close the socket; answers still in their delay are dropped."""
        with self._life_lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            if self._serving:  # shutdown() would wait for ever for a loop that never ran
                self._httpd.shutdown()
            self._httpd.server_close()
            thread = self._thread
        if thread is not None:
            thread.join()

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return self._url

    @property
    def issuer(self) -> str:
        return self._url + "/as"

    @property
    def token_endpoint(self) -> str:
        return self._url + "/as/token"

    @property
    def api_url(self) -> str:
        return self._url

    # -- control -------------------------------------------------------------------------

    def generate(
        self, *, client_id: str | None = None, sub: str = "sandbox-user"
    ) -> dict[str, object]:
        """Start a new token family, like AAC's Generate button; the token-endpoint JSON."""
        client_id = self.client_id if client_id is None else client_id
        if not client_id or not sub:
            raise InputError("sandbox generate needs a non-empty client_id and sub")
        refresh_token = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            family = _Family(
                secrets.token_hex(6),
                client_id,
                sub,
                now + self._refresh_ttl,
                _digest(refresh_token),
            )
            self._families[family.id] = family
            self._by_token[family.current] = family.id
            self._clients.add(client_id)
            answer = self._mint(family, refresh_token, now)
        answer["refresh_token_expires_in"] = math.ceil(self._refresh_ttl)
        return answer

    def log(self) -> list[dict[str, object]]:
        """A copy of the token-request log, oldest first (see the class docstring)."""
        with self._lock:
            return [dict(entry) for entry in self._log]

    def revoke_access_token(self, access_token: str) -> None:
        """From now on the API answers 401 for this access token."""
        with self._lock:
            self._revoked_access.add(_digest(access_token))

    def fail_next(
        self,
        count: int,
        *,
        status: int = 503,
        retry_after: float | None = None,
        body: str | None = None,
        drop: bool = False,
    ) -> None:
        """Make the next ``count`` token requests fail (queued after earlier injections).

        With ``drop`` a request is decided as usual (a valid refresh token rotates), then
        its connection is closed without an answer: a lost response.
        """
        if count < 0 or not 200 <= status <= 599:
            raise InputError("fail_next needs count >= 0 and a status in 200..599")
        if retry_after is not None and not 0 <= retry_after < math.inf:
            raise InputError("fail_next retry_after must be a finite number >= 0")
        with self._lock:
            retry = None if retry_after is None else float(retry_after)
            if count:
                self._injections.append((_Injection(status, retry, body, drop), count))

    def set_answer_delay(self, seconds: float) -> None:
        """Wait this long between deciding (and logging) a token request and answering it."""
        if not 0 <= seconds < math.inf:
            raise InputError("sandbox answer delay must be a finite number of seconds >= 0")
        self._answer_delay = seconds

    # -- decisions -----------------------------------------------------------------------

    def _mint(self, family: _Family, refresh_token: str, now: float) -> dict[str, object]:
        ttl = math.ceil(self._access_ttl)  # whole seconds as on the wire, and never 0
        iat = int(now)
        claims = {
            "iss": self.issuer,
            "sub": family.sub,
            "client_id": family.client_id,
            "iat": iat,
            "exp": iat + ttl,
            "jti": secrets.token_hex(16),
            "scope": "aac",
        }
        return {
            "access_token": sign_hs256(claims, self._key),
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": ttl,
        }

    def _token_request(self, form: Mapping[str, list[str]] | None) -> _Answer:
        """Decide one POST /as/token and log it (``form`` None: the body was unusable)."""
        fields = {k: v[0] for k, v in (form or {}).items() if len(v) == 1}
        refresh_token = fields.get("refresh_token", "")
        with self._lock:
            now = self.clock()
            family = self._families.get(self._by_token.get(_digest(refresh_token), ""))
            injection = self._next_injection() if form is not None else None
            new_hash: str | None = None
            if injection is not None and not injection.drop:
                outcome, answer = "failed_injected", _injected_answer(injection)
            else:
                outcome, answer, new_hash = self._decide(form, fields, family, now)
                if injection is not None:
                    answer = _DROP
                    outcome = "dropped_after_rotation" if outcome == "rotated" else outcome
            entry = {
                "seq": len(self._log) + 1,
                "at": now,
                "rt_hash": token_hash(refresh_token) if refresh_token else "",
                "client_id": fields.get("client_id", ""),
                "outcome": outcome,
                "new_rt_hash": new_hash,
                "family": family.id if family else "",
            }
            self._log.append(entry)
            return replace(answer, delay=self._answer_delay)

    def _next_injection(self) -> _Injection | None:
        if not self._injections:
            return None
        injection, left = self._injections.popleft()
        if left > 1:
            self._injections.appendleft((injection, left - 1))
        return injection

    def _decide(
        self,
        form: Mapping[str, list[str]] | None,
        fields: dict[str, str],
        family: _Family | None,
        now: float,
    ) -> tuple[str, _Answer, str | None]:
        grant_type = fields.get("grant_type")
        refresh_token = fields.get("refresh_token", "")
        client_id = fields.get("client_id", "")
        if form is None or len(fields) != len(form):  # RFC 6749 3.2: no parameter twice
            return (
                "invalid_request",
                _oauth_error(400, "invalid_request", "malformed request"),
                None,
            )
        if grant_type != "refresh_token":
            error = ("unsupported_grant_type", "only refresh_token is served here")
            if not grant_type:
                error = ("invalid_request", "grant_type is required")
            return "invalid_request", _oauth_error(400, *error), None
        if not refresh_token:
            error = ("invalid_request", "refresh_token is required")
            return "invalid_request", _oauth_error(400, *error), None
        if client_id not in self._clients or (family and family.client_id != client_id):
            return "invalid_client", _oauth_error(401, *_INVALID_CLIENT), None
        if family is None or family.revoked or now >= family.refresh_expires_at:
            outcome = "unknown" if family is None else "revoked" if family.revoked else "expired"
            return outcome, _oauth_error(400, *_INVALID_GRANT), None
        if family.current != _digest(refresh_token):
            family.revoked = True  # a used token came back: two parties hold the chain
            return "reuse_revoked", _oauth_error(400, *_INVALID_GRANT), None
        new_token = secrets.token_urlsafe(32)
        family.current = _digest(new_token)
        self._by_token[family.current] = family.id
        token = self._mint(family, new_token, now)
        return "rotated", _json_answer(200, token), token_hash(new_token)

    def _workspace(self, authorization: str) -> _Answer:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        claims = verify_hs256(token, self._key) if scheme.lower() == "bearer" else None
        with self._lock:
            valid = (
                claims is not None
                and claims.get("iss") == self.issuer
                and isinstance(exp := claims.get("exp"), int | float)
                and exp > self.clock()
                and _digest(token) not in self._revoked_access
            )
        if claims is None or not valid:
            challenge = ("WWW-Authenticate", 'Bearer error="invalid_token"')
            return _json_answer(401, {"error": "invalid_token"}, challenge)
        workspace = {"id": _WORKSPACE_ID, "name": "Sandbox workspace", "user": claims.get("sub")}
        return _json_answer(200, workspace)


# -- HTTP --------------------------------------------------------------------------------


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body) if body.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InputError("the request body must be a JSON object")
    return value


def _field(obj: Mapping[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = obj.get(name, default)
    # bool is an int to Python but not to JSON: accept it only where a bool is wanted
    if value is not default and (
        not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    ):
        raise InputError(f"field {name!r} has the wrong type")
    return value


class _Handler(BaseHTTPRequestHandler):
    """Routes one request per connection; every answer is JSON and nothing is printed."""

    server: _HTTPServer
    timeout = _READ_TIMEOUT

    def version_string(self) -> str:
        return "aac-sandbox"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a request line may carry a token, and tests want a clean stderr."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self.close_connection = True  # one request per connection: stop() leaves none open
        sandbox = self.server.sandbox
        path = urllib.parse.urlsplit(self.path).path
        route = _ROUTES.get(path)
        try:
            body = self._body() if method == "POST" else b""
            if route is None:
                answer = _json_answer(404, {"error": "not_found"})
            elif route[0] != method:
                answer = _json_answer(405, {"error": "method_not_allowed"}, ("Allow", route[0]))
            elif isinstance(body, _Answer):
                answer = body
                if path == "/as/token":
                    sandbox._token_request(None)  # logged like every token request
            else:
                answer = route[1](self, sandbox, body)
        except InputError as exc:
            answer = _json_answer(400, {"error": str(exc)})
        except OSError:
            return  # the client went away or stalled; nobody to answer
        if answer.delay > 0 and sandbox._stopping.wait(answer.delay):
            answer = _DROP  # stopping: the answer is lost, as in a crash
        if not answer.drop:
            self._send(answer)

    def _body(self) -> bytes | _Answer:
        if self.headers.get("Transfer-Encoding"):
            return _json_answer(411, {"error": "send a Content-Length"})
        length = self.headers.get("Content-Length", "0").strip()
        if not (length.isascii() and length.isdigit()):
            return _json_answer(400, {"error": "bad Content-Length"})
        if int(length) > MAX_BODY_BYTES:
            return _json_answer(413, {"error": "request body too large"})
        return self.rfile.read(int(length))

    def _send(self, answer: _Answer) -> None:
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:
            pass  # the client gave up waiting (a test killing it inside the answer delay)


def _route_token(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    try:
        form = urllib.parse.parse_qs(
            body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS
        )
    except ValueError:
        return sandbox._token_request(None)  # too many fields
    return sandbox._token_request(form)


def _route_workspace(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    return sandbox._workspace(handler.headers.get("Authorization", ""))


def _route_generate(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    obj = _json_object(body)
    client_id = _field(obj, "client_id", (str,), None)
    sub = _field(obj, "sub", (str,), "sandbox-user")
    return _json_answer(200, sandbox.generate(client_id=client_id, sub=sub))


def _route_log(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    return _json_answer(200, sandbox.log())


def _route_revoke(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    sandbox.revoke_access_token(_field(_json_object(body), "access_token", (str,), ""))
    return _json_answer(200, {"revoked": True})


def _route_fail(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    obj = _json_object(body)
    sandbox.fail_next(
        _field(obj, "count", (int,), 1),
        status=_field(obj, "status", (int,), 503),
        retry_after=_field(obj, "retry_after", (int, float), None),
        body=_field(obj, "body", (str,), None),
        drop=_field(obj, "drop", (bool,), False),
    )
    return _json_answer(200, {"queued": True})


def _route_delay(handler: _Handler, sandbox: SandboxServer, body: bytes) -> _Answer:
    sandbox.set_answer_delay(_field(_json_object(body), "seconds", (int, float), 0.0))
    return _json_answer(200, {"answer_delay": sandbox._answer_delay})


_ROUTES: dict[str, tuple[str, Callable[[_Handler, SandboxServer, bytes], _Answer]]] = {
    "/as/token": ("POST", _route_token),
    "/iam/v1/workspaces/current": ("GET", _route_workspace),
    "/sandbox/generate": ("POST", _route_generate),
    "/sandbox/log": ("GET", _route_log),
    "/sandbox/revoke-access": ("POST", _route_revoke),
    "/sandbox/fail": ("POST", _route_fail),
    "/sandbox/answer-delay": ("POST", _route_delay),
}


# -- command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aac-tokend sandbox``."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="loopback IP to listen on (default 127.0.0.1)")
    add("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    add("--access-ttl", type=float, default=3600.0, metavar="S", help="access token seconds")
    add("--refresh-ttl", type=float, default=30 * 86400.0, metavar="S", help="family seconds")
    add("--answer-delay", type=float, default=0.0, metavar="MS", help="ms to wait per answer")


def run_cli(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGTERM or SIGINT; print one line once listening."""
    server = SandboxServer(
        host=args.host,
        port=args.port,
        access_ttl=args.access_ttl,
        refresh_ttl=args.refresh_ttl,
        answer_delay=args.answer_delay / 1000.0,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # stop() waits for the serve loop, which runs in this very thread: stop from another.
        threading.Thread(target=server.stop, name="aac-sandbox-stop", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(
            f"sandbox listening on {server.url} token_endpoint={server.token_endpoint}", flush=True
        )
        server.serve_forever()
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aac_tokend.sandbox``: the sandbox without the rest of the CLI."""
    parser = argparse.ArgumentParser(
        prog="aac-tokend sandbox", description="A local AAC-like authorization server."
    )
    add_arguments(parser)
    try:
        return run_cli(parser.parse_args(argv))
    except AacTokendError as exc:
        print(f"aac-tokend sandbox: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
