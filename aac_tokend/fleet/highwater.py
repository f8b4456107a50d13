"""The highest generation this host has seen per fleet profile: a rollback is refused.

etcd restored from a snapshot, or a stale member's answer, could hand back an older state
whose refresh token was already spent; presenting it would revoke the chain. Each host keeps
its own marks in a small local file (``fleet-NAME.highwater`` in the state directory: atomic,
durable, 0600) that etcd's operator cannot touch, and refuses any generation below them.

A mark only rises. A missing file is a host that has seen nothing yet; a file that exists
but cannot be read is an error, never a reset to zero (that would re-admit every rollback).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from ..errors import BusyError, RollbackError, StateCorruptError, StorageError
from ..store.fileio import (
    FileLayer,
    OsFileLayer,
    ensure_private_dir,
    flock_within,
    open_lock_file,
    read_regular_file,
)

__all__ = ["HighWater"]

FORMAT = 1
#: A mark file holds a line per profile; a megabyte is not ours.
MAX_MARK_BYTES = 1 << 20
#: Raising a mark is a few milliseconds of I/O; a holder that keeps the lock this long is
#: stopped or wedged, and the caller retries later rather than hanging with it.
LOCK_TIMEOUT_SECONDS = 5.0
#: Polling step while the lock is held elsewhere: invisible to a person, not a spin.
LOCK_POLL_SECONDS = 0.01
_MAX_GENERATION = 2**63 - 1


class HighWater:
    """The marks of one fleet on this host, in ``state_dir/fleet-<fleet>.highwater``.

    ``fleet`` is a validated fleet name (``settings.py`` restricts its characters), so it is
    safe in a file name.
    """

    def __init__(self, state_dir: Path, fleet: str, fs: FileLayer | None = None) -> None:
        self._dir = state_dir
        self._fleet = fleet
        self._fs = fs or OsFileLayer()
        self.path = state_dir / f"fleet-{fleet}.highwater"
        self._lock_path = state_dir / f".fleet-{fleet}.highwater.lock"
        self._thread_lock = threading.Lock()  # flock is per open file, not per thread

    def mark(self, profile: str) -> int:
        """The highest generation seen for ``profile`` (0 if none)."""
        return self._read().get(profile, 0)

    def check(self, profile: str, generation: int) -> None:
        """Refuse a generation below the mark (RollbackError); equal or above is fine."""
        seen = self.mark(profile)
        if generation < seen:
            raise RollbackError(
                f"fleet {self._fleet!r} profile {profile!r}: etcd holds generation {generation} "
                f"but this host has seen {seen}, a rollback (etcd restored from a snapshot?) "
                "that could bring a spent refresh token back; nothing was used: restore etcd's "
                "latest data or import a new token pair into the fleet"
            )

    def note(self, profile: str, generation: int) -> None:
        """Raise the mark of ``profile`` to ``generation``, durably; never lowers it."""
        if not 0 <= generation <= _MAX_GENERATION:
            raise ValueError(f"a generation is from 0 to {_MAX_GENERATION}")
        with self._locked():
            marks = self._read()
            if generation <= marks.get(profile, 0):
                return
            self._write({**marks, profile: generation})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Threads of one process take the thread lock; processes (daemon, courier) the flock.
        if not self._thread_lock.acquire(timeout=LOCK_TIMEOUT_SECONDS):
            raise self._busy()
        try:
            ensure_private_dir(self._dir)
            try:
                fd = open_lock_file(self._lock_path)
            except OSError as exc:
                raise StorageError(
                    f"cannot open the lock file {self._lock_path}: {exc.strerror}"
                ) from exc
            try:
                if not flock_within(fd, LOCK_TIMEOUT_SECONDS, LOCK_POLL_SECONDS):
                    raise self._busy()
                yield
            finally:
                os.close(fd)
        finally:
            self._thread_lock.release()

    def _busy(self) -> BusyError:
        return BusyError(
            f"{self.path.name}: another process is raising a generation mark; try again shortly"
        )

    def _read(self) -> dict[str, int]:
        try:
            data, _ = read_regular_file(self.path, MAX_MARK_BYTES + 1, follow_symlinks=False)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StorageError(
                f"cannot read the generation marks {self.path}: {exc.strerror} (a symlink is "
                "never followed); fix the file's permissions"
            ) from exc
        marks = self._parse(data)
        if marks is None:
            raise StateCorruptError(
                f"the generation marks {self.path} are damaged; they are not reset (that would "
                "let a rollback through): restore the file from a backup, or if etcd's data is "
                "known to be current, move it aside"
            )
        return marks

    def _parse(self, data: bytes) -> dict[str, int] | None:
        if len(data) > MAX_MARK_BYTES:
            return None
        try:
            doc = json.loads(data)
        except ValueError:  # also UnicodeDecodeError
            return None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return None
        if doc.get("fleet") != self._fleet or set(doc) != {"format", "fleet", "marks"}:
            return None
        marks = doc["marks"]
        if not isinstance(marks, dict) or not all(_is_generation(v) for v in marks.values()):
            return None
        return dict(marks)

    def _write(self, marks: Mapping[str, int]) -> None:
        doc = {"format": FORMAT, "fleet": self._fleet, "marks": dict(sorted(marks.items()))}
        data = json.dumps(doc, indent=1).encode() + b"\n"
        tmp = self._dir / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            try:
                self._fs.write_durably(tmp, data)
                self._fs.rename(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)  # after a failure; after the rename it is gone
            self._fs.fsync_dir(self._dir)
        except OSError as exc:
            raise StorageError(
                f"cannot save the generation marks {self.path}: {exc.strerror}; free space or "
                "fix the disk (the previous marks are kept)"
            ) from exc


def _is_generation(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_GENERATION
