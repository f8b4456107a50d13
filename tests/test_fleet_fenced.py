"""The fenced refresh (issue #13 items 4-6) against the real sandbox and a chain store.

The chain store here is ``MemoryChains``: a small in-memory class with FleetChains' methods
and etcd's compare semantics (the owner key's lease and the chain key's mod_revision), and
faults a test scripts per call (a reply dropped after the write was applied, a cluster out
of reach). The token endpoint is the real sandbox on loopback, and its request log is the
referee: a test that says "nothing sent" reads it empty.
"""

from __future__ import annotations

import contextlib
import enum
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from aac_tokend.core.importer import build_state, parse_import_text
from aac_tokend.core.outcome import Transient
from aac_tokend.errors import (
    EtcdAuthError,
    EtcdOutcomeUnknownError,
    EtcdUnsentError,
    FenceLostError,
)
from aac_tokend.fleet.chains import AttemptSeen, SeenKind, Versioned
from aac_tokend.fleet.connection import PreparedRequest, RequestTimeouts, open_request
from aac_tokend.fleet.etcd_types import LeaseInfo
from aac_tokend.fleet.fenced import FleetJob, carry_fenced
from aac_tokend.fleet.records import (
    ChainRecord,
    encode_record,
    first_record,
    resolved_by_heir,
)
from aac_tokend.fleet.settings import FleetSettings
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.sandbox.server import SandboxServer

PROFILE = "p"
SETTINGS = FleetSettings(
    endpoints=("http://127.0.0.1:2379",),
    name="test",
    send_window_seconds=2.0,
    resolve_wait_seconds=6.0,
    courier_life_seconds=5.0,
    connect_timeout_seconds=1.0,
    send_timeout_seconds=1.0,
    request_deadline_seconds=2.0,
)
TIMEOUTS = RequestTimeouts(
    SETTINGS.connect_timeout_seconds,
    SETTINGS.send_timeout_seconds,
    SETTINGS.request_deadline_seconds,
)


# -- an honest in-memory FleetChains ---------------------------------------------------------
class Fault(enum.Enum):
    DROP_REPLY = "applied, then the reply is lost"
    UNREACHABLE = "no member answers; nothing applied"
    REFUSED = "etcd refuses our credentials"


@dataclass
class MemoryChains:
    """FleetChains' transactions on a dict, with etcd's revision and lease compares."""

    revision: int = 1
    chain: dict[str, Versioned] = field(default_factory=dict)
    owner_lease: dict[str, int] = field(default_factory=dict)
    alive_leases: set[int] = field(default_factory=set)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    journal_commits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _fault(self, method: str) -> Fault | None:
        queue = self.faults.get(method)
        return queue.pop(0) if queue else None

    def _put(self, profile: str, record: ChainRecord) -> int:
        self.revision += 1
        self.chain[profile] = Versioned(record, self.revision)
        return self.revision

    def read(self, profile: str) -> Versioned | None:
        if self._fault("read") is not None:
            raise EtcdUnsentError("no member answered")
        with self.lock:
            return self.chain.get(profile)

    def commit_journal(
        self, profile: str, entry: ChainRecord, *, read_revision: int, lease_id: int
    ) -> int:
        fault = self._fault("commit_journal")
        if fault is Fault.UNREACHABLE:
            raise EtcdUnsentError("no member answered")
        with self.lock:
            now = self.chain.get(profile)
            if (
                self.owner_lease.get(profile) != lease_id
                or lease_id not in self.alive_leases
                or now is None
                or now.revision != read_revision
            ):
                raise FenceLostError("the compare failed")
            self.journal_commits += 1
            revision = self._put(profile, entry)
        if fault is Fault.DROP_REPLY:
            raise EtcdOutcomeUnknownError("the reply was lost")
        return revision

    def commit_resolution(
        self, profile: str, record: ChainRecord, *, entry_revision: int
    ) -> int | None:
        fault = self._fault("commit_resolution")
        if fault is Fault.UNREACHABLE:
            raise EtcdUnsentError("no member answered")
        if fault is Fault.REFUSED:
            raise EtcdAuthError("etcd refused the credentials")
        with self.lock:
            now = self.chain.get(profile)
            if now is None or now.revision != entry_revision:
                revision = None
            else:
                revision = self._put(profile, record)
        if fault is Fault.DROP_REPLY:
            raise EtcdOutcomeUnknownError("the reply was lost")
        return revision

    def find_attempt(self, profile: str, attempt_id: str) -> AttemptSeen:
        if self._fault("find_attempt") is not None:
            raise EtcdUnsentError("no member answered")
        with self.lock:
            now = self.chain.get(profile)
        if now is None:
            return AttemptSeen(SeenKind.ABSENT, None)
        attempt = now.record.unresolved
        if attempt is not None and attempt.id == attempt_id:
            return AttemptSeen(SeenKind.JOURNAL, now)
        if now.record.resolved == attempt_id:
            return AttemptSeen(SeenKind.RESOLVED, now)
        return AttemptSeen(SeenKind.ABSENT, now)

    # EtcdClient.time_to_live
    def time_to_live(self, lease_id: int, *, keys: bool = False) -> LeaseInfo | None:
        return LeaseInfo(lease_id, 5, 10, ()) if lease_id in self.alive_leases else None

    def current(self) -> ChainRecord:
        return self.chain[PROFILE].record


