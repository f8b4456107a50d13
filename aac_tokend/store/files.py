"""The encrypted, durable state store: one AES-GCM file per profile.

Writes are atomic and durable: a temp file in the same directory, fsync, rename over the
old file, fsync of the directory. A crash at any instant leaves either the old or the new
complete file. A file that cannot be decrypted is reported and never overwritten.

File format: ``MAGIC | nonce (12) | AES-GCM(key, nonce, state JSON, aad=MAGIC|profile)``.
The profile name is authenticated, so swapping two profiles' files is detected.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..core.state import ProfileState, state_from_json, state_to_json, validate_profile_name
from ..errors import BusyError, ProfileError, StateCorruptError, StorageError
from .fileio import (
    FileLayer,
    OsFileLayer,
    ensure_private_dir,
    open_lock_file,
    read_regular_file,
)

if TYPE_CHECKING:
    from .keystore import SecretBackend

__all__ = ["CRYPTO_LOCK", "FileStore", "StateStore", "load_or_create_key", "stored_state_count"]

MAGIC = b"AATK\x01"
NONCE_BYTES = 12
KEY_BYTES = 32
SUFFIX = ".state"
#: Polling step while waiting for a profile lock: short enough to be invisible to a
#: person, long enough not to spin.
LOCK_POLL_SECONDS = 0.02
#: Held around every AES-GCM call in the daemon and around every fork of a courier, so a
#: forked child never inherits an OpenSSL lock held by another thread (see courier.py).
CRYPTO_LOCK = threading.Lock()


class StateStore(Protocol):
    """Where profile states live. FileStore and the tests' MemoryStore pass one contract."""

    def load(self, profile: str) -> ProfileState | None: ...
    def save(self, state: ProfileState) -> None: ...
    def delete(self, profile: str) -> None: ...
    def profiles(self) -> list[str]: ...
    def locked(self, profile: str, timeout: float) -> contextlib.AbstractContextManager[None]: ...


def load_or_create_key(
    config_dir: Path,
    fs: FileLayer | None = None,
    *,
    keyring: SecretBackend | None = None,
    state_dir: Path | None = None,
) -> bytes:
    """The state key: created on first use (0600, atomically), checked on every later use.

    When ``aac-tokend key move-to-keyring`` has put it in the OS keyring, it comes from there
    (from ``keyring``, for tests; by default the OS keyring). A missing key is never
    created while ``state_dir`` holds state files: only the lost key can read them.
    """
    fs = fs or OsFileLayer()
    ensure_private_dir(config_dir)
    path = config_dir / "state.key"
    try:
        key, info = read_regular_file(path, KEY_BYTES + 1, follow_symlinks=False)
    except FileNotFoundError:
        from .keystore import KEYRING_POINTER, load_keyring_key

        if (config_dir / KEYRING_POINTER).exists():  # never a new key: it would orphan the state
            return load_keyring_key(config_dir, keyring)
        if state_dir is not None:
            _refuse_new_key_beside_states(path, state_dir)
        key = secrets.token_bytes(KEY_BYTES)
        tmp = config_dir / f".state.key.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            try:
                fs.write_durably(tmp, key)
                os.link(tmp, path)  # fails if another process won the race: use theirs
            finally:
                tmp.unlink(missing_ok=True)  # also after a failed write: no stray key copy
            fs.fsync_dir(config_dir)
        except FileExistsError:
            return load_or_create_key(config_dir, fs, keyring=keyring, state_dir=state_dir)
        except OSError as exc:
            raise StorageError(f"cannot create the state key {path}: {exc.strerror}") from exc
        return key
    except OSError as exc:
        raise StorageError(
            f"cannot read the state key {path}: {exc.strerror} (a symlink is never followed); "
            "put the 32-byte key file back there from a backup"
        ) from exc
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StorageError(
            f"the state key {path} must be owned by you with mode 0600; run chmod 600 on it"
        )
    if len(key) != KEY_BYTES:
        raise StateCorruptError(f"the state key {path} is damaged; restore it from a backup")
    return key


def stored_state_count(state_dir: Path) -> int:
    """How many profile state files ``state_dir`` holds (0 if it does not exist)."""
    try:
        with os.scandir(state_dir) as entries:
            return sum(1 for e in entries if e.name.endswith(SUFFIX) and not e.name.startswith("."))
    except OSError:
        return 0


def _refuse_new_key_beside_states(path: Path, state_dir: Path) -> None:
    # A new key could not read the existing state files, and the next save would leave them
    # beside states under another key: the refresh tokens in them would be lost for good.
    count = stored_state_count(state_dir)
    if count:
        raise StateCorruptError(
            f"the state key {path} is missing, but {state_dir} holds {count} state file(s) "
            "that only it can read; restore state.key from a backup"
        )


class FileStore:
    """Encrypted profile states in a 0700 directory, written atomically and durably."""

    def __init__(
        self,
        state_dir: Path,
        key: bytes,
        fs: FileLayer | None = None,
        *,
        crypto_lock: threading.Lock | None = None,
    ) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("state key must be 32 bytes")
        self.state_dir = state_dir
        self._lock = crypto_lock or CRYPTO_LOCK
        with self._lock:
            self._aead = AESGCM(key)
        self._fs = fs or OsFileLayer()
        ensure_private_dir(state_dir)

    def path(self, profile: str) -> Path:
        return self.state_dir / (validate_profile_name(profile) + SUFFIX)

    def encrypt(self, state: ProfileState) -> bytes:
        """The file content for a state (exposed so a courier can hand it over unsaved)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = MAGIC + state.profile.encode()
        with self._lock:
            sealed = self._aead.encrypt(nonce, state_to_json(state), aad)
        return MAGIC + nonce + sealed

    def decrypt(self, profile: str, blob: bytes, where: Path | None = None) -> ProfileState:
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
        return self.decrypt(profile, blob)

    def save(self, state: ProfileState) -> None:
        """Replace the profile's state atomically and durably; never over a corrupt file."""
        self._write(state.profile, self.encrypt(state))

    def save_blob(self, profile: str, blob: bytes) -> None:
        """Write already-encrypted content (see ``encrypt``) atomically and durably."""
        self.decrypt(profile, blob)  # never write what we could not read back
        self._write(profile, blob)

    def _write(self, profile: str, blob: bytes) -> None:
        path = self.path(profile)
        try:
            existing = self._fs.read(path)
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise StorageError(f"cannot read state file {path}: {exc.strerror}") from exc
        if existing is not None:
            self.decrypt(profile, existing)  # raises StateCorruptError: leave it untouched
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
        """Names of the profiles that have a state file."""
        names = []
        for entry in os.scandir(self.state_dir):
            if entry.name.endswith(SUFFIX) and not entry.name.startswith("."):
                names.append(entry.name[: -len(SUFFIX)])
        return sorted(names)

    @contextlib.contextmanager
    def locked(self, profile: str, timeout: float) -> Iterator[None]:
        """Hold the profile's refresh lock (a courier holds it for its whole life)."""
        with hold_lock(self.state_dir / f"{validate_profile_name(profile)}.lock", timeout):
            yield

    def lock_is_free(self, profile: str) -> bool:
        """True if no courier (or other writer) holds the profile's lock right now."""
        try:
            with self.locked(profile, timeout=0):
                return True
        except BusyError:
            return False


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
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BusyError(
                        f"{path.name}: another refresh of this profile is still running; "
                        "try again in a few seconds"
                    ) from None
                sleep(LOCK_POLL_SECONDS)
        yield
    finally:
        os.close(fd)
