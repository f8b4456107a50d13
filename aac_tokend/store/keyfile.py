"""The state key file: created once (0600, atomically), checked on every later use; and the
helpers that write and check any secret key file (the fleet key's too).

Apart from ``FileStore`` because it is the key's life (creation race, keyring pointer,
refusing a new key beside states only the old one can read), not the states'.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StateCorruptError, StorageError
from .fileio import FileLayer, OsFileLayer, ensure_private_dir, read_regular_file

if TYPE_CHECKING:
    from .keystore import SecretBackend

__all__ = [
    "KEY_BYTES",
    "load_or_create_key",
    "read_key_file",
    "stored_state_count",
    "write_new_key_file",
]

KEY_BYTES = 32
#: The suffix of a profile's state file (the file store's; counted here before it exists).
SUFFIX = ".state"


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
        return read_key_file(
            path, KEY_BYTES, "state key",
            unreadable="put the 32-byte key file back there from a backup",
            damaged="restore it from a backup",
        )  # fmt: skip
    except FileNotFoundError:
        pass
    from .keystore import KEYRING_POINTER, load_keyring_key

    if (config_dir / KEYRING_POINTER).exists():  # never a new key: it would orphan the state
        return load_keyring_key(config_dir, keyring)
    if state_dir is not None:
        _refuse_new_key_beside_states(path, state_dir)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        write_new_key_file(path, key, fs)
    except FileExistsError:  # another process won the race: use theirs
        return load_or_create_key(config_dir, fs, keyring=keyring, state_dir=state_dir)
    except OSError as exc:
        raise StorageError(f"cannot create the state key {path}: {exc.strerror}") from exc
    return key


def read_key_file(path: Path, size: int, name: str, *, unreadable: str, damaged: str) -> bytes:
    """The ``size``-byte key in ``path``, checked: a regular file of ours, mode 0600.

    FileNotFoundError is left to the caller (each key has its own way to come into being);
    ``unreadable`` and ``damaged`` are the advice for a file that cannot be read or is not
    a key.
    """
    try:
        key, info = read_regular_file(path, size + 1, follow_symlinks=False)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(
            f"cannot read the {name} {path}: {exc.strerror} (a symlink is never followed); "
            f"{unreadable}"
        ) from exc
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise StorageError(
            f"the {name} {path} must be owned by you with mode 0600; run chmod 600 on it"
        )
    if len(key) != size:
        raise StateCorruptError(f"the {name} {path} is damaged; {damaged}")
    return key


def write_new_key_file(path: Path, key: bytes, fs: FileLayer) -> None:
    """``key`` in ``path`` (0600, atomically); FileExistsError if a file is there: never replaced.

    Written whole to a temporary file and linked into place: a reader sees no key or all of
    it, and a key there is never overwritten (another process's, or one the state needs).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fs.write_durably(tmp, key)
        os.link(tmp, path)  # fails if a file is there
    finally:
        tmp.unlink(missing_ok=True)  # also after a failed write: no stray key copy
    fs.fsync_dir(path.parent)


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
