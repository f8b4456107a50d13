"""One control-socket client as the control server's I/O thread sees it.

The bookkeeping of a connection (its buffers, deadlines, rate-limit bucket and the flags of
its life cycle) and the two questions asked of its socket or bucket; the server loop in
``control_server`` decides what to do with them.
"""

from __future__ import annotations

import select
import socket
from dataclasses import dataclass, field

__all__ = ["Conn", "hung_up"]


@dataclass(eq=False)
class Conn:
    """A client connection: buffers, deadlines and life-cycle flags (I/O thread only)."""

    sock: socket.socket
    deadline: float  # closed when idle past this, unless a request is in flight
    tokens: float  # rate-limit bucket
    refilled: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    progress: float = 0.0  # when outbuf was last empty or last shrank
    born: float = 0.0  # when it was accepted
    seen: bool = False  # it has had a read pass (see control_server._EVICT_GRACE)
    busy: bool = False  # a request is with the handler; later lines wait in inbuf
    eof: bool = False  # the peer shut down writing: answer complete lines, then close
    closing: bool = False  # close once outbuf is flushed
    closed: bool = False
    events: int = 0  # what the selector watches for this socket now

    def take_token(self, now: float, rate: float) -> bool:
        """Spend one request from the bucket (refilled at ``rate`` a second, ``rate`` deep)."""
        self.tokens = min(rate, self.tokens + (now - self.refilled) * rate)
        self.refilled = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def hung_up(sock: socket.socket) -> bool:
    """Return whether the peer closed its socket, not merely shut down its writing side.

    Both read as end-of-file; only a closed peer makes the kernel report POLLHUP, and a
    client that shut down writing (``nc -N``, ``socat``) still waits for its answers.
    """
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))
