"""The chain keys' transactions: every read and write of ``/aac-tokend/<fleet>/chain/...``.

Each write is ONE etcd transaction whose compares say who may write (issue #13 items 2, 4
and 6):

- ``create`` (import, move in): the chain key must not exist (``create_revision == 0``) and
  the gone key must be as read, so two creates race to one winner and a move in never
  reuses a sequence number a host has seen (the tombstone keeps the last one);
- ``commit_journal`` (the fenced courier): the owner key's LEASE is the caller's AND the
  chain has not moved since it was read;
- ``commit_resolution`` (an outcome, a cancellation, an heir's resolution, a plain save):
  ONLY the chain's revision, never the lease, so of two racing resolutions of one entry
  exactly one wins;
- ``replace`` and ``remove`` (a person's import over a chain, a move out): the revision the
  person's command read.

Every value read is opened here (``open``): unsealed under the fleet key, decoded, its
sequence number checked against this host's high-water mark and then noted, so nothing
older than what this host has seen is ever used. etcd errors pass up unchanged:
``EtcdUnsentError`` (not applied), ``EtcdOutcomeUnknownError`` (maybe applied: the caller
resolves it with ``find_attempt``).

Over 300 lines because it is the whole set of the chain keys' transactions, each beside the
compares that make it safe; split, the reason one compares the lease and another must not
would sit in two files.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass

from ..core.ownership import claim
from ..core.state import ProfileState, TokenKind, validate_profile_name
from ..core.tokens import token_hash
from ..errors import (
    AacTokendError,
    BusyError,
    ChainInUseError,
    FenceLostError,
    ProfileError,
    StateCorruptError,
    TokenHeldError,
    TokenSpentError,
)
from .etcd import Compare, DeleteOp, EtcdClient, KeyValue, PutOp, RangeOp, RangeResult
from .highwater import HighWater
from .keys import FleetKeys, KeyKind
from .records import (
    ChainRecord,
    Tombstone,
    decode_record,
    decode_tombstone,
    encode_record,
    encode_tombstone,
    first_record,
)
from .sealing import Sealer

__all__ = ["AttemptSeen", "FleetChains", "SeenKind", "Versioned"]


@dataclass(frozen=True)
class Versioned:
    """A chain record and the chain key's mod_revision it was read (or written) at."""

    record: ChainRecord
    revision: int


class SeenKind(enum.Enum):
    """What a linearizable read found of one attempt (issue #13 item 5)."""

    #: The chain holds that attempt's journal entry, still unresolved.
    JOURNAL = "journal"
    #: The chain's current record is that attempt's outcome (or its cancellation, or an
    #: heir's resolution of it).
    RESOLVED = "resolved"
    #: Neither: the journal was never applied, or the chain has moved on past it.
    ABSENT = "absent"


@dataclass(frozen=True)
class AttemptSeen:
    """``find_attempt``'s answer: the kind, and the chain as read (None: no chain)."""

    kind: SeenKind
    versioned: Versioned | None


