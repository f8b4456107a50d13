"""Ownership by lease against a real 3-member etcd: three "hosts" in one process.

Each host has its own clients, LeaseKeeper and Elector, and each test its own fleet name.
A host whose keepalives stop (``Freezable``: the keeper's calls block, as in a SIGSTOPped
process) loses its owner key after the lease TTL, and another host takes over.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from aac_tokend.fleet.election import Elector
from aac_tokend.fleet.etcd import EtcdClient
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.fleet.lease import LeaseKeeper
from aac_tokend.testing import FakeClock
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: The lease TTL (etcd's minimum here) and how much longer a takeover may take: one
#: keepalive interval for the lease to be seen gone, a watch event and a campaign txn.
TTL = 2
TAKEOVER_BOUND = 2.0
#: The watch's read deadline: several progress intervals (300 ms), so only a dead stream hits.
IDLE = 1.5

_fleets = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three members that send watch progress notifications every 300 ms."""
    progress = "--experimental-watch-progress-notify-interval=300ms"
    base = tmp_path_factory.mktemp("etcd-election")
    with EtcdCluster(base, extra_args=(progress,)).running() as c:
        yield c


@pytest.fixture
def keys() -> FleetKeys:
    """A fleet no other test uses."""
    return FleetKeys(f"elect{next(_fleets)}x{time.monotonic_ns()}")


