"""A host's link to etcd in the fleet campaign: a loopback TCP proxy per member, cuttable.

``Link`` is one host's state, shared by its proxies (one per etcd member, so that the host
can still fail over between members): ``cut()`` makes every connection a black hole, as a
partition does (nothing is forwarded either way and nothing is refused: the host's calls run
into their own timeouts), ``heal()`` resets the connections that lived through the cut (their
peers have long given up) and lets new ones through, and ``drop_writes(n)`` drops etcd's reply
to the host's next ``n`` writes after etcd applied them (a transaction or put, then the
connection reset: an outcome unknown to the host). etcd_cluster's ReplyDroppingProxy drops
every reply; this one drops chosen ones and passes the rest.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

__all__ = ["CutProxy", "Link"]

#: How often a relay looks at its link's state: a cut must take effect within a small part
#: of the lease TTL (2 s) for a cut "between commit and send" to mean what it says.
_TICK_SECONDS = 0.02
#: The requests whose replies ``drop_writes`` drops: writes, whose effect is what is unknown.
_WRITES = (b"POST /v3/kv/txn", b"POST /v3/kv/put", b"POST /v3/kv/deleterange")


class Link:
    """One host's link state: cut or not, and how many write replies are still to drop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cut = False
        self._epoch = 0  # bumped by every cut: connections from before are reset on heal
        self._drops = 0
        self.dropped = 0

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def epoch(self) -> int:
        return self._epoch

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            self._epoch += 1

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def drop_writes(self, count: int) -> None:
        """Drop etcd's replies to the next ``count`` writes (after etcd applied them)."""
        with self._lock:
            self._drops += count

    def take_drop(self) -> bool:
        """True (and one fewer to drop) if this reply is to be dropped."""
        with self._lock:
            if self._drops <= 0:
                return False
            self._drops -= 1
            self.dropped += 1
            return True


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a dying member or a middlebox leaves a connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _stop_listening(listener: socket.socket) -> None:
    """Close a listener that a thread is blocked on in accept(): close() alone would leave it
    listening until that accept returns; shutdown() wakes it and stops the listening now."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()


class CutProxy:
    """A loopback TCP proxy to one etcd member, obeying its host's ``Link``."""

    def __init__(self, upstream_port: int, link: Link) -> None:
        self.upstream_port = upstream_port
        self.link = link
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._serve, args=(self.listener,), daemon=True).start()

    def refuse(self) -> None:
        """Stop listening while the member is down: a dead member refuses connections, so
        the host's client knows nothing was sent and fails over (an accepted connection
        reset after the request would be an unknown outcome that etcd never caused)."""
        _stop_listening(self.listener)

    def accept_again(self) -> None:
        """Listen again on the same port (the member is back)."""
        if self.listener.fileno() == -1:
            self.listener = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._serve, args=(self.listener,), daemon=True).start()

    @property
    def url(self) -> str:
        """The proxy's URL, one of the host's etcd endpoints."""
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        epoch = self.link.epoch
        up: socket.socket | None = None
        last_request = b""
        try:
            while not self._closed.is_set():
                if self.link.is_cut or self.link.epoch != epoch:
                    if not self.link.is_cut:
                        return  # healed: this connection lived through a cut
                    self._closed.wait(_TICK_SECONDS)  # a black hole: read nothing, send nothing
                    continue
                if up is None:
                    up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
                ready, _, _ = select.select([client, up], [], [], _TICK_SECONDS)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        return
                    if data.startswith(b"POST "):
                        last_request = data
                    up.sendall(data)
                if up in ready:
                    if last_request.startswith(_WRITES) and self.link.take_drop():
                        return  # etcd answered (so applied it): the reply is lost
                    last_request = b""
                    data = up.recv(65536)
                    if not data:
                        return
                    client.sendall(data)
        except OSError:
            return
        finally:
            _reset(client)
            if up is not None:
                _reset(up)

    def close(self) -> None:
        """Stop accepting; relays end at their next tick."""
        self._closed.set()
        _stop_listening(self.listener)
