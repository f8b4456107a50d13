"""The control socket: JSON lines in, JSON lines out, answers in request order.

One I/O thread owns every socket (non-blocking, in a selector); handler calls run on a
small thread pool, so a slow refresh, a client that sends nothing, or one that floods never
delays anyone else. Each connection has bounded input (one line at a time, at most
MAX_REQUEST_BYTES), bounded output (MAX_OUTPUT_BYTES), a request rate and an idle timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aac_tokend import errors
from aac_tokend.unixsock import adopt_listener, bind_listener, peer_uid

__all__ = [
    "ERROR_CODES",
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_OUTPUT_BYTES",
    "MAX_REQUEST_BYTES",
    "RATE_LIMIT",
    "ControlHandler",
    "ControlServer",
    "error_code",
]

# The largest legitimate request is an import of a token pair: an access JWT and a refresh
# token, a few KiB each. 64 KiB leaves ample room and bounds what a client can make us hold.
MAX_REQUEST_BYTES = 64 * 1024

# A connection with no complete request for this long is closed: CLI commands send their
# request at once, so only a stuck or hostile client stays this quiet.
IDLE_TIMEOUT = 30.0

# Requests per second per connection, and the burst allowed: far above what a person or a
# status poller needs, low enough that one looping client cannot monopolise the handlers.
RATE_LIMIT = 50.0

# Every CLI command uses one short connection; 64 leaves room for monitors and scripts while
# bounding the descriptors and buffers a runaway script can pin.
MAX_CONNECTIONS = 64

# A client that stops reading its answers is dropped once this much is queued for it.
MAX_OUTPUT_BYTES = 1024 * 1024

_RECV_SIZE = 64 * 1024  # one read per readiness event, so one client cannot hog the loop
_LINES_PER_PASS = 32  # answered-inline lines (errors) per connection before others get a turn
_ACCEPT_ERROR_PAUSE = 0.01  # see token_server: a readable listener at EMFILE would spin
_STOP_TIMEOUT = 2.0  # stop() waits this long for the I/O thread: a drain plus ample margin

# On stop, answers already computed (or finishing now: a `shutdown` request's own answer
# races with the stop it triggers) get this long to reach their clients. Short, so a slow
# handler cannot hold up the exit.
_DRAIN_TIMEOUT = 0.5

# Wire codes of errors that escape the handler; a class not listed takes its nearest
# ancestor's code. control_ops answers with the same mapping, so the CLI maps
# both kinds of answer to the same exit status.
ERROR_CODES: dict[type[errors.AacTokendError], str] = {
    errors.BusyError: "busy",
    errors.EndpointUnavailableError: "endpoint_unavailable",
    errors.TransientError: "transient",
    errors.RefreshRejectedError: "refresh_rejected",
    errors.StateCorruptError: "corrupt_state",
    errors.StorageError: "storage_error",
    errors.AlertError: "alert",
    errors.ConfigError: "config_error",
    errors.ProfileError: "unknown_profile",
    errors.InputError: "bad_request",
    errors.AacTokendError: "error",
}


def error_code(exc: errors.AacTokendError) -> str:
    """Return the wire code of ``exc``: that of its nearest class in ERROR_CODES."""
    for cls in type(exc).__mro__:
        code = ERROR_CODES.get(cls)
        if code is not None:
            return code
    return "error"


class ControlHandler(Protocol):
    """Answers control requests; may block (a refresh takes seconds)."""

    def handle(self, request: dict[str, object]) -> dict[str, object]:
        """Return the response object for ``request`` (which has a string "op")."""
        ...


def _encode(response: dict[str, object]) -> bytes:
    return json.dumps(response, separators=(",", ":")).encode() + b"\n"


def _failure(code: str, message: str, request: dict[str, object] | None = None) -> bytes:
    response: dict[str, object] = {"ok": False, "code": code, "message": message}
    if request is not None and "id" in request:
        response["id"] = request["id"]
    return _encode(response)


def _parse(line: bytes) -> tuple[dict[str, object] | None, str | None]:
    """Return (request, None), or (whatever parsed, why it is a bad request)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"the request is not valid JSON ({exc.msg} at column {exc.colno})"
    except (ValueError, RecursionError):  # bad UTF-8, nesting too deep, a 5000-digit number
        return None, "the request could not be parsed as JSON"
    if not isinstance(obj, dict):
        return None, "the request must be a JSON object"
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        return obj, 'the request needs an "op" string'
    return obj, None


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float  # closed when idle past this, unless a request is in flight
    tokens: float  # rate-limit bucket
    refilled: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    busy: bool = False  # a request is with the handler; nothing more is read meanwhile
    eof: bool = False  # the peer shut down writing: answer complete lines, then close
    closing: bool = False  # close once outbuf is flushed
    closed: bool = False
    events: int = 0  # what the selector watches for this socket now


