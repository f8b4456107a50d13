"""The token endpoint client: one form-encoded refresh POST, its answer classified.

``classify_response`` is pure (status, headers, body, now) so hostile answers can be fuzzed
without a network. ``TokenEndpoint`` is the only place that touches ``requests`` and the only
place its exceptions are translated. It never retries by itself: under rotation a retried
POST is a reuse, so every retry is the scheduler's decision, made after the outcome is
durable.
"""

from __future__ import annotations

import email.utils
import json
import math
from collections.abc import Mapping
from typing import Any

import requests
import urllib3.exceptions

from . import __version__
from .errors import TokenFormatError
from .outcome import Refreshed, RefreshOutcome, Rejected, Transient
from .policy import ASSUMED_LIFETIME_SECONDS
from .tokens import parse_jwt

__all__ = ["TokenEndpoint", "classify_response", "name_network_failure", "parse_retry_after"]

USER_AGENT = f"aac-tokend/{__version__}"
#: Connecting takes milliseconds when the network is up; fail fast and retry later.
CONNECT_TIMEOUT_SECONDS = 5.0
#: PingFederate answers in well under a second; 20 s covers a slow proxy. Together with the
#: connect timeout this bounds a courier's request to 25 s (see courier.MAX_LIFE_SECONDS).
READ_TIMEOUT_SECONDS = 20.0
#: A token response is a few KiB; a larger body is not a token response.
MAX_BODY_BYTES = 64 * 1024
#: Retry-After beyond this is treated as this: the backoff cap keeps the chain watched.
MAX_RETRY_AFTER_SECONDS = 3600.0
#: An access lifetime beyond a year is garbage; capping keeps the schedule's dates sane.
MAX_EXPIRES_IN_SECONDS = 366 * 86400.0
_TEXT_LIMIT = 200


def _clean(text: object) -> str:
    """A server-supplied string made safe for one log line."""
    s = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return s[:_TEXT_LIMIT]


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
    raw = payload.get("expires_in")
    if isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        # isdigit alone admits '²', which float() refuses; 400 digits make inf: cap it too.
        raw = min(float(raw), MAX_EXPIRES_IN_SECONDS)
    if isinstance(raw, int) and not isinstance(raw, bool) and raw > MAX_EXPIRES_IN_SECONDS:
        raw = MAX_EXPIRES_IN_SECONDS  # before math.isfinite, which overflows on huge ints
    if (
        isinstance(raw, int | float)
        and not isinstance(raw, bool)
        and math.isfinite(raw)
        and raw > 0
    ):
        return float(min(raw, MAX_EXPIRES_IN_SECONDS))
    try:
        left = parse_jwt(access_token).exp - now
    except TokenFormatError:
        return ASSUMED_LIFETIME_SECONDS
    return max(min(left, MAX_EXPIRES_IN_SECONDS), 1.0)


def _servable(token: str) -> bool:
    """A token that can go into an Authorization header: printable ASCII, no spaces."""
    return bool(token) and token.isascii() and token.isprintable() and " " not in token


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def classify_response(
    status: int, headers: Mapping[str, str], body: bytes, now: float
) -> RefreshOutcome:
    """What an HTTP answer from the token endpoint means for the chain."""
    payload = _json_object(body) if len(body) <= MAX_BODY_BYTES else None
    retry_after = parse_retry_after(headers.get("Retry-After"), now)
    if status == 200:
        token = payload.get("access_token") if payload else None
        if not isinstance(token, str) or not _servable(token.strip()):
            # The server may have rotated the refresh token before the answer got garbled.
            return Transient(
                "token endpoint answered 200 without a usable access_token", None, True
            )
        refresh = payload.get("refresh_token") if payload else None
        if not isinstance(refresh, str) or not refresh.strip():
            refresh = None
        return Refreshed(
            token.strip(),
            refresh.strip() if refresh else None,
            _expires_in(payload or {}, token, now),
        )
    if status in (400, 401) and payload is not None and isinstance(payload.get("error"), str):
        desc = payload.get("error_description")
        return Rejected(
            _clean(payload["error"]) or "unknown_error",
            _clean(desc) if isinstance(desc, str) else None,
            status,
        )
    if status in (408, 429) or 500 <= status <= 599:
        return Transient(f"token endpoint answered HTTP {status}", retry_after)
    return Transient(f"token endpoint answered HTTP {status} without an OAuth error", retry_after)


class TokenEndpoint:
    """Sends refresh requests; the session is injectable (tests mount failing adapters)."""

    def __init__(
        self,
        session: requests.Session | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        read_timeout: float = READ_TIMEOUT_SECONDS,
    ) -> None:
        # trust_env (default) takes proxies and the CA bundle from the environment.
        self._session = session or requests.Session()
        self._timeouts = (connect_timeout, read_timeout)

    def refresh(
        self, endpoint: str, client_id: str, refresh_token: str, *, now: float
    ) -> RefreshOutcome:
        """One refresh POST; every failure becomes an outcome, never an exception."""
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
            ) as response:
                body = response.raw.read(MAX_BODY_BYTES + 1, decode_content=True)
                return classify_response(response.status_code, response.headers, body or b"", now)
        except (
            requests.exceptions.ConnectTimeout,
            requests.exceptions.SSLError,
            requests.exceptions.ProxyError,
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ) as exc:
            # Nothing reached the token endpoint: the refresh token is certainly unspent.
            named = name_network_failure(exc)
            return Transient(named or f"cannot reach the token endpoint: {type(exc).__name__}")
        except requests.exceptions.ConnectionError as exc:
            if _never_connected(exc):
                return Transient(f"cannot reach the token endpoint: {type(exc).__name__}")
            return Transient(f"connection lost after sending: {type(exc).__name__}", None, True)
        except requests.exceptions.RequestException as exc:
            # Read timeouts, resets mid-answer, broken chunking: the request may have landed.
            return Transient(f"no complete answer: {type(exc).__name__}", None, True)
        except urllib3.exceptions.HTTPError as exc:
            # Reading the body (response.raw) raises urllib3's own errors, unwrapped: a
            # timeout, a cut or an undecodable body after the status line. It landed.
            return Transient(f"no complete answer: {type(exc).__name__}", None, True)
        except OSError as exc:
            return Transient(f"no complete answer: {type(exc).__name__}", None, True)


def _never_connected(exc: BaseException) -> bool:
    """True if the chain of causes shows the TCP connection was never made."""
    import urllib3.exceptions as u3

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(
            seen, u3.NewConnectionError | u3.NameResolutionError | ConnectionRefusedError
        ):
            return True
        if isinstance(seen, u3.MaxRetryError) and seen.reason is not None:
            seen = seen.reason
            continue
        nxt = seen.__cause__ or seen.__context__
        if nxt is None and seen.args and isinstance(seen.args[0], BaseException):
            nxt = seen.args[0]
        seen = nxt
    return False


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
