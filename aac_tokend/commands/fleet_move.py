"""``fleet move-in`` and ``fleet move-out``: a chain crosses between this host's state
directory and etcd, crash-safe at every step.

A chain must never be in two places (both could be refreshed: a token spent twice) and never
in none (lost). Each move keeps a local marker file until etcd confirms its side, so a rerun
after a crash at any step finishes the move:

- move-in renames ``<profile>.state`` to ``<profile>.moving`` (durably) first: from then the
  local daemon no longer sees the chain, yet it is not lost. ``FleetChains.create`` follows,
  then a linearizable read confirms it; only then is ``.moving`` deleted. A create that surely
  did not apply renames the file back.
- move-out writes the record read from etcd to ``<profile>.moving-out`` (durably) first, then
  ``FleetChains.remove`` (compare the revision read: a chain that moved on meanwhile is read
  again), and renames ``.moving-out`` to ``<profile>.state`` once etcd no longer has it.

What a rerun cannot tell apart, and so what a person must not do: run the same profile's
move on two hosts at once. A move-out interrupted after its remove was sent, while another
host moved the chain out too, or a move-in interrupted before its create was confirmed,
while another host moved the chain in and out again, leaves a marker that a rerun would
finish although etcd's change was the other host's (the tombstone does not say whose it
is). Each step is refused if the chain is in etcd under another token, so this needs two
people moving one profile at the same moment and a crash or a lost reply in between.

The markers' file steps are in ``fleet_markers``. Both moves run under the single-owner
lock (the local daemon must be stopped: ``commands/fleet.py`` says so) and the profile's
lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..core.state import ProfileState
from ..core.tokens import token_hash
from ..errors import (
    AacTokendError,
    BusyError,
    EtcdOutcomeUnknownError,
    FenceLostError,
    InputError,
    ProfileError,
    StorageError,
    TransientError,
)
from ..fleet.records import ChainRecord
from ..store.files import FileStore
from .fleet_markers import (
    Move,
    check_not_moving,
    moving_in_path,
    moving_out_path,
    read_marker,
    rename_durably,
    unlink_marker,
    write_marker,
)

__all__ = [
    "MOVE_LOCK_SECONDS",
    "REMOVE_TRIES",
    "Chains",
    "Moved",
    "VersionedRecord",
    "check_movable",
    "move_in",
    "move_out",
]

#: How long a move waits for the profile's lock: a courier of a killed daemon holds it until
#: its outcome is on disk, within its own bound (offline.IMPORT_LOCK_SECONDS, alike).
MOVE_LOCK_SECONDS = 10.0
#: A fleet owner may refresh the chain between our read and our remove; each refresh is a
#: few etcd writes minutes apart, so three reads in a row that lose the race mean something
#: else is writing the key: stop and say so rather than loop.
REMOVE_TRIES = 3


class VersionedRecord(Protocol):
    """``fleet.chains.Versioned``: a chain record and its key's mod_revision."""

    @property
    def record(self) -> ChainRecord: ...
    @property
    def revision(self) -> int: ...


class Chains(Protocol):
    """What the moves need of ``fleet.chains.FleetChains`` (design section A)."""

    def read(self, profile: str) -> VersionedRecord | None: ...
    def create(self, profile: str, state: ProfileState) -> VersionedRecord: ...
    def remove(self, profile: str, *, expected_revision: int) -> int: ...


@dataclass(frozen=True)
class Moved:
    """What a move did: ``finished`` is True when it completed an interrupted one."""

    profile: str
    seq: int | None
    finished: bool


def _identity(state: ProfileState) -> str:
    # The refresh token names an OAuth chain; a static token is its own chain.
    return token_hash(state.refresh_token or state.access_token)


def _descends(remote: ProfileState, local: ProfileState) -> bool:
    """``remote`` is ``local``'s chain, possibly refreshed since (owners may refresh it
    the moment it lands in etcd): its token is current there or was spent there."""
    mine = _identity(local)
    return mine == _identity(remote) or mine in remote.spent_rt_hashes


def check_movable(state: ProfileState, pending: bytes | None, fleet: str) -> None:
    """Refuse a chain that cannot go to the fleet as it is (each a one-line InputError)."""
    name = state.profile
    if state.in_flight is not None:
        raise InputError(
            f"profile {name} has an unresolved refresh (its journal is in flight); start "
            "`aac-tokend run` once so it resolves it, stop it, then move the profile in"
        )
    if pending is not None:
        raise InputError(
            f"profile {name} has a refreshed pair a stopped daemon could not save; start "
            "`aac-tokend run` once so it saves it, stop it, then move the profile in"
        )
    if state.rejection is not None:
        raise InputError(
            f"profile {name} was rejected by the token endpoint and needs a new pair, not a "
            f"fleet; import a new pair (`aac-tokend import -p {name}`), then move it into "
            f"fleet {fleet}"
        )


