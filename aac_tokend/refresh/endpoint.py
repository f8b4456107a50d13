"""The token endpoint client: one form-encoded refresh POST, its answer classified.

``classify_response`` is pure (status, headers, body, now) so hostile answers can be fuzzed
without a network. ``TokenEndpoint`` is the only place that touches ``requests`` and the only
place its exceptions are translated. It never retries by itself: under rotation a retried
POST is a reuse, so every retry is the scheduler's decision, made after the outcome is
durable.

Over 300 lines: the connection classes that record whether a byte left ("did the request
leave?") exist only for the one request ``TokenEndpoint`` makes and share its private
attempt record. ``classify_response`` and its helpers (pure) could move to ``core``; left
here while the courier's imports are being reworked, to spare that merge.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import math
import socket
import ssl
import threading
from collections.abc import Collection, Mapping
from typing import Any

import requests
import requests.adapters
import urllib3.exceptions

from .. import __version__
from ..core.origin import direct_proxies
from ..core.outcome import (
    UNREACHED_PREFIX,
    FailureKind,
    Refreshed,
    RefreshOutcome,
    Rejected,
    Transient,
)
from ..core.policy import ASSUMED_LIFETIME_SECONDS
from ..core.tokens import mask_tokens, parse_jwt
from ..errors import TokenFormatError
from ..netio import WatchedAdapter, watching

__all__ = [
    "TERMINAL_OAUTH_ERRORS",
    "TokenEndpoint",
    "classify_response",
    "name_network_failure",
    "parse_retry_after",
]

USER_AGENT = f"aac-tokend/{__version__}"
#: Connecting takes milliseconds when the network is up; fail fast and retry later.
CONNECT_TIMEOUT_SECONDS = 5.0
#: PingFederate answers in well under a second; 20 s of silence covers a slow proxy.
READ_TIMEOUT_SECONDS = 20.0
#: One deadline for the whole refresh: name lookup, connect, TLS, send and the whole answer.
#: Per-operation timeouts alone do not bound it (a server dripping a byte every 19 s never
#: trips the read timeout); this keeps a courier's request well inside courier.MAX_LIFE_SECONDS.
TOTAL_DEADLINE_SECONDS = 25.0
#: A token response is a few KiB; a larger body is not a token response.
MAX_BODY_BYTES = 64 * 1024
#: Retry-After beyond this is treated as this: the backoff cap keeps the chain watched.
MAX_RETRY_AFTER_SECONDS = 3600.0
#: An access lifetime beyond a year is garbage; capping keeps the schedule's dates sane.
MAX_EXPIRES_IN_SECONDS = 366 * 86400.0
#: One that dies within a second of the answer is garbage too (milliseconds by mistake):
#: trusted, it made the daemon refresh as fast as it could. The same bounds as import's.
MIN_EXPIRES_IN_SECONDS = 1.0
_TEXT_LIMIT = 200


def _clean(text: object, secrets: Collection[str] = ()) -> str:
    """A server-supplied string made safe for one log line, tokens masked before the cut."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return mask_tokens(s, secrets)[:_TEXT_LIMIT]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), bounded."""
    if not value:
        return None
    value = value.strip()
    seconds: float | None
    if value.isascii() and value.isdigit():  # isdigit alone admits '²', which float() refuses
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _expires_in(payload: Mapping[str, Any], access_token: str, now: float) -> float:
    """The access token's lifetime: the server's expires_in when it is within the bounds that
    import applies, else the JWT's exp, else the assumed short lifetime.

    Out of bounds is never a reason to drop the answer: a 200 carries the rotated refresh
    token, and retrying with the old one would be a reuse that revokes the whole family.
    """
    raw = payload.get("expires_in")
    if isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        # isdigit alone admits '²', which float() refuses; 400 digits make inf: cap it too.
        raw = min(float(raw), MAX_EXPIRES_IN_SECONDS + 1)
    if isinstance(raw, int) and not isinstance(raw, bool) and raw > MAX_EXPIRES_IN_SECONDS:
        raw = MAX_EXPIRES_IN_SECONDS + 1  # before math.isfinite, which overflows on huge ints
    if (
        isinstance(raw, int | float)
        and not isinstance(raw, bool)
        and math.isfinite(raw)
        and MIN_EXPIRES_IN_SECONDS <= raw <= MAX_EXPIRES_IN_SECONDS
    ):
        return float(raw)
    try:
        left = parse_jwt(access_token).exp - now
    except TokenFormatError:
        return ASSUMED_LIFETIME_SECONDS
    return max(min(left, MAX_EXPIRES_IN_SECONDS), MIN_EXPIRES_IN_SECONDS)


