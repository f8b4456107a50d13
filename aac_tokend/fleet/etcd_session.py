"""The HTTP session to etcd members: TLS files, and a record of whether a request left.

The watched connection classes (``netio``) note the first ``send`` after the connection is
up (the TLS handshake is part of connecting) on the ``Attempt`` of the calling thread: an
error before that send proves the member received nothing; after it, the request may have
been acted on.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests

from ..netio import WatchedAdapter, watching

__all__ = ["Attempt", "Credentials", "TlsFiles", "attempt", "session_for", "tls_failure"]

#: How deep to look through wrapped exceptions for the TLS error (requests wraps urllib3's
#: MaxRetryError, which wraps urllib3's SSLError, which wraps ssl's): a handful of levels.
_MAX_WRAPS = 8


@dataclass(frozen=True)
class Credentials:
    """An etcd user and password for ``/v3/auth/authenticate`` (never logged)."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password=<hidden>)"


@dataclass(frozen=True)
class TlsFiles:
    """The CA that signed etcd's certificates (None: the CAs requests trusts by default), and
    an optional client certificate and key."""

    ca: str | None
    cert: str | None = None
    key: str | None = None


class Attempt:
    """One request to one member: whether a byte of it was handed to the socket."""

    def __init__(self) -> None:
        self.sent = False

    def watch(self, sock: object) -> None:
        """A connection is up: nothing sent yet, and no deadline here to refuse it."""

    def sending(self, sock: object) -> None:
        """A byte of the request is about to go to the socket."""
        self.sent = True


def _tls12_context() -> ssl.SSLContext:
    """A verifying client context that stops at TLS 1.2 (see the comment below)."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


# TLS 1.2, not 1.3, to etcd: under TLS 1.3 the client's handshake is over before the server
# has checked the client certificate, so a refused certificate shows only after the request
# is written (Go's server then just closes: an EOF indistinguishable from a member dying
# mid-answer). Under TLS 1.2 the server's Finished comes after that check, so a refusal
# fails the connect and the request provably never left. ECDHE with AES-GCM, which etcd
# offers, keeps 1.2 sound; the exact "did it leave?" is what the fleet's fencing rests on.
class _Tls12Adapter(WatchedAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = _tls12_context()
        super().init_poolmanager(*args, **kwargs)


@contextlib.contextmanager
def attempt() -> Iterator[Attempt]:
    """Record, for requests this thread makes inside the block, whether a byte was sent."""
    current = Attempt()
    with watching(current):
        yield current


def session_for(tls: TlsFiles | None) -> requests.Session:
    """A session with the watched adapter, our CA and client certificate, and no proxies."""
    session = requests.Session()
    session.trust_env = False  # etcd members are named explicitly; never via a proxy
    session.mount("http://", _Tls12Adapter())
    session.mount("https://", _Tls12Adapter())
    if tls is not None:
        if tls.ca is not None:
            session.verify = tls.ca
        if tls.cert is not None:
            session.cert = (tls.cert, tls.key) if tls.key else tls.cert
    return session


#: A connection closed mid-handshake: a member going away, not a TLS setting to fix.
_DROPPED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _unreadable(path: str) -> str | None:
    """Why ``path`` is no readable regular file, or None if it is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None if os.access(path, os.R_OK) else "not readable"


def _wrapped(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (cause, context, urllib3's ``reason``, exception args)."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < _MAX_WRAPS:
        each = todo.pop(0)
        if id(each) in seen:
            continue
        seen.add(id(each))
        yield each
        inner = [each.__cause__, each.__context__, getattr(each, "reason", None), *each.args]
        todo.extend(e for e in inner if isinstance(e, BaseException))


def tls_failure(exc: BaseException, tls: TlsFiles | None) -> str | None:
    """A failed request's TLS cause, in words that name the setting to fix; None if TLS was
    not the cause. Paths and OpenSSL's reason only: never a byte of the request."""
    files = (("ca_file", tls.ca), ("cert_file", tls.cert), ("key_file", tls.key)) if tls else ()
    for key, path in files:
        why = _unreadable(path) if path is not None else None
        if why is not None:
            return f"TLS: fleet.{key} {path!r} cannot be read ({why})"
    trusted = (
        f"fleet.ca_file {tls.ca!r}"
        if tls is not None and tls.ca is not None
        else "the default CAs (set fleet.ca_file to etcd's CA)"
    )
    for each in _wrapped(exc):
        if isinstance(each, ssl.SSLCertVerificationError):
            return (
                f"TLS: the member's certificate failed verification against {trusted} "
                f"({each.verify_message})"
            )
        if isinstance(each, ssl.SSLError) and not isinstance(each, _DROPPED):
            mine = " (check fleet.cert_file and key_file)" if tls and tls.cert else ""
            return f"TLS: the handshake failed ({each.reason or type(each).__name__}){mine}"
    return None
