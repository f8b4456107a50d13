"""The etcd client against a real 3-member etcd cluster on loopback.

Keys, transactions, leases and status on a shared cluster; failover, pauses, lost quorum
and lost replies on the same cluster, each test putting back what it killed or paused;
auth and TLS on clusters of their own.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from aac_tokend.errors import (
    AlertError,
    EtcdAuthError,
    EtcdLeaseGoneError,
    EtcdOutcomeUnknownError,
    EtcdUnavailableError,
    EtcdUnsentError,
    TransientError,
)
from aac_tokend.fleet.etcd import (
    Compare,
    Credentials,
    DeleteOp,
    DeleteResult,
    EtcdClient,
    PutOp,
    RangeOp,
    RangeResult,
    TlsFiles,
    WatchEvent,
)
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster, ReplyDroppingProxy, free_port
from tests.etcd_cluster import TlsFiles as Pki

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: The bound every call is held to here; a paused member must not stretch it.
TIMEOUT = 1.5
#: What the bound may be exceeded by: one connect and scheduling on 2 shared cores.
SLACK = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three members shared by this module's tests."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd")).running() as c:
        yield c


@pytest.fixture
def etcd(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The shared cluster with every member running again after the test."""
    yield cluster
    cluster.restore()


@pytest.fixture
def client(cluster: EtcdCluster) -> EtcdClient:
    """A client of all three members."""
    return EtcdClient(cluster.endpoints, timeout=TIMEOUT, connect_timeout=0.5)


def unique(name: str) -> bytes:
    """A key no other test uses."""
    return f"/test/{name}/{time.monotonic_ns()}".encode()


class TestKeys:
    """Put, range and delete keep bytes and report etcd's revisions."""

    def test_put_then_range_returns_value_and_revisions(self, client: EtcdClient) -> None:
        """A put is read back with its create and mod revision, version 1, and no lease."""
        key = unique("kv")
        put = client.put(key, b"\x00\xffbinary")
        found = client.range(key)
        assert [kv.value for kv in found.kvs] == [b"\x00\xffbinary"]
        kv = found.kvs[0]
        assert (kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
            put.revision, put.revision, 1, 0,
        )  # fmt: skip
        assert found.revision >= put.revision
        client.put(key, b"two")
        again = client.get(key)
        assert again is not None
        assert (again.version, again.create_revision) == (2, put.revision)

    def test_prefix_range_and_delete(self, client: EtcdClient) -> None:
        """A prefix reads and deletes exactly the keys under it."""
        base = unique("prefix")
        for name in (b"/a", b"/b", b"/c"):
            client.put(base + name, name)
        client.put(base + b"0", b"outside")  # shares the bytes but not the "/"
        under = client.range(base + b"/", prefix=True)
        assert [kv.key for kv in under.kvs] == [base + b"/a", base + b"/b", base + b"/c"]
        assert client.delete(base + b"/", prefix=True).deleted == 3
        assert client.range(base + b"/", prefix=True).kvs == ()
        assert client.get(base + b"0") is not None

    def test_serializable_read_answers(self, client: EtcdClient) -> None:
        """A serializable read returns the key too (from the member's own copy)."""
        key = unique("serial")
        client.put(key, b"v")
        deadline = time.monotonic() + 2
        while not client.range(key, serializable=True).kvs and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.range(key, serializable=True).kvs[0].value == b"v"


class TestTxn:
    """Transactions compare, then run one branch, as one revision."""

    def test_create_only_put(self, client: EtcdClient) -> None:
        """A put guarded by create_revision == 0 succeeds once and fails on a live key."""
        key = unique("create")
        first = client.txn([Compare.create_revision(key, 0)], [PutOp(key, b"one")])
        assert first.succeeded
        second = client.txn([Compare.create_revision(key, 0)], [PutOp(key, b"two")], [RangeOp(key)])
        assert not second.succeeded
        found = second.responses[0]
        assert isinstance(found, RangeResult)
        assert found.kvs[0].value == b"one"
        assert found.kvs[0].mod_revision == first.revision

    def test_mod_revision_compare_refuses_a_stale_read(self, client: EtcdClient) -> None:
        """A write based on an old mod_revision loses to the write that came between."""
        key = unique("mod")
        read_at = client.put(key, b"v1").revision
        client.put(key, b"v2")  # someone else's write
        stale = client.txn([Compare.mod_revision(key, read_at)], [PutOp(key, b"v3")])
        assert not stale.succeeded
        current = client.get(key)
        assert current is not None and current.value == b"v2"
        fresh = client.txn([Compare.mod_revision(key, current.mod_revision)], [DeleteOp(key)])
        assert fresh.succeeded
        assert isinstance(fresh.responses[0], DeleteResult)
        assert fresh.responses[0].deleted == 1

    def test_lease_and_value_compares(self, client: EtcdClient) -> None:
        """A compare on the key's lease holds for its own lease only; value compares too."""
        key = unique("lease-cmp")
        mine, other = client.grant(10), client.grant(10)
        try:
            client.put(key, b"owner-a", lease=mine.id)
            assert client.txn([Compare.lease(key, mine.id)], [PutOp(key, b"x", mine.id)]).succeeded
            assert not client.txn([Compare.lease(key, other.id)], [DeleteOp(key)]).succeeded
            assert client.txn([Compare.value(key, b"x")], []).succeeded
            assert not client.txn([Compare.value(key, b"owner-a")], []).succeeded
        finally:
            client.revoke(mine.id)
            client.revoke(other.id)


