"""HTTP connections that tell whether a request left: requests' adapter whose urllib3
connection classes report connect and send to the watcher of the calling thread.

Under rotation (the token endpoint) and under fencing (etcd) the one question about a failed
request is whether any byte of it was handed to the socket; ``requests``' exceptions cannot
answer it (see ``refresh.endpoint``). Used by ``refresh.endpoint`` and ``fleet.etcd_session``;
at the top, importing only requests and urllib3, so the spawned courier loads nothing of
``host`` or ``fleet`` through it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool

__all__ = ["WatchedAdapter", "Watcher", "watching"]


class Watcher(Protocol):
    """What a watched connection reports to, for the requests of one thread."""

    def watch(self, sock: object) -> None:
        """A socket exists (before the TLS handshake) or is connected; an OSError refuses it."""

    def sending(self, sock: object) -> None:
        """A byte of the request is about to go to ``sock``: from here it may have left."""


_current = threading.local()


def _watcher() -> Watcher | None:
    return getattr(_current, "watcher", None)


@contextlib.contextmanager
def watching(watcher: Watcher) -> Iterator[None]:
    """Report the watched connections this thread uses inside the block to ``watcher``."""
    previous = _watcher()
    _current.watcher = watcher
    try:
        yield
    finally:
        _current.watcher = previous


class _WatchedMixin:
    """Reports connect and send to the current watcher (a proxy's CONNECT is not a send)."""

    _connecting = False

    def connect(self) -> None:
        self._connecting = True  # a proxy's CONNECT goes through send(): not the request
        try:
            super().connect()  # type: ignore[misc]
        finally:
            self._connecting = False
        if (watcher := _watcher()) is not None:
            watcher.watch(self.sock)  # type: ignore[attr-defined]

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        if (watcher := _watcher()) is not None:
            try:
                watcher.watch(sock)  # a watchdog can cut the TLS handshake too
            except OSError:
                sock.close()
                raise
        return sock

    def send(self, data: Any) -> None:
        if self.sock is None and not self._connecting:  # type: ignore[attr-defined]
            self.connect()  # http.client connects lazily inside send: not a send yet
        if (watcher := _watcher()) is not None and not self._connecting:
            watcher.sending(self.sock)  # type: ignore[attr-defined]
        super().send(data)  # type: ignore[misc]


class _HTTPConnection(_WatchedMixin, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_WatchedMixin, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter with the watched connection classes (SOCKS proxies excepted)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = _POOLS
        return manager
