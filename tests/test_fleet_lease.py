"""The owner's lease against a real 3-member etcd: the granted TTL, send-time expiry, renewal.

A fake monotonic clock (``FakeClock``) and a client whose answers take fake time show
that ``expires_at`` counts from when a keepalive was sent; the rest run on real time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from aac_tokend.errors import EtcdUnsentError
from aac_tokend.fleet.etcd import EtcdClient, Lease
from aac_tokend.fleet.lease import LeaseKeeper
from aac_tokend.testing import FakeClock
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: etcd's minimum lease TTL on the test cluster: 1.5 election timeouts (1 s), rounded up.
MIN_TTL = 2
#: What real waits here may overrun by: scheduling on 2 shared cores.
SLACK = 1.5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three members shared by this module's tests."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd-lease")).running() as c:
        yield c


@pytest.fixture
def client(cluster: EtcdCluster) -> EtcdClient:
    """A client of all three members, for the test's own reads and writes."""
    return EtcdClient(cluster.endpoints, timeout=3, connect_timeout=0.5)


class SlowAnswers(EtcdClient):
    """A real client whose grant and keepalive answers arrive ``delay`` fake seconds late."""

    def __init__(self, endpoints: list[str], clock: FakeClock, delay: float) -> None:
        super().__init__(endpoints, timeout=3, connect_timeout=0.5)
        self.clock = clock
        self.delay = delay

    def grant(self, ttl: int) -> Lease:
        lease = super().grant(ttl)
        self.clock.advance(self.delay)
        return lease

    def keepalive(self, lease_id: int) -> int:
        ttl = super().keepalive(lease_id)
        self.clock.advance(self.delay)
        return ttl


class Unplugged(EtcdClient):
    """A real client whose grants and keepalives fail as if no member could be reached."""

    unplugged = False

    def _check(self) -> None:
        if self.unplugged:
            raise EtcdUnsentError("etcd: no member reachable (test: unplugged)")

    def grant(self, ttl: int) -> Lease:
        self._check()
        return super().grant(ttl)

    def keepalive(self, lease_id: int) -> int:
        self._check()
        return super().keepalive(lease_id)


class Lost:
    """Records the lease ids an on_lost listener was told about."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.told = threading.Event()

    def __call__(self, lease_id: int) -> None:
        self.ids.append(lease_id)
        self.told.set()


def bound_keys(client: EtcdClient, lease_id: int) -> tuple[bytes, ...] | None:
    """The keys bound to a lease, or None if the lease is gone."""
    info = client.time_to_live(lease_id, keys=True)
    return None if info is None else info.keys


class TestGrantedTtl:
    """The lease's TTL is the one etcd granted, not the one asked for."""

    def test_one_second_is_raised_to_etcds_minimum(self, cluster: EtcdCluster) -> None:
        """Asked for 1 s, the keeper uses etcd's 2 s and expires_at is its send time + 2."""
        clock = FakeClock()
        sent = clock.monotonic()
        keeper = LeaseKeeper(SlowAnswers(cluster.endpoints, clock, 0.7), 1, 0.9, clock.monotonic)
        keeper.start()
        try:
            assert keeper.granted_ttl == MIN_TTL
            assert keeper.expires_at == sent + MIN_TTL
            assert keeper.left() == pytest.approx(MIN_TTL - 0.7)
        finally:
            keeper.close()

    def test_a_larger_ttl_is_kept(self, cluster: EtcdCluster, client: EtcdClient) -> None:
        """A TTL above the minimum is granted as asked and etcd reports the same."""
        keeper = LeaseKeeper(EtcdClient(cluster.endpoints, timeout=3), 7, 1 / 3)
        keeper.start()
        try:
            info = client.time_to_live(keeper.lease_id)
            assert keeper.granted_ttl == 7
            assert info is not None and info.granted_ttl == 7
        finally:
            keeper.close()