class TestLeases:
    """The granted TTL is etcd's, keepalives renew, and expiry deletes bound keys."""

    def test_grant_returns_the_ttl_etcd_granted(self, client: EtcdClient) -> None:
        """A 1 s lease is raised to etcd's minimum (1.5 election timeouts: 2 s here)."""
        lease = client.grant(1)
        try:
            assert lease.ttl == 2
            info = client.time_to_live(lease.id)
            assert info is not None and info.granted_ttl == 2
        finally:
            client.revoke(lease.id)

    def test_keepalive_renews_and_reports_gone(self, client: EtcdClient) -> None:
        """A live lease's keepalive gives its TTL; once revoked it gives 0 and no info."""
        lease = client.grant(5)
        assert client.keepalive(lease.id) == 5
        client.revoke(lease.id)
        assert client.keepalive(lease.id) == 0
        assert client.time_to_live(lease.id) is None

    def test_expiry_deletes_the_bound_key(self, client: EtcdClient) -> None:
        """A key bound to a lease that is not kept alive is gone after the TTL."""
        key = unique("expiry")
        lease = client.grant(2)
        client.put(key, b"owner", lease=lease.id)
        info = client.time_to_live(lease.id, keys=True)
        assert info is not None and info.keys == (key,)
        assert client.get(key) is not None
        deadline = time.monotonic() + 6
        while client.get(key) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get(key) is None
        assert client.keepalive(lease.id) == 0

    def test_put_on_a_gone_lease_is_refused(self, client: EtcdClient) -> None:
        """A put bound to a revoked lease raises EtcdLeaseGoneError and writes nothing."""
        key = unique("gone")
        lease = client.grant(5)
        client.revoke(lease.id)
        with pytest.raises(EtcdLeaseGoneError):
            client.put(key, b"v", lease=lease.id)
        assert client.get(key) is None


class TestStatus:
    """Each member reports who leads and how far its log is."""

    def test_one_leader_all_agree(self, client: EtcdClient, cluster: EtcdCluster) -> None:
        """Every member names the same leader, which is one of them, with a raft index."""
        statuses = [client.status(url) for url in cluster.endpoints]
        assert len({s.leader for s in statuses}) == 1
        assert sum(s.is_leader for s in statuses) == 1
        assert all(s.raft_index > 0 and s.version.startswith("3.") for s in statuses)
        assert client.status().member_id in {s.member_id for s in statuses}