class FleetChains:
    """The chain keys of one fleet: reads that check the high-water mark, fenced writes."""

    def __init__(
        self, client: EtcdClient, keys: FleetKeys, sealer: Sealer, highwater: HighWater
    ) -> None:
        self.client = client
        self.keys = keys
        self.sealer = sealer
        self.highwater = highwater

    # -- reads --------------------------------------------------------------------------
    def peek(self, profile: str) -> KeyValue | None:
        """The chain key as etcd holds it, not opened (for a revision, or a damaged one)."""
        return self.client.get(self.keys.chain(validate_profile_name(profile)))

    def read(self, profile: str) -> Versioned | None:
        """The profile's chain, read linearizably and opened; None if it has none."""
        kv = self.peek(profile)
        return None if kv is None else self.open(profile, kv)

    def open(self, profile: str, kv: KeyValue) -> Versioned:
        """The record in a chain key's value: StateCorruptError if it does not open or
        decode, RollbackError (nothing noted) if it is older than this host has seen."""
        generation, plain = self.sealer.unseal(profile, kv.value)
        record = decode_record(plain, profile)
        if record.seq != generation:
            raise StateCorruptError(
                f"fleet {self.keys.fleet!r}: the etcd value of profile {profile!r} claims "
                f"sequence {record.seq} inside and {generation} outside; it is left untouched: "
                "check that every host runs the same aac-tokend version"
            )
        self.highwater.check(profile, generation)
        self.highwater.note(profile, generation)
        return Versioned(record, kv.mod_revision)

    def read_all(self) -> tuple[dict[str, Versioned | AacTokendError], int]:
        """Every chain key by profile name (one that cannot be used as its error, never
        dropped), and the range's header revision: a watch resumes from revision + 1."""
        found = self.client.range(self.keys.prefix(KeyKind.CHAIN), prefix=True)
        return self.open_all(found), found.revision

    def open_all(self, found: RangeResult) -> dict[str, Versioned | AacTokendError]:
        """``read_all`` of a range already made (the listing's names, each opened)."""
        chains: dict[str, Versioned | AacTokendError] = {}
        for kv in found.kvs:
            name = self.name_of(kv.key)
            try:
                chains[name] = self.open(validate_profile_name(name), kv)
            except AacTokendError as exc:  # ProfileError, StateCorruptError, RollbackError
                chains[name] = exc
        return chains

    def name_of(self, key: bytes) -> str:
        """The profile name in a chain key, whatever it is (a misnamed one is reported)."""
        parsed = self.keys.parse(key)
        if parsed is not None:
            return parsed[1]
        # Not UTF-8: named as well as it can be, so that it is listed and reported.
        return key[len(self.keys.prefix(KeyKind.CHAIN)) :].decode("utf-8", "backslashreplace")

    def find_attempt(self, profile: str, attempt_id: str) -> AttemptSeen:
        """After an unknown outcome: is ``attempt_id``'s journal or resolution the chain's
        current record? A linearizable read, so a write that was applied is seen."""
        current = self.read(profile)
        if current is None:
            return AttemptSeen(SeenKind.ABSENT, None)
        record = current.record
        unresolved = record.unresolved
        if unresolved is not None and unresolved.id == attempt_id:
            return AttemptSeen(SeenKind.JOURNAL, current)
        if record.resolved == attempt_id:
            return AttemptSeen(SeenKind.RESOLVED, current)
        return AttemptSeen(SeenKind.ABSENT, current)

    # -- the courier's and the resolvers' writes ------------------------------------------
    def commit_journal(
        self, profile: str, entry: ChainRecord, *, read_revision: int, lease_id: int
    ) -> int:
        """Put the journal entry if this host's lease holds the owner key and the chain is
        still at ``read_revision``; the new revision, or FenceLostError."""
        validate_profile_name(profile)
        if lease_id <= 0 or read_revision <= 0:
            # An absent key compares as lease 0 and revision 0: never a fence.
            raise ValueError("a journal needs a lease and the revision of an existing chain")
        result = self.client.txn(
            [
                Compare.lease(self.keys.owner(profile), lease_id),
                Compare.mod_revision(self.keys.chain(profile), read_revision),
            ],
            [PutOp(self.keys.chain(profile), self._seal(profile, entry))],
        )
        if not result.succeeded:
            raise FenceLostError(
                f"fleet {self.keys.fleet!r} profile {profile!r}: the journal was not written "
                "(this host no longer owns the chain, or it moved on since it was read); "
                "nothing was sent: read it again"
            )
        self._noted(profile, entry.seq)
        return result.revision

    def commit_resolution(
        self, profile: str, record: ChainRecord, *, entry_revision: int
    ) -> int | None:
        """Put ``record`` if the chain is still at ``entry_revision`` (never comparing the
        lease: an owner's outcome and an heir's resolution race on the revision alone);
        the new revision, None if someone else wrote first."""
        validate_profile_name(profile)
        if entry_revision <= 0:
            raise ValueError("a resolution needs the revision of an existing chain")
        result = self.client.txn(
            [Compare.mod_revision(self.keys.chain(profile), entry_revision)],
            [PutOp(self.keys.chain(profile), self._seal(profile, record))],
        )
        if not result.succeeded:
            return None
        self._noted(profile, record.seq)
        return result.revision

    # -- a person's writes: import, move in, move out ------------------------------------
    def create(self, profile: str, state: ProfileState) -> Versioned:
        """The profile's first chain record (an import or a move in): create-only.

        Its sequence number is above the tombstone's (a profile moved out and back) and
        above this host's mark, so no host's mark refuses it. ChainInUseError if the chain
        exists; FenceLostError if a move out or in raced this one (read again).
        """
        validate_profile_name(profile)
        if state.profile != profile:
            raise ValueError("the state is another profile's")
        gone = self.client.get(self.keys.gone(profile))
        after = max(self._tombstone_seq(profile, gone), self.highwater.mark(profile))
        record = first_record(state, after)
        result = self.client.txn(
            [
                Compare.create_revision(self.keys.chain(profile), 0),
                Compare.mod_revision(self.keys.gone(profile), gone.mod_revision if gone else 0),
            ],
            [
                PutOp(self.keys.chain(profile), self._seal(profile, record)),
                DeleteOp(self.keys.gone(profile)),
            ],
            [RangeOp(self.keys.chain(profile))],
        )
        if not result.succeeded:
            chain = result.responses[0] if result.responses else None
            if isinstance(chain, RangeResult) and chain.kvs:
                raise ChainInUseError(
                    f"profile {profile!r} is already in fleet {self.keys.fleet!r}; nothing was "
                    "changed: import over it with the fleet's replace, or move it out first"
                )
            raise FenceLostError(
                f"fleet {self.keys.fleet!r} profile {profile!r}: moved out or in by another "
                "host at the same time; nothing was changed: try again"
            )
        self._noted(profile, record.seq)
        return Versioned(record, result.revision)

    def replace(self, profile: str, state: ProfileState, *, expected_revision: int) -> Versioned:
        """An import over the existing chain (a new pair after a rejection), if the chain
        is still at ``expected_revision`` (FenceLostError). The refresh token must not be
        the chain's current one (TokenHeldError) nor one it has sent or may have sent: the
        unresolved journal's, the spent ones (TokenSpentError). Nothing else is changed
        then. The new state continues the chain's generation and spent history."""
        if state.profile != profile:
            raise ValueError("the state is another profile's")
        current = self.read(profile)
        if current is None:
            raise ProfileError(
                f"profile {profile!r} is not in fleet {self.keys.fleet!r}; import it (create) "
                "instead"
            )
        if current.revision != expected_revision:
            raise self._moved_on(profile)
        _refuse_reuse(profile, state, current.record, self.keys.fleet)
        merged = claim(state, [current.record.state], [], replace_chain=True)
        if merged is None:  # unreachable after _refuse_reuse; claim's own "no-op" answer
            raise _held(profile, self.keys.fleet)
        record = ChainRecord(current.record.seq + 1, merged)
        result = self.client.txn(
            [Compare.mod_revision(self.keys.chain(profile), expected_revision)],
            [PutOp(self.keys.chain(profile), self._seal(profile, record))],
        )
        if not result.succeeded:
            raise self._moved_on(profile)
        self._noted(profile, record.seq)
        return Versioned(record, result.revision)

    def remove(self, profile: str, *, expected_revision: int) -> int:
        """Move the profile out: delete its chain key and leave a tombstone with its last
        sequence number, if the chain is still at ``expected_revision`` (FenceLostError);
        the revision of the removal.

        Refused (BusyError) while a journal is unresolved: its outcome would be lost. A
        chain that does not open (damaged) can be removed: its tombstone then carries the
        highest sequence this host knows of.
        """
        kv = self.peek(profile)
        if kv is None:
            raise ProfileError(f"no profile named {profile!r} in fleet {self.keys.fleet!r}")
        if kv.mod_revision != expected_revision:
            raise self._moved_on(profile)
        try:
            record = self.open(profile, kv).record
        except StateCorruptError:
            seq = self.highwater.mark(profile)
            with contextlib.suppress(StateCorruptError):  # a frame too damaged to claim one
                seq = max(seq, self.sealer.generation_of(profile, kv.value))
        else:
            attempt = record.unresolved
            if attempt is not None:
                raise BusyError(
                    f"fleet {self.keys.fleet!r} profile {profile!r}: an attempt by host "
                    f"{attempt.host!r} is not resolved yet; move it out once it is"
                )
            seq = record.seq
        stone = self.sealer.seal(profile, seq, encode_tombstone(Tombstone(seq)))
        result = self.client.txn(
            [Compare.mod_revision(self.keys.chain(profile), expected_revision)],
            [DeleteOp(self.keys.chain(profile)), PutOp(self.keys.gone(profile), stone)],
        )
        if not result.succeeded:
            raise self._moved_on(profile)
        return result.revision

    # -- helpers --------------------------------------------------------------------------
    def _seal(self, profile: str, record: ChainRecord) -> bytes:
        return self.sealer.seal(profile, record.seq, encode_record(record))

    def _tombstone_seq(self, profile: str, gone: KeyValue | None) -> int:
        if gone is None:
            return 0
        generation, plain = self.sealer.unseal(profile, gone.value)
        stone = decode_tombstone(plain, profile)
        if stone.seq != generation:
            raise StateCorruptError(
                f"fleet {self.keys.fleet!r}: the tombstone of profile {profile!r} claims "
                f"sequence {stone.seq} inside and {generation} outside; it is left untouched"
            )
        return stone.seq

    def _noted(self, profile: str, seq: int) -> None:
        # Raise the mark to what this host itself wrote, so that etcd rolled back past it
        # is refused here too. Best effort: the commit is applied whatever the local disk
        # says, and a caller told otherwise would act as if it were not; the next open of
        # this record (the follower's watch reads every write) notes it again.
        with contextlib.suppress(AacTokendError):
            self.highwater.note(profile, seq)

    def _moved_on(self, profile: str) -> FenceLostError:
        return FenceLostError(
            f"fleet {self.keys.fleet!r} profile {profile!r}: the chain moved on since it was "
            "read; nothing was changed: read it again"
        )


def _refuse_reuse(profile: str, state: ProfileState, current: ChainRecord, fleet: str) -> None:
    token = state.refresh_token
    if state.kind is not TokenKind.OAUTH or token is None:
        return
    # The journal first: its token is the current one too, and "may be on the wire right
    # now" is what the person needs to hear.
    attempt = current.unresolved
    in_flight = current.state.in_flight
    if attempt is not None and in_flight is not None and in_flight.rt_hash == token_hash(token):
        raise TokenSpentError(
            f"import: fleet {fleet!r} profile {profile!r}: host {attempt.host!r} may be "
            "sending this refresh token right now (its attempt is not resolved); presenting "
            "it again would make the server revoke the chain: import the newest pair instead"
        )
    if token == current.state.refresh_token:
        raise _held(profile, fleet)


def _held(profile: str, fleet: str) -> TokenHeldError:
    return TokenHeldError(
        f"import: fleet {fleet!r} profile {profile!r} already holds this refresh token as "
        "its current one; nothing was changed"
    )
