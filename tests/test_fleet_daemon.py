"""Fleet mode end to end: real ``aac-tokend run`` daemons as hosts, a real etcd, the sandbox.

Each test builds its own fleet (a fresh fleet name, homes and sandbox) on one module-scoped
single-member etcd; timings are the demo's, scaled down by configuration (lease TTL 2 s).
The sandbox's request log is the referee: every refresh token is presented once. The
handover (test_fleet_handover.py), etcd lost (test_fleet_etcd_lost.py) and step-down
(test_fleet_stepdown.py) are in files of their own, each under a minute.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from aac_tokend.errors import EtcdUnavailableError
from aac_tokend.fleet.routing import RoutingStore
from aac_tokend.sandbox.demo_fleet import fleet_config_text
from aac_tokend.store.memory import MemoryStore
from aac_tokend.testing import oauth_state
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster
from tests.fleet_hosts import (
    TTL,
    FleetHosts,
    Readers,
    fresh_fleet,
    presented_twice,
    progress_etcd,
    rotations,
    steady,
)
from tests.helpers_e2e import (
    READY_TIMEOUT,
    RecordingSandbox,
    assert_one_line_error,
    e2e_home,
    import_pair,
    running_sandbox,
    wait_until,
)

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member, with watch progress notifications every 300 ms."""
    with progress_etcd(tmp_path_factory.mktemp("etcd-daemon")) as cluster:
        yield cluster


@pytest.fixture
def sandbox() -> Iterator[RecordingSandbox]:
    """Access tokens that live 8 s: a refresh every 5-6 s, room for a failover in each."""
    with running_sandbox(access_ttl=8) as server:
        yield server


@pytest.fixture
def fleet(etcd: EtcdCluster, sandbox: RecordingSandbox) -> Iterator[FleetHosts]:
    """A fleet no other test uses; its daemons are stopped after the test."""
    with fresh_fleet(etcd, sandbox, "d") as hosts:
        yield hosts


class TestServing:
    """The owner refreshes; every host serves the same token from its own socket."""

    def test_followers_serve_each_new_token_within_a_moment(
        self, fleet: FleetHosts, sandbox: RecordingSandbox
    ) -> None:
        """Two refreshes by the owner are served by all three hosts within 0.5 s of each
        other, with no empty read, and the sandbox saw each refresh token once."""
        fleet.add(3)
        fleet.move_in("host-0")
        fleet.start()
        owner = fleet.wait_owner()
        steady(fleet, sandbox)
        with Readers(fleet.daemons) as readers:
            wait_until(lambda: rotations(sandbox) >= 3, 20, "two more refreshes")
            time.sleep(0.6)
        assert presented_twice(sandbox) == []
        assert sum(readers.gaps.values()) == 0, readers.gap_times
        spreads = []
        for _, token in readers.served[owner][1:]:  # the tokens the owner's refreshes got
            first = [next(t for t, tok in readers.served[h] if tok == token) for h in fleet.daemons]
            spreads.append(max(first) - min(first))
        assert len(spreads) >= 2 and max(spreads) < 0.5, spreads
        print(f"hosts' first reads of a new token: at most {max(spreads) * 1000:.0f} ms apart")


class TestStatus:
    """``status --json`` has a ``fleet`` object on the owner and on a follower."""

    def test_owner_and_follower_fleet_fields(
        self, fleet: FleetHosts, sandbox: RecordingSandbox
    ) -> None:
        """Both name themselves and the owner, the owner has lease time left, etcd is ok and
        after a refresh each knows its clock skew to the owner (one clock here: small)."""
        fleet.add(2)
        fleet.move_in("host-0")
        fleet.start()
        owner = fleet.wait_owner()
        steady(fleet, sandbox)
        for host in fleet.daemons:
            facts = fleet.fleet_row(host)
            assert facts["host"] == host
            assert facts["role"] == ("owner" if host == owner else "follower")
            assert facts["owner"] == owner
            assert facts["etcd"] == "ok"
            assert facts["clock_skew_seconds"] is not None
            # the same clock: what is measured is the outcome commit and the watch's delivery
            assert abs(facts["clock_skew_seconds"]) < 1.0
            assert "clock_warning" not in facts
            if host == owner:
                assert 0 < facts["lease_left_seconds"] <= TTL
            else:
                assert facts["lease_left_seconds"] is None


