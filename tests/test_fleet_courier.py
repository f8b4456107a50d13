"""The spawned fleet courier end to end: a real etcd, the real sandbox, real processes.

One module-scoped etcd cluster (a fresh fleet name per test); the sandbox in this process on
loopback; couriers are ``python -P -m aac_tokend.refresh.spawned --fleet`` children. The
sandbox's request log is the referee. Skips with the reason
where the etcd binary is absent.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import secrets
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from aac_tokend.core.importer import build_state, parse_import_text
from aac_tokend.fleet.chains import FleetChains
from aac_tokend.fleet.courier import FleetCourier, FleetSpec
from aac_tokend.fleet.etcd import EtcdClient
from aac_tokend.fleet.etcd_session import Credentials
from aac_tokend.fleet.fenced import FleetJob
from aac_tokend.fleet.highwater import HighWater
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.fleet.sealing import Sealer
from aac_tokend.fleet.settings import FleetSettings
from aac_tokend.refresh.courier import ForkCourier, Refresher
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.refresh.spawn import SpawnCourier
from aac_tokend.refresh.transaction import CourierJob
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStoreSpec

from .crash_rig import wait_for
from .etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

PROFILE = "p"
#: Refreshes per refresher for the latency comparison (the brief: a median over >= 30).
ROUNDS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member is enough here: the courier's failures are tested in test_fleet_fenced."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1).running() as c:
        yield c


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=600) as server:
        yield server


@dataclass
class Host:
    """One fleet host's view: its spec (lease on the owner key) and its chains."""

    spec: FleetSpec
    chains: FleetChains
    client: EtcdClient

    def record(self) -> object:
        versioned = self.chains.read(PROFILE)
        assert versioned is not None
        return versioned.record

    def job(self) -> FleetJob:
        state = self.chains.read(PROFILE).record.state
        return FleetJob(PROFILE, state.refresh_token)


@pytest.fixture
def host(cluster: EtcdCluster, sandbox: SandboxServer, tmp_path: Path) -> Iterator[Host]:
    """A fresh fleet with one profile imported, owned by host "a" under a lease kept alive
    (engineer B's LeaseKeeper does it in a daemon; here a plain thread)."""
    name = f"t{secrets.token_hex(4)}"
    settings = FleetSettings(endpoints=tuple(cluster.endpoints), name=name, lease_ttl_seconds=30)
    client = EtcdClient(cluster.endpoints, timeout=5.0)
    key = secrets.token_bytes(32)
    keys = FleetKeys(name)
    chains = FleetChains(client, keys, Sealer(key, name), HighWater(tmp_path / "admin", name))
    request = parse_import_text(json.dumps(sandbox.generate()), profile=PROFILE)
    request = dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
    chains.create(PROFILE, build_state(request, time.time()))
    lease = client.grant(30)
    client.put(keys.owner(PROFILE), b"a", lease=lease.id)
    spec = FleetSpec(settings, "a", lease.id, str(tmp_path / "state-a"), key)
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(5.0):
            client.keepalive(lease.id)

    keeper = threading.Thread(target=keep, daemon=True)
    keeper.start()
    try:
        yield Host(spec, chains, client)
    finally:
        stop.set()
        keeper.join()


@pytest.fixture
def courier(host: Host) -> Iterator[FleetCourier]:
    built = FleetCourier(host.spec)
    try:
        yield built
    finally:
        built.close()