class TestFailover:
    """Reads and unsent writes move to the next member; nothing waits past its bound."""

    def test_member_in_use_killed(self, etcd: EtcdCluster) -> None:
        """With the member in use (a follower) killed, reads and unsent writes go on."""
        leader = etcd.leader()
        first = next(m for m in etcd.members if m is not leader)
        order = [first.url] + [m.url for m in etcd.members if m is not first]
        client = EtcdClient(order, timeout=TIMEOUT, connect_timeout=0.5)
        key = unique("failover")
        client.put(key, b"before")
        assert client.status().endpoint == first.url
        etcd.kill(first)
        assert client.put(key, b"after").revision > 0  # refused by the dead one: never sent
        found = client.get(key)
        assert found is not None and found.value == b"after"
        assert client.status().endpoint != first.url

    def test_leader_killed(self, etcd: EtcdCluster) -> None:
        """With the leader killed, a write is bounded, and reads work after the election."""
        leader = etcd.leader()
        order = [leader.url] + [m.url for m in etcd.members if m is not leader]
        client = EtcdClient(order, timeout=TIMEOUT, connect_timeout=0.5)
        key = unique("leader")
        client.put(key, b"before")
        etcd.kill(leader)
        started = time.monotonic()
        # Sent to a member that may still have no leader: applied or not is unknown.
        with contextlib.suppress(EtcdOutcomeUnknownError):
            client.put(key, b"during")
        assert time.monotonic() - started < TIMEOUT + SLACK
        deadline = time.monotonic() + 5
        while True:
            try:
                found = client.get(key)
                break
            except EtcdUnavailableError:
                assert time.monotonic() < deadline, "no read within 5 s of the election"
        assert found is not None and found.value in (b"before", b"during")
        assert etcd.leader() is not leader

    def test_quorum_lost_is_a_clear_bounded_error(
        self, etcd: EtcdCluster, client: EtcdClient
    ) -> None:
        """With two of three members killed, a read and a write fail within the bound."""
        etcd.kill(etcd.members[0])
        etcd.kill(etcd.members[1])
        started = time.monotonic()
        with pytest.raises(EtcdUnavailableError, match="no member answered"):
            client.range(b"/anything")
        assert time.monotonic() - started < TIMEOUT + SLACK
        started = time.monotonic()
        # The survivor received the put and could not commit it: applied is unknown.
        with pytest.raises(EtcdOutcomeUnknownError):
            client.put(unique("noquorum"), b"v")
        assert time.monotonic() - started < TIMEOUT + SLACK

    def test_paused_member_cannot_hang_a_call(self, etcd: EtcdCluster) -> None:
        """A SIGSTOPped first member costs a read part of its bound, a write its error."""
        leader = etcd.leader()  # pause a follower: a paused leader would add an election
        first = next(m for m in etcd.members if m is not leader)
        order = [first.url] + [m.url for m in etcd.members if m is not first]
        client = EtcdClient(order, timeout=TIMEOUT, connect_timeout=0.5)
        etcd.pause(first)
        started = time.monotonic()
        with pytest.raises(EtcdOutcomeUnknownError):
            client.put(unique("paused"), b"v")  # sent to the paused member: maybe applied
        assert time.monotonic() - started < TIMEOUT + SLACK
        started = time.monotonic()
        client.range(b"/anything")  # the paused member has its third; the next answers
        assert time.monotonic() - started < TIMEOUT + SLACK

    def test_no_member_listening_is_unsent(self) -> None:
        """A write to members that refuse the connection provably never left."""
        client = EtcdClient([f"http://127.0.0.1:{free_port()}" for _ in range(3)], timeout=2)
        started = time.monotonic()
        with pytest.raises(EtcdUnsentError):
            client.put(b"/k", b"v")
        assert time.monotonic() - started < 1
        assert issubclass(EtcdUnsentError, TransientError)


class TestUnknownOutcome:
    """A reply lost after etcd applied the write is reported as such, and not re-sent."""

    def test_lost_reply_is_outcome_unknown_and_not_retried(
        self, etcd: EtcdCluster, client: EtcdClient
    ) -> None:
        """The write is applied, the error says so, and the second member never sees it."""
        proxy = ReplyDroppingProxy(etcd.members[0].client_port)
        try:
            via_proxy = EtcdClient([proxy.url, etcd.members[1].url], timeout=3)
            key = unique("lost-reply")
            with pytest.raises(EtcdOutcomeUnknownError, match="may have been applied"):
                via_proxy.put(key, b"applied")
            assert proxy.requests_forwarded == 1
            found = client.get(key)  # resolved by reading
            assert found is not None and found.value == b"applied" and found.version == 1
            # a read through the same proxy moves on to the next member instead
            assert via_proxy.get(key) == found
        finally:
            proxy.close()


