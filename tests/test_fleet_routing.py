"""The routing store: fleet profiles to the fleet's store, the others to local files; a
`remove` on one host never ends a chain every host serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from aac_tokend.core.config import Config
from aac_tokend.core.state import ProfileState
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.errors import InputError, RollbackError, StateCorruptError, StorageError
from aac_tokend.fleet.routing import RoutingStore
from aac_tokend.testing import (
    T0,
    FakeClock,
    FakeRefresher,
    FakeScheduler,
    MemoryStore,
    RecordingSink,
    oauth_state,
)


def _stores() -> tuple[MemoryStore, MemoryStore, RoutingStore]:
    local, fleet = MemoryStore(), MemoryStore()
    fleet.save(oauth_state())  # 'work' lives in the fleet
    local.save(oauth_state(profile="mine"))
    return local, fleet, RoutingStore(local, fleet, lambda name: name == "work", "demo")


class TestRouting:
    """Each call goes to the store of the profile's side."""

    def test_loads_and_lists_each_side(self) -> None:
        """A fleet profile is read from the fleet, a local one from the files; both listed."""
        _local, _fleet, routed = _stores()
        assert routed.profiles() == ["mine", "work"]
        state = routed.load("work")
        assert state is not None and state.profile == "work"
        assert routed.load("mine") is not None

    def test_a_covered_name_with_only_a_local_file_says_move_in(self) -> None:
        """A fleet profile whose chain is still a local file is unusable, with the fix named."""
        local, fleet, routed = _stores()
        fleet.delete("work")
        local.save(oauth_state())
        with pytest.raises(StorageError, match="fleet move-in work"):
            routed.load("work")


class RollingBackStore(MemoryStore):
    """A fleet store whose chain is older than this host has seen (etcd rolled back)."""

    def load(self, profile: str) -> ProfileState | None:
        raise RollbackError(f"fleet 'demo' profile {profile!r}: a rollback")


class TestRollback:
    """A rolled-back chain reaches the engine as a state it must not use, never a crash."""

    def test_rollback_is_a_state_not_to_use(self) -> None:
        """RollbackError becomes StateCorruptError, which the engine reports and keeps."""
        routed = RoutingStore(MemoryStore(), RollingBackStore(), lambda n: n == "work", "demo")
        with pytest.raises(StateCorruptError, match="rollback"):
            routed.load("work")


class TestRemove:
    """`remove` of a fleet profile is refused on every host; a local one is removed."""

    def test_remove_of_a_fleet_profile_is_refused(self) -> None:
        """The refusal names the move out, and the fleet's chain is untouched."""
        _local, fleet, routed = _stores()
        with pytest.raises(InputError, match="fleet move-out work"):
            routed.delete("work")
        assert fleet.load("work") is not None

    def test_remove_of_a_local_profile_goes_on(self) -> None:
        """A profile outside the fleet is removed as on one host."""
        local, _fleet, routed = _stores()
        routed.delete("mine")
        assert local.load("mine") is None

    def test_the_engine_refuses_and_keeps_serving(self) -> None:
        """Through the engine (as the control socket's remove), the profile stays served."""
        _local, fleet, routed = _stores()
        clock = FakeClock(T0)
        engine = Engine(
            store=routed,
            refresher=FakeRefresher(routed, clock),
            scheduler=FakeScheduler(),
            clock=clock,
            config=Config(notifications=False),
            alerter=Alerter([RecordingSink()]),
            socket_path=lambda name: Path("/run/test") / f"{name}.token.sock",
        )
        engine.start()
        with pytest.raises(InputError):
            engine.remove("work")
        assert engine.current_token("work") is not None
        assert fleet.load("work") is not None
