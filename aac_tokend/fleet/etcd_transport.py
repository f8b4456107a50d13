"""HTTP to etcd's JSON gateway: several members, bounded calls, auth, and "did it leave?".

Every call has one time limit across all the members it tries. A read (and a write that
provably never left) moves on to the next member; a write that may have been sent is never
sent again elsewhere: it raises ``EtcdOutcomeUnknownError`` and the caller reads to find out.

Whether a request left is recorded, not guessed from the exception (``etcd_session``, the
idea of the token endpoint's client): an error before the first byte was sent (refused,
DNS, a certificate refused, a connect or handshake timeout) proves etcd received nothing.

Per-attempt timeouts are what is left of the call's limit. ``requests``' read timeout
bounds each wait for bytes, not the whole answer; etcd is trusted not to trickle, and a
paused member sends nothing at all, so each attempt ends within what was left.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from typing import Any

import requests
import urllib3.exceptions

from ..errors import (
    EtcdAuthError,
    EtcdLeaseGoneError,
    EtcdOutcomeUnknownError,
    EtcdRequestError,
    EtcdUnavailableError,
    EtcdUnsentError,
)
from .etcd_session import Credentials, TlsFiles, attempt, session_for, tls_failure

#: What a request that got no answer raises (reading the body raises urllib3's own errors).
_BROKEN = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError)

__all__ = ["Credentials", "JsonObject", "TlsFiles", "Transport", "session_for"]

JsonObject = dict[str, Any]

#: gRPC codes etcd answers with (the gateway puts them in the body's ``code``).
_INVALID_ARGUMENT, _NOT_FOUND, _PERMISSION_DENIED = 3, 5, 7
_FAILED_PRECONDITION, _UNAUTHENTICATED = 9, 16

#: etcd's own words for a token it no longer knows: a simple token expires after
#: --auth-token-ttl of disuse and is known only to the member that issued it.
_TOKEN_INVALID = "invalid auth token"  # noqa: S105 (an error message, not a secret)


class _SentError(Exception):
    """This attempt failed after its request may have reached the member."""


class _UnsentError(Exception):
    """This attempt failed before any byte of the request left."""


class _TlsUnsentError(_UnsentError):
    """TLS stopped this attempt before any byte left (a CA, a certificate, a handshake)."""


def _etcd_error(response: requests.Response) -> tuple[int, str]:
    """etcd's gRPC code and message from an error answer (0 and the status if garbled)."""
    try:
        body = json.loads(response.content[:4096])
        return int(body.get("code", 0)), str(body.get("message") or body.get("error"))[:200]
    except (ValueError, TypeError, AttributeError):
        return 0, f"HTTP {response.status_code}"


