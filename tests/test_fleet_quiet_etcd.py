"""Fleet watches on an etcd at its DEFAULT progress interval (10 min): healthy, and stoppable.

Issue #13's fleet benchmark found every host saying ``etcd: unreachable`` on a healthy
cluster that never sends progress notifications (only the stream's reopening after each
read deadline is heard), and daemons that took 30 s+ to stop because a watch thread blocked
in a read or reconnecting could not be told to stop. One member, so pausing it stalls etcd.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from aac_tokend.fleet.election import Elector
from aac_tokend.fleet.etcd import EtcdClient, KeyValue, WatchEvent, WatchProgress
from aac_tokend.fleet.follow import ChainFollower
from aac_tokend.fleet.keys import FleetKeys, KeyKind
from aac_tokend.fleet.lease import LeaseKeeper
from aac_tokend.fleet.records import ChainRecord, first_record
from aac_tokend.testing import oauth_state
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: The watches' read deadline here: short, so a quiet stream is dropped and reopened often.
IDLE = 0.5
#: What "at once" means for a stop: far below one read deadline of the daemon (a lease TTL).
PROMPT = 0.3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member with etcd's default progress interval (no progress-notify flag)."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd-quiet"), size=1).running() as c:
        yield c


@pytest.fixture
def etcd(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared member, running (resumed) again after the test."""
    yield cluster
    cluster.restore()


@pytest.fixture
def client(cluster: EtcdCluster) -> EtcdClient:
    return EtcdClient(cluster.endpoints, timeout=1, connect_timeout=0.3)


def unique(name: str) -> bytes:
    """A key (or fleet name) no other test uses."""
    return f"/quiet/{name}/{time.monotonic_ns()}".encode()


def finishes(work: Callable[[], Any], within: float) -> list[Any]:
    """Run ``work`` on a thread; what it returned or raised, or [] if not done ``within``."""
    done: list[Any] = []

    def run() -> None:
        try:
            done.append(work())
        except BaseException as exc:  # handed to the test to assert on
            done.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    return done


class EmptyChains:
    """FleetChains.read_all/open over a prefix nobody writes: no records, etcd's revision."""

    def __init__(self, client: EtcdClient, keys: FleetKeys) -> None:
        self.client, self.keys = client, keys

    def read_all(self) -> tuple[Mapping[str, Any], int]:
        return {}, self.client.range(self.keys.prefix(KeyKind.CHAIN), prefix=True).revision

    def open(self, profile: str, kv: KeyValue) -> Any:
        raise AssertionError(f"no record was written, yet {profile} was opened")


@dataclass(frozen=True)
class Versioned:
    """chains.Versioned: a record and its key's mod revision."""

    record: ChainRecord
    revision: int


class OneChain(EmptyChains):
    """One profile's first record (revision 1), as read_all would find it; nothing else."""

    def read_all(self) -> tuple[Mapping[str, Any], int]:
        _, revision = super().read_all()
        return {"work": Versioned(first_record(oauth_state(profile="work"), 0), 1)}, revision


@pytest.fixture
def follower(client: EtcdClient) -> Iterator[ChainFollower[Any]]:
    """A started follower of an empty fleet, with a read deadline of IDLE; closed after."""
    keys = FleetKeys(f"quiet{time.monotonic_ns()}")
    made: ChainFollower[Any] = ChainFollower(
        client,
        EmptyChains(client, keys),
        keys,
        lambda _p, _v: None,
        lambda _p: None,
        time.monotonic,
        watch_idle_seconds=IDLE,
    )
    made.start()
    deadline = time.monotonic() + 5
    while not made.healthy():
        assert time.monotonic() < deadline, "the follower did not start watching"
        time.sleep(0.02)
    yield made
    made.close()


class TestReopeningIsContact:
    """A stream reopened after its read deadline says etcd answered."""

    def test_quiet_stream_yields_progress_at_each_reopening(self, client: EtcdClient) -> None:
        """Without progress notifications, next() still returns within about a deadline."""
        key = unique("idle")
        start = client.put(unique("elsewhere"), b"v").revision + 1
        with client.watch(key, start_revision=start, idle_timeout=IDLE) as watch:
            got = finishes(lambda: [next(watch) for _ in range(3)], within=4 * IDLE + 2)
            reconnects = watch.reconnects
            if not got:
                watch.close()
        assert got, "next() said nothing for several read deadlines on a healthy etcd"
        items = got[0]
        assert all(isinstance(i, WatchProgress) for i in items), items
        assert reconnects >= 3  # the first opening is not news: the caller just called

    def test_progress_of_a_reopening_promises_nothing_undelivered(self, client: EtcdClient) -> None:
        """A reopening's progress is the last revision delivered; what follows still comes."""
        key = unique("later")
        start = client.put(key, b"1").revision
        second = client.put(key, b"2").revision
        with client.watch(key, start_revision=start, idle_timeout=IDLE) as watch:
            first = [next(watch), next(watch)]
            reopened = next(watch)  # after a read deadline of silence
            third = client.put(key, b"3").revision
            last = next(watch)
        assert [e.value for e in first if isinstance(e, WatchEvent)] == [b"1", b"2"]
        assert reopened == WatchProgress(second)
        assert isinstance(last, WatchEvent) and last.revision == third