class MemoryStore:
    """FleetStore's part the courier uses: a profile lock and the local pending record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.kept: dict[str, bytes] = {}

    @contextlib.contextmanager
    def locked(self, profile: str, timeout: float) -> Iterator[None]:
        assert self._lock.acquire(timeout=timeout)
        try:
            yield
        finally:
            self._lock.release()

    def seal_outcome(self, record: ChainRecord, entry_revision: int) -> bytes:
        return json.dumps(
            {"record": json.loads(encode_record(record)), "entry_revision": entry_revision}
        ).encode()

    def keep_pending(self, profile: str, blob: bytes) -> None:
        self.kept[profile] = blob


class FakeBoottime:
    """The suspend-counting clock, which a test jumps forward (a suspend it cannot run)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=600) as server:
        yield server


@dataclass
class Fleet:
    """One chain in MemoryChains owned by host "a" under lease 1, its pair from the sandbox."""

    sandbox: SandboxServer
    chains: MemoryChains
    boottime: FakeBoottime
    stores: dict[str, MemoryStore] = field(default_factory=dict)

    def job(self, **kw: float | None) -> FleetJob:
        state = self.chains.current().state
        assert state.refresh_token is not None
        return FleetJob(PROFILE, state.refresh_token, **kw)  # type: ignore[arg-type]

    def hand_over(self, host_lease: int) -> None:
        """The owner key now names another host's lease (the old one expired)."""
        self.chains.alive_leases = {host_lease}
        self.chains.owner_lease[PROFILE] = host_lease

    def carry(
        self,
        job: FleetJob,
        *,
        host: str = "a",
        lease: int = 1,
        prepare: Callable[[str], PreparedRequest | Transient] | None = None,
        trace: Callable[[str], None] | None = None,
        on_answer: Callable[[], None] | None = None,
        retry_for: float = 0.3,
        life_ends: float | None = None,
    ) -> CourierResult:
        store = self.stores.setdefault(host, MemoryStore())
        return carry_fenced(
            job, store, self.chains, self.chains,
            prepare or (lambda url: open_request(url, TIMEOUTS)),
            SETTINGS, host, lease, self.boottime, time.time,
            trace=trace, on_answer=on_answer, retry_for=retry_for, life_ends=life_ends,
        )  # fmt: skip

    def sent(self) -> list[str]:
        return [str(entry["outcome"]) for entry in self.sandbox.log()]


@pytest.fixture
def fleet(sandbox: SandboxServer) -> Fleet:
    request = parse_import_text(json.dumps(sandbox.generate()), profile=PROFILE)
    request = request.__class__(**{**request.__dict__, "token_endpoint": sandbox.token_endpoint})
    chains = MemoryChains(alive_leases={1}, owner_lease={PROFILE: 1})
    chains._put(PROFILE, first_record(build_state(request, time.time()), 0))
    return Fleet(sandbox, chains, FakeBoottime())


