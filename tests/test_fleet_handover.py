"""Fleet mode end to end: the owner daemon stopped (SIGTERM) or killed (SIGKILL), or cut
off from etcd; the other hosts' readers never see no token while the token is good.

Real ``aac-tokend run`` daemons as hosts (tests/fleet_hosts.py), one module-scoped
single-member etcd, the in-process sandbox with 12 s access tokens: a refresh about every
9 s leaves the heir's first refresh (a cold fleet courier, 1-2 s on the loaded 2-core
machine) room before serving ends (expiry minus SERVE_MARGIN_SECONDS minus the skew).
Separate from test_fleet_daemon.py to keep each file under a minute.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

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
from tests.helpers_e2e import RecordingSandbox, running_sandbox, wait_until

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member, with watch progress notifications every 300 ms."""
    with progress_etcd(tmp_path_factory.mktemp("etcd-handover")) as cluster:
        yield cluster


@pytest.fixture
def sandbox() -> Iterator[RecordingSandbox]:
    """Access tokens that live 12 s (the module docstring says why)."""
    with running_sandbox(access_ttl=12) as server:
        yield server


@pytest.fixture
def fleet(etcd: EtcdCluster, sandbox: RecordingSandbox) -> Iterator[FleetHosts]:
    """A fleet no other test uses; its daemons are stopped and etcd runs again after."""
    with fresh_fleet(etcd, sandbox, "h") as hosts:
        yield hosts


class TestHandover:
    """The owner stops; another host owns, and readers on the others never see no token."""

    def handover(self, fleet: FleetHosts, sandbox: RecordingSandbox, sig: int) -> float:
        """Stop the owner with ``sig`` just after a refresh; seconds until another owns.
        Readers on the surviving hosts read through it and through the next refresh."""
        fleet.add(3)
        fleet.move_in("host-0")
        fleet.start()
        owner = fleet.wait_owner()
        steady(fleet, sandbox)
        survivors = {h: d for h, d in fleet.daemons.items() if h != owner}
        with Readers(survivors) as readers:
            time.sleep(0.3)
            fleet.daemons[owner].send_signal(sig)
            stopped = time.monotonic()
            heir = fleet.wait_owner(timeout=3 * TTL, besides=owner)
            took = time.monotonic() - stopped
            before = rotations(sandbox)
            wait_until(lambda: rotations(sandbox) > before, 15, "the heir's refresh")
            time.sleep(0.6)
        assert fleet.daemons[owner].wait(10) in (0, -signal.SIGKILL)
        assert heir in survivors
        gaps = {h: [round(t - stopped, 2) for t in ts] for h, ts in readers.gap_times.items()}
        assert sum(readers.gaps.values()) == 0, gaps
        assert all(len(readers.served[h]) >= 2 for h in survivors), readers.served
        assert presented_twice(sandbox) == []
        return took

    def test_sigterm_hands_over_well_under_the_ttl(
        self, fleet: FleetHosts, sandbox: RecordingSandbox
    ) -> None:
        """A SIGTERM'd owner revokes its lease: another host owns within half the TTL."""
        took = self.handover(fleet, sandbox, signal.SIGTERM)
        print(f"SIGTERM handover: {took:.2f} s (lease TTL {TTL:g} s)")
        assert took < TTL / 2

    def test_sigkill_hands_over_within_about_the_ttl(
        self, fleet: FleetHosts, sandbox: RecordingSandbox
    ) -> None:
        """A SIGKILL'd owner's lease runs out: another host owns within the TTL and a second."""
        took = self.handover(fleet, sandbox, signal.SIGKILL)
        print(f"SIGKILL handover: {took:.2f} s (lease TTL {TTL:g} s)")
        assert took < TTL + 1.0
