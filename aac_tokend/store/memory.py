"""A state store in memory: the whole ``StateStore`` interface, for tests and the sandbox.

Honest, not a stub: a real per-profile lock with a timeout (threads stand in for
processes), sealed blobs authenticated per profile (HMAC-SHA256 under a random key, so a
blob moved to another profile or altered is ``StateCorruptError`` as with FileStore), and
the failures a real store has, on demand: an entry that cannot be read back (``corrupt``,
never overwritten), one that cannot be read now (``unreadable``), a name that is not a
profile's (``add_stray``), and a store that refuses writes (``fail_saves``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import secrets
import threading
from collections.abc import Iterator

from ..core.state import ProfileState, state_from_json, state_to_json, validate_profile_name
from ..errors import BusyError, ProfileError, StateCorruptError, StorageError
from .interface import StateStore

__all__ = ["MemoryStore"]

_MAGIC = b"AAMS\x01"
_MAC_BYTES = hashlib.sha256().digest_size


class MemoryStore(StateStore):
    """Profile states in a dict, one lock per profile; passes the store contract suite."""

    def __init__(self) -> None:
        self._states: dict[str, ProfileState] = {}
        self._pending: dict[str, bytes] = {}
        self._corrupt: set[str] = set()
        self._unreadable: set[str] = set()
        self._strays: set[str] = set()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._key = secrets.token_bytes(32)
        self._stamps = itertools.count(1)
        self._stamp = 0
        #: While True, ``save`` and ``save_journal`` raise StorageError (a full disk).
        self.fail_saves = False
        #: While True, ``keep_pending`` raises StorageError too (the second disk fails).
        self.fail_pending = False
        #: Every state written, in order (journals included): what the "disk" went through.
        self.writes: list[ProfileState] = []

    # -- failures on demand -------------------------------------------------------------
    def corrupt(self, profile: str) -> None:
        """Make the profile's entry unreadable for good (as a damaged or foreign file)."""
        with self._guard:
            self._corrupt.add(profile)
            self._unreadable.discard(profile)
            self._touch()

    def unreadable(self, profile: str, broken: bool = True) -> None:
        """Make the entry fail to read for now (EIO), or (``broken=False``) read again."""
        with self._guard:
            (self._unreadable.add if broken else self._unreadable.discard)(profile)
            self._touch()

    def repair(self, profile: str, state: ProfileState | None = None) -> None:
        """Undo ``corrupt``: the entry holds ``state`` (as a restored file), or nothing."""
        with self._guard:
            self._corrupt.discard(profile)
            self._states.pop(profile, None)
            if state is not None:
                self._states[profile] = state
            self._touch()

    def add_stray(self, name: str) -> None:
        """An entry whose name is not a profile's (a sync tool's copy): listed, unloadable."""
        with self._guard:
            self._strays.add(name)
            self._touch()

    def _touch(self) -> None:
        self._stamp = next(self._stamps)

    # -- one profile ----------------------------------------------------------------------
    def load(self, profile: str) -> ProfileState | None:
        """The profile's state, None if it has none."""
        validate_profile_name(profile)
        with self._guard:
            self._check_readable(profile)
            return self._states.get(profile)

    def _check_readable(self, profile: str) -> None:
        if profile in self._corrupt:
            raise StateCorruptError(
                f"{self.where(profile)} cannot be read back (test: corrupt); it was left untouched"
            )
        if profile in self._unreadable:
            raise StorageError(f"cannot read {self.where(profile)} (test: unreadable)")

    def save(self, state: ProfileState) -> None:
        """Replace the profile's state; never over an entry that cannot be read back."""
        validate_profile_name(state.profile)
        with self._guard:
            if self.fail_saves:
                raise StorageError(
                    f"cannot write {self.where(state.profile)} (test: refused); "
                    "the previous state is kept"
                )
            self._check_readable(state.profile)
            if state.profile not in self._states:
                self._touch()
            self._states[state.profile] = state
            self.writes.append(state)

    def save_journal(self, journal: ProfileState) -> None:
        """One process owns this store: a journal is saved like any state."""
        self.save(journal)

    def delete(self, profile: str) -> None:
        """Remove the profile's state (ProfileError if it has none)."""
        with self._guard:
            if self._states.pop(profile, None) is None and profile not in self._corrupt:
                raise ProfileError(f"no profile named {profile!r}; see `aac-tokend profiles`")
            self._corrupt.discard(profile)
            self._unreadable.discard(profile)
            self._touch()

    def where(self, profile: str) -> str:
        return f"memory:{profile}"

    # -- the lock ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, profile: str, timeout: float) -> Iterator[None]:
        """Hold the profile's lock, waiting at most ``timeout`` seconds (BusyError)."""
        with self._guard:
            lock = self._locks.setdefault(validate_profile_name(profile), threading.Lock())
        got = lock.acquire(timeout=timeout) if timeout > 0 else lock.acquire(blocking=False)
        if not got:
            raise BusyError(
                f"{profile}: another refresh of this profile is still running; "
                "try again in a few seconds"
            )
        try:
            yield
        finally:
            lock.release()

    # -- listing ----------------------------------------------------------------------------
    def profiles(self) -> list[str]:
        with self._guard:
            return sorted(set(self._states) | self._corrupt | self._unreadable | self._strays)

    def listing_stamp(self) -> int:
        return self._stamp

    # -- sealed states and the pending outcome --------------------------------------------
    def seal(self, state: ProfileState) -> bytes:
        payload = state_to_json(state)
        return _MAGIC + self._mac(state.profile, payload) + payload

    def unseal(self, profile: str, blob: bytes) -> ProfileState:
        head, payload = blob[: len(_MAGIC) + _MAC_BYTES], blob[len(_MAGIC) + _MAC_BYTES :]
        if not head.startswith(_MAGIC) or not hmac.compare_digest(
            head[len(_MAGIC) :], self._mac(profile, payload)
        ):
            raise StateCorruptError(f"a sealed state for {profile!r} is damaged or not its own")
        state = state_from_json(payload)
        if state.profile != profile:  # unreachable unless the MAC is broken; cheap to check
            raise StateCorruptError(f"a sealed state for {profile!r} belongs to another profile")
        return state

    def _mac(self, profile: str, payload: bytes) -> bytes:
        return hmac.new(self._key, profile.encode() + b"\0" + payload, hashlib.sha256).digest()

    def keep_pending(self, profile: str, blob: bytes) -> None:
        if self.fail_pending:
            raise StorageError(f"cannot keep the pending state of {profile!r} (test: refused)")
        self._pending[validate_profile_name(profile)] = blob

    def pending(self, profile: str) -> bytes | None:
        """The kept blob; StateCorruptError if it is not this profile's (as FileStore)."""
        blob = self._pending.get(profile)
        if blob is not None:
            self.unseal(profile, blob)
        return blob

    def clear_pending(self, profile: str) -> None:
        self._pending.pop(profile, None)
