"""The chain follower against a real 3-member etcd: in order, once, through kills and compaction.

The follower reads through the real ``FleetChains`` (each follower a host of its own, with
its own high-water marks), counted by ``CountingChains``. Records are written straight to
the chain keys, sealed at their seq.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aac_tokend.core.policy import begin_attempt
from aac_tokend.errors import AacTokendError, EtcdUnavailableError
from aac_tokend.fleet.chains import FleetChains, Versioned
from aac_tokend.fleet.etcd import EtcdClient, Watch, WatchEvent
from aac_tokend.fleet.follow import ChainFollower
from aac_tokend.fleet.highwater import HighWater
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.fleet.records import (
    Attempt,
    ChainRecord,
    encode_record,
    first_record,
    journal_of,
    new_attempt_id,
    outcome_of,
    with_state,
)
from aac_tokend.fleet.sealing import Sealer
from aac_tokend.testing import T0, FakeClock, oauth_state
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster, Member

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: The watch's read deadline: several progress intervals (300 ms), so only a dead stream hits.
IDLE = 1.5
KEY = bytes(range(32))

_fleets = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three members that send watch progress notifications every 300 ms."""
    progress = "--experimental-watch-progress-notify-interval=300ms"
    with EtcdCluster(tmp_path_factory.mktemp("etcd-follow"), extra_args=(progress,)).running() as c:
        yield c


