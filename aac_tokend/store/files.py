"""The encrypted, durable state store: one AES-GCM file per profile.

Writes are atomic and durable: a temp file in the same directory, fsync, rename over the
old file, fsync of the directory. A crash at any instant leaves either the old or the new
complete file. A file that cannot be decrypted is reported and never overwritten.

File format: ``MAGIC | nonce (12) | AES-GCM(key, nonce, state JSON, aad=MAGIC|profile)``.
The profile name is authenticated, so swapping two profiles' files is detected.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..core.state import ProfileState, state_from_json, state_to_json, validate_profile_name
from ..errors import BusyError, ProfileError, StateCorruptError, StorageError
from .fileio import FileLayer, OsFileLayer, ensure_private_dir, flock_within, open_lock_file
from .interface import StateStore
from .keyfile import KEY_BYTES, SUFFIX, load_or_create_key, stored_state_count
from .pending import PendingStore

# load_or_create_key and stored_state_count are re-exported: they lived here (keyfile.py).
__all__ = [
    "CRYPTO_LOCK",
    "SUFFIX",
    "FileStore",
    "FileStoreSpec",
    "hold_lock",
    "load_or_create_key",
    "stored_state_count",
]

MAGIC = b"AATK\x01"
NONCE_BYTES = 12
#: Polling step while waiting for a profile lock: short enough to be invisible to a
#: person, long enough not to spin.
LOCK_POLL_SECONDS = 0.02
#: Held around every AES-GCM call in the daemon and around every fork of a courier, so a
#: forked child never inherits an OpenSSL lock held by another thread (see courier.py).
CRYPTO_LOCK = threading.Lock()


@dataclass(frozen=True)
class FileStoreSpec:
    """How to open a FileStore in another process (a courier): small and serialisable.

    ``pending_dir`` is where outcomes the state disk refuses are kept (pending.py); ""
    for nowhere. The key never appears in a repr.
    """

    state_dir: str
    key: bytes = field(repr=False)
    pending_dir: str = ""

    def open(self, *, crypto_lock: threading.Lock | None = None) -> FileStore:
        """The store this spec names (``crypto_lock``: a forked child's fresh one)."""
        pending = PendingStore(Path(self.pending_dir)) if self.pending_dir else None
        return FileStore(Path(self.state_dir), self.key, crypto_lock=crypto_lock, pending=pending)

    def to_dict(self) -> dict[str, Any]:
        key = base64.b64encode(self.key).decode()
        return {"state_dir": self.state_dir, "key": key, "pending_dir": self.pending_dir}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileStoreSpec:
        key = base64.b64decode(data["key"])
        return cls(str(data["state_dir"]), key, str(data.get("pending_dir", "")))


class FileStore(StateStore):
    """Encrypted profile states in a 0700 directory, written atomically and durably."""

    def __init__(
        self,
        state_dir: Path,
        key: bytes,
        fs: FileLayer | None = None,
        *,
        crypto_lock: threading.Lock | None = None,
        pending: PendingStore | None = None,
    ) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("state key must be 32 bytes")
        self.state_dir = state_dir
        self.pending_store = pending
        self._lock = crypto_lock or CRYPTO_LOCK
        with self._lock:
            self._aead = AESGCM(key)
        self._fs = fs or OsFileLayer()
        ensure_private_dir(state_dir)

    def path(self, profile: str) -> Path:
        return self.state_dir / (validate_profile_name(profile) + SUFFIX)

    def where(self, profile: str) -> str:
        """The state file's path (of any name: a misnamed file is reported by it)."""
        return str(self.state_dir / (profile + SUFFIX))

    def seal(self, state: ProfileState) -> bytes:
        """The file content for a state (so a courier can hand it over unsaved)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = MAGIC + state.profile.encode()
        with self._lock:
            sealed = self._aead.encrypt(nonce, state_to_json(state), aad)
        return MAGIC + nonce + sealed

    def unseal(self, profile: str, blob: bytes, where: Path | None = None) -> ProfileState:
        """The state in a file's content; StateCorruptError if it is not ours or damaged.

        ``where`` names the file in errors (default: the profile's state file).
        """
        where = where or self.path(profile)
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + NONCE_BYTES + 16:
            raise StateCorruptError(
                f"state file {where} is not an aac-tokend state file; it was left untouched: "
                "move it aside and run `aac-tokend import` again"
            )
        nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            with self._lock:
                raw = self._aead.decrypt(
                    nonce, blob[len(MAGIC) + NONCE_BYTES :], MAGIC + profile.encode()
                )
        except InvalidTag as exc:
            raise StateCorruptError(
                f"state file {where} cannot be decrypted (damaged, or another key); it was "
                "left untouched: restore the key or move the file aside and import again"
            ) from exc
        state = state_from_json(raw)
        if state.profile != profile:
            raise StateCorruptError(f"state file {where} belongs to another profile")
        return state

    def load(self, profile: str) -> ProfileState | None:
        """The profile's state, None if it has none."""
        path = self.path(profile)
        try:
            blob = self._fs.read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StateCorruptError(
                    f"state file {path} is a symlink; it is never followed: remove it"
                ) from exc
            raise StorageError(
                f"cannot read state file {path}: {exc.strerror}; fix or replace it (a running "
                "daemon retries it every few seconds) or move it aside and import again"
            ) from exc
        return self.unseal(profile, blob)

    #: Until the offline commands move onto ``unseal`` (they read pending records with it).
    def save(self, state: ProfileState) -> None:
        """Replace the profile's state atomically and durably; never over a corrupt file."""
        self._write(state.profile, self.seal(state))

    def save_journal(self, journal: ProfileState) -> None:
        """A journal is a state like any other here: one process owns the directory."""
        self.save(journal)

    def _write(self, profile: str, blob: bytes) -> None:
        path = self.path(profile)
        try:
            existing = self._fs.read(path)
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise StorageError(f"cannot read state file {path}: {exc.strerror}") from exc
        if existing is not None:
            self.unseal(profile, existing)  # raises StateCorruptError: leave it untouched
        tmp = self.state_dir / f".{profile}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        renamed = False
        try:
            self._fs.write_durably(tmp, blob)
            self._fs.rename(tmp, path)
            renamed = True
            self._fs.fsync_dir(self.state_dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            # After the rename the new state is in place, only its durability is in doubt.
            kept = (
                "the new state may not survive a crash" if renamed else "the previous state is kept"
            )
            raise StorageError(
                f"cannot write state file {path}: {exc.strerror or exc}; {kept}"
            ) from exc

    def delete(self, profile: str) -> None:
        """Remove the profile's state (a missing profile is an error)."""
        path = self.path(profile)
        try:
            path.unlink()
            self._fs.fsync_dir(self.state_dir)
        except FileNotFoundError as exc:
            raise ProfileError(f"no profile named {profile!r}; see `aac-tokend profiles`") from exc
        except OSError as exc:
            raise StorageError(f"cannot remove {path}: {exc.strerror}") from exc

    def profiles(self) -> list[str]:
        """Names of the profiles that have a state file (StorageError: unreadable dir)."""
        try:
            with os.scandir(self.state_dir) as entries:
                names = [
                    entry.name[: -len(SUFFIX)]
                    for entry in entries
                    if entry.name.endswith(SUFFIX) and not entry.name.startswith(".")
                ]
        except OSError as exc:
            raise StorageError(f"cannot list {self.state_dir}: {exc.strerror}") from exc
        return sorted(names)

    def listing_stamp(self) -> int:
        """The state directory's mtime_ns: it changes when a state file comes or goes."""
        try:
            return os.stat(self.state_dir).st_mtime_ns
        except OSError as exc:
            raise StorageError(f"cannot read {self.state_dir}: {exc.strerror}") from exc

    @contextlib.contextmanager
    def locked(self, profile: str, timeout: float) -> Iterator[None]:
        """Hold the profile's refresh lock (a courier holds it for its whole life)."""
        with hold_lock(self.state_dir / f"{validate_profile_name(profile)}.lock", timeout):
            yield

    # -- outcomes the state disk refused: kept by the PendingStore, if given one ---------
    def keep_pending(self, profile: str, blob: bytes) -> None:
        """Keep a sealed outcome in the pending directory (nowhere without one)."""
        if self.pending_store is not None:
            self.pending_store.put(profile, blob)

    def pending(self, profile: str) -> bytes | None:
        """The kept sealed outcome; StateCorruptError (naming the pending file) if it is
        not this profile's, so no caller mistakes it for the state file."""
        if self.pending_store is None:
            return None
        blob = self.pending_store.get(profile)
        if blob is not None:
            self.unseal(profile, blob, where=self.pending_store.path(profile))
        return blob

    def clear_pending(self, profile: str) -> None:
        """Forget the kept outcome, if any."""
        if self.pending_store is not None:
            self.pending_store.clear(profile)


@contextlib.contextmanager
def hold_lock(
    path: Path, timeout: float, sleep: Callable[[float], None] = time.sleep
) -> Iterator[None]:
    """An exclusive flock on ``path``, waiting at most ``timeout`` seconds (BusyError)."""
    try:
        fd = open_lock_file(path)
    except OSError as exc:
        raise StorageError(f"cannot open lock file {path}: {exc.strerror}") from exc
    try:
        if not flock_within(fd, timeout, LOCK_POLL_SECONDS, sleep):
            raise BusyError(
                f"{path.name}: another refresh of this profile is still running; "
                "try again in a few seconds"
            )
        yield
    finally:
        os.close(fd)