class Transport:
    """POSTs JSON to the members in turn, sticking to the one that last answered."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        timeout: float,
        connect_timeout: float,
        tls: TlsFiles | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.tls = tls
        self._credentials = credentials
        self._session = session_for(tls)
        self._lock = threading.Lock()
        self._preferred = 0
        self._tokens: dict[str, str] = {}  # per member: a simple token is local to its issuer

    def rotation(self) -> list[str]:
        """The members in the order to try them: the one that last answered first."""
        with self._lock:
            first = self._preferred
        return self.endpoints[first:] + self.endpoints[:first]

    def prefer(self, endpoint: str) -> None:
        """Try ``endpoint`` first from now on."""
        with self._lock:
            self._preferred = self.endpoints.index(endpoint)

    def call(
        self, path: str, body: Mapping[str, Any], *, write: bool, endpoint: str | None = None
    ) -> JsonObject:
        """One call within ``timeout``; see the module docstring for failover and errors."""
        deadline = time.monotonic() + self.timeout
        failures: list[str] = []
        tls_refused = 0
        members = [endpoint] if endpoint else self.rotation()
        for tried, member in enumerate(members):
            if deadline - time.monotonic() <= 0:
                break
            # A read that may go on to other members leaves them their share of the limit
            # (a paused member costs only its share); a write gets all that is left, since
            # once sent it goes nowhere else.
            share = 1 if write else len(members) - tried
            try:
                answer = self._authorised(member, path, body, deadline, share)
            except _UnsentError as exc:
                failures.append(f"{member}: {exc}")
                tls_refused += isinstance(exc, _TlsUnsentError)
                continue
            except _SentError as exc:
                if write:
                    raise EtcdOutcomeUnknownError(
                        f"etcd write {path} may have been applied; no answer from {member}: {exc}"
                    ) from exc
                failures.append(f"{member}: {exc}")
                continue
            if endpoint is None:
                self.prefer(member)
            return answer
        said = "; ".join(failures) or "no member tried"
        kind = EtcdUnsentError if write else EtcdUnavailableError
        if failures and tls_refused == len(failures):
            raise kind(f"etcd {path}: TLS refused every member tried ({said})")
        raise kind(f"etcd {path}: no member answered within {self.timeout:g} s ({said})")

    def _authorised(
        self, member: str, path: str, body: Mapping[str, Any], deadline: float, share: int
    ) -> JsonObject:
        """One member, with its auth token; a token etcd calls invalid is renewed once."""
        if self._credentials is None:
            return self.post(member, path, body, deadline, None, share)
        for renewed in (False, True):
            token = self._tokens.get(member)
            if token is None:
                try:
                    token = self._authenticate(member, deadline)
                except _SentError as exc:
                    # Only the authentication may have arrived; the call itself did not leave.
                    raise _UnsentError(f"authentication unanswered: {exc}") from exc
            try:
                return self.post(member, path, body, deadline, token, share)
            except EtcdAuthError as exc:
                # A request refused for its token was not applied: sending it again is safe.
                if renewed or _TOKEN_INVALID not in str(exc):
                    raise
                self._tokens.pop(member, None)
        raise AssertionError("unreachable")

    def _authenticate(self, member: str, deadline: float) -> str:
        assert self._credentials is not None
        creds = {"name": self._credentials.user, "password": self._credentials.password}
        answer = self.post(member, "/v3/auth/authenticate", creds, deadline, None)
        token = str(answer.get("token", ""))
        if not token:
            raise EtcdAuthError(f"etcd {member} authenticated {self._credentials.user!r} "
                                "but gave no token; is auth enabled?")  # fmt: skip
        self._tokens[member] = token
        return token

    def auth_header(self, member: str, deadline: float) -> dict[str, str]:
        """The Authorization header for a stream to ``member`` (empty without credentials)."""
        if self._credentials is None:
            return {}
        try:
            token = self._tokens.get(member) or self._authenticate(member, deadline)
        except (_SentError, _UnsentError) as exc:
            raise EtcdUnavailableError(f"etcd {member}: could not authenticate: {exc}") from exc
        return {"Authorization": token}

    def forget_token(self, member: str) -> None:
        """Drop ``member``'s token (a stream was refused with it)."""
        self._tokens.pop(member, None)

    def post(
        self,
        member: str,
        path: str,
        body: Mapping[str, Any],
        deadline: float,
        token: str | None,
        share: int = 1,
    ) -> JsonObject:
        """One POST to one member within its ``share`` of what is left of the call's limit.

        Raises _UnsentError, _SentError, or etcd's verdict as our error.
        """
        limit = (deadline - time.monotonic()) / share
        if limit <= 0:
            raise _UnsentError("the call's time limit passed")
        headers = {"Authorization": token} if token else {}
        with attempt() as sending:
            try:
                response = self._session.post(
                    member + path,
                    data=json.dumps(body),
                    headers=headers,
                    timeout=(min(self.connect_timeout, limit), limit),
                    allow_redirects=False,
                )
                content = response.content
            except (
                requests.exceptions.RequestException,
                urllib3.exceptions.HTTPError,
                OSError,
            ) as e:
                name = type(e).__name__
                if sending.sent:
                    raise _SentError(f"no answer: {name}") from e
                # A TLS refusal is no silent etcd: say which file, and what OpenSSL said.
                tls = tls_failure(e, self.tls)
                if tls is not None:
                    raise _TlsUnsentError(tls) from e
                raise _UnsentError(name) from e
        if response.status_code == 200:
            try:
                answer = json.loads(content)
            except ValueError as exc:
                raise _SentError("a garbled answer") from exc
            if not isinstance(answer, dict):
                raise _SentError("a garbled answer")
            return answer
        return raise_for(member, path, response)


def raise_for(member: str, path: str, response: requests.Response) -> JsonObject:
    """Turn etcd's error answer into the error for what the caller does next."""
    code, message = _etcd_error(response)
    said = f"etcd {member} refused {path}: {message}"
    if response.status_code >= 500 or code == 0:
        # "leader changed", "request timed out", "no leader": it may have been proposed.
        raise _SentError(f"HTTP {response.status_code}: {message}")
    if (
        code in (_UNAUTHENTICATED, _PERMISSION_DENIED)
        or "user name" in message
        or (path == "/v3/auth/authenticate" and code in (_INVALID_ARGUMENT, _FAILED_PRECONDITION))
    ):
        raise EtcdAuthError(said)
    if code == _NOT_FOUND and "lease" in message:
        raise EtcdLeaseGoneError(said)
    raise EtcdRequestError(said, code=code)