def _servable(token: str) -> bool:
    """A token that can go into an Authorization header: printable ASCII, no spaces."""
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


#: OAuth errors (RFC 6749 s5.2) that say the grant, the client or the request itself is bad:
#: sending the same request again cannot help, so the chain ends and a person must act. Any
#: other code (server_error, temporarily_unavailable, a vendor's own) is the server asking us
#: to try again later; so is invalid_request, which a proxy mangling the body can cause and
#: which the same well-formed request does not keep earning.
TERMINAL_OAUTH_ERRORS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "unsupported_grant_type",
     "invalid_scope"}
)  # fmt: skip


def classify_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    *,
    secrets: Collection[str] = (),
) -> RefreshOutcome:
    """What an HTTP answer from the token endpoint means for the chain.

    The server's error text is kept with ``secrets`` (the refresh token just sent) and
    anything token-shaped masked: it goes to the state, ``status`` and the log.

    Every answer but a success or an OAuth error in a 400/401 is ambiguous: the request
    reached something, and a gateway or proxy may have delivered it (and the server rotated)
    before it answered 5xx, 429, 403 or an HTML error page of its own. An OAuth error JSON in
    a 400/401 is the authorization server's own answer (RFC 6749 s5.2), and a server that
    answers with an error has not rotated: retryable ones are not ambiguous. Only a 400/401
    carries a verdict on the grant; the same error under any other status is retried (and
    stays ambiguous), the safe side when we cannot tell who wrote it.
    """
    payload = _json_object(body) if len(body) <= MAX_BODY_BYTES else None
    retry_after = parse_retry_after(headers.get("Retry-After"), now)
    if status == 200:
        token = payload.get("access_token") if payload else None
        refresh = payload.get("refresh_token") if payload else None
        if not isinstance(refresh, str) or not _servable(refresh.strip()):
            refresh = None  # absent, null, empty or garbled: no new refresh token
        if not isinstance(token, str) or not _servable(token.strip()):
            if refresh is not None:
                # Rotated, and the new refresh token is here: keep it, the old one is spent.
                return Transient(
                    "token endpoint answered 200 with a new refresh token but no usable "
                    "access_token",
                    rotated_refresh_token=refresh.strip(),
                )
            # The server may have rotated the refresh token before the answer got garbled.
            return Transient(
                "token endpoint answered 200 without a usable access_token",
                failure=FailureKind.AMBIGUOUS,
            )
        return Refreshed(
            token.strip(),
            refresh.strip() if refresh else None,
            _expires_in(payload or {}, token, now),
        )
    error = payload.get("error") if payload is not None else None
    if status in (400, 401) and isinstance(error, str):
        if error in TERMINAL_OAUTH_ERRORS:
            desc = payload.get("error_description") if payload is not None else None
            desc = _clean(desc, secrets) if isinstance(desc, str) else None
            return Rejected(error, desc, status)
        said = _clean(error, secrets).strip()
        return Transient(
            f"token endpoint answered HTTP {status} {said or 'with an empty error'}"
            " (not a verdict on the grant: retrying)",
            retry_after,
            # an empty error is no OAuth answer: who wrote it is unknown
            FailureKind.ANSWERED if said else FailureKind.AMBIGUOUS,
        )
    if status in (408, 429) or 500 <= status <= 599:
        return Transient(
            f"token endpoint answered HTTP {status}", retry_after, FailureKind.AMBIGUOUS
        )
    return Transient(
        f"token endpoint answered HTTP {status} without an OAuth error",
        retry_after,
        FailureKind.AMBIGUOUS,
    )


# -- did the request leave? ----------------------------------------------------------------
#
# Under rotation the one question about a failed refresh is whether the server may have seen
# the refresh token. `requests` cannot answer it from its exceptions: an SSLError is raised
# alike for a certificate refused in the handshake and for a TLS record broken mid-answer,
# a ConnectionError alike for a refused connect and for a reset after sending, and a TLS
# handshake that times out surfaces as a ReadTimeout. So the endpoint's own connection
# class records the one fact that matters: whether any byte of the request was handed to
# the socket (``send`` after ``connect``, a proxy's CONNECT not counting). No byte sent:
# provably unspent. A byte sent: ambiguous, whatever the error. Where the connection is not
# ours (a caller's own adapter, a SOCKS proxy), only failures urllib3 raises before a socket
# exists (name resolution, connect refused or timed out, a bad URL, a refused proxy, a
# certificate refused) count as unsent; everything else is ambiguous.
#
# The same hooks enforce the one deadline: a watchdog timer shuts the socket down, which
# wakes a connect, handshake, send or read blocked in this thread, and no byte is sent once
# it has fired. Name resolution alone cannot be interrupted: a lookup that outlasts the
# deadline is bounded by the resolver's own timeouts, sends nothing afterwards, and the
# courier's alarm remains the last bound.