class TestSendTime:
    """A keepalive's TTL counts from when it was sent, however late its answer comes."""

    def test_slow_keepalive_counts_from_its_send(self, cluster: EtcdCluster) -> None:
        """A keepalive sent at t and answered 3 s later gives expires_at = t + TTL."""
        clock = FakeClock()
        slow = SlowAnswers(cluster.endpoints, clock, 0.0)
        # 0.9 of 30 s: the keeper's own thread stays asleep for the whole test
        keeper = LeaseKeeper(slow, 30, 0.9, clock.monotonic)
        keeper.start()
        try:
            clock.advance(5)
            sent = clock.monotonic()
            slow.delay = 3.0
            assert keeper.renew()
            assert clock.monotonic() == sent + 3.0
            assert keeper.expires_at == sent + 30
            assert keeper.left() == pytest.approx(27.0)
        finally:
            keeper.close()

    def test_unreachable_etcd_leaves_expiry_alone(self, cluster: EtcdCluster) -> None:
        """A keepalive that reaches no member changes nothing: the time left runs down."""
        clock = FakeClock()
        unplugged = Unplugged(cluster.endpoints, timeout=3)
        keeper = LeaseKeeper(unplugged, 30, 0.9, clock.monotonic)
        keeper.start()
        try:
            before = keeper.expires_at
            unplugged.unplugged = True
            clock.advance(12)
            assert not keeper.renew()
            assert keeper.expires_at == before
            assert keeper.left() == pytest.approx(18.0)
            clock.advance(20)
            assert keeper.left() == 0.0
        finally:
            unplugged.unplugged = False
            keeper.close()


class TestRenewal:
    """The keeper's thread keeps the lease alive; a lost lease is replaced and reported."""

    def test_thread_keeps_a_bound_key_past_the_ttl(
        self, cluster: EtcdCluster, client: EtcdClient
    ) -> None:
        """A key bound to a 2 s lease is still there after 2 x TTL, renewed by the thread."""
        keeper = LeaseKeeper(EtcdClient(cluster.endpoints, timeout=0.5), MIN_TTL, 1 / 3)
        keeper.start()
        key = f"/lease-test/kept/{time.monotonic_ns()}".encode()
        try:
            client.put(key, b"owner", lease=keeper.lease_id)
            time.sleep(2 * MIN_TTL)
            assert client.get(key) is not None
            assert keeper.left() > 0
        finally:
            keeper.close()
        assert client.get(key) is None  # revoked by close(): the bound key went with it

    def test_revoked_lease_is_replaced_and_listeners_told(
        self, cluster: EtcdCluster, client: EtcdClient
    ) -> None:
        """A lease revoked behind the keeper's back is replaced and on_lost hears the old id."""
        keeper = LeaseKeeper(EtcdClient(cluster.endpoints, timeout=0.5), MIN_TTL, 1 / 3)
        lost = Lost()
        keeper.on_lost(lost)
        keeper.start()
        try:
            old = keeper.lease_id
            client.revoke(old)
            # the next keepalive is due within TTL / 3; it answers 0 and a new lease follows
            assert lost.told.wait(MIN_TTL / 3 + SLACK)
            assert lost.ids == [old]
            assert keeper.lease_id not in (0, old)
            assert bound_keys(client, keeper.lease_id) == ()
            assert keeper.left() > 0
        finally:
            keeper.close()

    def test_close_revokes(self, cluster: EtcdCluster, client: EtcdClient) -> None:
        """close() revokes the lease: etcd no longer knows it and lease_id is 0."""
        keeper = LeaseKeeper(EtcdClient(cluster.endpoints, timeout=3), 10, 1 / 3)
        keeper.start()
        lease = keeper.lease_id
        keeper.close()
        assert bound_keys(client, lease) is None
        assert keeper.lease_id == 0 and keeper.left() == 0.0

    def test_start_during_an_outage_grants_later(
        self, cluster: EtcdCluster, client: EtcdClient
    ) -> None:
        """Started while etcd is unreachable, the keeper has no lease, then gets one."""
        unplugged = Unplugged(cluster.endpoints, timeout=3)
        unplugged.unplugged = True
        keeper = LeaseKeeper(unplugged, MIN_TTL, 1 / 3)
        keeper.start()
        try:
            time.sleep(0.3)
            assert keeper.lease_id == 0 and keeper.left() == 0.0
            unplugged.unplugged = False
            deadline = time.monotonic() + SLACK
            while keeper.lease_id == 0:
                assert time.monotonic() < deadline, "no lease after etcd came back"
                time.sleep(0.02)
            assert bound_keys(client, keeper.lease_id) == ()
        finally:
            keeper.close()