class TestCloseFromAnotherThread:
    """close() ends a next() blocked on another thread at once."""

    def test_close_ends_a_blocked_read(self, client: EtcdClient) -> None:
        """A watch waiting out a long read deadline stops when closed, not at the deadline."""
        watch = client.watch(unique("blocked"), idle_timeout=30.0)
        ended = threading.Event()

        def drain() -> None:
            for _ in watch:
                pass
            ended.set()

        threading.Thread(target=drain, daemon=True).start()
        time.sleep(0.2)  # blocked reading by now
        started = time.monotonic()
        watch.close()
        assert ended.wait(5), "the watch went on reading after close()"
        assert time.monotonic() - started < PROMPT

    def test_close_during_reconnects_to_a_stalled_etcd(self, etcd: EtcdCluster) -> None:
        """A watch reopening against a paused member stops when closed, raising nothing.

        An opening in flight cannot be cut short (no socket is ours yet): it ends with its
        own read deadline, and the watch then stops instead of trying the next member."""
        slow = EtcdClient(etcd.endpoints, timeout=30, connect_timeout=0.3)
        key = unique("stalled")
        start = slow.put(key, b"v").revision + 1
        idle = 1.0  # read until ~1 s after the pause, then open again until ~2 s
        watch = slow.watch(key, start_revision=start, idle_timeout=idle)
        got = finishes(lambda: next(watch), within=3)
        assert got and isinstance(got[0], WatchProgress)
        etcd.pause(etcd.members[0])
        outcome: list[Any] = []
        drain = threading.Thread(target=lambda: outcome.extend(finishes(lambda: list(watch), 10)))
        drain.daemon = True
        drain.start()
        time.sleep(idle * 1.5)  # reopening against the frozen member by now
        started = time.monotonic()
        watch.close()
        while not outcome and time.monotonic() - started < 5:
            time.sleep(0.01)
        assert outcome == [[]], outcome
        assert time.monotonic() - started < idle + PROMPT


class TestFollowerHealth:
    """healthy() is true while etcd answers, whatever its progress interval."""

    def test_healthy_throughout_on_a_quiet_cluster(self, follower: ChainFollower[Any]) -> None:
        """Sampled every 50 ms over six read deadlines, the follower is always healthy."""
        sick = []
        until = time.monotonic() + 6 * IDLE
        while time.monotonic() < until:
            if not follower.healthy():
                sick.append(round(time.monotonic() - follower.last_contact(), 3))
            time.sleep(0.05)
        assert sick == []

    def test_stalled_etcd_is_noticed(self, etcd: EtcdCluster, follower: ChainFollower[Any]) -> None:
        """A paused member is unhealthy within a few deadlines, and healthy once resumed."""
        etcd.pause(etcd.members[0])
        deadline = time.monotonic() + 6 * IDLE + 2
        while follower.healthy():
            assert time.monotonic() < deadline, "a frozen etcd still looks healthy"
            time.sleep(0.05)
        etcd.resume(etcd.members[0])
        deadline = time.monotonic() + 10
        while not follower.healthy():
            assert time.monotonic() < deadline, "the follower did not recover"
            time.sleep(0.05)

    def test_healthy_while_the_first_records_are_handed_over(self, client: EtcdClient) -> None:
        """etcd answered the first read: healthy while a slow listener takes its records."""
        keys = FleetKeys(f"quiet{time.monotonic_ns()}")
        taking, done = threading.Event(), threading.Event()

        def slow(_profile: str, _versioned: Any) -> None:
            taking.set()
            done.wait(5)

        made: ChainFollower[Any] = ChainFollower(
            client, OneChain(client, keys), keys, slow, lambda _p: None, time.monotonic,
            watch_idle_seconds=IDLE,
        )  # fmt: skip
        made.start()
        try:
            assert taking.wait(5)
            assert made.healthy()
        finally:
            done.set()
            made.close()

    def test_close_is_prompt(self, follower: ChainFollower[Any]) -> None:
        """close() returns at once, though the watch was blocked in a read."""
        time.sleep(IDLE / 2)
        started = time.monotonic()
        follower.close()
        assert time.monotonic() - started < PROMPT


class TestPromptStops:
    """The elector and the lease keeper stop at once, the lease revoked."""

    def test_elector_and_lease_close_at_once(self, client: EtcdClient) -> None:
        """An owner's elector and keeper close in well under a second; its key is gone."""
        keys = FleetKeys(f"quiet{time.monotonic_ns()}")
        leases = LeaseKeeper(EtcdClient(client.endpoints, timeout=1), 2, 1 / 3)
        elector = Elector(
            client,
            keys,
            leases,
            "h1",
            lambda: ["work"],
            lambda _p: None,
            watch_idle_seconds=30.0,
        )
        leases.start()
        elector.start()
        deadline = time.monotonic() + 5
        while not elector.is_owner("work"):
            assert time.monotonic() < deadline, "h1 was not elected"
            time.sleep(0.02)
        lease = leases.lease_id
        time.sleep(0.3)  # the watch is blocked in its 30 s read by now
        started = time.monotonic()
        elector.close()  # alone: no revoked lease's key deletion wakes the watch
        assert time.monotonic() - started < PROMPT
        started = time.monotonic()
        leases.close()
        assert time.monotonic() - started < PROMPT
        assert client.range(keys.owner("work")).kvs == ()
        assert client.time_to_live(lease) is None
