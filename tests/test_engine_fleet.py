"""The engine's fleet hooks on its interfaces alone (daemon/fleet_view.py): a fleet profile
is refreshed only by its owner, learns of refreshes from the watch (``Engine.follow``), keeps
another host's journal for the fenced courier, and stops serving by the clock skew.

A small honest ``FleetView`` stands in for fleet/runtime.py; the engine, store, refresher,
clock and scheduler are those of tests/test_engine.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from aac_tokend.core.config import Config
from aac_tokend.core.outcome import Refreshed
from aac_tokend.core.policy import SERVE_MARGIN_SECONDS, begin_attempt
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.testing import (
    T0,
    FakeClock,
    FakeRefresher,
    FakeScheduler,
    MemoryStore,
    RecordingSink,
    oauth_state,
)

NEW_ACCESS = "access-after-rotation-bbbbbbbb"
NEW_REFRESH = "refresh-after-rotation-ssssssss"
SKEW = 5.0


class TwoHostView:
    """The fleet as one host sees it: 'work' is in the fleet, owned here while ``owner``."""

    def __init__(self) -> None:
        self.owner = False

    def covers(self, name: str) -> bool:
        return name == "work"

    def may_refresh(self, name: str) -> bool:
        return not self.covers(name) or self.owner

    def serve_margin(self, name: str) -> float:
        return SKEW if self.covers(name) else 0.0

    def facts(self, name: str) -> dict[str, Any] | None:
        if not self.covers(name):
            return None
        return {"role": "owner" if self.owner else "follower"}


class Rig:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.clock = FakeClock(T0)
        self.refresher = FakeRefresher(self.store, self.clock)
        self.scheduler = FakeScheduler()
        self.view = TwoHostView()
        self.engine = Engine(
            store=self.store,
            refresher=self.refresher,
            scheduler=self.scheduler,
            clock=self.clock,
            config=Config(notifications=False),
            alerter=Alerter([RecordingSink()]),
            socket_path=lambda name: Path("/run/test-engine") / f"{name}.token.sock",
            fleet=self.view,
        )


def _rotated(state_generation: int) -> Any:
    """The state an owner elsewhere committed after a refresh: newer generation, new pair."""
    return oauth_state(
        access_token=NEW_ACCESS,
        refresh_token=NEW_REFRESH,
        access_obtained_at=T0 + 10,
        access_expires_at=T0 + 3610,
        generation=state_generation,
    )


class TestFollower:
    """A follower never refreshes; the watch brings the owner's state."""

    def test_follower_sends_nothing_when_due(self) -> None:
        """Due and asked to refresh, a follower starts no courier and counts no failure."""
        rig = Rig()
        rig.store.save(oauth_state())
        rig.engine.start()
        rig.clock.advance(3500)
        state = rig.engine.refresh("work")
        rig.engine.tick()
        assert rig.refresher.jobs == []
        assert state.consecutive_failures == 0

    def test_owner_refreshes(self) -> None:
        """The same profile on its owner goes through the refresher."""
        rig = Rig()
        rig.view.owner = True
        rig.store.save(oauth_state())
        rig.engine.start()
        rig.refresher.script(Refreshed(NEW_ACCESS, NEW_REFRESH, 3600))
        rig.engine.refresh("work")
        assert [job.profile for job in rig.refresher.jobs] == ["work"]
        assert rig.engine.current_token("work") == NEW_ACCESS.encode()

    def test_followed_state_is_served_at_once(self) -> None:
        """A newer state from the watch is served and rescheduled without a store read."""
        rig = Rig()
        rig.store.save(oauth_state())
        rig.engine.start()
        assert rig.engine.follow(_rotated(5)) is True
        assert rig.engine.current_token("work") == NEW_ACCESS.encode()

    def test_an_older_state_never_wins(self) -> None:
        """A state from the watch older than memory's (a race with our own absorb) is dropped."""
        rig = Rig()
        rig.store.save(oauth_state(generation=7))
        rig.engine.start()
        assert rig.engine.follow(_rotated(6)) is False
        assert rig.engine.current_token("work") == b"access-token-aaaaaaaaaaaa"

    def test_a_profile_first_seen_on_the_watch_is_adopted(self) -> None:
        """A fleet profile this host has never served is served from its first record."""
        rig = Rig()
        rig.engine.start()
        assert rig.engine.profiles() == []
        assert rig.engine.follow(_rotated(1)) is True
        assert rig.engine.profiles() == ["work"]

    def test_a_busy_lock_defers_to_the_tick(self) -> None:
        """While the profile's lock is held (our courier's absorb), the tick takes it later."""
        rig = Rig()
        rig.store.save(oauth_state())
        rig.engine.start()
        with rig.store.locked("work", 1):
            assert rig.engine.follow(_rotated(5)) is False
        assert rig.engine.current_token("work") == b"access-token-aaaaaaaaaaaa"
        rig.engine.tick()
        assert rig.engine.current_token("work") == NEW_ACCESS.encode()

    def test_a_single_host_profile_is_not_followed(self) -> None:
        """follow() ignores a profile outside the fleet: its file is its only truth."""
        rig = Rig()
        other = dataclasses.replace(_rotated(5), profile="local")
        assert rig.engine.follow(other) is False


class TestInheritedJournal:
    """Another host's journal entry is left for the fenced courier, never recovered here."""

    def test_fleet_journal_is_kept_at_adoption(self) -> None:
        """A fleet profile adopted with a journal keeps it (another host may be sending)."""
        rig = Rig()
        journal = begin_attempt(oauth_state(), T0)
        rig.store.save(journal)
        rig.engine.start()
        assert rig.store.load("work") == journal
        assert rig.engine.current_token("work") == b"access-token-aaaaaaaaaaaa"

    def test_single_host_journal_is_still_recovered(self) -> None:
        """The same journal in a profile outside the fleet is recovered as today."""
        rig = Rig()
        journal = dataclasses.replace(begin_attempt(oauth_state(), T0), profile="local")
        rig.store.save(journal)
        rig.engine.start()
        stored = rig.store.load("local")
        assert stored is not None and stored.in_flight is None


class TestSkew:
    """A fleet profile stops being served max_clock_skew early: expiry is the owner's clock."""

    def test_served_until_skew_before_expiry(self) -> None:
        """Served until SKEW + the usual margin before expiry, then not; a local one longer."""
        rig = Rig()
        rig.store.save(oauth_state())
        rig.store.save(oauth_state(profile="local"))
        rig.engine.start()
        rig.clock.advance(3600 - SKEW - SERVE_MARGIN_SECONDS - 0.5)
        assert rig.engine.current_token("work") is not None
        rig.clock.advance(1.0)
        assert rig.engine.current_token("work") is None
        assert rig.engine.current_token("local") is not None

    def test_status_row_carries_the_fleet_object(self) -> None:
        """A fleet profile's row has the view's facts; a local one's is null."""
        rig = Rig()
        rig.store.save(oauth_state())
        rig.store.save(oauth_state(profile="local"))
        rig.engine.start()
        rows = {row.profile: row for row in rig.engine.status()}
        assert rows["work"].fleet == {"role": "follower"}
        assert rows["local"].fleet is None
