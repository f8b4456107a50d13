"""A watch that cannot stall silently: progress, a read deadline, resume, compaction.

The gateway serves a watch as one streaming POST whose answer is a line of JSON per watch
response. Four things keep it honest:

- progress notifications are requested (``progress_notify``): etcd then says "nothing
  changed up to revision R" on an idle key, every --experimental-watch-progress-notify-
  interval (10 min by default in 3.4; set it below ``idle_timeout`` on the cluster);
- a read deadline (``idle_timeout``): a stream silent for that long is dropped and opened
  again, on the next member, so a paused or cut-off member costs one deadline, not forever;
- ``hasleader`` is required (gRPC metadata through the gateway): a member that loses its
  leader ends the stream instead of serving a partitioned, frozen view;
- after a broken stream the watch resumes from the last revision seen + 1 (an event's
  mod_revision, or a progress notification's revision), so nothing is lost or repeated;
  if etcd has compacted that revision away, ``EtcdWatchCompactedError`` tells the caller
  to re-read everything and watch again from the revision of that read.

If no member accepts a watch within the client's call timeout, ``EtcdUnavailableError`` is
raised from ``next()``: the caller learns it has lost etcd rather than waiting on it.

Etcd's progress interval is the cluster's setting, not ours: at its default (10 min) every
idle stream hits the read deadline and is opened again. Each opening etcd answers
("created") is contact with etcd, so ``next()`` returns a WatchProgress for each
reopening (not for the first opening, which the caller's own call made): a caller
that counts what the watch yields as etcd speaking stays right whatever the interval.

``close()`` may be called from another thread and returns at once: it shuts the stream's
socket, so a ``next()`` blocked reading it (or pausing between reopenings) ends at once with
StopIteration instead of reopening. One waiting for a member to answer an opening ends
with StopIteration when that attempt's own timeout does (a read deadline at most).

(Over 300 lines: reading, reopening and closing share one stream's state; split, each
part would reach into the others'.)
"""

from __future__ import annotations

import base64
import contextlib
import enum
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Self

import requests
import urllib3.exceptions

from ..errors import (
    EtcdAuthError,
    EtcdUnavailableError,
    EtcdWatchCompactedError,
)
from .etcd_transport import JsonObject, Transport, session_for

__all__ = ["EventType", "Watch", "WatchEvent", "WatchProgress"]

#: gRPC metadata through the gateway: end the watch when the member has no leader.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}

#: Streams opened and broken in a row, without a created, progress or event in between,
#: before the watch says etcd is unavailable: enough for every member of a 5-member
#: cluster to fail once and a token to be renewed, few enough to answer within seconds.
_BREAKS_BEFORE_GIVING_UP = 6
#: Growing pause between such reopenings, so a member that refuses at once is not spun on.
_REOPEN_PAUSE_SECONDS = 0.1

_BROKEN = (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError)


class EventType(enum.Enum):
    """The two kinds of watch event."""

    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class WatchEvent:
    """A key was put or deleted at ``revision``; a deleted key's value is empty."""

    type: EventType
    key: bytes
    value: bytes
    revision: int
    create_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class WatchProgress:
    """Nothing under the watch changed up to ``revision`` (etcd's progress notification)."""

    revision: int


