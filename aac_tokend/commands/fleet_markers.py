"""The marker files of ``fleet move-in`` / ``move-out``: where they are, and their durable
file steps (see ``fleet_move`` for why they exist).

``<profile>.moving`` is the state file renamed by a move-in until etcd confirms the create;
``<profile>.moving-out`` is etcd's record written by a move-out before the chain key is
removed. Neither ends in ``.state``, so no store lists it as a profile; both are sealed with
the local state key like any state file, and written and renamed as the store writes state
files (0600, O_NOFOLLOW, fsync before rename, then the directory).
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, StorageError
from ..store.fileio import OsFileLayer

if TYPE_CHECKING:
    from ..core.state import ProfileState
    from ..store.files import FileStore

__all__ = [
    "Move",
    "check_not_moving",
    "interrupted_moves",
    "marker_path",
    "moving_in_path",
    "moving_out_path",
    "read_marker",
    "rename_durably",
    "unlink_marker",
    "write_marker",
]


class Move(enum.StrEnum):
    """Which way a chain moves: its name is the command's."""

    IN = "move-in"
    OUT = "move-out"


def moving_in_path(store: FileStore, profile: str) -> Path:
    """The move-in marker: the state file renamed, kept until etcd confirms the create."""
    return store.state_dir / f"{profile}.moving"


def moving_out_path(store: FileStore, profile: str) -> Path:
    """The move-out marker: etcd's record written here before the chain key is removed."""
    return store.state_dir / f"{profile}.moving-out"


_FS = OsFileLayer()


def marker_path(store: FileStore, profile: str, move: Move) -> Path:
    """The marker of ``move`` for ``profile``."""
    return (moving_in_path if move is Move.IN else moving_out_path)(store, profile)


def rename_durably(store: FileStore, src: Path, dst: Path) -> None:
    """Rename, then fsync the state directory (StorageError naming both paths)."""
    try:
        _FS.rename(src, dst)
        _FS.fsync_dir(store.state_dir)
    except OSError as exc:
        raise StorageError(f"cannot rename {src} to {dst}: {exc.strerror}") from exc


def read_marker(store: FileStore, profile: str, path: Path) -> ProfileState | None:
    """The state a marker holds (None: no marker), unsealed with the local state key."""
    try:
        blob = _FS.read(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}; fix it, then run again") from exc
    return store.unseal(profile, blob, where=path)


def write_marker(store: FileStore, path: Path, state: ProfileState) -> None:
    """Write ``state`` sealed at ``path`` atomically and durably (temp file, rename)."""
    tmp = store.state_dir / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        _FS.write_durably(tmp, store.seal(state))
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror}; nothing was moved") from exc
    rename_durably(store, tmp, path)


def unlink_marker(store: FileStore, path: Path) -> None:
    """Delete a marker (gone already is fine), then fsync the state directory."""
    try:
        path.unlink()
        _FS.fsync_dir(store.state_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(
            f"cannot remove {path}: {exc.strerror}; run the same fleet command again"
        ) from exc


def check_not_moving(store: FileStore, profile: str, other: Move) -> None:
    """Refuse a move while one the other way is unfinished: its marker holds the chain."""
    marker = marker_path(store, profile, other)
    if marker.exists():
        raise InputError(
            f"profile {profile}: a {other} was interrupted ({marker} holds its chain); finish "
            f"it with `aac-tokend fleet {other} {profile}` first"
        )


def interrupted_moves(state_dir: Path) -> list[tuple[str, Move]]:
    """``(profile, move)`` for every marker an interrupted move left."""
    found: list[tuple[str, Move]] = []
    if not state_dir.is_dir():
        return found
    for path in sorted(state_dir.iterdir()):
        for suffix, move in ((".moving", Move.IN), (".moving-out", Move.OUT)):
            if path.name.endswith(suffix) and not path.name.startswith("."):
                found.append((path.name[: -len(suffix)], move))
    return found
