"""Real fleet daemons on an etcd at its default progress interval: "ok", and a fast stop.

Three hosts as the fleet benchmark runs them (tests/bench_fleet_rig.py: the demo's scaled
timings, a 2 s lease), on a 3-member etcd started WITHOUT the progress-notify flag, so
etcd never sends watch progress (10 min in 3.4). The README promises a stop within 2 s of
SIGTERM; a stopping owner revokes its lease, so another host owns well inside a lease TTL.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from aac_tokend.sandbox.demo_fleet import FLEET_TIMINGS
from tests.bench_fleet_rig import HOSTS, FleetRig, fleet_facts, fleet_rig
from tests.bench_procs import run_sandbox
from tests.etcd_cluster import ETCD, SKIP_REASON

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: The README's promise: SIGTERM/SIGINT stop the daemon within 2 s.
STOP_PROMISE = 2.0
TTL = float(FLEET_TIMINGS["lease_ttl_seconds"])
#: The access tokens live an hour: nothing refreshes during these tests.
ACCESS_TTL = 3600.0


def waited(proc: subprocess.Popen[bytes]) -> float:
    """time.monotonic() when ``proc`` exited (a daemon stopped, or killed past 10 s)."""
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic()


@pytest.fixture(scope="module")
def rig() -> Iterator[FleetRig]:
    """Three hosts serving one chain; host-a owns it. The tests run in file order."""
    with run_sandbox(ACCESS_TTL) as sandbox, fleet_rig(sandbox) as made:
        yield made


class TestHealthyEtcd:
    """Every host says etcd is ok on a healthy cluster that sends no progress."""

    def test_every_host_says_ok_over_several_lease_ttls(self, rig: FleetRig) -> None:
        """From the moment each serves, sampled every 100 ms for four read deadlines (a
        lease TTL each), no host's status says unreachable."""
        seen: dict[str, set[object]] = {host: set() for host in HOSTS}
        until = time.monotonic() + 4 * TTL
        while time.monotonic() < until:
            for host, daemon in rig.hosts.items():
                facts = fleet_facts(daemon)
                if facts is not None:
                    seen[host].add(facts.get("etcd"))
            time.sleep(0.1)
        assert seen == {host: {"ok"} for host in HOSTS}


class TestStop:
    """SIGTERM stops a fleet daemon within 2 s, and its chain moves at once."""

    def test_owner_stops_within_two_seconds_and_another_host_owns_at_once(
        self, rig: FleetRig
    ) -> None:
        """The owner exits within 2 s; another host owns well within a lease TTL."""
        assert rig.owner() == HOSTS[0]
        owner = rig.hosts[HOSTS[0]]
        exited: list[float] = []
        waiter = threading.Thread(target=lambda: exited.append(waited(owner.proc)), daemon=True)
        signalled = time.monotonic()
        owner.proc.terminate()
        waiter.start()
        owned_at = None
        while owned_at is None and time.monotonic() - signalled < 3 * TTL:
            if rig.owner() not in (None, HOSTS[0]):
                owned_at = time.monotonic()
            time.sleep(0.02)
        waiter.join(10)
        assert owned_at is not None, "no other host took the chain"
        assert owned_at - signalled < TTL / 2
        assert exited and exited[0] - signalled < STOP_PROMISE
        assert owner.proc.returncode == 0

    def test_the_other_hosts_stop_within_two_seconds(self, rig: FleetRig) -> None:
        """SIGTERM to every remaining host at once: the slowest is gone within 2 s."""
        assert rig.stop_all() < STOP_PROMISE