class Watch:
    """An iterator of WatchEvent and WatchProgress; close it (or use ``with``) when done."""

    def __init__(
        self,
        transport: Transport,
        body: JsonObject,
        *,
        start_revision: int,
        idle_timeout: float,
    ) -> None:
        self._transport = transport
        self._body = body
        self._idle = idle_timeout
        #: the first revision not yet delivered (0: "from now", until etcd says what now is)
        self.next_revision = start_revision
        self.member: str | None = None
        self.reconnects = 0
        self._breaks_in_a_row = 0
        self._session = session_for(transport.tls)
        self._response: requests.Response | None = None
        self._lines: Any = None
        self._pending: deque[WatchEvent] = deque()
        #: set by close(), from any thread; guards _response against a racing _connect
        self._closing = threading.Event()
        self._lock = threading.Lock()
        # "From now" means from this call, not from the first next(): wait for etcd to say
        # which revision now is (its created response), so nothing in between is missed.
        while self.next_revision == 0 and not self.closed:
            try:
                self._step()
            except BaseException:
                self.close()
                raise

    def __iter__(self) -> Self:
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """close() was called."""
        return self._closing.is_set()

    def close(self) -> None:
        """Stop watching and release the connection (from any thread: see the docstring)."""
        self._closing.set()
        self._drop()
        self._session.close()

    def _drop(self) -> None:
        with self._lock:
            response, self._response, self._lines = self._response, None, None
        if response is not None:
            _interrupt(response)
            with contextlib.suppress(*_BROKEN):
                response.close()

    def __next__(self) -> WatchEvent | WatchProgress:
        while True:
            if self._pending:
                return self._pending.popleft()
            if self.closed:
                raise StopIteration
            progress = self._step()
            if progress is not None:
                return progress

    def _step(self) -> WatchProgress | None:
        """Read one line of the stream (opening it if need be) and act on it."""
        lines = self._lines  # close() on another thread may clear the attribute meanwhile
        if lines is None:
            self._connect()
            lines = self._lines
            if lines is None:  # closed while connecting
                return None
        try:
            line = next(lines)
        except (StopIteration, *_BROKEN):
            line = None
        if self.closed:  # the read ended because close() shut the socket: not a break
            return None
        if line is None:
            self._broken("the stream ended or was silent too long")
            return None
        if not line:  # a blank line is the gateway's keepalive, not a break
            return None
        return self._handle(line)

    def _broken(self, reason: str) -> None:
        """Drop the stream to open it again; give up if it keeps breaking with nothing said."""
        self._drop()
        self.reconnects += 1
        self._breaks_in_a_row += 1
        if self._breaks_in_a_row > _BREAKS_BEFORE_GIVING_UP:
            self.close()
            raise EtcdUnavailableError(
                f"etcd watch broke {self._breaks_in_a_row} times in a row without a word "
                f"from etcd; last: {reason}"
            )
        self._closing.wait(_REOPEN_PAUSE_SECONDS * (self._breaks_in_a_row - 1))

    def _handle(self, line: bytes) -> WatchProgress | None:
        try:
            message = json.loads(line)
            result: JsonObject = message.get("result") or {}
        except (ValueError, AttributeError):
            message, result = None, {}
        if not result:  # an error line ("no leader", "invalid auth token"): try again
            said = str(message.get("error", "")) if isinstance(message, dict) else "garbled"
            if "auth token" in said and self.member is not None:
                self._transport.forget_token(self.member)
            self._broken(said[:200])
            return None
        revision = int(result.get("header", {}).get("revision", 0))
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            self.close()
            raise EtcdWatchCompactedError(
                f"etcd compacted the revisions this watch needed (up to {compacted}); "
                "re-read the keys and watch again",
                compact_revision=compacted,
            )
        if result.get("canceled"):
            reason = str(result.get("cancel_reason", ""))[:200]
            if "invalid auth token" in reason and self.member is not None:
                self._transport.forget_token(self.member)  # etcd dropped it: authenticate again
            elif "permission denied" in reason or "user name" in reason:
                self.close()
                raise EtcdAuthError(f"etcd {self.member} cancelled the watch: {reason}")
            self._broken(reason)
            return None
        self._breaks_in_a_row = 0  # etcd spoke: the stream works
        if result.get("created"):
            if self.next_revision == 0:
                self.next_revision = revision + 1
            if not self.reconnects:  # the first opening: the caller just called etcd
                return None
            # A stream reopened: etcd answered, which the caller counts as contact. It
            # says nothing past what was delivered (events from next_revision on may
            # follow, or a compaction), so the progress is only up to that.
            return WatchProgress(self.next_revision - 1)
        events = result.get("events", ())
        for event in events:
            kv = event.get("kv", {})
            mod = int(kv.get("mod_revision", 0))
            self._pending.append(
                WatchEvent(
                    EventType.DELETE if event.get("type") == "DELETE" else EventType.PUT,
                    _unb64(kv.get("key")),
                    _unb64(kv.get("value")),
                    mod,
                    int(kv.get("create_revision", 0)),
                    int(kv.get("version", 0)),
                    int(kv.get("lease", 0)),
                )
            )
            self.next_revision = max(self.next_revision, mod + 1)
        if events:
            return None
        self.next_revision = max(self.next_revision, revision + 1)
        return WatchProgress(revision)

    def _connect(self) -> None:
        """Open the stream on the first member that takes it, within the call timeout."""
        deadline = time.monotonic() + self._transport.timeout
        members = self._transport.rotation()
        if self.member in members:  # the member that just failed goes last
            members.remove(self.member)
            members.append(self.member)
        failures = []
        request: JsonObject = {"create_request": dict(self._body, progress_notify=True)}
        if self.next_revision:
            request["create_request"]["start_revision"] = str(self.next_revision)
        for member in members:
            if self.closed:
                return
            if time.monotonic() >= deadline:
                break
            try:
                headers = dict(_REQUIRE_LEADER, **self._transport.auth_header(member, deadline))
                response = self._session.post(
                    member + "/v3/watch",
                    data=json.dumps(request),
                    headers=headers,
                    timeout=(self._transport.connect_timeout, self._idle),
                    stream=True,
                )
            except EtcdUnavailableError as exc:
                failures.append(f"{member}: {exc}")
                continue
            except _BROKEN as exc:
                failures.append(f"{member}: {type(exc).__name__}")
                continue
            if response.status_code != 200:
                failures.append(f"{member}: HTTP {response.status_code}")
                if response.status_code == 401:
                    self._transport.forget_token(member)
                response.close()
                continue
            with self._lock:
                if not self.closed:
                    self.member, self._response = member, response
                    self._lines = response.iter_lines()
                    return
            response.close()  # close() came while this member answered
            return
        if self.closed:  # the attempts failed because close() came: not an outage
            return
        said = "; ".join(failures) or "no member tried"
        raise EtcdUnavailableError(
            f"etcd watch: no member took it within {self._transport.timeout:g} s ({said})"
        )


def _interrupt(response: requests.Response) -> None:
    """Shut the stream's socket: a read blocked on it in another thread returns at once
    (closing a descriptor does not wake a thread blocked reading it on Linux)."""
    connection = getattr(response.raw, "connection", None) or getattr(
        response.raw, "_connection", None
    )
    sock = getattr(connection, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _unb64(text: object) -> bytes:
    return base64.b64decode(str(text)) if text else b""
