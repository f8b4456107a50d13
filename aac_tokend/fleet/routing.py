"""One store and one refresher for the engine, whichever profiles are in the fleet.

A daemon with a ``[fleet]`` table serves both kinds of profile: those the table covers
live in etcd (``FleetStore``, refreshed by the fenced courier), the others in local files
as on a single host. The engine sees one ``StateStore`` and one ``Refresher``; these route
each call by the profile's name. Which names the fleet covers is config (``[fleet]
profiles``), so a name never changes sides while the daemon runs.

The engine knows a store's trouble as ``StorageError`` (kept serving, reported, retried):
etcd out of reach, or a compare that failed (the chain moved on under another host), reach
it as one, naming etcd. The fenced courier uses the fleet store directly and sees them as
they are.

A covered name that still has a local state file (not moved in yet) is listed, and
loading it says what to do: the engine reports it as unusable, and serves nothing from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from ..core.state import ProfileState
from ..errors import (
    EtcdLeaseGoneError,
    EtcdUnavailableError,
    FenceLostError,
    InputError,
    RollbackError,
    StateCorruptError,
    StorageError,
)
from ..refresh.courier import CourierJob, Refresher
from ..refresh.result import CourierResult
from ..store.interface import StateStore

__all__ = ["RoutingRefresher", "RoutingStore"]


class RoutingStore(StateStore):
    """``fleet`` for the names ``covers`` accepts, ``local`` for the others."""

    def __init__(
        self, local: StateStore, fleet: StateStore, covers: Callable[[str], bool], fleet_name: str
    ) -> None:
        self._local, self._fleet, self._covers = local, fleet, covers
        self._fleet_name = fleet_name
        self._fleet_names: list[str] = []

    def _for(self, profile: str) -> StateStore:
        return self._fleet if self._covers(profile) else self._local

    @contextlib.contextmanager
    def _etcd(self) -> Iterator[None]:
        try:
            yield
        except (EtcdUnavailableError, EtcdLeaseGoneError, FenceLostError) as exc:
            raise StorageError(f"fleet {self._fleet_name!r}: {exc}") from exc
        except RollbackError as exc:  # never used, like a state that cannot be read back
            raise StateCorruptError(str(exc)) from exc

    def load(self, profile: str) -> ProfileState | None:
        if self._covers(profile):
            with self._etcd():
                state = self._fleet.load(profile)
            if state is None and self._local.load(profile) is not None:
                raise StorageError(
                    f"profile {profile!r} is in fleet {self._fleet_name!r} (config.toml "
                    f"[fleet]) but its chain is still in {self._local.where(profile)}; move it "
                    f"in with `aac-tokend fleet move-in {profile}`"
                )
            return state
        return self._local.load(profile)

    def save(self, state: ProfileState) -> None:
        with self._etcd():
            self._for(state.profile).save(state)

    def save_journal(self, journal: ProfileState) -> None:
        self._for(journal.profile).save_journal(journal)

    def delete(self, profile: str) -> None:
        if self._covers(profile):
            # `remove` on any one host must not end the chain every host serves.
            raise InputError(
                f"profile {profile!r} is in fleet {self._fleet_name!r}: removing it here would "
                f"end its chain for every host; move it out first (`aac-tokend stop`, then "
                f"`aac-tokend fleet move-out {profile}`), or take it out of [fleet] profiles"
            )
        self._local.delete(profile)

    def where(self, profile: str) -> str:
        return self._for(profile).where(profile)

    def locked(self, profile: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        return self._for(profile).locked(profile, timeout)

    def lock_is_free(self, profile: str) -> bool:
        return self._for(profile).lock_is_free(profile)

    def profiles(self) -> list[str]:
        local = self._local.profiles()
        try:
            with self._etcd():
                self._fleet_names = self._fleet.profiles()
        except StorageError:
            # etcd out of reach must neither hide the local profiles (a daemon started while
            # etcd is down serves them) nor drop the fleet ones it serves (a follower that
            # loses etcd serves until expiry): the fleet's names as last listed.
            pass
        return sorted(set(self._fleet_names) | set(local))

    def listing_stamp(self) -> int:
        return hash((self._local.listing_stamp(), self._fleet.listing_stamp()))

    def seal(self, state: ProfileState) -> bytes:
        return self._for(state.profile).seal(state)

    def unseal(self, profile: str, blob: bytes) -> ProfileState:
        return self._for(profile).unseal(profile, blob)

    def keep_pending(self, profile: str, blob: bytes) -> None:
        self._for(profile).keep_pending(profile, blob)

    def pending(self, profile: str) -> bytes | None:
        return self._for(profile).pending(profile)

    def clear_pending(self, profile: str) -> None:
        self._for(profile).clear_pending(profile)


class RoutingRefresher:
    """The fleet's courier for covered profiles, the single-host courier for the others."""

    def __init__(self, local: Refresher, fleet: Refresher, covers: Callable[[str], bool]) -> None:
        self._local, self._fleet, self._covers = local, fleet, covers

    def refresh(self, job: CourierJob) -> CourierResult:
        chosen = self._fleet if self._covers(job.profile) else self._local
        return chosen.refresh(job)
