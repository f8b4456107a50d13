"""The StateStore of a fleet profile: its state in etcd's chain key, its lock and pending
record on this host.

What the engine and the commands use for a fleet profile (``store/interface.py``); it
passes ``tests/test_store_contract.py`` against a real etcd.

- The lock is a local flock per profile (``state_dir/fleet-<fleet>/<profile>.lock``): it
  orders this host's writers (courier, daemon, commands). Across hosts etcd's compares order
  them: every write here is one of ``FleetChains``' transactions.
- ``load`` remembers the revision it read; ``save`` commits against it (``commit_resolution``
  of ``with_state``), so a save never writes over a chain that moved on: FenceLostError, and
  the caller reads again. A save with nothing read before creates the chain (create-only) or,
  if it exists, reads it now: the caller holds the lock and has no older view to protect.
  No plain save replaces an unresolved journal entry (BusyError): only its resolution may.
- Journals are written by the fenced courier alone (``FleetChains.commit_journal``):
  ``save_journal`` refuses.
- The pending record is LOCAL (``state_dir/fleet-<fleet>/<profile>.pending``, atomic, 0600,
  sealed with the fleet key) and carries the journal entry's revision: ``seal_outcome`` is
  what the fenced courier hands the daemon when etcd could not take its outcome, and ``save``
  of the state ``unseal`` returned from it commits that outcome against the entry's revision,
  from this daemon or from a restarted one.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.state import ProfileState, state_from_json, state_to_json, validate_profile_name
from ..errors import (
    BusyError,
    ChainInUseError,
    FenceLostError,
    ProfileError,
    StateCorruptError,
    StorageError,
)
from ..store.fileio import FileLayer, ensure_private_dir
from ..store.files import hold_lock
from ..store.interface import StateStore
from ..store.pending import PendingStore
from .chains import FleetChains, SeenKind, Versioned
from .keys import KeyKind
from .records import ChainRecord, decode_record, encode_record, with_state

__all__ = ["FleetStore"]

#: The pending record's own format number: its JSON is never a chain record's (which has
#: "format"), so neither can stand in for the other although both are sealed alike.
PENDING_FORMAT = 1


class FleetStore(StateStore):
    """Fleet profiles' states in etcd (through ``chains``); lock and pending record local."""

    def __init__(self, chains: FleetChains, state_dir: Path, fs: FileLayer | None = None) -> None:
        self.chains = chains
        self.directory = state_dir / f"fleet-{chains.keys.fleet}"
        self.pending_store = PendingStore(self.directory, fs)
        self._guard = threading.Lock()
        #: The chain as this store last read or wrote it, per profile: what ``save`` commits
        #: against.
        self._known: dict[str, Versioned] = {}
        #: Outcomes opened from pending records, by (profile, state generation): the record
        #: and the journal entry's revision that ``save`` of that very state commits against.
        self._outcomes: dict[tuple[str, int], tuple[ChainRecord, int]] = {}
        self._stamp = 0

    # -- one profile ----------------------------------------------------------------------
    def load(self, profile: str) -> ProfileState | None:
        """The chain's current state (read linearizably), remembered for ``save``."""
        validate_profile_name(profile)
        current = self.chains.read(profile)
        self._remember(profile, current)
        return None if current is None else current.record.state

    def save(self, state: ProfileState) -> None:
        """Commit ``state`` against the revision last seen (FenceLostError if the chain
        moved on); a pending outcome's state against its journal entry's revision."""
        profile = validate_profile_name(state.profile)
        owed = self._owed(profile, state)
        if owed is not None:
            self._push_outcome(profile, *owed)
            return
        with self._guard:
            known = self._known.get(profile)
        if known is None:
            current = self.chains.read(profile)  # a damaged chain: StateCorruptError
            if current is None:
                try:
                    created = self.chains.create(profile, state)
                except ChainInUseError:  # another host created it since the read
                    raise self._moved_on(profile) from None
                self._remember(profile, created)
                return
            known = current
        attempt = known.record.unresolved
        if attempt is not None:
            # Only the attempt's outcome or an heir's resolution (commit_resolution, after W)
            # may replace a journal entry: a plain save would drop the attempt unresolved,
            # and its courier's outcome, the rotated pair, with it.
            raise BusyError(
                f"{self.where(profile)}: an attempt by host {attempt.host!r} is not resolved "
                "yet; nothing was written: try again once it is"
            )
        record = with_state(known.record, state)
        revision = self.chains.commit_resolution(profile, record, entry_revision=known.revision)
        if revision is None:
            self._remember(profile, None)
            self.chains.read(profile)  # reports a damaged chain as such; it is never written
            raise self._moved_on(profile)
        self._remember(profile, Versioned(record, revision))

    def save_journal(self, journal: ProfileState) -> None:
        """Refused: a fleet journal is committed only by the fenced courier, under the
        owner's lease (``FleetChains.commit_journal``)."""
        profile = validate_profile_name(journal.profile)
        self.chains.read(profile)  # a damaged chain is reported as such, as by every store
        raise StorageError(
            f"{self.where(profile)}: fleet journals are written by the fenced courier; "
            "nothing was written"
        )

    def delete(self, profile: str) -> None:
        """Move the profile out of the fleet (``FleetChains.remove``): its chain key goes,
        a tombstone keeps its sequence number."""
        kv = self.chains.peek(profile)
        if kv is None:
            raise ProfileError(f"no profile named {profile!r}; see `aac-tokend profiles`")
        revision = self.chains.remove(profile, expected_revision=kv.mod_revision)
        self._remember(profile, None)
        self._saw(revision)

    def where(self, profile: str) -> str:
        """The chain key, for messages."""
        return "etcd:" + self.chains.keys.chain(profile).decode("utf-8", "backslashreplace")

    # -- the lock -------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, profile: str, timeout: float) -> Iterator[None]:
        """This host's lock of the profile (other hosts are ordered by etcd's compares)."""
        name = validate_profile_name(profile)
        ensure_private_dir(self.directory)
        with hold_lock(self.directory / f"{name}.lock", timeout):
            yield

    # -- listing --------------------------------------------------------------------------
    def profiles(self) -> list[str]:
        """The names of the fleet's chain keys, sorted (misnamed ones too: reported)."""
        found = self.chains.client.range(self.chains.keys.prefix(KeyKind.CHAIN), prefix=True)
        self._saw(found.revision)
        return sorted(self.chains.name_of(kv.key) for kv in found.kvs)

    def listing_stamp(self) -> int:
        """The last etcd revision this store saw: it moves with every write it makes or
        listing it reads (another host's writes show at the next listing)."""
        return self._stamp

    # -- sealed states and the pending record ---------------------------------------------
    def seal(self, state: ProfileState) -> bytes:
        """A state as a blob sealed with the fleet key (no journal entry revision)."""
        doc = {"pending": PENDING_FORMAT, "state": json.loads(state_to_json(state))}
        return self._seal(state.profile, state.generation, doc)

    def seal_outcome(self, record: ChainRecord, entry_revision: int) -> bytes:
        """A courier's outcome etcd could not take, with its journal entry's revision:
        ``save`` of the state ``unseal`` gives back commits it against that revision."""
        if record.resolved is None or entry_revision <= 0:
            raise ValueError("an outcome resolves an attempt, at a journal entry's revision")
        doc = {
            "pending": PENDING_FORMAT,
            "record": json.loads(encode_record(record)),
            "entry_revision": entry_revision,
        }
        return self._seal(record.state.profile, record.seq, doc)

    def unseal(self, profile: str, blob: bytes) -> ProfileState:
        """The state in a blob (StateCorruptError if it is not the profile's); an outcome's
        record and entry revision are remembered for ``save`` of that very state."""
        _, plain = self.chains.sealer.unseal(profile, blob)
        try:
            doc = json.loads(plain)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("pending") != PENDING_FORMAT:
            raise _not_pending(profile)
        if "record" in doc:
            record = decode_record(json.dumps(doc["record"]).encode(), profile)
            revision = doc.get("entry_revision")
            if type(revision) is not int or revision <= 0 or record.resolved is None:
                raise _not_pending(profile)
            with self._guard:
                self._outcomes[(profile, record.state.generation)] = (record, revision)
            return record.state
        if not isinstance(doc.get("state"), dict):
            raise _not_pending(profile)
        state = state_from_json(json.dumps(doc["state"]).encode())
        if state.profile != profile:
            raise _not_pending(profile)
        return state

    def keep_pending(self, profile: str, blob: bytes) -> None:
        """Keep a sealed outcome on this host (atomic, 0600), replacing any earlier one."""
        self.pending_store.put(profile, blob)

    def pending(self, profile: str) -> bytes | None:
        """The kept blob; StateCorruptError if it is not this profile's."""
        blob = self.pending_store.get(profile)
        if blob is not None:
            try:
                self.unseal(profile, blob)
            except StateCorruptError as exc:
                raise StateCorruptError(
                    f"the pending record {self.pending_store.path(profile)} is not profile "
                    f"{profile!r}'s or is damaged; it is left untouched: move it aside"
                ) from exc
        return blob

    def clear_pending(self, profile: str) -> None:
        """Forget the kept blob, if any."""
        self.pending_store.clear(profile)

    # -- helpers --------------------------------------------------------------------------
    def _owed(self, profile: str, state: ProfileState) -> tuple[ChainRecord, int] | None:
        with self._guard:
            owed = self._outcomes.get((profile, state.generation))
        return owed if owed is not None and owed[0].state == state else None

    def _push_outcome(self, profile: str, record: ChainRecord, entry_revision: int) -> None:
        # Against the journal entry's revision, never the lease: the owner may have changed
        # since, and only an heir's resolution of the same entry may win over this one.
        revision = self.chains.commit_resolution(profile, record, entry_revision=entry_revision)
        with self._guard:
            self._outcomes.pop((profile, record.state.generation), None)
        if revision is not None:
            self._remember(profile, Versioned(record, revision))
            return
        assert record.resolved is not None  # seal_outcome and unseal require it
        seen = self.chains.find_attempt(profile, record.resolved)
        if seen.kind is SeenKind.RESOLVED and seen.versioned and seen.versioned.record == record:
            self._remember(profile, seen.versioned)  # an earlier push landed, its reply lost
            return
        self._remember(profile, None)
        raise FenceLostError(
            f"{self.where(profile)}: superseded: the attempt's entry was resolved by another "
            "host first (or the chain moved on), so this outcome's pair is lost; nothing was "
            "written: read the chain again"
        )

    def _remember(self, profile: str, versioned: Versioned | None) -> None:
        with self._guard:
            if versioned is None:
                self._known.pop(profile, None)
            else:
                self._known[profile] = versioned
                self._stamp = max(self._stamp, versioned.revision)

    def _saw(self, revision: int) -> None:
        with self._guard:
            self._stamp = max(self._stamp, revision)

    def _seal(self, profile: str, generation: int, doc: dict[str, Any]) -> bytes:
        plain = json.dumps(doc, separators=(",", ":")).encode()
        return self.chains.sealer.seal(validate_profile_name(profile), generation, plain)

    def _moved_on(self, profile: str) -> FenceLostError:
        return FenceLostError(
            f"{self.where(profile)}: the chain moved on since it was read; nothing was "
            "written: read it again"
        )


def _not_pending(profile: str) -> StateCorruptError:
    return StateCorruptError(
        f"a sealed state for {profile!r} is not a pending record of this fleet; it is left "
        "untouched"
    )