def move_in(store: FileStore, chains: Chains, profile: str, fleet: str) -> Moved:
    """Move ``profile``'s local chain into etcd (or finish an interrupted move-in)."""
    marker = moving_in_path(store, profile)
    state_path = store.path(profile)
    with store.locked(profile, MOVE_LOCK_SECONDS):
        check_not_moving(store, profile, Move.OUT)
        state = read_marker(store, profile, marker)
        if state is not None:
            if state_path.exists():
                raise StorageError(
                    f"both {state_path} and {marker} exist (a move-in was interrupted and a "
                    "pair imported since); move one of them aside, then run move-in again"
                )
            return _finish_in(store, chains, profile, fleet, state, chains.read(profile))
        state = store.load(profile)
        # Read before the rename: an unreachable etcd, or a chain already there, leaves the
        # local file where the daemon finds it.
        there = chains.read(profile)
        if state is None:
            if there is not None:
                raise InputError(f"profile {profile} is already in fleet {fleet}")
            raise ProfileError(f"no local profile named {profile!r}; import one first")
        if there is not None:
            if _descends(there.record.state, state):
                raise InputError(
                    f"profile {profile} is already in fleet {fleet} and the local state file "
                    "is an older copy of that chain (refreshing it here would spend a token "
                    f"twice): delete it with `aac-tokend remove {profile}`"
                )
            raise _other_chain(profile, fleet)
        check_movable(state, store.pending(profile), fleet)
        rename_durably(store, state_path, marker)
        return _create(store, chains, profile, state)


def _other_chain(profile: str, fleet: str) -> InputError:
    return InputError(
        f"profile {profile} is already in fleet {fleet} with another chain; the local one is "
        "left as it was: move the fleet's out first, or import the local one under another name"
    )


def _create(store: FileStore, chains: Chains, profile: str, state: ProfileState) -> Moved:
    """Create the chain key from the marker's state, confirm it by a read, drop the marker."""
    marker = moving_in_path(store, profile)
    try:
        chains.create(profile, state)
    except EtcdOutcomeUnknownError:
        pass  # the read below says whether it applied
    except Exception:
        # Surely not applied (refused, not sent, a chain created meanwhile): the local
        # daemon gets its chain back as it was.
        rename_durably(store, marker, store.path(profile))
        raise
    again = f"its state is kept in {marker}: run `aac-tokend fleet move-in {profile}` again"
    try:
        there = chains.read(profile)
    except AacTokendError as exc:
        raise TransientError(
            f"cannot confirm the move-in of profile {profile} ({exc}); {again}"
        ) from exc
    if there is None or not _descends(there.record.state, state):
        raise TransientError(f"etcd did not confirm the move-in of profile {profile}; {again}")
    unlink_marker(store, marker)
    return Moved(profile, there.record.seq, finished=False)


def _finish_in(
    store: FileStore,
    chains: Chains,
    profile: str,
    fleet: str,
    state: ProfileState,
    there: VersionedRecord | None,
) -> Moved:
    """A rerun: the marker holds the chain; etcd has it (done but for the marker) or not."""
    marker = moving_in_path(store, profile)
    if there is None:
        moved = _create(store, chains, profile, state)
        return Moved(profile, moved.seq, finished=True)
    if not _descends(there.record.state, state):
        raise InputError(
            f"profile {profile} is in fleet {fleet} with another chain than the one an "
            f"interrupted move-in left in {marker}; keep whichever is current: remove "
            f"{marker}, or move the fleet's out first"
        )
    unlink_marker(store, marker)
    return Moved(profile, there.record.seq, finished=True)


def move_out(store: FileStore, chains: Chains, profile: str, fleet: str) -> Moved:
    """Move ``profile``'s chain from etcd to a local state file (or finish a move-out)."""
    marker = moving_out_path(store, profile)
    state_path = store.path(profile)
    with store.locked(profile, MOVE_LOCK_SECONDS):
        check_not_moving(store, profile, Move.IN)
        finishing = marker.exists()
        if state_path.exists():
            raise InputError(
                f"profile {profile} already has a local state file {state_path}; remove it "
                f"(`aac-tokend remove {profile}`) or move the fleet's chain out under its name "
                "later"
            )
        maybe_removed = False
        for _ in range(REMOVE_TRIES):
            there = chains.read(profile)
            if there is None:
                state = read_marker(store, profile, marker)
                if state is None:
                    raise ProfileError(f"profile {profile!r} is not in fleet {fleet}")
                # Removed from etcd (by us, before a crash or a lost reply): finish.
                rename_durably(store, marker, state_path)
                return Moved(profile, None, True)
            attempt = there.record.unresolved
            if attempt is not None:
                unlink_marker(store, marker)  # a stale copy: etcd keeps the chain
                raise BusyError(
                    f"profile {profile}: a refresh by host {attempt.host} is not resolved yet; "
                    "wait for it (at most the fleet's resolve_wait_seconds), then run "
                    "move-out again"
                )
            write_marker(store, marker, there.record.state)
            try:
                chains.remove(profile, expected_revision=there.revision)
            except FenceLostError:
                maybe_removed = False
                continue  # the chain moved on: read it again
            except EtcdOutcomeUnknownError:
                maybe_removed = True
                continue  # maybe removed: the read says
            except Exception:
                unlink_marker(store, marker)  # surely not removed: etcd keeps the chain
                raise
            rename_durably(store, marker, state_path)
            return Moved(profile, there.record.seq, finishing)
        if not maybe_removed:
            unlink_marker(store, marker)  # a stale copy: etcd keeps the chain
    raise FenceLostError(
        f"profile {profile}: the fleet chain changed under each of {REMOVE_TRIES} tries to move "
        f"it out (or etcd's answers were lost); run `aac-tokend fleet move-out {profile}` again"
    )
