"""A fake daemon for client-side tests: a real Unix socket whose answers a test scripts.

Shared by the client's tests and the CLI contract's: each connection is handed to the
test's ``behaviour`` (a callable on the accepted socket), then closed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

#: Generous: only a stalled machine gets near it.
JOIN_WAIT = 10.0


class FakeDaemon:
    """Listens on a real Unix socket at ``path``; ``behaviour`` handles each connection."""

    def __init__(self, path: Path, behaviour: Callable[[socket.socket], None]) -> None:
        self.path = path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(16)
        self._behaviour = behaviour
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self._behaviour(conn)

    def close(self) -> None:
        """Stop listening and wait for the serving thread."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(JOIN_WAIT)
