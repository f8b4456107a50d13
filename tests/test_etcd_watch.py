"""The etcd watch against a real 3-member cluster: it resumes, reports compaction, never stalls.

The cluster sends progress notifications every 300 ms, so an idle watch hears from etcd
well inside its read deadline; each test puts back what it killed or paused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from aac_tokend.errors import EtcdUnavailableError, EtcdWatchCompactedError
from aac_tokend.fleet.etcd import EtcdClient, Watch, WatchEvent, WatchProgress
from aac_tokend.fleet.etcd_watch import EventType
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster, Member

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: The watch's read deadline here: several progress intervals, so only a dead stream hits it.
IDLE = 1.5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three members that send watch progress notifications every 300 ms."""
    progress = "--experimental-watch-progress-notify-interval=300ms"
    with EtcdCluster(tmp_path_factory.mktemp("etcd-watch"), extra_args=(progress,)).running() as c:
        yield c


@pytest.fixture
def etcd(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster with every member running again after the test."""
    yield cluster
    cluster.restore()


@pytest.fixture
def client(cluster: EtcdCluster) -> EtcdClient:
    """A client of all three members."""
    return EtcdClient(cluster.endpoints, timeout=3, connect_timeout=0.5)


def follower_first(etcd: EtcdCluster) -> EtcdClient:
    """A client whose first member (where its watch goes) is a follower.

    Killing or pausing the watch's member is what these tests are about; killing the leader
    too would add an election that the writes in the test have to wait out.
    """
    leader = etcd.leader()
    order = [m.url for m in etcd.members if m is not leader] + [leader.url]
    return EtcdClient(order, timeout=3, connect_timeout=0.5)


def member_of(etcd: EtcdCluster, watch: Watch) -> Member:
    """The member the watch is on now."""
    return next(m for m in etcd.members if m.url == watch.member)


def writer_without(etcd: EtcdCluster, member: Member) -> EtcdClient:
    """A client of every member but ``member`` (killed or paused by the test)."""
    return EtcdClient([m.url for m in etcd.members if m is not member], timeout=5)


def unique(name: str) -> bytes:
    """A key no other test uses."""
    return f"/watch/{name}/{time.monotonic_ns()}".encode()


def events(watch: Watch, count: int, within: float = 8.0) -> list[WatchEvent]:
    """The next ``count`` events (progress notifications skipped), failing after ``within``."""
    found: list[WatchEvent] = []
    deadline = time.monotonic() + within
    while len(found) < count:
        assert time.monotonic() < deadline, f"only {len(found)} of {count} events: {found}"
        item = next(watch)
        if isinstance(item, WatchEvent):
            found.append(item)
    return found


class TestEvents:
    """Puts and deletes arrive in order with their revisions, from a chosen revision."""

    def test_put_and_delete_in_order(self, client: EtcdClient) -> None:
        """A watch from now sees a put, a second put and a delete, in revision order."""
        key = unique("order")
        with client.watch(key, idle_timeout=IDLE) as watch:
            next(watch)  # the first item comes once the watch exists (a progress, here)
            r1 = client.put(key, b"1").revision
            r2 = client.put(key, b"2").revision
            r3 = client.delete(key).revision
            got = events(watch, 3)
        assert [(e.type, e.value, e.revision) for e in got] == [
            (EventType.PUT, b"1", r1),
            (EventType.PUT, b"2", r2),
            (EventType.DELETE, b"", r3),
        ]
        assert got[1].version == 2 and got[1].create_revision == r1

    def test_start_revision_replays_history(self, client: EtcdClient) -> None:
        """A watch from an old revision delivers what happened since, prefix-wide."""
        base = unique("replay")
        first = client.put(base + b"/a", b"a").revision
        client.put(base + b"/b", b"b")
        client.put(base + b"x", b"outside the prefix")
        with client.watch(base + b"/", prefix=True, start_revision=first, idle_timeout=IDLE) as w:
            got = events(w, 2)
        assert [e.key for e in got] == [base + b"/a", base + b"/b"]


class TestProgress:
    """An idle watch hears from etcd, so silence means a broken stream, not a quiet key."""

    def test_progress_on_an_idle_key(self, client: EtcdClient) -> None:
        """Progress notifications arrive on a key nobody writes, carrying the revision."""
        key = unique("idle")
        now = client.put(unique("elsewhere"), b"v").revision
        with client.watch(key, idle_timeout=IDLE) as watch:
            started = time.monotonic()
            items = [next(watch) for _ in range(3)]
            elapsed = time.monotonic() - started
            assert watch.reconnects == 0
        assert all(isinstance(i, WatchProgress) and i.revision >= now for i in items)
        assert elapsed < 3 * IDLE


class TestResume:
    """A broken stream resumes from the last revision seen + 1: nothing lost, nothing twice."""

    def test_resumes_after_its_member_is_killed(
        self, etcd: EtcdCluster, client: EtcdClient
    ) -> None:
        """Killing the member the watch is on loses no event and repeats none."""
        client = follower_first(etcd)
        key = unique("resume")
        with client.watch(key, idle_timeout=IDLE) as watch:
            next(watch)
            r1 = client.put(key, b"1").revision
            assert [e.revision for e in events(watch, 1)] == [r1]
            dead = member_of(etcd, watch)
            etcd.kill(dead)
            writer = writer_without(etcd, dead)
            r2 = writer.put(key, b"2").revision
            r3 = writer.put(key, b"3").revision
            got = events(watch, 2)
            assert watch.reconnects >= 1 and watch.member != dead.url
        assert [(e.value, e.revision) for e in got] == [(b"2", r2), (b"3", r3)]

    def test_paused_member_costs_one_deadline(self, etcd: EtcdCluster, client: EtcdClient) -> None:
        """A SIGSTOPped member is left after the read deadline and the events still come."""
        client = follower_first(etcd)
        key = unique("paused")
        with client.watch(key, idle_timeout=IDLE) as watch:
            next(watch)
            stuck = member_of(etcd, watch)
            etcd.pause(stuck)
            writer = writer_without(etcd, stuck)
            r1 = writer.put(key, b"while paused").revision
            started = time.monotonic()
            got = events(watch, 1)
            elapsed = time.monotonic() - started
            assert watch.member != stuck.url
        assert [e.revision for e in got] == [r1]
        assert elapsed < IDLE + 3  # one deadline, then a reconnect to a live member

    def test_no_member_left_is_an_error_not_a_wait(self, etcd: EtcdCluster) -> None:
        """With every member killed, the watch raises within its bounds instead of waiting."""
        client = EtcdClient(etcd.endpoints, timeout=1, connect_timeout=0.3)
        with client.watch(unique("gone"), idle_timeout=IDLE) as watch:
            next(watch)
            for m in etcd.members:
                etcd.kill(m)
            started = time.monotonic()
            with pytest.raises(EtcdUnavailableError, match="no member took it"):
                while True:
                    next(watch)
        assert time.monotonic() - started < IDLE + 2


class TestCompaction:
    """A watch whose revisions are compacted tells the caller to re-read everything."""

    def test_compacted_start_revision(self, client: EtcdClient) -> None:
        """Watching from before a compaction raises with etcd's compact revision."""
        key = unique("compact")
        old = client.put(key, b"1").revision
        client.put(key, b"2")
        latest = client.put(key, b"3").revision
        client.compact(latest)
        watch = client.watch(key, start_revision=old, idle_timeout=IDLE)
        with pytest.raises(EtcdWatchCompactedError) as caught:
            next(watch)
        assert caught.value.compact_revision == latest
        with pytest.raises(StopIteration):
            next(watch)  # closed: the caller re-reads and starts a new watch

    def test_compacted_while_disconnected(self, etcd: EtcdCluster, client: EtcdClient) -> None:
        """A resume that finds its revision compacted away raises instead of skipping events."""
        client = follower_first(etcd)
        key = unique("compact-resume")
        with client.watch(key, idle_timeout=IDLE) as watch:
            next(watch)
            dead = member_of(etcd, watch)
            etcd.kill(dead)
            writer = writer_without(etcd, dead)
            writer.put(key, b"missed")
            latest = writer.put(key, b"missed too").revision
            writer.compact(latest)
            with pytest.raises(EtcdWatchCompactedError):
                events(watch, 2)


class TestLeaderless:
    """A member cut off from the quorum ends the watch instead of serving a frozen view."""

    def test_watch_on_a_member_that_lost_its_leader_ends(self, etcd: EtcdCluster) -> None:
        """With the other two killed, the watch raises (hasleader) instead of ticking forever."""
        client = follower_first(etcd)
        with client.watch(unique("leaderless"), idle_timeout=IDLE) as watch:
            alone = member_of(etcd, watch)
            for m in etcd.members:
                if m is not alone:
                    etcd.kill(m)
            deadline = time.monotonic() + 15
            with pytest.raises(EtcdUnavailableError):
                # progress notifications from the lone member would go on for ever
                while time.monotonic() < deadline:
                    next(watch)