def _refusing(url: str) -> PreparedRequest | Transient:
    """A token endpoint on a port nothing listens on: the connection is refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return open_request(f"http://127.0.0.1:{port}/token", TIMEOUTS)


# -- the tests ----------------------------------------------------------------------------------
class TestRefresh:
    """The owner's fenced refresh rotates the chain and commits the outcome."""

    def test_refreshes_and_resolves_its_entry(self, fleet: Fleet) -> None:
        """One request, the new pair in the chain, the record naming the attempt resolved."""
        before = fleet.chains.current()
        steps: list[str] = []
        result = fleet.carry(fleet.job(), trace=steps.append)
        assert result.kind is CourierKind.REFRESHED, result
        after = fleet.chains.current()
        assert after.state.refresh_token != before.state.refresh_token
        assert after.state.in_flight is None and after.resolved is not None
        assert after.seq == before.seq + 2
        assert fleet.sent() == ["rotated"]
        assert steps == ["journaled", "answered", "persisted"]

    def test_a_stale_token_sends_nothing(self, fleet: Fleet) -> None:
        """A job whose token is not the chain's: STATE_CHANGED, nothing sent or written."""
        result = fleet.carry(FleetJob(PROFILE, "not-the-token"))
        assert result.kind is CourierKind.STATE_CHANGED
        assert fleet.sent() == [] and fleet.chains.journal_commits == 0


class TestConnectionFirst:
    """The connection is opened before the journal commit."""

    def test_a_refused_connection_writes_no_journal(self, fleet: Fleet) -> None:
        """Connect refused: no journal entry ever, the failure recorded as unreached."""
        steps: list[str] = []
        result = fleet.carry(fleet.job(), prepare=_refusing, trace=steps.append)
        assert result.kind is CourierKind.TRANSIENT
        assert fleet.chains.journal_commits == 0
        assert steps == []
        state = fleet.chains.current().state
        assert state.consecutive_failures == 1 and state.in_flight is None
        assert state.last_failure is not None and state.last_failure.value == "unreached"
        assert fleet.sent() == []


class TestSuspendedOwner:
    """An owner that wakes past D after its journal commit sends nothing."""

    def test_past_d_nothing_is_sent_and_the_next_owner_succeeds(self, fleet: Fleet) -> None:
        """Clock jumped past D: no request, the entry cancelled; the heir's retry rotates."""
        token = fleet.chains.current().state.refresh_token

        def suspend(step: str) -> None:
            if step == "journaled":
                fleet.boottime.now += SETTINGS.send_window_seconds + 0.01

        result = fleet.carry(fleet.job(), trace=suspend)
        assert result.kind is CourierKind.STATE_CHANGED
        assert "past the send window" in result.detail
        assert fleet.sent() == []
        record = fleet.chains.current()
        assert record.unresolved is None and record.resolved is not None
        assert record.state.refresh_token == token and record.state.ambiguous_rt_hash is None
        fleet.hand_over(2)
        retry = fleet.carry(fleet.job(), host="b", lease=2)
        assert retry.kind is CourierKind.REFRESHED, retry
        assert fleet.sent() == ["rotated"]

    def test_a_courier_short_of_life_sends_nothing(self, fleet: Fleet) -> None:
        """Less of its life left than the request's deadline (it was stopped before its
        journal): no request, the entry taken back; with its life ahead, it sends."""
        short = time.monotonic() + SETTINGS.request_deadline_seconds - 0.5
        result = fleet.carry(fleet.job(), life_ends=short)
        assert result.kind is CourierKind.STATE_CHANGED
        assert "courier's life" in result.detail and fleet.sent() == []
        assert fleet.chains.current().unresolved is None
        ahead = time.monotonic() + SETTINGS.request_deadline_seconds + 5
        assert fleet.carry(fleet.job(), life_ends=ahead).kind is CourierKind.REFRESHED

    def test_just_inside_d_it_sends(self, fleet: Fleet) -> None:
        """A clock that moved less than D lets the request leave (the check is not vacuous)."""

        def late(step: str) -> None:
            if step == "journaled":
                fleet.boottime.now += SETTINGS.send_window_seconds - 0.5

        assert fleet.carry(fleet.job(), trace=late).kind is CourierKind.REFRESHED
        assert fleet.sent() == ["rotated"]