class TestSpawnedFleetCourier:
    """A warm spare carries a fenced refresh, and a SIGKILL never leads to a second request."""

    def test_warm_spare_refreshes(
        self, host: Host, courier: FleetCourier, sandbox: SandboxServer
    ) -> None:
        """The spare rotates the chain in etcd: one request, the entry resolved."""
        assert courier.prepare() is not None
        before = host.job().refresh_token
        result = courier.refresh(host.job())
        assert result.kind is CourierKind.REFRESHED, result
        record = host.record()
        assert record.state.refresh_token != before  # type: ignore[attr-defined]
        assert record.unresolved is None  # type: ignore[attr-defined]
        assert [e["outcome"] for e in sandbox.log()] == ["rotated"]

    def test_sigkill_mid_request_leaves_an_unresolved_entry_and_no_second_request(
        self, host: Host, courier: FleetCourier, sandbox: SandboxServer
    ) -> None:
        """Killed while the server holds the answer: the entry stays unresolved, the next
        job is BUSY (no sighting to count W from), and the server saw one request only."""
        pid = courier.prepare()
        assert pid is not None
        sandbox.set_answer_delay(2.0)
        job = host.job()
        got: list[CourierResult] = []
        worker = threading.Thread(target=lambda: got.append(courier.refresh(job)))
        worker.start()
        wait_for("the request at the sandbox", lambda: len(sandbox.log()) == 1, 10.0)
        os.kill(pid, signal.SIGKILL)
        worker.join(20)
        sandbox.set_answer_delay(0.0)
        assert got and got[0].kind is CourierKind.LOST
        record = host.record()
        assert record.unresolved is not None  # type: ignore[attr-defined]
        again = courier.refresh(job)
        assert again.kind is CourierKind.BUSY, again
        time.sleep(0.3)
        assert len(sandbox.log()) == 1


class TestOpenedAhead:
    """The spare opens the fleet ahead; the job's spec still decides the lease and fleet."""

    def test_a_new_lease_reaches_a_spare_opened_before_it(
        self, host: Host, courier: FleetCourier, sandbox: SandboxServer
    ) -> None:
        """The lease changes after the spare opened the fleet: the job's lease fences it."""
        assert courier.prepare() is not None
        lease = host.client.grant(30).id
        host.client.put(host.chains.keys.owner(PROFILE), b"a", lease=lease)
        courier.update(dataclasses.replace(host.spec, lease_id=lease))
        result = courier.refresh(host.job())
        assert result.kind is CourierKind.REFRESHED, result

    def test_a_spare_of_an_old_lease_is_fenced_off(
        self, host: Host, courier: FleetCourier, sandbox: SandboxServer
    ) -> None:
        """The owner key moved to another lease and the courier was not told: nothing sent."""
        assert courier.prepare() is not None
        lease = host.client.grant(30).id
        host.client.put(host.chains.keys.owner(PROFILE), b"b", lease=lease)
        result = courier.refresh(host.job())
        assert result.kind is CourierKind.STATE_CHANGED, result
        assert sandbox.log() == []


class TestSpec:
    """The fleet spec travels on stdin only, and whole."""

    def test_round_trip_and_no_key_in_repr(self, host: Host) -> None:
        """to_dict/from_dict keep every field; the fleet key is in no repr."""
        spec = host.spec
        assert FleetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert spec.fleet_key.hex() not in repr(spec) and str(spec.fleet_key) not in repr(spec)

    def test_the_spare_argv_holds_no_secret(self, host: Host, courier: FleetCourier) -> None:
        """The spare's command line is the courier module and --fleet: no key, no token."""
        pid = courier.prepare()
        assert pid is not None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[-2:] == [b"--fleet", b""]
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        key = host.spec.fleet_key
        for blob in (argv, [environ]):
            joined = b"\0".join(blob)
            assert key not in joined
            assert base64.b64encode(key) not in joined
            assert host.job().refresh_token.encode() not in joined


