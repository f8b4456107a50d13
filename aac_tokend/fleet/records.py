"""What a fleet chain key holds, inside its ciphertext: the state, and whose attempt is out.

Pure: records are built from records and ``now``; sealing and etcd are elsewhere.

A ``ChainRecord`` is a profile's ``ProfileState`` plus what fleet mode adds around it:

- ``seq``, the record's sequence number, one more at every write of the chain key. It is
  the generation the sealed blob authenticates and each host's high-water mark counts
  (highwater.py), so it never goes back, even across a move out and in again (the tombstone
  keeps the last one: keys.py).
- ``attempt``, set on a journal entry only: the attempt id, the host that wrote it and D,
  the duration within which its request must leave (issue #13 item 4). The state's own
  ``in_flight`` names the token (by hash) as on one host.
- ``resolved``, the id of the attempt whose outcome (or cancellation, or resolution by a
  new owner) this record is: a courier that lost the reply of its own outcome commit reads
  the key and knows it is done (item 5).

Serialised as JSON (the state in its own format, state.py), then sealed.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

from ..core.policy import recover_interrupted
from ..core.state import ProfileState, state_from_json, state_to_json
from ..errors import ProfileError, StateCorruptError

__all__ = [
    "Attempt",
    "ChainRecord",
    "Tombstone",
    "cancelled",
    "decode_record",
    "decode_tombstone",
    "encode_record",
    "encode_tombstone",
    "first_record",
    "journal_of",
    "new_attempt_id",
    "outcome_of",
    "resolved_by_heir",
    "with_state",
]

FORMAT = 1
_ATTEMPT_ID_BYTES = 16


def new_attempt_id() -> str:
    """A fresh attempt id: random, so that two hosts never pick the same one."""
    return secrets.token_hex(_ATTEMPT_ID_BYTES)


@dataclass(frozen=True)
class Attempt:
    """A journal entry's fleet part: whose attempt, and how long it may take to leave."""

    id: str
    host: str
    #: D, in seconds, counted by the writing host on its suspend-counting clock from before
    #: the journal commit was sent. No wall-clock time crosses hosts.
    send_window: float


@dataclass(frozen=True)
class ChainRecord:
    """One value of a profile's chain key."""

    seq: int
    state: ProfileState
    attempt: Attempt | None = None
    resolved: str | None = None

    @property
    def unresolved(self) -> Attempt | None:
        """The attempt of a journal entry nobody has resolved yet (None: not a journal)."""
        return self.attempt if self.state.in_flight is not None else None

    def __repr__(self) -> str:
        return f"ChainRecord(seq={self.seq}, state={self.state!r})"


@dataclass(frozen=True)
class Tombstone:
    """What a profile moved out of the fleet leaves: its last sequence number."""

    seq: int


def first_record(state: ProfileState, after_seq: int) -> ChainRecord:
    """The record an import (or a move in) creates, above every sequence seen before."""
    return ChainRecord(after_seq + 1, state)


def journal_of(record: ChainRecord, journal: ProfileState, attempt: Attempt) -> ChainRecord:
    """The journal entry: ``journal`` is ``policy.begin_attempt`` of the record's state."""
    return ChainRecord(record.seq + 1, journal, attempt)


def outcome_of(entry: ChainRecord, after: ProfileState) -> ChainRecord:
    """The courier's outcome of its own journal entry (``policy.apply_outcome``)."""
    return ChainRecord(entry.seq + 1, after, None, _attempt_id(entry))


def cancelled(entry: ChainRecord, before: ProfileState) -> ChainRecord:
    """The journal taken back: the courier knows its request never left (past D, lease
    gone). ``before`` is the state the journal was made from: nothing was spent. Its
    generation still moves past the entry's: a chain's generation only rises, so a later
    entry of the same token is never mistaken for this one (a job built before it, an
    heir's wait counted from it)."""
    state = replace(before, generation=entry.state.generation + 1)
    return ChainRecord(entry.seq + 1, state, None, _attempt_id(entry))


