"""The engine: each profile's state in memory, its next refresh scheduled, its token served.

It depends only on interfaces: a ``StateStore`` (store/interface.py), a ``Refresher``
(refresh/courier.py: a courier process, or the calling thread), a ``Clock`` and a
``Scheduler`` (daemon/scheduling.py), so tests/test_engine.py runs it in memory. Its
concerns live in one module each, stacked as mixins over one set of fields: serving.py
(memory and the hot path), adoption.py (stored profiles, pending records), refreshing.py (a
refresh and its result), management.py (import, remove); here the public face: lifecycle,
the tick, status.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

from ..core.conditions import condition_of
from ..core.config import Config
from ..core.policy import next_refresh_at
from ..core.report import RowState, StatusRow, profile_report, report_row
from ..core.state import ProfileState
from ..errors import BusyError
from ..refresh.courier import Refresher
from ..store.interface import StateStore
from .alerts import Alerter
from .fleet_view import SINGLE_HOST, FleetView
from .management import Management
from .refreshing import Refreshing
from .scheduling import WAKE_CAP_SECONDS, Clock, Scheduler
from .serving import ProfileEntry, ServedToken

__all__ = ["Engine"]

TICK_KEY = "__tick__"
#: A followed state waits this long for its profile's lock (held by our own courier's
#: absorb, a command); if still busy, the next tick takes it.
FOLLOW_LOCK_SECONDS = 0.2


class Engine(Refreshing, Management):
    """Owns every profile's chain for the daemon's lifetime."""

    def __init__(
        self,
        *,
        store: StateStore,
        refresher: Refresher,
        scheduler: Scheduler,
        clock: Clock,
        config: Config,
        alerter: Alerter,
        socket_path: Callable[[str], Path],
        on_profiles_changed: Callable[[], None] = lambda: None,
        fleet: FleetView = SINGLE_HOST,
    ) -> None:
        self._store, self._refresher = store, refresher
        self._scheduler, self._clock, self.config = scheduler, clock, config
        self._alerter, self._socket_path = alerter, socket_path
        self._on_profiles_changed = on_profiles_changed
        self._fleet = fleet
        self._followed_late: dict[str, ProfileState] = {}
        self._profiles: dict[str, ProfileEntry] = {}
        self._serving: dict[str, ServedToken] = {}
        self._unusable: dict[str, tuple[str, str]] = {}
        self._socket_problems: dict[str, str] = {}
        self._scanned: tuple[int, float] | None = None
        self._waiting: set[str] = set()
        self._lock = threading.Lock()
        self._import_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        """Adopt every stored profile (waiting for a courier of an earlier life) and tick."""
        self._scan()
        self._scheduler.every(TICK_KEY, WAKE_CAP_SECONDS, self.tick)

    def waiting_for_courier(self, name: str) -> bool:
        """True while ``name`` is not served yet: a courier from before a restart holds it."""
        return name in self._waiting

    def profiles(self) -> list[str]:
        return sorted(self._profiles)

    def listed(self) -> list[str]:
        """Every profile ``status`` reports: served, waiting for a courier, or unusable."""
        return sorted(set(self._profiles) | set(self._waiting) | set(self._unusable))

    def set_config(self, config: Config) -> None:
        """Adopt a reloaded config: every schedule is recomputed, every alert looked at again."""
        self.config = config
        now = self._clock.now()
        for name, entry in list(self._profiles.items()):
            self._schedule(entry.state)
            self._alerter.observe(
                name, condition_of(entry.state, now, self._lifetime_days(name)), now
            )

    def follow(self, state: ProfileState) -> bool:
        """Serve a fleet profile's state that the fleet's watch brought (how a follower, and
        an owner after another host's commit, learns of a refresh); True if taken.

        Taken only if newer than memory's (a chain's generation only rises), or where memory
        holds a pair etcd has not taken yet and etcd moved on: the watch and this host's
        own absorb may race, and the older must never win. Under the profile's lock, as any
        change of memory; while our own courier's absorb holds it, the next tick tries again.
        """
        name = state.profile
        if not self._fleet.covers(name):
            return False
        try:
            with self._store.locked(name, FOLLOW_LOCK_SECONDS):
                self._followed_late.pop(name, None)
                entry = self._profiles.get(name)
                if entry is not None and not _newer(state, entry.state, entry.unsaved):
                    return False
                self._hold(state)
        except BusyError:
            self._followed_late[name] = state
            return False
        self._announce(name)
        if entry is None:
            self._on_profiles_changed()
        return True

    def tick(self) -> None:
        """Catch what a sleeping scheduler missed (suspend, clock jump); retry unsaved state.

        Also looks for state files not served yet: a fixed or new file is adopted here.
        """
        for late in list(self._followed_late.values()):
            self.follow(late)
        self._scan()
        now = self._clock.now()
        for name, entry in list(self._profiles.items()):
            if entry.unsaved is not None:
                self._retry_unsaved(name, entry)
                if self._profiles.get(name) is not entry:
                    continue  # its state file was gone: forgotten
            if entry.refreshing or not self._fleet.may_refresh(name):
                continue
            # Due by the time that passed, even if the wall clock stepped back since.
            state_now = self._now_for(entry, now)
            at = next_refresh_at(entry.state, state_now, self.config.policy_for(name))
            if at is not None and at <= state_now:
                self._scheduler.schedule(name, now, lambda n=name: self.refresh(n))  # type: ignore[misc]
            self._alerter.observe(
                name, condition_of(entry.state, now, self._lifetime_days(name)), now
            )

    def note_socket_problem(self, name: str, problem: str | None) -> None:
        """Record why ``name`` has no token socket (None: it has one); status shows it."""
        if problem is None:
            self._socket_problems.pop(name, None)
        else:
            self._socket_problems[name] = problem

    def status(self, only: str | None = None) -> list[StatusRow]:
        """Each profile's status row (``status --json`` prints their ``to_wire()``); with
        ``only``, just its.

        ``only`` matters at scale: a thousand reports take ~20 ms, paid by every
        `refresh` answer, and token reads wait for the GIL meanwhile.
        """
        now = self._clock.now()
        rows = []
        for name, entry in sorted(self._profiles.items()):
            if only is not None and name != only:
                continue
            # On the state's own clock (see _now_for), shown as a time on today's wall clock.
            state_now = self._now_for(entry, now)
            at = next_refresh_at(entry.state, state_now, self.config.policy_for(name))
            if at is not None:
                at -= state_now - now
            row = profile_report(
                entry.state,
                now,
                next_refresh=at,
                token_socket=str(self._socket_path(name)),
                storage_error=entry.unsaved is not None,
                lifetime_days=self._lifetime_days(name),
            )
            # What a reader gets, by both clocks (the report alone knows only the wall clock).
            valid = row.token_valid and self.current_token(name) is not None
            row = dataclasses.replace(row, token_valid=valid)
            facts = self._fleet.facts(name)
            if facts is not None:
                row = dataclasses.replace(row, fleet=facts)
            problem = self._socket_problems.get(name)
            if problem is not None:
                row = dataclasses.replace(row, token_socket=None, alert=problem)
            rows.append(row)
        for name in sorted(set(self._waiting) - set(self._profiles)):
            if only is None or name == only:
                # Not served until the courier of the earlier daemon ends (within its bound):
                # no token now, and the daemon will serve it on its own.
                rows.append(
                    report_row(
                        profile=name,
                        state=RowState.RETRYING,
                        last_error="a refresh begun before the daemon restarted is still "
                        "finishing; the profile is served once it ends",
                        token_socket=str(self._socket_path(name)),
                    )
                )
        for name, (state, error) in sorted(dict(self._unusable).items()):
            if only is None or name == only:
                rows.append(report_row(profile=name, state=state, alert=error))
        return rows


def _newer(state: ProfileState, held: ProfileState, unsaved: bytes | None) -> bool:
    """True if a followed ``state`` should replace ``held`` (see ``Engine.follow``)."""
    if state.generation > held.generation:
        return True
    # Our outcome held unsaved and an heir's resolution of the same entry share a generation:
    # etcd's word wins (the heir's retry reports the lost pair as after_lost_response).
    return unsaved is not None and state.generation == held.generation and state != held
