"""Stdlib-only clients of the daemon's sockets, cheap enough for the `token` command.

``ask_daemon`` and ``need_daemon`` are the one way to the control socket: the commands
and the Python API (``api``) both use them, so a refusal, a hung daemon or a missing one
ends the same way (the same exception, the same exit status) whichever asked.

A shell prompt calling `aac-tokend token` pays every import on every call, so this module
imports only ``_socket``, the C core of ``socket``: measured with ``python -S -X
importtime``, ``import socket`` costs about 8 ms cold (it pulls in enum, selectors and
array), ``import _socket`` about 0.5 ms, and the C socket type has every method used here.
``json`` (which pulls in ``re``, several ms more) is imported when ControlClient first
sends a request; ``pathlib`` is not used at all.
"""

from __future__ import annotations

import _socket
import time  # built into the interpreter: no import cost

# Not `from typing import TYPE_CHECKING`: importing typing alone costs milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, Self

__all__ = [
    "ANSWER_FIELDS",
    "FAST_TIMEOUT_SECONDS",
    "QUICK_OPS",
    "READ_ONLY_OPS",
    "READ_TIMEOUT_SECONDS",
    "WAIT_TIMEOUT_SECONDS",
    "ControlClient",
    "ask_daemon",
    "format_token",
    "need_daemon",
    "read_token",
]

#: Ops the daemon answers from memory at once (~20 ms for a thousand profiles): past this
#: it is hung or swamped, and a monitor's `status --check` must not hang with it. The
#: others may wait for a refresh (a courier's own bound is 50 s) or a profile's lock.
READ_ONLY_OPS = frozenset({"status", "profiles", "token"})
#: Ops bound by READ_TIMEOUT_SECONDS: the read-only ones, and reload and shutdown, which
#: the daemon acknowledges at once and carries out after answering.
QUICK_OPS = READ_ONLY_OPS | {"reload", "shutdown"}
#: One budget for the whole request: connect, send and every read (a daemon trickling a
#: byte at a time cannot stretch it); `token` and get_token() spend it across the token
#: socket (at most FAST_TIMEOUT_SECONDS of it) and the control socket.
READ_TIMEOUT_SECONDS = 5.0
FAST_TIMEOUT_SECONDS = 2.0
WAIT_TIMEOUT_SECONDS = 120.0

#: What each op's answer must hold for a client to use it: (field, type) pairs. Checked in
#: one place (``ask_daemon``), so a daemon of another version or a foreign server sending
#: valid JSON of another shape is one line, not a KeyError deep in a command.
ANSWER_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    "token": (("token", str),),
    "status": (("profiles", list),),
    "profiles": (("profiles", list),),
    "refresh": (("profile", dict),),
    "import": (("changed", bool),),
    "remove": (("removed", str),),
}

# Answers larger than this are refused: a status of a thousand profiles is a few hundred
# KiB, so this only stops a runaway or foreign server from filling our memory.
_MAX_ANSWER_BYTES = 16 * 1024 * 1024

_RECV_SIZE = 64 * 1024  # a token (< 8 KiB) or a typical answer arrives in one read


# While the listen queue is full, a connect with a timeout fails at once with EAGAIN (a
# non-blocking AF_UNIX connect does not wait for room); it is retried after this pause,
# doubled up to the cap, until the timeout. The daemon empties its queue in microseconds, so
# the first pause is short, and the cap keeps a wait for a busy daemon from oversleeping.
_RETRY_FIRST = 0.0005
_RETRY_CAP = 0.02


