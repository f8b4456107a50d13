"""The state store's interface: everything the engine and the refresh transaction ask of it.

A store keeps one profile state per name, durably, and hands out a per-profile lock that
orders every write of that profile (a courier holds it from before its request until its
outcome is durable). ``FileStore`` (encrypted files, the embedded default) and
``MemoryStore`` (tests) implement all of it, and ``tests/test_store_contract.py`` runs one
suite against every implementation: a third store (fleet mode's etcd) is added by passing it.

Errors are the tree's: ``StateCorruptError`` for a stored state that cannot be read back
(never overwritten), ``StorageError`` for one that cannot be read or written now,
``BusyError`` for a lock not free within the timeout, ``ProfileError`` for a name that is
not a profile's.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from ..core.state import ProfileState
from ..errors import BusyError

__all__ = ["StateStore"]


class StateStore(Protocol):
    """Where profile states live, durably, one writer per profile at a time."""

    # -- one profile ------------------------------------------------------------------
    def load(self, profile: str) -> ProfileState | None:
        """The profile's state, None if it has none."""
        ...

    def save(self, state: ProfileState) -> None:
        """Replace the profile's state durably: afterwards a crash keeps it, or raises
        StorageError (the previous state is kept, or the message says the new one may not
        survive a crash). Never writes over a state that cannot be read back."""
        ...

    def save_journal(self, journal: ProfileState) -> None:
        """Make an attempt's journal (``in_flight`` set) durable before its request leaves.

        The refresh transaction's first write. A file store saves it like any state; a
        shared store commits it only while the caller still owns the chain."""
        ...

    def delete(self, profile: str) -> None:
        """Remove the profile's state (ProfileError if it has none)."""
        ...

    def where(self, profile: str) -> str:
        """Where the profile's state is kept, for messages (a path, a key); any name."""
        ...

    # -- the lock that orders one profile's writes ----------------------------------------
    def locked(self, profile: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        """Hold the profile's lock, waiting at most ``timeout`` seconds (BusyError)."""
        ...

    def lock_is_free(self, profile: str) -> bool:
        """True if nobody (a courier of an earlier daemon, a command) holds the lock now.

        Shared by the stores that subclass this protocol: trying the lock is the only
        answer that cannot race with a holder letting go."""
        try:
            with self.locked(profile, timeout=0):
                return True
        except BusyError:
            return False

    # -- listing ----------------------------------------------------------------------
    def profiles(self) -> list[str]:
        """The names of every stored entry, sorted, including names that are not valid
        profile names (a sync tool's copy): the engine reports those as misnamed."""
        ...

    def listing_stamp(self) -> int:
        """A number that changes whenever ``profiles()`` may have changed (cheap to read)."""
        ...

    # -- a state that could not be made durable -------------------------------------------
    def seal(self, state: ProfileState) -> bytes:
        """The state as an opaque, authenticated blob: how an outcome the store refused
        travels from a courier to the daemon, and how it is kept meanwhile."""
        ...

    def unseal(self, profile: str, blob: bytes) -> ProfileState:
        """The state in a sealed blob (StateCorruptError if it is not the profile's)."""
        ...

    def keep_pending(self, profile: str, blob: bytes) -> None:
        """Keep a sealed outcome the store refused somewhere that survives the daemon
        (StorageError if that fails too); replaces any earlier one."""
        ...

    def pending(self, profile: str) -> bytes | None:
        """The kept sealed outcome of the profile, if any."""
        ...

    def clear_pending(self, profile: str) -> None:
        """Forget the profile's kept outcome (no error if there is none)."""
        ...
