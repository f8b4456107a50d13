"""Where the state key lives: a 0600 file (the default) or the OS keyring (optional).

    <config dir>/state.key          the key itself, 32 bytes, 0600
    <config dir>/state.key.keyring  a pointer, no secret: the key is in the OS keyring
                                    (service "aac-tokend", user name = the config dir)

The file wins whenever it exists. Each move writes the key's new home, reads it back, and
only then removes the old one, so a move stopped at any step (crash, locked keyring, full
disk) leaves a usable key behind, never none. When the pointer says "keyring" and the
keyring cannot give the key (locked, not running, entry gone), loading fails with a
one-line error and never creates a new key: a new key would orphan every state file.

The keyring edge is ``SecretBackend``; ``OsKeyring`` is the real one (the ``keyring``
package: Secret Service on Linux, Keychain on macOS), and ``testing.MemorySecrets`` passes
the same contract tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..errors import InputError, KeyringUnavailableError, StateCorruptError, StorageError
from ..rundir import APP_NAME
from .fileio import FileLayer, OsFileLayer, ensure_private_dir

__all__ = [
    "KEYRING_POINTER",
    "OsKeyring",
    "SecretBackend",
    "add_arguments",
    "key_in_keyring",
    "load_keyring_key",
    "move_to_file",
    "move_to_keyring",
    "run_cli",
]

KEY_FILE = "state.key"
KEYRING_POINTER = "state.key.keyring"
KEY_BYTES = 32
#: A locked Secret Service collection makes the keyring package ask for an unlock prompt
#: and wait for it; with nobody at the screen (a service starting at boot) that wait never
#: ends. Past this the daemon says the keyring is locked instead of hanging unseen.
KEYRING_TIMEOUT_SECONDS = 10.0


class SecretBackend(Protocol):
    """A store of named secret strings (the OS keyring); unreachable: KeyringUnavailableError."""

    def get(self, name: str) -> str | None: ...
    def set(self, name: str, value: str) -> None: ...
    def delete(self, name: str) -> None: ...


class OsKeyring:
    """The OS keyring through the ``keyring`` package (the ``aac-tokend[keyring]`` extra)."""

    def __init__(self, backend: Any = None, timeout: float = KEYRING_TIMEOUT_SECONDS) -> None:
        self._backend = backend  # a keyring backend; None: the one keyring chooses
        self._timeout = timeout

    def get(self, name: str) -> str | None:
        value = self._call("read", lambda kr: kr.get_password(APP_NAME, name))
        return None if value is None else str(value)

    def set(self, name: str, value: str) -> None:
        self._call("write", lambda kr: kr.set_password(APP_NAME, name, value))

    def delete(self, name: str) -> None:
        def delete(kr: Any) -> None:
            import keyring.errors

            with contextlib.suppress(keyring.errors.PasswordDeleteError):  # already gone
                kr.delete_password(APP_NAME, name)

        self._call("delete", delete)

    def _call(self, what: str, func: Callable[[Any], object]) -> object:
        try:
            import keyring
        except ImportError as exc:
            raise InputError(
                "the state key is to be in the OS keyring, but the keyring package is not "
                "installed: pip install 'aac-tokend[keyring]'"
            ) from exc
        # A thread, so that a keyring waiting for an unlock prompt cannot hang us.
        answers: queue.Queue[tuple[object, Exception | None]] = queue.Queue()

        def call() -> None:
            try:
                answers.put((func(self._backend or keyring.get_keyring()), None))
            # The backends raise their own errors and those of their libraries (dbus,
            # secretstorage, jeepney, Security framework): every one means "unavailable".
            except Exception as exc:
                answers.put((None, exc))

        threading.Thread(target=call, name="keyring", daemon=True).start()
        try:
            value, error = answers.get(timeout=self._timeout)
        except queue.Empty:
            raise KeyringUnavailableError(
                f"the OS keyring did not answer a {what} within {self._timeout:.0f} s (locked "
                "and waiting for a password prompt?); unlock it, then try again"
            ) from None
        if error is not None:
            reason = " ".join(str(error).split())[:160] or "no reason given"
            raise KeyringUnavailableError(
                f"the OS keyring refused a {what} ({type(error).__name__}: {reason}); it is "
                "locked or not running: unlock it (log in to the desktop, or run "
                "gnome-keyring-daemon --unlock), then try again"
            ) from error
        return value


def _entry(config_dir: Path) -> str:
    # The config directory tells instances apart (AAC_TOKEND_HOME): each has its own key.
    return str(config_dir.absolute())


def key_in_keyring(config_dir: Path) -> bool:
    """True if the key is kept in the OS keyring (a pointer and no key file)."""
    return (config_dir / KEYRING_POINTER).exists() and not (config_dir / KEY_FILE).exists()


def load_keyring_key(config_dir: Path, backend: SecretBackend | None = None) -> bytes:
    """The state key from the OS keyring; never creates one (that would orphan the state)."""
    backend = backend or OsKeyring()
    pointer = config_dir / KEYRING_POINTER
    try:
        value = backend.get(_entry(config_dir))
    except KeyringUnavailableError as exc:
        raise KeyringUnavailableError(
            f"the state key is in the OS keyring ({pointer} says so), and {exc}; "
            "no new key was created"
        ) from exc
    if value is None:
        raise StateCorruptError(
            f"the OS keyring holds no aac-tokend state key for {config_dir}, though {pointer} "
            "says it is there; restore the keyring entry (no new key was created)"
        )
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise StateCorruptError(
            f"the state key in the OS keyring for {config_dir} is damaged; restore it"
        )
    return key


def _write_file(path: Path, data: bytes, fs: FileLayer, *, replace: bool) -> None:
    """``data`` at ``path``, complete or not at all (temp file, fsync, then link or rename)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fs.write_durably(tmp, data)
        if replace:
            fs.rename(tmp, path)
        else:
            os.link(tmp, path)  # never over an existing key
        fs.fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _remove(path: Path, fs: FileLayer) -> None:
    try:
        path.unlink(missing_ok=True)
        fs.fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def move_to_keyring(
    config_dir: Path, backend: SecretBackend | None = None, fs: FileLayer | None = None
) -> str:
    """Put the state key into the OS keyring and remove the file; returns what was done."""
    from .keyfile import load_or_create_key

    backend, fs = backend or OsKeyring(), fs or OsFileLayer()
    ensure_private_dir(config_dir)
    if key_in_keyring(config_dir):
        load_keyring_key(config_dir, backend)  # it is there and readable, or this says why
        return "the state key is already in the OS keyring"
    key = load_or_create_key(config_dir, fs, keyring=backend)
    name = _entry(config_dir)
    backend.set(name, key.hex())
    if backend.get(name) != key.hex():
        raise StorageError("the OS keyring did not give back the key just stored; kept the file")
    # From here on the keyring holds the key: first the pointer, then away with the file.
    _write_file(config_dir / KEYRING_POINTER, _pointer_text(config_dir), fs, replace=True)
    _remove(config_dir / KEY_FILE, fs)
    return f"the state key is now in the OS keyring; {config_dir / KEY_FILE} was removed"


