"""The state key file: created once (0600, atomically), checked on every later use.

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

__all__ = ["KEY_BYTES", "load_or_create_key", "stored_state_count"]

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