@pytest.fixture
def etcd(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster with every member running again after the test."""
    yield cluster
    cluster.restore()


class CountingChains(FleetChains):
    """The real FleetChains, counting its full reads (a re-read after a lost watch)."""

    def __init__(self, client: EtcdClient, keys: FleetKeys, sealer: Sealer, state_dir: Path):
        super().__init__(client, keys, sealer, HighWater(state_dir, keys.fleet))
        self.reads = 0

    def read_all(self) -> tuple[dict[str, Versioned | AacTokendError], int]:
        self.reads += 1
        return super().read_all()


class BreakingWatch:
    """A real watch that raises EtcdUnavailableError after ``after`` events, as a lost etcd
    (progress notifications are passed on and not counted)."""

    def __init__(self, watch: Watch, after: int) -> None:
        self.watch, self.left = watch, after

    def __enter__(self) -> BreakingWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.watch.close()

    def close(self) -> None:
        self.watch.close()

    def __iter__(self) -> BreakingWatch:
        return self

    def __next__(self) -> Any:
        if self.left <= 0:
            self.watch.close()
            raise EtcdUnavailableError("etcd watch broke (test)")
        item = next(self.watch)
        if isinstance(item, WatchEvent):
            self.left -= 1
        return item


class BreakingClient(EtcdClient):
    """A real client whose next watches break after the given numbers of events."""

    def __init__(self, endpoints: list[str], breaks: list[int]) -> None:
        super().__init__(endpoints, timeout=3, connect_timeout=0.5)
        self.breaks = breaks

    def watch(self, key: bytes, **kwargs: Any) -> Any:
        real = super().watch(key, **kwargs)
        return BreakingWatch(real, self.breaks.pop(0)) if self.breaks else real


class Delivered:
    """What the follower delivered, in order: (profile, revision, seq) and the gone profiles."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, int]] = []
        self.gone: list[str] = []
        self.lock = threading.Lock()

    def record(self, profile: str, versioned: Versioned) -> None:
        with self.lock:
            self.records.append((profile, versioned.revision, versioned.record.seq))

    def went(self, profile: str) -> None:
        with self.lock:
            self.gone.append(profile)

    def of(self, profile: str) -> list[int]:
        """The revisions delivered for ``profile``, in delivery order."""
        with self.lock:
            return [rev for p, rev, _ in self.records if p == profile]

    def wait_for(self, check: Callable[[], bool], within: float = 8.0) -> None:
        deadline = time.monotonic() + within
        while not check():
            assert time.monotonic() < deadline, f"not delivered within {within} s: {self.records}"
            time.sleep(0.02)


class Fleet:
    """One test's fleet: its keys, sealer and a writer of sealed chain records."""

    def __init__(self, cluster: EtcdCluster, hosts: Path) -> None:
        self.hosts = hosts
        self.keys = FleetKeys(f"follow{next(_fleets)}x{time.monotonic_ns()}")
        self.sealer = Sealer(KEY, self.keys.fleet)
        self.endpoints = cluster.endpoints
        self.writer = EtcdClient(cluster.endpoints, timeout=5, connect_timeout=0.5)
        self.last: dict[str, ChainRecord] = {}
        self.followers: list[ChainFollower[Versioned]] = []

    def write(self, profile: str, record: ChainRecord | None = None) -> int:
        """Put the profile's next record (or ``record``); its revision."""
        if record is None:
            before = self.last.get(profile)
            state = oauth_state(profile=profile)
            record = first_record(state, 0) if before is None else with_state(before, state)
        self.last[profile] = record
        blob = self.sealer.seal(profile, record.seq, encode_record(record))
        return self.writer.put(self.keys.chain(profile), blob).revision

    def follower(
        self,
        client: EtcdClient | None = None,
        boottime: Callable[[], float] = time.monotonic,
        *,
        wait: bool = True,
    ) -> tuple[ChainFollower[Versioned], Delivered, CountingChains]:
        """A started follower; unless told not to, one that has read and is watching."""
        client = client or EtcdClient(self.endpoints, timeout=3, connect_timeout=0.5)
        delivered = Delivered()
        state_dir = self.hosts / f"host{len(self.followers)}"
        chains = CountingChains(client, self.keys, self.sealer, state_dir)
        follower = ChainFollower(
            client,
            chains,
            self.keys,
            delivered.record,
            delivered.went,
            boottime,
            watch_idle_seconds=IDLE,
        )
        follower.start()
        self.followers.append(follower)
        deadline = time.monotonic() + 5
        while wait and not follower.healthy():
            assert time.monotonic() < deadline, "the follower did not start watching"
            time.sleep(0.02)
        return follower, delivered, chains


@pytest.fixture
def fleet(cluster: EtcdCluster, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet no other test uses; its followers are closed after the test."""
    made = Fleet(cluster, tmp_path)
    yield made
    for follower in made.followers:
        follower.close()


def follower_first(etcd: EtcdCluster) -> tuple[EtcdClient, Member]:
    """A client whose first member (where the watch goes) is a follower, and that member."""
    leader = etcd.leader()
    first = next(m for m in etcd.members if m is not leader)
    order = [first.url] + [m.url for m in etcd.members if m is not first]
    return EtcdClient(order, timeout=3, connect_timeout=0.5), first


def journal(fleet: Fleet, profile: str) -> ChainRecord:
    """A journal entry over the profile's last record, by host h1, with a fresh attempt id."""
    before = fleet.last[profile]
    return journal_of(
        before, begin_attempt(before.state, T0), Attempt(new_attempt_id(), "h1", 10.0)
    )


class TestOrder:
    """Every record is delivered, each profile's in revision order, each revision once."""

    def test_existing_then_new_records_in_order(self, fleet: Fleet) -> None:
        """Records written before start come from the read, later ones from the watch."""
        written = {p: [fleet.write(p)] for p in ("alpha", "beta")}
        follower, delivered, _ = fleet.follower()
        for _ in range(4):
            for profile in ("alpha", "beta", "gamma"):
                written.setdefault(profile, []).append(fleet.write(profile))
        for profile, revisions in written.items():
            delivered.wait_for(lambda p=profile, r=revisions: delivered.of(p) == r)  # type: ignore[misc]
        seqs = [(p, s) for p, _, s in delivered.records]
        for profile in written:
            mine = [s for p, s in seqs if p == profile]
            assert mine == sorted(mine) == list(range(1, len(mine) + 1))
        assert follower.healthy()
        assert time.monotonic() - follower.last_contact() < IDLE

    def test_deleted_chain_is_gone_once(self, fleet: Fleet) -> None:
        """A chain key deleted under the watch is reported gone once, and a re-read adds
        nothing."""
        fleet.write("alpha")
        client = BreakingClient(fleet.endpoints, [2])
        _, delivered, chains = fleet.follower(client)
        delivered.wait_for(lambda: len(delivered.of("alpha")) == 1)
        fleet.writer.delete(fleet.keys.chain("alpha"))
        delivered.wait_for(lambda: delivered.gone == ["alpha"])
        fleet.write("beta")
        delivered.wait_for(lambda: chains.reads >= 2 and len(delivered.of("beta")) == 1)
        assert delivered.gone == ["alpha"]


class TestResume:
    """A broken stream or a killed member loses no revision and repeats none."""

    def test_killed_member_loses_and_repeats_nothing(self, etcd: EtcdCluster, fleet: Fleet) -> None:
        """The member under the watch is killed between writes: every revision arrives once."""
        client, member = follower_first(etcd)
        _, delivered, _ = fleet.follower(client)
        written = [fleet.write("work") for _ in range(3)]
        delivered.wait_for(lambda: delivered.of("work") == written)
        etcd.kill(member)
        written += [fleet.write("work") for _ in range(5)]
        delivered.wait_for(lambda: delivered.of("work") == written, within=IDLE + 8)

    def test_a_revision_read_again_is_delivered_once(self, fleet: Fleet) -> None:
        """After a lost watch the follower reads everything again: what it had is not
        repeated, and the watch after the read misses nothing."""
        written = {"work": [fleet.write("work")], "other": [fleet.write("other")]}
        client = BreakingClient(fleet.endpoints, [2])  # the first watch breaks after 2 events
        _, delivered, chains = fleet.follower(client)
        written["work"] += [fleet.write("work"), fleet.write("work")]
        delivered.wait_for(lambda: chains.reads == 2 and client.breaks == [])
        written["work"] += [fleet.write("work"), fleet.write("work")]
        delivered.wait_for(lambda: delivered.of("work")[-1:] == written["work"][-1:])
        time.sleep(0.3)  # a repeat, if there were one, would come now
        assert delivered.of("work") == written["work"]
        assert delivered.of("other") == written["other"]
        assert chains.reads == 2


class TestCompaction:
    """A watch whose revisions were compacted away reads everything again."""

    def test_compacted_while_away_reads_all_again(self, etcd: EtcdCluster, fleet: Fleet) -> None:
        """The watch's member is paused while records are written and etcd is compacted: the
        follower re-reads, delivers the latest record, and repeats nothing it had."""
        fleet.write("still")
        client, member = follower_first(etcd)
        _, delivered, chains = fleet.follower(client)
        delivered.wait_for(lambda: len(delivered.of("still")) == 1)
        etcd.pause(member)
        fleet.writer = EtcdClient([m.url for m in etcd.members if m is not member], timeout=5)
        latest = [fleet.write("work") for _ in range(3)][-1]
        fleet.writer.compact(latest)
        delivered.wait_for(lambda: delivered.of("work")[-1:] == [latest], within=IDLE + 8)
        assert chains.reads >= 2
        assert delivered.of("still") == [delivered.records[0][1]]
        got = delivered.of("work")
        assert len(got) == len(set(got)) and got == sorted(got)


class TestFirstSeen:
    """first_seen is the boottime of this host's earliest sighting of an unresolved entry."""

    def test_earliest_sighting_kept_across_reads(self, fleet: Fleet) -> None:
        """An entry seen at 100 and read again at 200 stays first seen at 100; another host
        that first sees it at 200 says 200; once resolved it is forgotten."""
        boot = FakeClock()
        fleet.write("work")
        boot.set(0)
        start = boot.monotonic()
        entry = journal(fleet, "work")
        assert entry.unresolved is not None
        client = BreakingClient(fleet.endpoints, [2])  # a re-read after the 2nd event
        follower, delivered, chains = fleet.follower(client, boottime=boot.monotonic)
        delivered.wait_for(lambda: len(delivered.of("work")) == 1)
        assert follower.first_seen(entry.unresolved.id) is None
        revision = fleet.write("work", entry)
        delivered.wait_for(lambda: delivered.of("work")[-1:] == [revision])
        assert follower.first_seen(entry.unresolved.id) == start
        boot.advance(100)
        fleet.write("other")  # the watch's second event: it breaks, everything is read again
        delivered.wait_for(lambda: chains.reads >= 2 and len(delivered.of("other")) == 1)
        assert follower.first_seen(entry.unresolved.id) == start
        heir, heir_delivered, _ = fleet.follower(boottime=boot.monotonic)
        heir_delivered.wait_for(lambda: heir_delivered.of("work") == [revision])
        assert heir.first_seen(entry.unresolved.id) == start + 100
        assert follower.first_seen(entry.unresolved.id) == start
        done = outcome_of(entry, entry.state)
        resolved = fleet.write("work", done)
        delivered.wait_for(lambda: delivered.of("work")[-1:] == [resolved])
        assert follower.first_seen(entry.unresolved.id) is None


class TestHealth:
    """healthy() and last_contact() say whether etcd is being heard."""

    def test_unreachable_etcd_is_unhealthy(self, fleet: Fleet) -> None:
        """A follower whose only member refuses connections is not healthy, never contacted."""
        from tests.etcd_cluster import free_port

        dead = EtcdClient([f"http://127.0.0.1:{free_port()}"], timeout=0.5, connect_timeout=0.2)
        follower, _, _ = fleet.follower(dead, wait=False)
        time.sleep(0.5)
        assert not follower.healthy()
        assert follower.last_contact() == float("-inf")