@pytest.fixture
def etcd(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster with every member running again after the test."""
    yield cluster
    cluster.restore()


@pytest.fixture
def client(cluster: EtcdCluster) -> EtcdClient:
    """The test's own client, for reading keys and revoking leases behind a host's back."""
    return EtcdClient(cluster.endpoints, timeout=3, connect_timeout=0.5)


class Freezable(EtcdClient):
    """A real client whose keepalives block while frozen, as a stopped keeper's would."""

    def __init__(self, endpoints: list[str]) -> None:
        super().__init__(endpoints, timeout=1, connect_timeout=0.5)
        self.thawed = threading.Event()
        self.thawed.set()

    def keepalive(self, lease_id: int) -> int:
        self.thawed.wait()
        return super().keepalive(lease_id)


class Host:
    """One host: its own clients, lease keeper and elector, and the changes it was told."""

    def __init__(
        self,
        cluster: EtcdCluster,
        keys: FleetKeys,
        name: str,
        profiles: Callable[[], list[str]],
        monotonic: Callable[[], float] = time.monotonic,
        endpoints: list[str] | None = None,
    ) -> None:
        self.name = name
        endpoints = endpoints or cluster.endpoints
        self.lease_client = Freezable(endpoints)
        self.leases = LeaseKeeper(self.lease_client, TTL, 1 / 3)
        self.changes: list[str] = []
        self.elector = Elector(
            EtcdClient(endpoints, timeout=1, connect_timeout=0.5),
            keys,
            self.leases,
            name,
            profiles,
            self.changes.append,
            monotonic,
            watch_idle_seconds=IDLE,
        )

    def start(self) -> Host:
        self.leases.start()
        self.elector.start()
        return self

    def close(self) -> None:
        self.lease_client.thawed.set()
        self.elector.close()
        self.leases.close()


@pytest.fixture
def hosts(cluster: EtcdCluster, keys: FleetKeys) -> Iterator[Callable[..., Host]]:
    """Make started hosts of the test's fleet; all are closed after the test."""
    made: list[Host] = []

    def make(
        name: str,
        profiles: list[str] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        endpoints: list[str] | None = None,
    ) -> Host:
        covered = ["work"] if profiles is None else profiles
        host = Host(cluster, keys, name, lambda: covered, monotonic, endpoints)
        made.append(host)
        return host.start()

    yield make
    for host in made:
        host.close()


def wait_for(check: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``check()`` held; fails after ``within``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"not within {within} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - start


def owners(group: list[Host], profile: str) -> list[str]:
    """The hosts that believe they own ``profile``."""
    return [h.name for h in group if h.elector.is_owner(profile)]


class OwnerSampler:
    """Samples every host's is_owner every few ms on a thread; keeps any moment with two."""

    def __init__(self, group: list[Host], profile: str) -> None:
        self.group, self.profile = group, profile
        self.doubles: list[list[str]] = []
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            found = owners(self.group, self.profile)
            self.samples += 1
            if len(found) > 1:
                self.doubles.append(found)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class TestOneOwner:
    """Of several electors, exactly one owns each profile, and every host agrees on which."""

    def test_three_hosts_one_owner_per_profile(
        self, hosts: Callable[..., Host], client: EtcdClient, keys: FleetKeys
    ) -> None:
        """Three hosts campaigning for three profiles: one owner each, named by every view."""
        profiles = ["alpha", "beta", "work"]
        group = [hosts(name, profiles) for name in ("h1", "h2", "h3")]
        for profile in profiles:
            wait_for(
                lambda p=profile: (
                    all(h.elector.owner_of(p) for h in group)  # type: ignore[misc]
                    and len(owners(group, p)) == 1
                ),
                5,
                f"one owner of {profile} seen by all",
            )
            kv = client.get(keys.owner(profile))
            assert kv is not None
            (owner,) = owners(group, profile)
            assert kv.value == owner.encode()
            assert {h.elector.owner_of(profile) for h in group} == {owner}
            (host,) = [h for h in group if h.name == owner]
            assert kv.lease == host.leases.lease_id

    def test_stopped_keepalives_hand_the_profile_over(
        self, hosts: Callable[..., Host], client: EtcdClient, keys: FleetKeys
    ) -> None:
        """The owner's keepalives stop: its key is gone after the TTL and another host owns
        within TTL + a bound; the old owner stops believing it owns once its lease is spent."""
        group = [hosts(name) for name in ("h1", "h2", "h3")]
        wait_for(lambda: len(owners(group, "work")) == 1, 5, "an owner")
        (old,) = [h for h in group if h.elector.is_owner("work")]
        sampler = OwnerSampler(group, "work")
        old.lease_client.thawed.clear()  # its keeper is stopped from the next keepalive on
        frozen_at = time.monotonic()
        try:
            took = wait_for(
                lambda: any(h.elector.is_owner("work") for h in group if h is not old),
                TTL + TAKEOVER_BOUND,
                "another host owns",
            )
        finally:
            sampler.close()
        assert sampler.doubles == [] and sampler.samples > 100
        new = next(h for h in group if h is not old and h.elector.is_owner("work"))
        assert not old.elector.is_owner("work")
        kv = client.get(keys.owner("work"))
        assert kv is not None and kv.value == new.name.encode()
        assert kv.lease == new.leases.lease_id
        # the frozen keeper's last keepalive was sent at most TTL / 3 before it stopped
        assert time.monotonic() - frozen_at >= TTL - TTL / 3 - 0.1, took
        old.lease_client.thawed.set()  # it wakes: its lease is gone, it follows
        wait_for(lambda: old.leases.lease_id != kv.lease and old.leases.left() > 0, 5, "new lease")
        time.sleep(0.5)
        assert owners(group, "work") == [new.name]
        assert old.elector.owner_of("work") == new.name


class TestCutOff:
    """An owner cut off from etcd stops believing it owns before anyone else can own."""

    def test_partitioned_owner_gives_up_by_its_own_lease(
        self, etcd: EtcdCluster, hosts: Callable[..., Host]
    ) -> None:
        """The owner's only member is paused: its view still shows its key, but is_owner
        turns False when its lease surely ended, never overlapping the next owner."""
        leader = etcd.leader()
        lonely = next(m for m in etcd.members if m is not leader)
        others = [m.url for m in etcd.members if m is not lonely]
        old = hosts("h1", endpoints=[lonely.url])
        wait_for(lambda: old.elector.is_owner("work"), 5, "h1 owns")
        group = [old, hosts("h2", endpoints=others), hosts("h3", endpoints=others)]
        wait_for(lambda: all(h.elector.owner_of("work") == "h1" for h in group), 5, "all see h1")
        sampler = OwnerSampler(group, "work")
        etcd.pause(lonely)
        try:
            wait_for(
                lambda: any(h.elector.is_owner("work") for h in group[1:]),
                TTL + TAKEOVER_BOUND,
                "another host owns",
            )
        finally:
            sampler.close()
        assert sampler.doubles == [] and sampler.samples > 100
        assert old.elector.owner_of("work") == "h1"  # its view is frozen with its member
        assert not old.elector.is_owner("work") and old.leases.left() == 0.0


class TestFollowerView:
    """A follower sees an owner exactly while its key exists, never by a timer of its own."""

    def test_paused_follower_still_sees_a_living_owner(
        self, hosts: Callable[..., Host], client: EtcdClient, keys: FleetKeys
    ) -> None:
        """A follower whose clock jumps far past the TTL still sees the owner whose key lives,
        and sees none at once when the key goes."""
        owner = hosts("h1")
        wait_for(lambda: owner.elector.is_owner("work"), 5, "h1 owns")
        clock = FakeClock()
        follower = hosts("h2", profiles=[], monotonic=clock.monotonic)
        wait_for(lambda: follower.elector.owner_of("work") == "h1", 5, "h2 sees h1")
        clock.advance(100 * TTL)  # a pause (or suspend) as long as fifty leases
        time.sleep(TTL + 0.5)  # and real time past a TTL too, the owner renewing meanwhile
        assert client.get(keys.owner("work")) is not None
        assert follower.elector.owner_of("work") == "h1"
        assert not follower.elector.is_owner("work")
        owner.close()  # its lease revoked: etcd deletes the key, and h1 campaigns no more
        wait_for(lambda: follower.elector.owner_of("work") is None, 2, "h2 sees no owner")
        assert client.get(keys.owner("work")) is None
        assert "work" in follower.changes

    def test_view_read_again_after_compaction(
        self, etcd: EtcdCluster, hosts: Callable[..., Host], keys: FleetKeys
    ) -> None:
        """A follower whose watch missed changes that etcd then compacted away reads the owner
        keys again and shows what they hold now."""
        leader = etcd.leader()
        lonely = next(m for m in etcd.members if m is not leader)
        order = [lonely.url] + [m.url for m in etcd.members if m is not lonely]
        follower = hosts("h2", profiles=[], endpoints=order)
        writer = EtcdClient([m.url for m in etcd.members if m is not lonely], timeout=5)
        lease = writer.grant(30)
        try:
            writer.put(keys.owner("work"), b"h1", lease=lease.id)
            wait_for(lambda: follower.elector.owner_of("work") == "h1", 5, "h2 sees h1")
            etcd.pause(lonely)  # h2's watch hears nothing from here on
            writer.delete(keys.owner("work"))
            latest = writer.put(keys.owner("work"), b"h9", lease=lease.id).revision
            writer.compact(latest)  # h2's watch moves on after its read deadline: compacted
            wait_for(lambda: follower.elector.owner_of("work") == "h9", IDLE + 8, "h2 sees h9")
        finally:
            writer.revoke(lease.id)


class TestStepDown:
    """step_down deletes only our own key, and the backoff keeps us from campaigning."""

    def test_non_owner_step_down_deletes_nothing(
        self, hosts: Callable[..., Host], client: EtcdClient, keys: FleetKeys
    ) -> None:
        """A host that does not own the profile steps down: the owner's key stays."""
        owner = hosts("h1")
        wait_for(lambda: owner.elector.is_owner("work"), 5, "h1 owns")
        other = hosts("h2")
        wait_for(lambda: other.elector.owner_of("work") == "h1", 5, "h2 sees h1")
        assert not other.elector.step_down("work", "test: not mine", 5.0)
        kv = client.get(keys.owner("work"))
        assert kv is not None and kv.value == b"h1" and kv.lease == owner.leases.lease_id
        assert owner.elector.is_owner("work")

    def test_backoff_lets_another_host_take_it(
        self, hosts: Callable[..., Host], client: EtcdClient, keys: FleetKeys
    ) -> None:
        """The owner steps down: its key is deleted, the other host owns, and the first does
        not campaign again during its backoff, though the key is free again meanwhile."""
        first = hosts("h1")
        wait_for(lambda: first.elector.is_owner("work"), 5, "h1 owns")
        second = hosts("h2")
        wait_for(lambda: second.elector.owner_of("work") == "h1", 5, "h2 sees h1")
        backoff = 4.0
        stepped = time.monotonic()
        assert first.elector.step_down("work", "test: cannot reach AAC", backoff)
        wait_for(lambda: second.elector.is_owner("work"), 2, "h2 owns")
        assert first.elector.owner_of("work") == "h2" or first.elector.owner_of("work") is None
        # h2 gives it back at once (tiny backoff): h1, still backing off, must not take it
        assert second.elector.step_down("work", "test: disk failed", 0.1)
        while time.monotonic() - stepped < backoff - 0.5:
            kv = client.get(keys.owner("work"))
            assert kv is None or kv.value == b"h2", "h1 campaigned during its backoff"
            time.sleep(0.05)
        wait_for(
            lambda: first.elector.is_owner("work") or second.elector.is_owner("work"),
            backoff + TAKEOVER_BOUND,
            "an owner again after the backoffs",
        )

    def test_lone_host_campaigns_again_after_its_backoff(
        self, hosts: Callable[..., Host], client: EtcdClient, keys: FleetKeys
    ) -> None:
        """With no other host, the key stays free for the backoff, then the host owns again."""
        host = hosts("h1")
        wait_for(lambda: host.elector.is_owner("work"), 5, "h1 owns")
        stepped = time.monotonic()  # the backoff counts from the call
        assert host.elector.step_down("work", "test: cannot decrypt", 1.5)
        assert client.get(keys.owner("work")) is None
        took = wait_for(lambda: host.elector.is_owner("work"), 1.5 + TAKEOVER_BOUND, "h1 again")
        assert time.monotonic() - stepped >= 1.5, took


class TestLeaseLost:
    """A lost lease drops every profile to follower at once, then the host campaigns again."""

    def test_revoked_lease_drops_then_reowns(
        self, hosts: Callable[..., Host], client: EtcdClient, keys: FleetKeys
    ) -> None:
        """The owner's lease revoked behind its back: both profiles change role, and it owns
        them again under a new lease."""
        host = hosts("h1", profiles=["alpha", "work"])
        wait_for(lambda: all(host.elector.is_owner(p) for p in ("alpha", "work")), 5, "owns")
        old = host.leases.lease_id
        host.changes.clear()
        client.revoke(old)
        assert not host.elector.is_owner("work") or host.leases.lease_id == old
        wait_for(lambda: host.leases.lease_id not in (0, old), TTL / 3 + 2, "a new lease")
        wait_for(lambda: all(host.elector.is_owner(p) for p in ("alpha", "work")), 3, "owns")
        assert {"alpha", "work"} <= set(host.changes)
        for profile in ("alpha", "work"):
            kv = client.get(keys.owner(profile))
            assert kv is not None and kv.lease == host.leases.lease_id != old