class TestLeaseGone:
    """A lease gone between the journal commit and the send sends nothing."""

    def test_lease_gone_cancels_the_entry(self, fleet: Fleet) -> None:
        """The lease expires after the commit: no request, the entry cancelled as not sent."""

        def expire(step: str) -> None:
            if step == "journaled":
                fleet.chains.alive_leases.clear()

        result = fleet.carry(fleet.job(), trace=expire)
        assert result.kind is CourierKind.STATE_CHANGED
        assert "lease is gone" in result.detail
        assert fleet.sent() == []
        assert fleet.chains.current().unresolved is None

    def test_not_the_owner_writes_no_journal(self, fleet: Fleet) -> None:
        """Another host's lease on the owner key: the journal compare fails, nothing sent."""
        fleet.hand_over(2)
        result = fleet.carry(fleet.job(), lease=1)
        assert result.kind is CourierKind.STATE_CHANGED
        assert fleet.chains.journal_commits == 0 and fleet.sent() == []


class TestInheritedEntry:
    """An heir waits W from when it first saw an entry, then resolves it; one side wins."""

    def test_heir_is_busy_before_w_and_wins_after(self, fleet: Fleet) -> None:
        """The heir's resolution lands first: the courier's outcome is superseded."""
        heir_results: list[CourierResult] = []
        seen_at = fleet.boottime.now
        job = fleet.job()

        def heir() -> None:
            fleet.hand_over(2)
            entry = fleet.chains.current().unresolved
            assert entry is not None
            inherited = FleetJob(
                PROFILE, job.refresh_token, inherited_seen_at=seen_at, inherited_attempt=entry.id
            )
            fleet.boottime.now = seen_at + SETTINGS.resolve_wait_seconds - 0.1
            heir_results.append(fleet.carry(inherited, host="b", lease=2, prepare=_refusing))
            fleet.boottime.now = seen_at + SETTINGS.resolve_wait_seconds
            heir_results.append(fleet.carry(inherited, host="b", lease=2, prepare=_refusing))

        result = fleet.carry(job, on_answer=heir)
        assert [r.kind for r in heir_results] == [CourierKind.BUSY, CourierKind.TRANSIENT]
        assert "not resolved yet" in heir_results[0].detail
        assert result.kind is CourierKind.STATE_CHANGED
        assert result.detail.startswith("superseded")
        assert fleet.sent() == ["rotated"]  # the courier's one request; the heir's refused
        state = fleet.chains.current().state
        assert state.refresh_token == job.refresh_token and state.ambiguous_rt_hash

    def test_a_sighting_of_another_entry_does_not_count(self, fleet: Fleet) -> None:
        """Past W from the sighting of an earlier entry, a newer entry is still waited for:
        W counts from when this host first saw the very entry it would resolve."""
        stuck: list[CourierResult] = []
        seen_at = fleet.boottime.now

        def other(step: str) -> None:
            if step == "journaled":
                fleet.boottime.now = seen_at + 10 * SETTINGS.resolve_wait_seconds
                earlier = FleetJob(
                    PROFILE,
                    fleet.job().refresh_token,
                    inherited_seen_at=seen_at,
                    inherited_attempt="an-earlier-entry",
                )
                stuck.append(fleet.carry(earlier, host="b", lease=1))
                fleet.boottime.now = seen_at  # the first courier is still within its D

        fleet.carry(fleet.job(), trace=other)
        assert stuck[0].kind is CourierKind.BUSY
        assert fleet.sent() == ["rotated"]

    def test_no_sighting_means_busy(self, fleet: Fleet) -> None:
        """An unresolved entry and no first sighting: BUSY, nothing sent or written."""
        stuck: list[CourierResult] = []

        def other(step: str) -> None:
            if step == "journaled":
                stuck.append(fleet.carry(fleet.job(), host="b", lease=1))

        fleet.carry(fleet.job(), trace=other)
        assert stuck[0].kind is CourierKind.BUSY
        assert fleet.sent() == ["rotated"]

    def test_heir_won_and_the_reply_was_lost(self, fleet: Fleet) -> None:
        """The heir resolved first and the courier's reply is lost: the record names the
        same attempt, but it is not the courier's outcome: superseded, not done."""

        def heir() -> None:
            entry = fleet.chains.chain[PROFILE]
            fleet.chains.commit_resolution(
                PROFILE, resolved_by_heir(entry.record, time.time()), entry_revision=entry.revision
            )
            fleet.chains.faults["commit_resolution"] = [Fault.DROP_REPLY]

        result = fleet.carry(fleet.job(), on_answer=heir)
        assert result.kind is CourierKind.STATE_CHANGED
        assert result.detail.startswith("superseded")