def move_to_file(
    config_dir: Path, backend: SecretBackend | None = None, fs: FileLayer | None = None
) -> str:
    """Put the state key back into its 0600 file and remove it from the OS keyring."""
    backend, fs = backend or OsKeyring(), fs or OsFileLayer()
    pointer, path = config_dir / KEYRING_POINTER, config_dir / KEY_FILE
    if not pointer.exists():
        return f"the state key is already in {path}"
    if not path.exists():
        key = load_keyring_key(config_dir, backend)
        _write_file(path, key, fs, replace=False)
    # From here on the file holds the key (and wins): the pointer and the entry can go.
    _remove(pointer, fs)
    try:
        backend.delete(_entry(config_dir))
    except KeyringUnavailableError as exc:
        return f"the state key is now in {path}; its copy in the OS keyring stays ({exc})"
    return f"the state key is now in {path} and no longer in the OS keyring"


def _pointer_text(config_dir: Path) -> bytes:
    return (
        f"The aac-tokend state key is in the OS keyring: service {APP_NAME!r}, user "
        f"{_entry(config_dir)!r}. `aac-tokend key move-to-file` brings it back.\n"
    ).encode()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``key move-to-keyring`` / ``key move-to-file`` / ``key where``."""
    actions = parser.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    actions.add_parser("move-to-keyring", help="keep the state key in the OS keyring")
    actions.add_parser("move-to-file", help="keep the state key in its 0600 file (the default)")
    actions.add_parser("where", help="say where the state key is kept")


def run_cli(args: argparse.Namespace) -> int:
    """Carry out ``aac-tokend key ACTION``."""
    from ..host.paths import resolve_paths

    config_dir = resolve_paths(os.environ).config_dir
    if args.key_action == "move-to-keyring":
        print(move_to_keyring(config_dir))
    elif args.key_action == "move-to-file":
        print(move_to_file(config_dir))
    elif key_in_keyring(config_dir):
        print(f"OS keyring (service {APP_NAME}, user {_entry(config_dir)})")
    elif (config_dir / KEY_FILE).exists():
        print(config_dir / KEY_FILE)
    else:
        print(f"no state key yet; it will be created as {config_dir / KEY_FILE}")
    return 0
