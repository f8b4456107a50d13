"""The control socket: JSON lines in, JSON lines out, answers in request order.

One I/O thread owns every socket (non-blocking, in a selector); handler calls run on a
small thread pool, and the ops that wait (a refresh) on threads of their own, so a slow
refresh, a client that sends nothing, or one that floods never delays anyone else. Each
connection has bounded input (one line at a time, at most MAX_REQUEST_BYTES), bounded output
(MAX_OUTPUT_BYTES), a request rate and an idle timeout.

No request can wedge a connection: ``wire.parse_request`` refuses what no answer could echo
or no handler should see (nesting past MAX_DEPTH, NaN, lone surrogates, an ``id`` past
MAX_ID_BYTES) and encodes the ``id`` once; ``_respond`` turns any handler result or
exception into one encodable line. A client that hangs up is dropped at once, and a new
client takes the slot of the longest-idle one when all MAX_CONNECTIONS are taken.

Longer than 300 lines: the server is one state machine on one thread (accept, read, queue,
flush, evict, expire and drain share the connection set and the selector), and every limit
above it is explained where it is set; cut apart, its invariants would be read in pieces.
The wire format is in ``wire``, a connection's bookkeeping in ``connection``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aac_tokend import errors
from aac_tokend.serve.connection import Conn, hung_up
from aac_tokend.serve.unixsock import adopt_listener, bind_listener, peer_uid
from aac_tokend.serve.wire import MAX_DEPTH, MAX_ID_BYTES, ControlHandler, parse_request

# Under the names _respond used before the wire format moved out, so the error-map change
# that rewrites _respond and its error_code merges cleanly; _respond joins wire.py after it.
from aac_tokend.serve.wire import answer as _answer
from aac_tokend.serve.wire import failure as _failure

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_DEPTH",
    "MAX_ID_BYTES",
    "MAX_OUTPUT_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_WAITING",
    "OUTPUT_STALL_TIMEOUT",
    "RATE_LIMIT",
    "ControlHandler",
    "ControlServer",
]

# The largest legitimate request is an import of a token pair: an access JWT and a refresh
# token, a few KiB each. 64 KiB leaves ample room and bounds what a client can make us hold.
MAX_REQUEST_BYTES = 64 * 1024

# A connection with no complete request for this long is closed: CLI commands send their
# request at once, so only a stuck or hostile client stays this quiet.
IDLE_TIMEOUT = 30.0

# A connection is never evicted before its first read pass, unless it has said nothing for
# this long: an accept burst takes up to MAX_CONNECTIONS connections before any is read, and
# a connect-and-hang-up flood in it must not push out a client whose request is waiting to
# be read. A CLI client sends within a millisecond of connecting.
_EVICT_GRACE = 0.5

# Requests per second per connection, and the burst allowed: far above what a person or a
# status poller needs, low enough that one looping client cannot monopolise the handlers.
RATE_LIMIT = 50.0

# Every CLI command uses one short connection; 64 leaves room for monitors and scripts while
# bounding the descriptors and buffers a runaway script can pin.
MAX_CONNECTIONS = 64

# Requests of the ops named in ``waiting_ops`` (a refresh waits for the token endpoint, an
# import or remove for the profile lock a refresh holds: up to a minute) run on threads of
# their own, never on the shared workers, so status, token and profiles never queue behind
# them. One per connection would do, but a request whose client hung up still runs to its
# end (a refresh may be writing its journal) while the slot goes to a new client; this bound
# keeps such leftovers from adding threads without end (the excess waits its turn).
MAX_WAITING = MAX_CONNECTIONS

# No further request of a connection is read while this much of its answers is unsent: a
# client that pipelines without reading is slowed to its own reading pace instead of making
# us queue for it. Answers are small (an import's is under 2 KiB); the largest, a status of
# a thousand profiles, is about 600 KiB (measured: ~570 bytes a profile) and is queued
# whole, so what one connection pins stays under one such answer plus this.
MAX_OUTPUT_BYTES = 64 * 1024

# A connection whose queued answers make no progress (not one byte taken) for this long is
# closed: a client that stopped reading. A reader on this machine takes its answer in
# microseconds; a suspended `less` is not worth holding a slot for.
OUTPUT_STALL_TIMEOUT = 5.0

# ... and after this long without progress it is already fair game for a newcomer, like an
# idle one: 64 clients that never read cannot hold every slot even for OUTPUT_STALL_TIMEOUT.
_STALL_EVICTABLE = 0.5

_RECV_SIZE = 64 * 1024  # one read per readiness event, so one client cannot hog the loop
_LINES_PER_PASS = 32  # answered-inline lines (errors) per connection before others get a turn
_ACCEPT_ERROR_PAUSE = 0.01  # see token_server: a readable listener at EMFILE would spin
_STOP_TIMEOUT = 2.0  # stop() waits this long for the I/O thread: a drain plus ample margin

# On stop, answers already computed (or finishing now: a `shutdown` request's own answer
# races with the stop it triggers) get this long to reach their clients. Short, so a slow
# handler cannot hold up the exit.
_DRAIN_TIMEOUT = 0.5


def _respond(handler: ControlHandler, request: dict[str, object], echo: bytes) -> bytes:
    """Return the answer line to ``request``; whatever the handler does, never raises."""
    try:
        return _answer(handler.handle(request), echo)
    except errors.AacTokendError as exc:
        try:
            message = str(exc)
        except Exception:
            message = type(exc).__name__
        return _failure(exc.code, message, echo)  # the wire code is the class's (errors.py)
    except Exception as exc:
        # str(exc) of a foreign exception might quote a token; its class name cannot.
        return _failure("internal_error", type(exc).__name__, echo)


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
        waiting_ops: Collection[str] = (),
        idle_timeout: float = IDLE_TIMEOUT,
        rate_limit: float = RATE_LIMIT,
    ) -> None:
        self.path = path
        self._handler = handler
        self._uid = os.getuid() if uid is None else uid
        self._inherited = listener
        self._workers = workers
        self._waiting_ops = frozenset(waiting_ops)
        self._idle = idle_timeout
        self._rate = rate_limit
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._executor: ThreadPoolExecutor | None = None
        self._waiters: ThreadPoolExecutor | None = None  # for waiting_ops, see MAX_WAITING
        self._conns: set[Conn] = set()
        self._ready: set[Conn] = set()  # complete lines left over for the next pass
        self._done: deque[tuple[Conn, bytes]] = deque()  # filled by workers
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._held_back = False  # the listener is out of the selector: see _hold_back
        self._resume_at = 0.0
        #: connections closed at once: foreign uid, or over MAX_CONNECTIONS with none idle
        self.rejected = 0
        #: idle connections closed to make room for a new one
        self.evicted = 0

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
        self._waiters = ThreadPoolExecutor(MAX_WAITING, thread_name_prefix="control-wait")
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
        for executor in (self._executor, self._waiters):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)

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
                if self._held_back and time.monotonic() >= self._resume_at:
                    self._resume_accepting()
            self._drain()
        finally:
            self._shutdown()

    def _drain(self) -> None:
        """Deliver answers finishing within _DRAIN_TIMEOUT; read and start nothing new."""
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        if self._listener is not None and not self._held_back:
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
        deadlines += [c.progress + OUTPUT_STALL_TIMEOUT for c in self._conns if c.outbuf]
        if self._held_back:
            deadlines.append(self._resume_at)
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
            full = len(self._conns) >= MAX_CONNECTIONS
            if full and not self._evictable() and self._hold_back():
                return  # newcomers wait in the listen queue until a slot frees up
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                time.sleep(_ACCEPT_ERROR_PAUSE)
                return
            try:
                allowed = peer_uid(sock) == self._uid and self._make_room()
            except OSError:
                allowed = False
            if not allowed:
                self.rejected += 1
                sock.close()
                continue
            sock.setblocking(False)
            now = time.monotonic()
            conn = Conn(sock, deadline=now + self._idle, tokens=self._rate, refilled=now, born=now)
            self._conns.add(conn)
            self._update(conn)

    def _hold_back(self) -> bool:
        """With every slot taken, stop accepting while some connection is not yet read.

        Such a connection is soon either served or gone (a connect-and-hang-up flood reads
        as end-of-file at its first read pass), so the newcomer waits in the listen queue
        for its slot instead of being refused. Accepting resumes when a connection closes,
        or when the oldest unread one reaches _EVICT_GRACE and may be evicted.
        """
        unread = [c.born for c in self._conns if not (c.seen or c.busy)]
        if not unread:
            return False  # every slot is at work: refusing the newcomer is all we can do
        if not self._held_back:
            assert self._listener is not None
            self._selector.unregister(self._listener)
            self._held_back = True
        self._resume_at = min(unread) + _EVICT_GRACE
        return True

    def _resume_accepting(self) -> None:
        if self._held_back and not self._stopping:
            assert self._listener is not None
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTEN)
            self._held_back = False

    def _make_room(self) -> bool:
        """Return whether a new connection fits, closing the longest-idle one if need be.

        Otherwise 64 clients that connect and say nothing would lock every other client out
        for IDLE_TIMEOUT. A connection with a request in flight, or with answers its client
        is taking, is never taken: it is doing work, which its handler's own time bounds.
        One whose answers have not moved for _STALL_EVICTABLE is not reading: it counts as
        idle. One not yet read is not idle (see _EVICT_GRACE): the newcomer is refused.
        """
        if len(self._conns) < MAX_CONNECTIONS:
            return True
        idle = self._evictable()
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.deadline))  # earliest deadline: idle longest
        self.evicted += 1
        return True

    def _evictable(self) -> list[Conn]:
        """The connections _make_room may close: idle, read at least once (or silent past
        _EVICT_GRACE), and not in the middle of taking their answers."""
        now = time.monotonic()
        return [
            c
            for c in self._conns
            if not c.busy
            and (c.seen or c.born <= now - _EVICT_GRACE)
            and (not c.outbuf or c.progress <= now - _STALL_EVICTABLE)
        ]

    def _on_ready(self, conn: Conn, mask: int) -> None:
        if conn.closed:
            return  # closed earlier in this batch of events
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            conn.seen = True
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
                if conn.busy and hung_up(conn.sock):
                    # Nobody is left to read the answer: free the slot now, not when the
                    # handler returns (a refresh can take a minute). Its answer is dropped.
                    self._close(conn)
                    return
            self._pump(conn)

    def _pump(self, conn: Conn) -> None:
        """Handle complete lines until one goes to the handler, then fix the interest set."""
        answered = 0
        while not (conn.busy or conn.closing or conn.closed or self._stopping):
            if len(conn.outbuf) > MAX_OUTPUT_BYTES:
                break  # it is not reading its answers: read no more until it does (_flush)
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
            # Parsed before the rate check, so a rate_limited answer echoes its id too: the
            # parse is linear and C-speed, costing no more than reading the line did.
            request, echo, problem = parse_request(line)
            if not conn.take_token(now, self._rate):
                self._queue(conn, _failure("rate_limited", "too many requests; slow down", echo))
                continue
            if problem is not None or request is None:
                self._queue(conn, _failure("bad_request", problem or "bad request", echo))
                continue
            self._submit(conn, request, echo)
        self._update(conn)

    def _too_large(self, conn: Conn) -> None:
        message = f"a request line is limited to {MAX_REQUEST_BYTES} bytes"
        self._queue(conn, _failure("request_too_large", message))
        conn.closing = True

    def _submit(self, conn: Conn, request: dict[str, object], echo: bytes) -> None:
        pool = self._waiters if request["op"] in self._waiting_ops else self._executor
        assert pool is not None
        try:
            pool.submit(self._call, conn, request, echo)
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

    def _queue(self, conn: Conn, payload: bytes) -> None:
        if conn.closed:
            return
        if not conn.outbuf:
            conn.progress = time.monotonic()
        conn.outbuf += payload
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent:
                del conn.outbuf[:sent]
                conn.progress = time.monotonic()
                if len(conn.outbuf) <= MAX_OUTPUT_BYTES and conn.inbuf and not conn.busy:
                    self._ready.add(conn)  # lines held back by _pump while output was full
        self._update(conn)

    def _update(self, conn: Conn) -> None:
        """Close a finished connection, or watch exactly what it can make progress on."""
        if conn.closed:
            return
        if conn.closing and not conn.outbuf:
            self._close(conn)
            return
        want = 0
        # While busy, read on (up to one request's worth, so memory stays bounded) only to
        # see the end of the stream: a client that hangs up mid-request is noticed at once.
        reading = (not conn.busy or len(conn.inbuf) <= MAX_REQUEST_BYTES) and len(
            conn.outbuf
        ) <= MAX_OUTPUT_BYTES
        if reading and not (conn.eof or conn.closing or self._stopping or conn in self._ready):
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
        stalled = now - OUTPUT_STALL_TIMEOUT
        for conn in [
            c
            for c in self._conns
            if (not c.busy and c.deadline <= now) or (c.outbuf and c.progress <= stalled)
        ]:
            self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self._selector.unregister(conn.sock)
            conn.events = 0
        conn.sock.close()
        self._conns.discard(conn)
        self._ready.discard(conn)
        self._resume_accepting()  # a slot is free

    # -- worker threads -----------------------------------------------------------------------

    def _call(self, conn: Conn, request: dict[str, object], echo: bytes) -> None:
        if conn.closed:
            # Its client hung up while this waited for a worker: nobody is left to answer,
            # and running it would keep the clients still connected waiting for nothing.
            return
        # _respond never raises an Exception; the finally frees the connection even if a
        # BaseException (a handler's SystemExit) escapes, so it cannot stay busy forever.
        payload = _failure("internal_error", "the handler did not answer", echo)
        try:
            payload = _respond(self._handler, request, echo)
        finally:
            self._done.append((conn, payload))
            self._wake()