class TestUnknownOutcomes:
    """Lost etcd replies are settled by reading for the attempt id."""

    def test_lost_outcome_reply_is_found_resolved(self, fleet: Fleet) -> None:
        """The outcome commit applied, its reply lost: find_attempt says ours: REFRESHED."""
        fleet.chains.faults["commit_resolution"] = [Fault.DROP_REPLY]
        result = fleet.carry(fleet.job())
        assert result.kind is CourierKind.REFRESHED, result
        assert fleet.chains.current().unresolved is None
        assert fleet.sent() == ["rotated"]

    def test_lost_journal_reply_is_cancelled_unsent(self, fleet: Fleet) -> None:
        """The journal commit applied, its reply lost: the entry is cancelled, nothing sent."""
        fleet.chains.faults["commit_journal"] = [Fault.DROP_REPLY]
        result = fleet.carry(fleet.job())
        assert result.kind is CourierKind.NOT_STARTED
        assert fleet.chains.journal_commits == 1
        assert fleet.chains.current().unresolved is None and fleet.sent() == []

    def test_etcd_unreachable_after_the_answer_keeps_it_pending(self, fleet: Fleet) -> None:
        """No member answers the outcome commit: STORAGE_FAILED with the blob, kept locally,
        carrying the entry's revision."""
        fleet.chains.faults["commit_resolution"] = [Fault.UNREACHABLE] * 10
        entry_revision = fleet.chains.revision + 1
        result = fleet.carry(fleet.job())
        assert result.kind is CourierKind.STORAGE_FAILED
        assert result.unsaved is not None
        assert fleet.stores["a"].kept[PROFILE] == result.unsaved
        kept = json.loads(result.unsaved)
        assert kept["entry_revision"] == entry_revision
        assert kept["record"]["state"]["refresh_token"] != fleet.job().refresh_token
        assert fleet.chains.current().unresolved is not None  # for the daemon to push
        assert fleet.sent() == ["rotated"]

    def test_refused_after_the_answer_keeps_it_pending(self, fleet: Fleet) -> None:
        """etcd refusing the outcome commit (credentials) loses no pair: kept pending."""
        fleet.chains.faults["commit_resolution"] = [Fault.REFUSED] * 10
        result = fleet.carry(fleet.job())
        assert result.kind is CourierKind.STORAGE_FAILED and result.unsaved is not None
        assert fleet.stores["a"].kept[PROFILE] == result.unsaved

    def test_unreachable_then_back_commits(self, fleet: Fleet) -> None:
        """A short outage after the answer is retried within the bound: REFRESHED."""
        fleet.chains.faults["commit_resolution"] = [Fault.UNREACHABLE]
        result = fleet.carry(fleet.job(), retry_for=2.0)
        assert result.kind is CourierKind.REFRESHED
        assert fleet.chains.current().unresolved is None


