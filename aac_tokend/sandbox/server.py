"""A local AAC-like OAuth 2.0 authorization server on loopback, for tests, demos and trials.

It behaves like PingFederate behind AAC's token endpoint wherever aac-tokend can tell:
refresh-token rotation, revocation of the whole family when a used refresh token comes
back, a family lifetime that rotation does not extend, and the same OAuth error bodies.
It also serves the one AAC API call used to check an access token, and /sandbox/*
control endpoints (generate a family, read the request log, revoke, inject failures).

State lives in memory, refresh tokens only as hashes; nothing is printed per request.

The HTTP handler and routes are in ``http``, the answers both speak in ``answers``, the
command line in ``cli``.

Longer than 300 lines: one authorization server whose families, log and injections live
under one lock, and whose decisions (rotate, revoke the family, inject) read and change them
together; its HTTP side, its answers and its command line are already modules of their own.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType

from ..core.tokens import token_hash
from ..errors import InputError
from .answers import DROP, Answer, Injection, injected_answer, json_answer, oauth_error
from .cli import add_arguments, main, run_cli
from .http import (
    MAX_BODY_BYTES,
    SandboxHandler,
    SandboxHTTPServer,
    SandboxHTTPServer6,
    loopback_address,
)
from .jwt_sign import sign_hs256, verify_hs256

__all__ = ["MAX_BODY_BYTES", "SandboxServer", "add_arguments", "main", "run_cli"]

# stop() waits for the serve loop to notice its flag, which it polls this often: short, as
# test suites start and stop a server per test; 20 idle wake-ups a second cost nothing.
_POLL_INTERVAL = 0.05
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


class SandboxServer:
    """An in-memory authorization server plus AAC API stub, serving on loopback (HTTPS with tls).

    Token-request log outcomes: rotated, reuse_revoked, unknown, revoked, expired,
    invalid_client, invalid_request, failed_injected, dropped_after_rotation,
    failed_after_rotation.
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
        tls: ssl.SSLContext | None = None,
    ) -> None:
        ip = loopback_address(host)
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
        self._injections: deque[tuple[Injection, int]] = deque()  # (what, how many more)
        self._log: list[dict[str, object]] = []
        self._stopping = threading.Event()
        self._life_lock = threading.Lock()  # start/serve/stop
        self._thread: threading.Thread | None = None
        self._serving = False
        try:
            self._httpd = (SandboxHTTPServer6 if ip.version == 6 else SandboxHTTPServer)(
                (host, port), SandboxHandler
            )
        except OSError as exc:
            raise InputError(
                f"sandbox cannot listen on {host} port {port} ({exc.strerror}); pick another port"
            ) from exc
        self._httpd.sandbox = self
        if tls is not None:
            # The handshake happens on the handler thread's first read, not in accept(): a
            # client that fails it (a wrong CA, in tests) must not stall the accept loop.
            self._httpd.socket = tls.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        netloc = f"[{host}]" if ip.version == 6 else host
        scheme = "http" if tls is None else "https"
        self._url = f"{scheme}://{netloc}:{self._httpd.server_address[1]}"

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
        forward: bool = False,
    ) -> None:
        """Make the next ``count`` token requests fail (queued after earlier injections).

        With ``drop`` a request is decided as usual (a valid refresh token rotates), then
        its connection is closed without an answer: a lost response. With ``forward`` it is
        decided as usual, then answered with this failure instead of the server's answer:
        a gateway that delivered the request and timed out (a 504 page) before the answer.
        """
        if count < 0 or not 200 <= status <= 599:
            raise InputError("fail_next needs count >= 0 and a status in 200..599")
        if drop and forward:
            raise InputError("fail_next: choose drop (no answer) or forward (an error answer)")
        if retry_after is not None and not 0 <= retry_after < math.inf:
            raise InputError("fail_next retry_after must be a finite number >= 0")
        with self._lock:
            retry = None if retry_after is None else float(retry_after)
            if count:
                self._injections.append((Injection(status, retry, body, drop, forward), count))

    @property
    def answer_delay(self) -> float:
        """The seconds between deciding a token request and answering it."""
        return self._answer_delay

    def stopped_within(self, seconds: float) -> bool:
        """Wait up to ``seconds``; return whether stop() was called (the answer is lost)."""
        return self._stopping.wait(seconds)

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

    def answer_token_request(self, form: Mapping[str, list[str]] | None) -> Answer:
        """Decide one POST /as/token and log it (``form`` None: the body was unusable)."""
        fields = {k: v[0] for k, v in (form or {}).items() if len(v) == 1}
        refresh_token = fields.get("refresh_token", "")
        with self._lock:
            now = self.clock()
            family = self._families.get(self._by_token.get(_digest(refresh_token), ""))
            injection = self._next_injection() if form is not None else None
            new_hash: str | None = None
            if injection is not None and not (injection.drop or injection.forward):
                outcome, answer = "failed_injected", injected_answer(injection)
            else:
                outcome, answer, new_hash = self._decide(form, fields, family, now)
                if injection is not None and injection.drop:
                    answer = DROP
                    outcome = "dropped_after_rotation" if outcome == "rotated" else outcome
                elif injection is not None:
                    answer = injected_answer(injection)
                    outcome = "failed_after_rotation" if outcome == "rotated" else outcome
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

    def _next_injection(self) -> Injection | None:
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
    ) -> tuple[str, Answer, str | None]:
        grant_type = fields.get("grant_type")
        refresh_token = fields.get("refresh_token", "")
        client_id = fields.get("client_id", "")
        if form is None or len(fields) != len(form):  # RFC 6749 3.2: no parameter twice
            return (
                "invalid_request",
                oauth_error(400, "invalid_request", "malformed request"),
                None,
            )
        if grant_type != "refresh_token":
            error = ("unsupported_grant_type", "only refresh_token is served here")
            if not grant_type:
                error = ("invalid_request", "grant_type is required")
            return "invalid_request", oauth_error(400, *error), None
        if not refresh_token:
            error = ("invalid_request", "refresh_token is required")
            return "invalid_request", oauth_error(400, *error), None
        if client_id not in self._clients or (family and family.client_id != client_id):
            return "invalid_client", oauth_error(401, *_INVALID_CLIENT), None
        if family is None or family.revoked or now >= family.refresh_expires_at:
            outcome = "unknown" if family is None else "revoked" if family.revoked else "expired"
            return outcome, oauth_error(400, *_INVALID_GRANT), None
        if family.current != _digest(refresh_token):
            family.revoked = True  # a used token came back: two parties hold the chain
            return "reuse_revoked", oauth_error(400, *_INVALID_GRANT), None
        new_token = secrets.token_urlsafe(32)
        family.current = _digest(new_token)
        self._by_token[family.current] = family.id
        token = self._mint(family, new_token, now)
        return "rotated", json_answer(200, token), token_hash(new_token)

    def answer_workspace(self, authorization: str) -> Answer:
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
            return json_answer(401, {"error": "invalid_token"}, challenge)
        workspace = {"id": _WORKSPACE_ID, "name": "Sandbox workspace", "user": claims.get("sub")}
        return json_answer(200, workspace)