def _enable_auth(url: str) -> None:
    """Root (with the root role) and an app user allowed under /fleet/, then auth on."""

    def post(path: str, body: dict[str, object]) -> None:
        answer = requests.post(url + path, json=body, timeout=5)
        assert answer.status_code == 200, answer.text

    def b(data: bytes) -> str:
        return base64.b64encode(data).decode()

    post("/v3/auth/user/add", {"name": "root", "password": "root-pw"})
    post("/v3/auth/role/add", {"name": "root"})
    post("/v3/auth/user/grant", {"user": "root", "role": "root"})
    post("/v3/auth/role/add", {"name": "fleet"})
    perm = {"permType": "READWRITE", "key": b(b"/fleet/"), "range_end": b(b"/fleet0")}
    post("/v3/auth/role/grant", {"name": "fleet", "perm": perm})
    post("/v3/auth/user/add", {"name": "app", "password": "app-pw"})
    post("/v3/auth/user/grant", {"user": "app", "role": "fleet"})
    post("/v3/auth/enable", {})


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three members with auth on and a 1 s simple-token TTL."""
    base = tmp_path_factory.mktemp("etcd-auth")
    with EtcdCluster(base, extra_args=("--auth-token-ttl=1",)).running() as c:
        _enable_auth(c.endpoints[0])
        yield c


class TestAuth:
    """User and password auth, with the token renewed when etcd lets it expire."""

    def test_user_and_password(self, secured: EtcdCluster) -> None:
        """The app user reads and writes its prefix; outside it, etcd says permission denied."""
        app = EtcdClient(secured.endpoints, credentials=Credentials("app", "app-pw"), timeout=3)
        app.put(b"/fleet/k", b"v")
        found = app.get(b"/fleet/k")
        assert found is not None and found.value == b"v"
        with pytest.raises(EtcdAuthError, match="permission denied"):
            app.put(b"/elsewhere", b"v")
        assert "app-pw" not in repr(Credentials("app", "app-pw"))

    def test_wrong_password_and_none(self, secured: EtcdCluster) -> None:
        """A wrong password is an alert, not a retry; no credentials at all is refused too."""
        wrong = EtcdClient(secured.endpoints, credentials=Credentials("app", "nope"), timeout=3)
        with pytest.raises(EtcdAuthError) as caught:
            wrong.get(b"/fleet/k")
        assert isinstance(caught.value, AlertError) and "nope" not in str(caught.value)
        anonymous = EtcdClient(secured.endpoints, timeout=3)
        with pytest.raises(EtcdAuthError):
            anonymous.put(b"/fleet/k", b"v")

    def test_watch_with_credentials_and_a_stale_token(self, secured: EtcdCluster) -> None:
        """A watch opened with a token etcd has dropped authenticates again and sees events."""
        app = EtcdClient(secured.endpoints[:1], credentials=Credentials("app", "app-pw"))
        app.put(b"/fleet/watched", b"0")  # authenticates: the token is cached
        time.sleep(3)  # ... and dropped by etcd (TTL 1 s)
        with app.watch(b"/fleet/watched", idle_timeout=5) as watch:
            revision = app.put(b"/fleet/watched", b"1").revision
            deadline = time.monotonic() + 10
            item = next(watch)
            while not isinstance(item, WatchEvent) and time.monotonic() < deadline:
                item = next(watch)
        assert isinstance(item, WatchEvent)
        assert (item.value, item.revision) == (b"1", revision)

    def test_token_renewed_after_its_ttl(self, secured: EtcdCluster) -> None:
        """After etcd drops the token (TTL 1 s), the next call authenticates again and works."""
        url = secured.members[0].url
        app = EtcdClient([url], credentials=Credentials("app", "app-pw"), timeout=3)
        app.put(b"/fleet/renew", b"1")
        token = requests.post(
            url + "/v3/auth/authenticate", json={"name": "app", "password": "app-pw"}, timeout=3
        ).json()["token"]
        time.sleep(3)  # the simple-token keeper drops tokens unused for the TTL
        stale = requests.post(url + "/v3/kv/range", json={"key": "eA=="},
                              headers={"Authorization": token}, timeout=3)  # fmt: skip
        assert stale.status_code == 401 and "invalid auth token" in stale.text
        app.put(b"/fleet/renew", b"2")
        found = app.get(b"/fleet/renew")
        assert found is not None and found.value == b"2"


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """Three members on https with --client-cert-auth."""
    base: Path = tmp_path_factory.mktemp("etcd-tls")
    with EtcdCluster(base, tls=Pki.make(base / "pki")).running() as c:
        yield c


class TestTls:
    """TLS with a client certificate works, and etcd refuses a client without one."""

    def test_client_certificate(self, tls_cluster: EtcdCluster) -> None:
        """With the CA and a client certificate, writes and reads go through."""
        pki = tls_cluster.tls
        assert pki is not None
        files = TlsFiles(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        client = EtcdClient(tls_cluster.endpoints, tls=files, timeout=3)
        client.put(b"/tls/k", b"v")
        found = client.get(b"/tls/k")
        assert found is not None and found.value == b"v"
        assert tls_cluster.endpoints[0].startswith("https://")

    def test_refused_without_client_certificate(self, tls_cluster: EtcdCluster) -> None:
        """Without a client certificate the handshake fails: the write provably never left."""
        pki = tls_cluster.tls
        assert pki is not None
        client = EtcdClient(tls_cluster.endpoints, tls=TlsFiles(str(pki.ca)), timeout=3)
        with pytest.raises(EtcdUnsentError):
            client.put(b"/tls/k", b"nope")


class TestNotImported:
    """With fleet mode off nothing loads the client: no module outside fleet imports it."""

    def test_no_module_outside_fleet_imports_it(self) -> None:
        """Every import of the etcd client (at any level, in any function) is inside fleet.

        (core.config imports fleet.settings, the pure parser of a [fleet] table, and only
        when the table is there: tests/test_fleet_settings.py shows it loads nothing else.)"""
        from tests.test_layout import all_imports, resolved

        bad = [
            f"{i.importer}:{i.line}"
            for i in all_imports()
            if resolved(i).startswith("aac_tokend.fleet.etcd")
            and not i.importer.startswith("aac_tokend.fleet")
        ]
        assert not bad