class TestConfig:
    """A [fleet] table that cannot be applied says so in one line; etcd down is survived."""

    def test_reload_with_a_changed_fleet_table_is_refused(
        self, fleet: FleetHosts, sandbox: RecordingSandbox
    ) -> None:
        """``aac-tokend reload`` after the [fleet] table changed exits 78 with one line, and
        the daemon goes on serving the fleet profile."""
        (host,) = fleet.add(1)
        fleet.move_in(host)
        fleet.start()
        fleet.wait_owner()
        steady(fleet, sandbox)
        fleet.config_file(host).write_text(
            fleet_config_text(fleet.endpoints, host, fleet.name + "other")
        )
        result = fleet.homes[host].cli("reload")
        line = assert_one_line_error(result, 78)
        assert "[fleet] table changed" in line and "restart" in line
        assert fleet.daemons[host].alive
        assert fleet.daemons[host].token()
        assert fleet.daemons[host].profile_status()["fleet"]["role"] == "owner"

    def test_fleet_table_without_a_fleet_key_exits_in_one_line(self, fleet: FleetHosts) -> None:
        """A daemon with [fleet] but no fleet key exits with one line naming the command
        that installs the key."""
        with e2e_home() as home:
            config = home.paths.config_dir / "config.toml"
            config.parent.mkdir(mode=0o700, parents=True)
            config.write_text(fleet_config_text(fleet.endpoints, "lonely", fleet.name))
            daemon = home.daemon().start(wait=False)
            status = daemon.wait(READY_TIMEOUT)
            lines = daemon.output().strip().splitlines()
        assert status != 0 and len(lines) == 1, lines
        assert lines[0].startswith("aac-tokend: error: no fleet key"), lines
        assert "aac-tokend fleet key import" in lines[0], lines

    def test_started_while_etcd_is_down_serves_local_then_fleet_profiles(
        self, etcd: EtcdCluster, fleet: FleetHosts, sandbox: RecordingSandbox
    ) -> None:
        """With etcd down at start the daemon serves its local profile, and the fleet
        profile once etcd is up."""
        (host,) = fleet.add(1, extra='profiles = ["default"]\n')
        fleet.move_in(host)
        import_pair(fleet.homes[host], sandbox, profile="solo")
        etcd.kill(etcd.members[0])
        daemon = fleet.homes[host].daemon().start(wait=False)
        fleet.daemons[host] = daemon
        wait_until(lambda: daemon.token("solo"), READY_TIMEOUT, "the local profile's token")
        assert daemon.token("default") == ""
        etcd.restore()
        wait_until(lambda: daemon.token("default"), 20, "the fleet profile's token")
        assert daemon.alive and daemon.token("solo")


class UnreachableFleet(MemoryStore):
    """A fleet store whose etcd is out of reach while ``down`` (its listing fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def profiles(self) -> list[str]:
        if self.down:
            raise EtcdUnavailableError("etcd /v3/kv/range: no member answered (test)")
        return super().profiles()


class TestRoutingListing:
    """The routed listing survives etcd out of reach: local names stay, fleet names too."""

    def test_listing_without_etcd_keeps_local_and_last_fleet_names(self) -> None:
        """Down at start: the local names; up: both; down again: both, as last listed."""
        local, fleet = MemoryStore(), UnreachableFleet()
        local.save(oauth_state(profile="solo"))
        fleet.save(oauth_state(profile="shared"))
        routed = RoutingStore(local, fleet, lambda name: name == "shared", "f")
        fleet.down = True
        assert routed.profiles() == ["solo"]
        fleet.down = False
        assert routed.profiles() == ["shared", "solo"]
        fleet.down = True
        assert routed.profiles() == ["shared", "solo"]