def resolved_by_heir(entry: ChainRecord, now: float) -> ChainRecord:
    """An inherited entry, after W: today's ambiguous attempt (``recover_interrupted``)."""
    return ChainRecord(
        entry.seq + 1, recover_interrupted(entry.state, now), None, _attempt_id(entry)
    )


def _attempt_id(entry: ChainRecord) -> str:
    if entry.attempt is None:
        raise ValueError("not a journal entry")
    return entry.attempt.id


# -- bytes --------------------------------------------------------------------------------


def encode_record(record: ChainRecord) -> bytes:
    """The record as JSON bytes (tokens included: only ever passed to the sealer)."""
    attempt = record.attempt
    data: dict[str, Any] = {
        "format": FORMAT,
        "seq": record.seq,
        "state": json.loads(state_to_json(record.state)),
        "attempt": None
        if attempt is None
        else {"id": attempt.id, "host": attempt.host, "send_window": attempt.send_window},
        "resolved": record.resolved,
    }
    return json.dumps(data, separators=(",", ":")).encode()


def decode_record(raw: bytes, profile: str) -> ChainRecord:
    """Parse an opened record of ``profile``; StateCorruptError on any surprise."""
    data = _object(raw, profile)
    seq = data.get("seq")
    if not isinstance(seq, int) or not _is_seq(seq) or data.get("format") != FORMAT:
        raise _corrupt(profile, "no valid format or sequence number")
    state_data = data.get("state")
    if not isinstance(state_data, dict):
        raise _corrupt(profile, "no state")
    try:
        state = state_from_json(json.dumps(state_data).encode())
    except ProfileError as exc:  # a profile name no profile can have: damage, not input
        raise _corrupt(profile, "a state with an unusable profile name") from exc
    if state.profile != profile:
        raise _corrupt(profile, f"it is profile {state.profile!r}'s state")
    attempt = _attempt(data.get("attempt"), profile)
    resolved = data.get("resolved")
    if resolved is not None and not isinstance(resolved, str):
        raise _corrupt(profile, "a bad resolved attempt id")
    return ChainRecord(seq, state, attempt, resolved)


def encode_tombstone(stone: Tombstone) -> bytes:
    return json.dumps({"format": FORMAT, "gone_seq": stone.seq}).encode()


def decode_tombstone(raw: bytes, profile: str) -> Tombstone:
    data = _object(raw, profile)
    seq = data.get("gone_seq")
    if not isinstance(seq, int) or not _is_seq(seq) or data.get("format") != FORMAT:
        raise _corrupt(profile, "a tombstone without a valid sequence number")
    return Tombstone(seq)


def _object(raw: bytes, profile: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(profile, "it is not JSON") from exc
    if not isinstance(data, dict):
        raise _corrupt(profile, "it is not a JSON object")
    return data


def _attempt(value: object, profile: str) -> Attempt | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _corrupt(profile, "a bad attempt")
    ident, host, window = value.get("id"), value.get("host"), value.get("send_window")
    if (
        not isinstance(ident, str)
        or not isinstance(host, str)
        or not isinstance(window, int | float)
        or isinstance(window, bool)
        or not math.isfinite(window)
        or window <= 0
    ):
        raise _corrupt(profile, "a bad attempt")
    return Attempt(ident, host, float(window))


def _is_seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _corrupt(profile: str, why: str) -> StateCorruptError:
    return StateCorruptError(
        f"the fleet record of profile {profile!r} opened but cannot be read ({why}); it is "
        "left untouched: check that every host runs the same aac-tokend version"
    )


def with_state(record: ChainRecord, state: ProfileState) -> ChainRecord:
    """The next record with ``state`` and nothing in flight of the fleet's (a plain save)."""
    return replace(record, seq=record.seq + 1, state=state, attempt=None, resolved=None)