class _Attempt:
    """One refresh's progress and its deadline, shared with the watchdog timer."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.lock = threading.Lock()
        self.expired = False
        self.connected = False  # our connection class took part
        self.sent = False  # a byte of the request went to the socket
        self.sock: socket.socket | None = None

    def watch(self, sock: object) -> None:
        """Remember the socket the watchdog must cut; refuse it if the deadline has passed."""
        with self.lock:
            self.connected = True
            if isinstance(sock, socket.socket):  # not urllib3's TLS-in-TLS wrapper
                self.sock = sock
            if self.expired:
                raise _DeadlineError("the refresh deadline passed before sending")

    def sending(self, sock: object) -> None:
        """Called before each send: from here on the request may have left."""
        with self.lock:
            if self.expired:
                raise _DeadlineError("the refresh deadline passed before sending")
            self.connected = self.sent = True
            if isinstance(sock, socket.socket):
                self.sock = sock

    def expire(self) -> None:
        """The watchdog: stop whatever the request is blocked in."""
        with self.lock:
            self.expired = True
            if self.sock is not None:
                # shutdown wakes a recv or send blocked in another thread; close would not.
                # The plain socket's method, also for a TLS socket: ssl.SSLSocket.shutdown
                # also drops the TLS state that the reading thread is still using.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class _DeadlineError(OSError):
    """The refresh deadline passed before sending (an OSError, so urllib3 handles it as one)."""


def _unsent_by_type(exc: BaseException) -> bool:
    """For connections that are not ours: True only for failures before any socket existed."""
    if isinstance(
        exc,
        requests.exceptions.ConnectTimeout
        | requests.exceptions.ProxyError
        | requests.exceptions.InvalidURL
        | requests.exceptions.MissingSchema
        | requests.exceptions.InvalidSchema,
    ):
        return True
    return _in_causes(
        exc,
        urllib3.exceptions.NewConnectionError  # also NameResolutionError
        | urllib3.exceptions.ConnectTimeoutError
        | ConnectionRefusedError
        | ssl.SSLCertVerificationError  # certificates are checked only in the handshake
        | ssl.CertificateError,
    )


def _in_causes(exc: BaseException, kinds: Any) -> bool:
    """True if ``exc`` or one of its causes (also urllib3's MaxRetryError.reason) is a kind."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, kinds):
            return True
        if isinstance(seen, urllib3.exceptions.MaxRetryError) and seen.reason is not None:
            seen = seen.reason
            continue
        nxt = seen.__cause__ or seen.__context__
        if nxt is None and seen.args and isinstance(seen.args[0], BaseException):
            nxt = seen.args[0]
        seen = nxt
    return False


class TokenEndpoint:
    """Sends refresh requests; the session is injectable (tests mount failing adapters)."""

    def __init__(
        self,
        session: requests.Session | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        deadline: float = TOTAL_DEADLINE_SECONDS,
    ) -> None:
        # trust_env (default) takes proxies and the CA bundle from the environment.
        session = session or requests.Session()
        for prefix in ("http://", "https://"):
            # requests' stock adapter becomes the watched one; an adapter of the caller's
            # own is kept, and its failures are judged by type alone.
            if type(session.adapters.get(prefix)) is requests.adapters.HTTPAdapter:
                session.mount(prefix, WatchedAdapter())
        self._session = session
        self._timeouts = (min(connect_timeout, deadline), min(read_timeout, deadline))
        self._deadline = deadline

    def refresh(
        self, endpoint: str, client_id: str, refresh_token: str, *, now: float
    ) -> RefreshOutcome:
        """One refresh POST within the deadline; every failure is an outcome, not an exception."""
        attempt = _Attempt(self._deadline)
        watchdog = threading.Timer(self._deadline, attempt.expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            with watching(attempt):
                return self._post(endpoint, client_id, refresh_token, now, attempt)
        finally:
            watchdog.cancel()

    def _post(
        self, endpoint: str, client_id: str, refresh_token: str, now: float, attempt: _Attempt
    ) -> RefreshOutcome:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": client_id,
        }
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        try:
            with self._session.post(
                endpoint,
                data=form,
                headers=headers,
                timeout=self._timeouts,
                stream=True,
                allow_redirects=False,
                proxies=direct_proxies(endpoint),  # plain http (loopback): never via a proxy
            ) as response:
                body = response.raw.read(MAX_BODY_BYTES + 1, decode_content=True)
                return classify_response(
                    response.status_code, response.headers, body or b"", now,
                    secrets=(refresh_token,),
                )  # fmt: skip
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # Reading the body (response.raw) raises urllib3's own errors, unwrapped.
            return _failed(exc, attempt)


def _failed(exc: BaseException, attempt: _Attempt) -> Transient:
    """The outcome of a request that raised: unreached only if it provably never left."""
    name = type(exc).__name__
    with attempt.lock:
        expired, sent, ours = attempt.expired, attempt.sent, attempt.connected
    if sent or (not ours and not _unsent_by_type(exc)):
        if expired:
            return Transient(
                f"no complete answer within {attempt.deadline:g} s", None, FailureKind.AMBIGUOUS
            )
        return Transient(f"no complete answer: {name}", None, FailureKind.AMBIGUOUS)
    if expired:
        return Transient(
            f"{UNREACHED_PREFIX} within {attempt.deadline:g} s", None, FailureKind.UNREACHED
        )
    # A proxy or TLS failure is named as such, with what to check (see name_network_failure).
    named = name_network_failure(exc)
    return Transient(f"{UNREACHED_PREFIX}: {named or name}", None, FailureKind.UNREACHED)


#: What to check, said once for every proxy failure: the service manager passes on only
#: what `service install` recorded, so a proxy that works in a shell may be unknown there.
_CHECK_PROXY = (
    "check HTTPS_PROXY (or https_proxy, ALL_PROXY) and NO_PROXY where the daemon runs; "
    "`aac-tokend service install` records them from the shell it runs in"
)
_CHECK_CA = (
    "if your network inspects TLS, set REQUESTS_CA_BUNDLE to your organisation's CA bundle "
    "where the daemon runs (`aac-tokend service install` records it); a wrong clock or "
    "token endpoint also fails this check"
)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: causes, contexts, urllib3's reasons and wrapped args."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 12 and seen not in chain:
        chain.append(seen)
        nxt = getattr(seen, "reason", None)
        if not isinstance(nxt, BaseException):
            nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            nxt = next((a for a in seen.args if isinstance(a, BaseException)), None)
        seen = nxt
    return chain


def name_network_failure(exc: BaseException) -> str | None:
    """A proxy or TLS failure named as such, with what to check; None for anything else.

    The text is for a person (``status``, the log): one line, no URL (a proxy URL may carry
    a password), only the kind of failure and fixed advice.
    """
    import ssl

    import urllib3.exceptions as u3

    chain = _causes(exc)
    if any(isinstance(e, requests.exceptions.ProxyError | u3.ProxyError) for e in chain):
        why = "the proxy failed"
        for e in chain:
            if isinstance(e, ConnectionRefusedError):
                why = "the proxy refused the connection"
            elif isinstance(e, u3.NameResolutionError):
                why = "the proxy's host name does not resolve"
            elif isinstance(e, TimeoutError) or (
                # urllib3's NewConnectionError is a ConnectTimeoutError, for history's sake
                isinstance(e, u3.ConnectTimeoutError) and not isinstance(e, u3.NewConnectionError)
            ):
                why = "the proxy did not answer in time"
            elif isinstance(e, ssl.SSLError):
                why = "TLS to the proxy failed"
            elif isinstance(e, OSError) and str(e).startswith("Tunnel connection failed: "):
                code = str(e).split()[3] if len(str(e).split()) > 3 else ""
                why = f"the proxy refused to open a tunnel (HTTP {_clean(code)[:3]})"
                if code == "407":
                    why += ": it wants credentials, given as http://user:password@host:port"
            else:
                continue
            break
        return f"proxy failure: {why}; {_CHECK_PROXY}"
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            what = _clean(e.verify_message or e.reason or "unverified")
            why = f"the token endpoint's certificate was not accepted ({what})"
            return f"TLS failure: {why}; {_CHECK_CA}"
        if isinstance(e, ssl.SSLError):
            what = _clean(e.reason or type(e).__name__)
            return f"TLS failure: no secure connection to the token endpoint ({what}); {_CHECK_CA}"
    return None