class TestEtcdPassword:
    """etcd's password comes from the daemon inside the spec: a courier reads no file."""

    def test_it_travels_whole_on_stdin_and_in_no_repr(self, host: Host) -> None:
        """to_dict/from_dict keep it (spaces too); repr shows neither it nor the key."""
        spec = dataclasses.replace(host.spec, etcd_password="s3cret pass ")
        assert FleetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert "s3cret" not in repr(spec)

    def test_a_password_file_gone_costs_no_refresh(
        self, secured: EtcdCluster, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """etcd with auth on, the password file removed after the daemon read it: the warm
        spare and a cold courier both authenticate with the spec's password and refresh."""
        name = f"t{secrets.token_hex(4)}"
        gone = tmp_path / "etcd.password"  # never there: as if removed after the daemon's start
        settings = FleetSettings(
            endpoints=tuple(secured.endpoints), name=name, lease_ttl_seconds=30,
            user="app", password_file=str(gone),
        )  # fmt: skip
        client = EtcdClient(secured.endpoints, timeout=5.0, credentials=Credentials("app", "pw"))
        key = secrets.token_bytes(32)
        keys = FleetKeys(name)
        chains = FleetChains(client, keys, Sealer(key, name), HighWater(tmp_path / "adm", name))
        request = parse_import_text(json.dumps(sandbox.generate()), profile=PROFILE)
        request = dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
        chains.create(PROFILE, build_state(request, time.time()))
        lease = client.grant(30)
        client.put(keys.owner(PROFILE), b"a", lease=lease.id)
        spec = FleetSpec(settings, "a", lease.id, str(tmp_path / "st"), key, etcd_password="pw")
        for warm in (True, False):
            courier = FleetCourier(spec, warm=warm)
            try:
                if warm:
                    assert courier.prepare() is not None
                record = chains.read(PROFILE)
                assert record is not None
                job = FleetJob(PROFILE, record.record.state.refresh_token)  # type: ignore[arg-type]
                result = courier.refresh(job)
            finally:
                courier.close()
            assert result.kind is CourierKind.REFRESHED, result
        assert [e["outcome"] for e in sandbox.log()] == ["rotated", "rotated"]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member with auth on: user "app" (password "pw") may use /aac-tokend/ only."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd-auth"), size=1).running() as c:
        url = c.endpoints[0]

        def post(path: str, body: dict[str, object]) -> None:
            answer = requests.post(url + path, json=body, timeout=5)
            assert answer.status_code == 200, answer.text

        def b(data: bytes) -> str:
            return base64.b64encode(data).decode()

        post("/v3/auth/user/add", {"name": "root", "password": "root-pw"})
        post("/v3/auth/role/add", {"name": "root"})
        post("/v3/auth/user/grant", {"user": "root", "role": "root"})
        post("/v3/auth/role/add", {"name": "fleet"})
        perm = {"permType": "READWRITE", "key": b(b"/aac-tokend/"), "range_end": b(b"/aac-tokend0")}
        post("/v3/auth/role/grant", {"name": "fleet", "perm": perm})
        post("/v3/auth/user/add", {"name": "app", "password": "pw"})
        post("/v3/auth/user/grant", {"user": "app", "role": "fleet"})
        post("/v3/auth/enable", {})
        yield c


class TestLatency:
    """The fleet courier's refresh latency beside the single-host couriers'."""

    def test_median_latency_against_fork_courier(
        self,
        host: Host,
        courier: FleetCourier,
        sandbox: SandboxServer,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """ROUNDS refreshes each, interleaved (fleet warm, fork, spawn warm on files), and
        a few cold fleet couriers; printed (the report's numbers), bounded loosely."""
        spec = FileStoreSpec(str(tmp_path / "single"), secrets.token_bytes(32))
        store = spec.open()
        request = parse_import_text(json.dumps(sandbox.generate()), profile=PROFILE)
        request = dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
        store.save(build_state(request, time.time()))
        fork, spawn = ForkCourier(spec), SpawnCourier(spec)
        cold = FleetCourier(host.spec, warm=False)
        times: dict[str, list[float]] = {"fleet warm": [], "fork": [], "spawn warm": []}
        times["fleet cold"] = []

        def timed(name: str, refresher: Refresher, job: CourierJob) -> None:
            started = time.perf_counter()
            result = refresher.refresh(job)
            times[name].append(time.perf_counter() - started)
            assert result.kind is CourierKind.REFRESHED, (name, result)

        def file_job() -> CourierJob:
            state = store.load(PROFILE)
            assert state is not None and state.refresh_token is not None
            return CourierJob(PROFILE, state.refresh_token)

        try:
            for i in range(ROUNDS):
                courier.prepare()  # each spare ready between refreshes, as in a daemon
                spawn.prepare()
                timed("fleet warm", courier, host.job())
                timed("fork", fork, file_job())
                timed("spawn warm", spawn, file_job())
                if i % 3 == 0:
                    timed("fleet cold", cold, host.job())
        finally:
            spawn.close()
            cold.close()
        fork_ms = statistics.median(times["fork"]) * 1000
        with capsys.disabled():
            print()
            for name, got in times.items():
                ms = statistics.median(got) * 1000
                print(
                    f"{name:>11}: median {ms:6.1f} ms, max {max(got) * 1000:6.1f} ms, "
                    f"{ms / fork_ms:4.2f}x fork, n={len(got)}"
                )
        assert statistics.median(times["fleet warm"]) < 2.0