def _remaining(deadline: float) -> float:
    """Seconds left before ``deadline`` (time.monotonic()); TimeoutError when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the daemon did not answer in time")
    return left


def _connect(sock: _socket.socket, path: str, deadline: float) -> None:
    """Connect ``sock`` to ``path`` before ``deadline``, waiting out a full listen queue."""
    pause = _RETRY_FIRST
    while True:
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(path)
            return
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the socket {path} stayed too busy to connect") from None
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, _RETRY_CAP)


def read_token(path: str, timeout: float = FAST_TIMEOUT_SECONDS, *, deadline: float = 0.0) -> str:
    """Return the token served on ``path``, or "" when the daemon has no valid token.

    One deadline bounds the whole read: ``timeout`` from now, or ``deadline``
    (time.monotonic()) if that comes first. Raises OSError when no daemon listens
    (FileNotFoundError, ConnectionRefusedError), TimeoutError past the deadline (a full
    listen queue is waited out until then), and ConnectionError when the answer is cut
    short or is not one ASCII line.
    """
    until = time.monotonic() + timeout
    if deadline:
        until = min(until, deadline)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        _connect(sock, path, until)
        sock.settimeout(_remaining(until))
        data = sock.recv(_RECV_SIZE)
        if data and not data.endswith(b"\n"):  # in pieces: read to the end
            chunks, size = [data], len(data)
            while size <= _MAX_ANSWER_BYTES:  # past it, malformed below: no token is this long
                sock.settimeout(_remaining(until))
                if not (chunk := sock.recv(_RECV_SIZE)):
                    break
                chunks.append(chunk)
                size += len(chunk)
            data = b"".join(chunks)
    finally:
        sock.close()
    if not data:
        return ""
    if not data.endswith(b"\n") or data.count(b"\n") != 1 or not data.isascii():
        raise ConnectionError(f"the token socket {path} sent a malformed answer; try again")
    return data[:-1].decode("ascii")


def format_token(token: str, form: str = "plain") -> str:
    """The line(s) ``aac-tokend token`` prints: the token, a header, or a curl config.

    ``header`` is for ``curl -H @-`` (curl 7.55+); ``curl-config`` is for ``curl -K -``,
    which every curl reads. Either way the token reaches curl on stdin, never in its argv.
    """
    if form == "header":
        return f"Authorization: Bearer {token}\n"
    if form == "curl-config":
        # curl's config syntax: inside double quotes, backslash escapes \\ and \".
        quoted = token.replace("\\", "\\\\").replace('"', '\\"')
        return f'header = "Authorization: Bearer {quoted}"\n'
    return token + "\n"


class ControlClient:
    """A connection to the control socket: one JSON line out, one JSON line back.

    Each request has one deadline, ``timeout`` from its start (and never past ``deadline``,
    time.monotonic(), when given): connect, send and every read share it.
    """

    def __init__(self, path: str, timeout: float = 30.0, *, deadline: float = 0.0) -> None:
        self._timeout = timeout
        self._until = deadline
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            _connect(self._sock, path, self._deadline())
        except BaseException:
            self._sock.close()
            raise
        self._buf = bytearray()

    def _deadline(self) -> float:
        until = time.monotonic() + self._timeout
        return min(until, self._until) if self._until else until

    def request(self, op: str, **fields: object) -> dict[str, object]:
        """Send one request and return its response object.

        Raises OSError on socket failures (ConnectionError when the daemon hangs up first,
        TimeoutError past the deadline) and ValueError when the answer is not a JSON object.
        """
        import json  # deferred: see the module docstring

        deadline = self._deadline()
        line = json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n"
        self._sock.settimeout(_remaining(deadline))
        self._sock.sendall(line)
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > _MAX_ANSWER_BYTES:
                raise ValueError("the control socket answer is too large")
            self._sock.settimeout(_remaining(deadline))
            chunk = self._sock.recv(_RECV_SIZE)
            if not chunk:
                raise ConnectionError("the daemon closed the control connection before answering")
            self._buf += chunk
        answer = bytes(self._buf[:end])
        del self._buf[: end + 1]
        try:
            response = json.loads(answer)
        except RecursionError:
            raise ValueError("the control socket answer is nested too deeply") from None
        if not isinstance(response, dict):
            raise ValueError("the control socket answer is not a JSON object")
        return response

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def ask_daemon(
    path: str, op: str, *, deadline: float = 0.0, **fields: object
) -> dict[str, Any] | None:
    """The daemon's answer to one request on the control socket ``path``; None when no
    daemon listens there.

    A refusal raises the exception its code names (``errors.from_wire``); a daemon that does
    not answer within the op's time (QUICK_OPS: READ_TIMEOUT_SECONDS; never past
    ``deadline``, time.monotonic(), when given) or hangs up before answering (stopping or
    restarting) raises TransientError; an answer without the fields ANSWER_FIELDS names,
    or any other failure to talk to it, AacTokendError.
    """
    from .errors import AacTokendError, TransientError, from_wire  # not on the fast path

    timeout = READ_TIMEOUT_SECONDS if op in QUICK_OPS else WAIT_TIMEOUT_SECONDS
    try:
        with ControlClient(path, timeout=timeout, deadline=deadline) as client:
            answer = client.request(op, **fields)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except TimeoutError as exc:
        raise TransientError(
            f"the daemon at {path} did not answer {op!r} within {timeout:.0f} s "
            "(overloaded or hung); try again, and if it persists restart the daemon"
        ) from exc
    except ConnectionError as exc:  # reset, broken pipe, closed before answering
        raise TransientError(
            f"the daemon at {path} hung up before answering {op!r} (restarting?); try again"
        ) from exc
    except (OSError, ValueError) as exc:
        from pathlib import Path  # imported already by whoever found ``path``

        from .serve.unixsock import check_path_length

        check_path_length(Path(path))  # too long to connect to: `run`'s words and status (65)
        raise AacTokendError(f"cannot talk to the daemon at {path}: {exc}") from exc
    if not answer.get("ok"):
        code = str(answer.get("code", "error"))
        raise from_wire(code, str(answer.get("message", code)))
    for field, kind in ANSWER_FIELDS.get(op, ()):
        if not isinstance(answer.get(field), kind):
            raise AacTokendError(
                f"the daemon's answer to {op!r} lacks {field!r} (a {kind.__name__}); "
                "is it another version? restart it"
            )
    return answer


def need_daemon(path: str, op: str, *, deadline: float = 0.0, **fields: object) -> dict[str, Any]:
    """``ask_daemon``, for a request only a running daemon can answer
    (DaemonNotRunningError, exit 4, without one)."""
    answer = ask_daemon(path, op, deadline=deadline, **fields)
    if answer is None:
        from .errors import DaemonNotRunningError

        raise DaemonNotRunningError(
            f"the daemon is not running (no {path}); start it with `aac-tokend run`"
        )
    return answer