_LISTEN = object()
_WAKE = object()


class ControlServer:
    """Serves JSON-line control requests on one Unix socket."""

    def __init__(
        self,
        path: Path,
        handler: ControlHandler,
        *,
        uid: int | None = None,
        listener: socket.socket | None = None,
        workers: int = 4,
        idle_timeout: float = IDLE_TIMEOUT,
        rate_limit: float = RATE_LIMIT,
    ) -> None:
        self.path = path
        self._handler = handler
        self._uid = os.getuid() if uid is None else uid
        self._inherited = listener
        self._workers = workers
        self._idle = idle_timeout
        self._rate = rate_limit
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._executor: ThreadPoolExecutor | None = None
        self._conns: set[_Conn] = set()
        self._ready: set[_Conn] = set()  # complete lines left over for the next pass
        self._done: deque[tuple[_Conn, bytes]] = deque()  # filled by workers
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: connections closed at once: foreign uid or over MAX_CONNECTIONS
        self.rejected = 0

    @property
    def connections(self) -> int:
        """Return the number of open client connections."""
        return len(self._conns)

    def start(self) -> None:
        """Bind (or adopt) the socket and start the I/O thread."""
        if self._thread is not None:
            raise RuntimeError("ControlServer can be started once")
        if self._inherited is not None:
            self._listener = adopt_listener(self._inherited)
        else:
            self._listener = bind_listener(self.path)
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="control")
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTEN)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._thread = threading.Thread(target=self._run, name="control-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop within about a second: answers ready in time are sent, the rest dropped."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT)
        else:
            self._shutdown()  # never started: nothing bound, only the wake-up pair to close
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- I/O thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, mask in self._selector.select(self._timeout()):
                    if key.data is _LISTEN:
                        self._accept()
                    elif key.data is _WAKE:
                        self._collect()
                    else:
                        self._on_ready(key.data, mask)
                for conn in list(self._ready):
                    self._ready.discard(conn)
                    self._pump(conn)
                self._expire()
            self._drain()
        finally:
            self._shutdown()

    def _drain(self) -> None:
        """Deliver answers finishing within _DRAIN_TIMEOUT; read and start nothing new."""
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        if self._listener is not None:
            self._selector.unregister(self._listener)
        for conn in list(self._conns):
            self._update(conn)  # now watching for writes only
        while any(c.busy or c.outbuf for c in self._conns):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for key, mask in self._selector.select(remaining):
                if key.data is _WAKE:
                    self._collect()
                elif mask & selectors.EVENT_WRITE and not key.data.closed:
                    self._flush(key.data)

    def _timeout(self) -> float | None:
        if self._ready:
            return 0.0
        deadlines = [c.deadline for c in self._conns if not c.busy]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _shutdown(self) -> None:
        for conn in list(self._conns):
            self._close(conn)
        if self._listener is not None:
            if self._inherited is None:
                self.path.unlink(missing_ok=True)
            self._listener.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        # Full means a wake-up is pending anyway; closed means we are shutting down.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(MAX_CONNECTIONS):  # a connect flood must not starve the others
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                time.sleep(_ACCEPT_ERROR_PAUSE)
                return
            try:
                allowed = peer_uid(sock) == self._uid and len(self._conns) < MAX_CONNECTIONS
            except OSError:
                allowed = False
            if not allowed:
                self.rejected += 1
                sock.close()
                continue
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(sock, deadline=now + self._idle, tokens=self._rate, refilled=now)
            self._conns.add(conn)
            self._update(conn)

    def _on_ready(self, conn: _Conn, mask: int) -> None:
        if conn.closed:
            return  # closed earlier in this batch of events
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            try:
                data = conn.sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(conn)
                return
            if data:
                conn.inbuf += data
            else:
                conn.eof = True
            self._pump(conn)

    def _pump(self, conn: _Conn) -> None:
        """Handle complete lines until one goes to the handler, then fix the interest set."""
        answered = 0
        while not (conn.busy or conn.closing or conn.closed or self._stopping):
            end = conn.inbuf.find(b"\n")
            if end < 0:
                if len(conn.inbuf) > MAX_REQUEST_BYTES:
                    self._too_large(conn)
                    break
                if not conn.eof:
                    break  # wait for the rest of the line
                if not conn.inbuf:
                    conn.closing = True  # all answered: close once they are flushed
                    break
                end = len(conn.inbuf)  # `printf '{"op":"status"}' | socat ...` has no newline
            if answered >= _LINES_PER_PASS:
                self._ready.add(conn)
                break
            line = bytes(conn.inbuf[:end])
            del conn.inbuf[: end + 1]
            now = time.monotonic()
            conn.deadline = now + self._idle
            if len(line) > MAX_REQUEST_BYTES:
                self._too_large(conn)
                break
            answered += 1
            if not self._take_token(conn, now):
                self._queue(conn, _failure("rate_limited", "too many requests; slow down"))
                continue
            request, problem = _parse(line)
            if problem is not None or request is None:
                self._queue(conn, _failure("bad_request", problem or "bad request", request))
                continue
            self._submit(conn, request)
        self._update(conn)

    def _too_large(self, conn: _Conn) -> None:
        message = f"a request line is limited to {MAX_REQUEST_BYTES} bytes"
        self._queue(conn, _failure("request_too_large", message))
        conn.closing = True

    def _take_token(self, conn: _Conn, now: float) -> bool:
        conn.tokens = min(self._rate, conn.tokens + (now - conn.refilled) * self._rate)
        conn.refilled = now
        if conn.tokens < 1.0:
            return False
        conn.tokens -= 1.0
        return True

    def _submit(self, conn: _Conn, request: dict[str, object]) -> None:
        assert self._executor is not None
        try:
            self._executor.submit(self._call, conn, request)
        except RuntimeError:  # the executor is shutting down
            self._close(conn)
            return
        conn.busy = True

    def _collect(self) -> None:
        """Queue the answers the workers finished, and resume those connections."""
        while True:
            try:
                self._wake_r.recv(4096)
            except OSError:
                break
        while self._done:
            conn, payload = self._done.popleft()
            conn.busy = False
            if conn.closed:
                continue
            conn.deadline = time.monotonic() + self._idle
            self._queue(conn, payload)
            self._pump(conn)

    def _queue(self, conn: _Conn, payload: bytes) -> None:
        if conn.closed:
            return
        conn.outbuf += payload
        if len(conn.outbuf) > MAX_OUTPUT_BYTES:
            self._close(conn)  # it is not reading its answers
            return
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            del conn.outbuf[:sent]
        self._update(conn)

    def _update(self, conn: _Conn) -> None:
        """Close a finished connection, or watch exactly what it can make progress on."""
        if conn.closed:
            return
        if conn.closing and not conn.outbuf:
            self._close(conn)
            return
        want = 0
        if not (conn.busy or conn.eof or conn.closing or self._stopping or conn in self._ready):
            want |= selectors.EVENT_READ
        if conn.outbuf:
            want |= selectors.EVENT_WRITE
        if want == conn.events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, want, conn)
        elif want == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, want, conn)
        conn.events = want

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._conns if not c.busy and c.deadline <= now]:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()
        self._conns.discard(conn)
        self._ready.discard(conn)

    # -- worker threads -----------------------------------------------------------------------

    def _call(self, conn: _Conn, request: dict[str, object]) -> None:
        payload = _failure("internal_error", "the handler did not answer", request)
        try:
            response = dict(self._handler.handle(request))
            if "id" in request:
                response["id"] = request["id"]
            payload = _encode(response)
        except errors.AacTokendError as exc:
            payload = _failure(error_code(exc), str(exc), request)
        except Exception as exc:
            # str(exc) of a foreign exception might quote a token; its class name cannot.
            payload = _failure("internal_error", type(exc).__name__, request)
        finally:
            self._done.append((conn, payload))
            self._wake()
