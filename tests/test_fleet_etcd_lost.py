"""Fleet mode end to end: a follower cut off from etcd (its only member SIGSTOPped) serves
until the token's expiry minus the fleet's clock skew, says so in ``status --json``, and
the chain goes on once etcd is back.

Real ``aac-tokend run`` daemons as hosts (tests/fleet_hosts.py), a real single-member etcd,
the in-process sandbox with 8 s access tokens. Apart from test_fleet_daemon.py to keep each
file under a minute.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from aac_tokend.core.policy import SERVE_MARGIN_SECONDS
from aac_tokend.core.tokens import parse_jwt
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster
from tests.fleet_hosts import (
    TTL,
    FleetHosts,
    Readers,
    fresh_fleet,
    presented_twice,
    progress_etcd,
    steady,
)
from tests.helpers_e2e import RecordingSandbox, running_sandbox, wait_until

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member, with watch progress notifications every 300 ms."""
    with progress_etcd(tmp_path_factory.mktemp("etcd-lost")) as cluster:
        yield cluster


@pytest.fixture
def sandbox() -> Iterator[RecordingSandbox]:
    """Access tokens that live 8 s: serving ends soon after etcd is stopped."""
    with running_sandbox(access_ttl=8) as server:
        yield server


@pytest.fixture
def fleet(etcd: EtcdCluster, sandbox: RecordingSandbox) -> Iterator[FleetHosts]:
    """A fleet no other test uses; its daemons are stopped and etcd runs again after."""
    with fresh_fleet(etcd, sandbox, "l") as hosts:
        yield hosts


class TestEtcdLost:
    """A host cut off from etcd keeps serving until the token's expiry minus the skew."""

    #: Larger than the usual serve margin (1 s), so that stopping early by it is seen; the
    #: most the demo's margin allows (lease TTL + W + request + skew <= 11 s).
    SKEW = 1.0

    def test_follower_serves_until_expiry_minus_skew_and_says_etcd_is_unreachable(
        self, etcd: EtcdCluster, fleet: FleetHosts, sandbox: RecordingSandbox
    ) -> None:
        """With etcd's only member stopped (SIGSTOP), the follower says etcd is unreachable
        and serves the last token until max_clock_skew_seconds (and the usual serve margin)
        before its expiry, then nothing; with etcd back the chain goes on."""
        fleet.add(2, timings={"max_clock_skew_seconds": self.SKEW})
        fleet.move_in("host-0")
        fleet.start()
        owner = fleet.wait_owner()
        token = steady(fleet, sandbox)
        follower = next(h for h in fleet.daemons if h != owner)
        daemon = fleet.daemons[follower]
        with Readers({follower: daemon}) as readers:
            etcd.pause(etcd.members[0])
            wait_until(
                lambda: daemon.profile_status()["fleet"]["etcd"] == "unreachable",
                3 * TTL,
                "the follower to notice",
            )
            facts = fleet.fleet_row(follower)
            assert facts["etcd"] == "unreachable" and facts["role"] == "follower"
            wait_until(lambda: not daemon.token(), 15, "serving to end")
            ended = time.time()
        # The daemon counts the expiry from when its request left (at most the sandbox's
        # receipt of it) and never past the JWT's exp: at most this, a few ms less. (The
        # rotation that minted it: the owner may have refreshed again, unseen, in the pause.)
        claims = parse_jwt(token)
        log = sandbox.log()
        sent = [float(str(e["at"])) for e in log if int(float(str(e["at"]))) == claims.iat]
        assert sent, log
        expires = min(min(sent) + 8, float(claims.exp or 0))
        print(f"serving ended {expires - ended:.2f} s before the expiry")
        assert readers.served[follower][-1][1] == token
        end = expires - self.SKEW - SERVE_MARGIN_SECONDS
        assert end - 0.5 <= ended <= end + 0.15, (ended - expires, log)
        etcd.resume(etcd.members[0])
        wait_until(lambda: daemon.token() not in ("", token), 30, "a new token after etcd is back")
        assert presented_twice(sandbox) == []
