"""The pending pair: a rotated state the state disk refused, kept on a second file system.

When the state file cannot be written (ENOSPC, EIO, a read-only remount) after the server
has rotated the refresh token, the new pair exists only in memory, and a daemon killed then
would lose the chain. The courier (which outlives the daemon) and the daemon therefore keep
that state here too, in the runtime directory: a tmpfs on Linux ($XDG_RUNTIME_DIR), another
file system than the state directory, which survives the daemon (not a reboot). The next
daemon adopts it at start; it is removed once the state file holds it.

Content: exactly what ``FileStore.encrypt`` makes (AES-GCM under the state key, the profile
name authenticated), so a record cannot be read without the key or moved to another profile.
Files are 0600 in a 0700 directory, written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from ..core.state import ProfileState, validate_profile_name
from ..errors import AacTokendError, StorageError
from .fileio import FileLayer, OsFileLayer, ensure_private_dir

__all__ = ["SUFFIX", "PendingStore", "follows", "still_owed"]

SUFFIX = ".pending"


def follows(held: ProfileState, disk: ProfileState) -> bool:
    """True if ``held`` (an outcome the disk refused) is the successor of the state on disk.

    Only then may it be written over the state file: the disk still holds the journal of the
    attempt that produced it (``in_flight`` set, an older generation, and the journal names
    the token ``held`` has spent). A state file that moved on since (saved late, imported
    anew, recovered) wins, and ``held`` is dropped: a newer import's own journal has a token
    the old chain never sent, whatever the generations say. The one rule for adopting a
    pending record at start and for the daemon's late retry.
    """
    if disk.in_flight is None or held.generation <= disk.generation:
        return False
    spent = {*held.spent_rt_hashes, *held.spent_imported_rt_hashes, held.ambiguous_rt_hash}
    return disk.in_flight.rt_hash in spent


def still_owed(held: ProfileState, disk: ProfileState) -> bool:
    """True if ``held`` (an outcome the store refused) must still be written over ``disk``.

    It follows the journal on disk (``follows``), or the disk already holds this very state
    but could not confirm it durable (the rename landed, the directory's fsync failed): it
    is owed again then, and nothing may spend its token until a write says it is durable.
    Anything else on disk (an import, a recovery) moved on, and ``held`` is dropped.
    """
    same = held.generation == disk.generation and held.refresh_token == disk.refresh_token
    return same or follows(held, disk)


class PendingStore:
    """Encrypted pending states, one file per profile, in a private directory."""

    def __init__(self, directory: Path, fs: FileLayer | None = None) -> None:
        self.directory = directory
        self._fs = fs or OsFileLayer()

    def path(self, profile: str) -> Path:
        return self.directory / (validate_profile_name(profile) + SUFFIX)

    def put(self, profile: str, blob: bytes) -> None:
        """Keep ``blob`` (an encrypted state) for ``profile``, replacing any earlier one."""
        path = self.path(profile)
        tmp = self.directory / f".{profile}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            ensure_private_dir(self.directory)
            self._fs.write_durably(tmp, blob)
            self._fs.rename(tmp, path)
            self._fs.fsync_dir(self.directory)
        except (OSError, AacTokendError) as exc:  # InputError: the directory is unusable
            with contextlib.suppress(OSError):
                tmp.unlink()
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise StorageError(f"cannot keep the pending state in {path}: {reason}") from exc

    def get(self, profile: str) -> bytes | None:
        """The pending record of ``profile``, None if there is none."""
        path = self.path(profile)
        try:
            return self._fs.read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read the pending state {path}: {exc.strerror}") from exc

    def clear(self, profile: str) -> None:
        """Forget the pending record of ``profile`` (the state file holds it, or moved on)."""
        path = self.path(profile)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot remove the pending state {path}: {exc.strerror}") from exc