# -- the same against a real etcd (engineer A's FleetChains and FleetStore) ------------------
@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real member for this module (a fresh fleet name per test)."""
    from .etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

    if ETCD is None:
        pytest.skip(SKIP_REASON)
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1).running() as cluster:
        yield cluster


class Detour:
    """Real FleetChains whose next ``times`` outcome commits (or journal commits, with
    ``journal``) go through another client (a reply-dropping proxy, or a port nobody listens
    on); everything else is the real one."""

    def __init__(self, real: Any, detour: Any, times: int, *, journal: bool = False) -> None:
        self.real, self.detour, self.times, self.journal = real, detour, times, journal

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def commit_journal(
        self, profile: str, entry: ChainRecord, *, read_revision: int, lease_id: int
    ) -> int:
        via = self.detour if self.journal and self.times > 0 else self.real
        if via is self.detour:
            self.times -= 1
        result: int = via.commit_journal(
            profile, entry, read_revision=read_revision, lease_id=lease_id
        )
        return result

    def commit_resolution(
        self, profile: str, record: ChainRecord, *, entry_revision: int
    ) -> int | None:
        if self.times > 0 and not self.journal:
            self.times -= 1
            result: int | None = self.detour.commit_resolution(
                profile, record, entry_revision=entry_revision
            )
            return result
        result = self.real.commit_resolution(profile, record, entry_revision=entry_revision)
        return result


@dataclass
class RealFleet:
    """A fleet on the real etcd: chains, store, the owner's lease, and chains via a client."""

    sandbox: SandboxServer
    client: Any
    chains: Any
    store: Any
    lease: int
    chains_via: Callable[[str], Any]

    def job(self) -> FleetJob:
        return FleetJob(PROFILE, self.chains.read(PROFILE).record.state.refresh_token)

    def carry(self, chains: Any, **kw: Any) -> CourierResult:
        return carry_fenced(
            self.job(), self.store, chains, self.client,
            lambda url: open_request(url, TIMEOUTS), SETTINGS, "a", self.lease,
            FakeBoottime(), time.time, **kw,
        )  # fmt: skip


@pytest.fixture
def real(etcd_cluster: Any, sandbox: SandboxServer, tmp_path: Any) -> RealFleet:
    import secrets

    from aac_tokend.fleet.chains import FleetChains
    from aac_tokend.fleet.etcd import EtcdClient
    from aac_tokend.fleet.highwater import HighWater
    from aac_tokend.fleet.keys import FleetKeys
    from aac_tokend.fleet.sealing import Sealer
    from aac_tokend.fleet.store import FleetStore

    name, key = f"t{secrets.token_hex(4)}", secrets.token_bytes(32)
    keys, sealer, marks = FleetKeys(name), Sealer(key, name), HighWater(tmp_path, name)

    def chains_via(endpoint: str) -> FleetChains:
        return FleetChains(EtcdClient([endpoint], timeout=2.0), keys, sealer, marks)

    chains = chains_via(etcd_cluster.endpoints[0])
    request = parse_import_text(json.dumps(sandbox.generate()), profile=PROFILE)
    request = request.__class__(**{**request.__dict__, "token_endpoint": sandbox.token_endpoint})
    chains.create(PROFILE, build_state(request, time.time()))
    lease = chains.client.grant(30)
    chains.client.put(keys.owner(PROFILE), b"a", lease=lease.id)
    store = FleetStore(chains, tmp_path)
    return RealFleet(sandbox, chains.client, chains, store, lease.id, chains_via)


