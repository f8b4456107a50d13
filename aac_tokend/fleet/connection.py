"""The fleet courier's request, in two halves: the connection first, the POST later.

Issue #13 item 4 orders a fenced refresh as (a) open the connection to the token endpoint
(DNS, connect, TLS), (b) commit the journal entry to etcd, (c) check the lease and D, (d)
write the request. Everything that can take long or fail without sending happens in (a),
before anything durable says a token is out; between (c) and (d) only bytes are written to
a socket that already exists. ``requests`` cannot split a request so (it connects inside
``post``), so this module drives urllib3's public ``HTTPConnection``/``HTTPSConnection``
itself, trusting the CA bundle requests would (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``,
else certifi's) and, for https, tunnelling through the environment's http proxy as requests
would (``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``; credentials in the proxy URL): the
CONNECT is part of opening. Plain http goes only to loopback (``core.origin``), never via a
proxy. An https or SOCKS proxy is not supported here: opening fails, naming it.

``open_request`` fails with a ``Transient`` (UNREACHED: nothing can have been written) or
returns a ``PreparedRequest`` whose ``send`` writes the POST with a socket timeout of
``send_timeout`` (written bytes cannot linger in our socket's buffer longer than that),
reads the answer within ``deadline`` of the send (a watchdog shuts the socket down, as
``refresh.endpoint`` does) and judges it with ``classify_response``. Once a byte may have
been written, every failure is AMBIGUOUS.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import urllib3.connection
import urllib3.exceptions
from urllib3.util import Url, parse_url

from ..core.origin import check_endpoint
from ..core.outcome import UNREACHED_PREFIX, FailureKind, RefreshOutcome, Transient
from ..errors import EndpointNotAllowedError
from ..refresh.endpoint import MAX_BODY_BYTES, USER_AGENT, classify_response, name_network_failure

__all__ = ["PreparedRequest", "RequestTimeouts", "ca_bundle", "open_request"]


@dataclass(frozen=True)
class RequestTimeouts:
    """The three bounds of a fenced request (FleetSettings' connect, send and deadline)."""

    connect: float
    send: float
    deadline: float


def ca_bundle() -> str:
    """The CA file requests would trust here: the environment's, else certifi's."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if value := os.environ.get(name):
            return value
    import requests.utils

    return str(requests.utils.DEFAULT_CA_BUNDLE_PATH)  # certifi's, as requests.certs.where()


def open_request(url: str, timeouts: RequestTimeouts) -> PreparedRequest | Transient:
    """Resolve, connect and (https) shake hands with the token endpoint; send nothing.

    A ``Transient`` (UNREACHED) if that fails: no byte of a request exists yet.
    """
    try:
        checked = check_endpoint(url, explicit=True)
    except EndpointNotAllowedError as exc:
        return Transient(f"{UNREACHED_PREFIX}: {exc}", None, FailureKind.UNREACHED)
    parsed = parse_url(checked)
    host, scheme = parsed.host or "", (parsed.scheme or "https").lower()
    proxy = _proxy_for(checked) if scheme == "https" else None
    if proxy is not None and (proxy.scheme or "http").lower() != "http":
        return Transient(
            f"{UNREACHED_PREFIX}: proxy failure: fleet mode tunnels through an http:// proxy "
            f"only, not {proxy.scheme}://; check HTTPS_PROXY, ALL_PROXY and NO_PROXY",
            None,
            FailureKind.UNREACHED,
        )
    conn: urllib3.connection.HTTPConnection
    try:
        if scheme == "https":
            context = ssl.create_default_context(cafile=ca_bundle())
            if proxy is None:
                conn = urllib3.connection.HTTPSConnection(
                    host, parsed.port or 443, timeout=timeouts.connect, ssl_context=context
                )
            else:
                conn = urllib3.connection.HTTPSConnection(
                    proxy.host or "", proxy.port or 80, timeout=timeouts.connect,
                    ssl_context=context,
                )  # fmt: skip
                conn.set_tunnel(host, parsed.port or 443, headers=_proxy_headers(proxy))
        else:
            conn = urllib3.connection.HTTPConnection(
                host, parsed.port or 80, timeout=timeouts.connect
            )
        conn.connect()
    except (OSError, urllib3.exceptions.HTTPError, ValueError) as exc:
        named = name_network_failure(exc)
        if named is None and proxy is not None:
            named = (
                f"proxy failure: the tunnel through the proxy failed ({type(exc).__name__}); "
                "check HTTPS_PROXY, ALL_PROXY and NO_PROXY"
            )
        return Transient(
            f"{UNREACHED_PREFIX}: {named or type(exc).__name__}", None, FailureKind.UNREACHED
        )
    return PreparedRequest(conn, parsed.request_uri, timeouts)


def _proxy_for(url: str) -> Url | None:
    """The environment's proxy for ``url`` (None: direct), as requests picks it."""
    import requests.utils

    proxies = requests.utils.get_environ_proxies(url)
    chosen = requests.utils.select_proxy(url, proxies)
    return parse_url(chosen) if chosen else None


def _proxy_headers(proxy: Url) -> dict[str, str]:
    """The CONNECT's headers: the proxy's credentials if its URL carries them."""
    if not proxy.auth:
        return {}
    user, _, password = proxy.auth.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


class PreparedRequest:
    """An open connection to the token endpoint, waiting for its one POST."""

    def __init__(
        self,
        conn: urllib3.connection.HTTPConnection,
        path: str,
        timeouts: RequestTimeouts,
    ) -> None:
        self._conn = conn
        self._path = path
        self._timeouts = timeouts
        self._used = False

    def send(self, form: Mapping[str, str], *, now: float) -> RefreshOutcome:
        """Write the POST of ``form`` and judge the answer; never raises for the network."""
        if self._used:
            raise RuntimeError("a prepared request is sent once")  # a reuse, never retried
        self._used = True
        secrets = tuple(v for k, v in form.items() if k == "refresh_token")
        body = urllib.parse.urlencode(dict(form)).encode()
        headers = {  # Host is http.client's (the tunnel's target when tunnelling)
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
            "Content-Length": str(len(body)),
        }
        sock = self._conn.sock
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            if isinstance(sock, socket.socket):
                # shutdown wakes a recv blocked in our thread; close would not (endpoint.py).
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

        watchdog = threading.Timer(self._timeouts.deadline, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            if sock is not None:
                sock.settimeout(self._timeouts.send)
            self._conn.request(
                "POST", self._path, body=body, headers=headers, preload_content=False
            )
            # getresponse sets the socket's timeout from this; the watchdog bounds the rest.
            self._conn.timeout = self._timeouts.deadline
            response = self._conn.getresponse()
            data = response.read(MAX_BODY_BYTES + 1, decode_content=True)
            status, answer_headers = response.status, response.headers  # case-blind
        except (OSError, urllib3.exceptions.HTTPError, ValueError) as exc:
            # From the first write on, the server may have the token: ambiguous, whatever broke.
            if expired.is_set():
                why = f"no complete answer within {self._timeouts.deadline:g} s"
            else:
                why = f"no complete answer: {type(exc).__name__}"
            return Transient(why, None, FailureKind.AMBIGUOUS)
        finally:
            watchdog.cancel()
            self.close()
        return classify_response(status, answer_headers, data or b"", now, secrets=secrets)

    def close(self) -> None:
        """Let the connection go (also when the request is not sent after all)."""
        with contextlib.suppress(Exception):
            self._conn.close()