class TestRealEtcd:
    """The fenced refresh on a real etcd, with its replies dropped or its members away."""

    def test_refreshes(self, real: RealFleet) -> None:
        """The owner's refresh rotates the chain in etcd and resolves its entry."""
        token = real.job().refresh_token
        result = real.carry(real.chains)
        assert result.kind is CourierKind.REFRESHED, result
        record = real.chains.read(PROFILE).record
        assert record.state.refresh_token != token and record.unresolved is None

    def test_lost_outcome_reply_is_found_resolved(self, real: RealFleet, etcd_cluster: Any) -> None:
        """The outcome commit applied, its reply dropped by a proxy: find_attempt reads
        the courier's own outcome, and the courier is done (REFRESHED)."""
        from .etcd_cluster import ReplyDroppingProxy

        proxy = ReplyDroppingProxy(etcd_cluster.members[0].client_port)
        try:
            chains = Detour(real.chains, real.chains_via(proxy.url), times=1)
            result = real.carry(chains)
            assert proxy.requests_forwarded == 1
        finally:
            proxy.close()
        assert result.kind is CourierKind.REFRESHED, result
        assert real.chains.read(PROFILE).record.unresolved is None
        assert [e["outcome"] for e in real.sandbox.log()] == ["rotated"]

    def test_unreachable_after_the_answer_is_pushed_later(self, real: RealFleet) -> None:
        """etcd out of reach after the answer: STORAGE_FAILED with the blob, kept pending
        locally; the store opens the blob and its save commits it against the entry."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
        chains = Detour(real.chains, real.chains_via(nowhere), times=100)
        result = real.carry(chains, retry_for=0.5)
        assert result.kind is CourierKind.STORAGE_FAILED, result
        assert result.unsaved is not None
        assert real.store.pending(PROFILE) == result.unsaved
        assert real.chains.read(PROFILE).record.unresolved is not None
        state = real.store.unseal(PROFILE, result.unsaved)
        real.store.save(state)
        record = real.chains.read(PROFILE).record
        assert record.unresolved is None and record.state.refresh_token == state.refresh_token

    def test_suspended_past_d_sends_nothing_and_the_heir_succeeds(self, real: RealFleet) -> None:
        """On the real etcd: woken past D after the journal commit, nothing reaches the
        sandbox and the entry is cancelled; the next owner (another lease) refreshes."""
        clock = FakeBoottime()

        def suspend(step: str) -> None:
            if step == "journaled":
                clock.now += SETTINGS.send_window_seconds + 1

        result = carry_fenced(
            real.job(), real.store, real.chains, real.client,
            lambda url: open_request(url, TIMEOUTS), SETTINGS, "a", real.lease,
            clock, time.time, trace=suspend,
        )  # fmt: skip
        assert result.kind is CourierKind.STATE_CHANGED and "send window" in result.detail
        assert real.sandbox.log() == []
        assert real.chains.read(PROFILE).record.unresolved is None
        real.client.revoke(real.lease)  # the old owner's lease expires; b takes over
        lease_b = real.client.grant(30).id
        real.client.put(real.chains.keys.owner(PROFILE), b"b", lease=lease_b)
        retry = carry_fenced(
            real.job(), real.store, real.chains, real.client,
            lambda url: open_request(url, TIMEOUTS), SETTINGS, "b", lease_b,
            FakeBoottime(), time.time,
        )  # fmt: skip
        assert retry.kind is CourierKind.REFRESHED, retry
        assert [e["outcome"] for e in real.sandbox.log()] == ["rotated"]

    def test_lease_revoked_after_the_commit_sends_nothing(self, real: RealFleet) -> None:
        """On the real etcd: the lease revoked between commit and send: time_to_live says
        gone, nothing reaches the sandbox, the entry is cancelled."""

        def revoke(step: str) -> None:
            if step == "journaled":
                real.client.revoke(real.lease)

        result = real.carry(real.chains, trace=revoke)
        assert result.kind is CourierKind.STATE_CHANGED and "lease is gone" in result.detail
        assert real.sandbox.log() == []
        record = real.chains.read(PROFILE).record
        assert record.unresolved is None and record.resolved is not None

    def test_lost_journal_reply_is_cancelled(self, real: RealFleet, etcd_cluster: Any) -> None:
        """On the real etcd: the journal commit applied, its reply dropped by a proxy: the
        courier finds its entry, cancels it, and sends nothing."""
        from .etcd_cluster import ReplyDroppingProxy

        proxy = ReplyDroppingProxy(etcd_cluster.members[0].client_port)
        try:
            chains = Detour(real.chains, real.chains_via(proxy.url), times=1, journal=True)
            result = real.carry(chains)
            assert proxy.requests_forwarded == 1
        finally:
            proxy.close()
        assert result.kind is CourierKind.NOT_STARTED, result
        assert real.sandbox.log() == []
        record = real.chains.read(PROFILE).record
        assert record.unresolved is None and record.resolved is not None
