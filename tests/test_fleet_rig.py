"""The fleet campaign's rig: its sandbox process, its cuttable links to etcd and its faults.

The daemons' fleet behaviour is not tested here (the campaign is its test); what is tested is
that the rig starts everything, that each host's config is one the config check accepts, and
that each fault does to etcd, the links and the readers what the campaign counts on.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest

from aac_tokend.core.config import parse_config
from aac_tokend.errors import EtcdOutcomeUnknownError, EtcdUnavailableError
from aac_tokend.fleet.etcd import EtcdClient

from .etcd_cluster import ETCD, SKIP_REASON
from .fleet_faults import Fault, Step, apply_fault
from .fleet_rig import FLEET_TIMINGS, FleetRig

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def rig() -> Iterator[FleetRig]:
    fleet = FleetRig()
    try:
        yield fleet
    finally:
        fleet.close()


def through(rig: FleetRig, host: int) -> EtcdClient:
    """A client that reaches etcd the way the host's daemon does: through its proxies. Its
    limit (3 s) is generous: on a loaded machine a write timed out on our side would leave
    a ``drop_writes`` budget unspent, to drop a later test's write."""
    return EtcdClient([p.url for p in rig.hosts[host].proxies], timeout=3.0, connect_timeout=1.0)


class TestSetup:
    def test_the_hosts_configs_pass_the_config_check(self, rig: FleetRig) -> None:
        """Each host's config.toml passes the check and names its own proxies; one fleet key."""
        homes: set[object] = set()
        ports: set[int] = set()
        for host in rig.hosts:
            path = host.rig.paths.config_dir / "config.toml"
            config = parse_config(path.read_text(), str(path))
            assert config.fleet is not None
            assert config.fleet.name == rig.fleet
            assert config.fleet.lease_ttl_seconds == FLEET_TIMINGS["lease_ttl_seconds"]
            assert config.fleet.endpoints == tuple(p.url for p in host.proxies)
            homes.add(host.rig.home)
            ports.update(p.port for p in host.proxies)
            assert (host.rig.paths.config_dir / "fleet.key").read_bytes() == (
                rig.hosts[0].rig.paths.config_dir / "fleet.key"
            ).read_bytes()
        assert len(homes) == 3 and len(ports) == 9

    def test_the_sandbox_process_mints_and_logs(self, rig: FleetRig) -> None:
        """The sandbox child answers generate, logs a refresh, and takes an answer delay."""
        import requests

        pair = rig.sandbox.generate()
        rig.sandbox.set_answer_delay(0.2)
        form = {
            "grant_type": "refresh_token",
            "refresh_token": str(pair["refresh_token"]),
            "client_id": "aac-sandbox-client",
        }
        started = time.monotonic()
        answer = requests.post(rig.sandbox.token_endpoint, data=form, timeout=10)
        rig.sandbox.set_answer_delay(0.0)
        assert answer.status_code == 200 and time.monotonic() - started >= 0.2
        assert rig.sandbox.log()[-1]["outcome"] == "rotated"


class TestLinks:
    def test_a_cut_host_reaches_no_member_and_a_healed_one_does(self, rig: FleetRig) -> None:
        """Cut: the host's calls time out while other hosts carry on; healed: it works again."""
        cut, other = through(rig, 1), through(rig, 2)
        cut.put(b"/rigtest/cut", b"before")
        with rig.cut_off(rig.hosts[1]):
            assert not rig.judgeable(rig.hosts[1])
            started = time.monotonic()
            with pytest.raises(EtcdUnavailableError):
                cut.get(b"/rigtest/cut")
            assert time.monotonic() - started < 6
            other.put(b"/rigtest/cut", b"during")
        kv = cut.get(b"/rigtest/cut")
        assert kv is not None and kv.value == b"during"
        assert not rig.judgeable(rig.hosts[1])  # still settling after the heal

    def test_a_dropped_write_reply_was_applied(self, rig: FleetRig) -> None:
        """drop_writes: the host's write is applied, its reply lost (outcome unknown)."""
        host = rig.hosts[0]
        host.link.drop_writes(1)
        with pytest.raises(EtcdOutcomeUnknownError):
            through(rig, 0).put(b"/rigtest/drop", b"applied")
        kv = rig.etcd.get(b"/rigtest/drop")
        assert kv is not None and kv.value == b"applied"
        assert host.link.dropped == 1
        assert through(rig, 0).get(b"/rigtest/drop") is not None  # reads pass, budget spent

    def test_a_proxy_of_a_dead_member_refuses(self, rig: FleetRig) -> None:
        """While its member is down a proxy refuses connections (nothing sent), then takes them."""
        proxy = rig.hosts[2].proxies[0]
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        proxy.accept_again()
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


class TestMembers:
    def test_killing_the_leader_then_two_members(self, rig: FleetRig) -> None:
        """One member down keeps a quorum and a new leader; two down is no quorum; restored."""
        old = rig.cluster.leader()
        rig.kill_members(1)
        assert old.proc is None and rig.members_up() == 2
        assert rig.cluster.leader() is not old
        through(rig, 0).put(b"/rigtest/members", b"one down")
        rig.kill_members(1)
        assert rig.members_up() == 1
        assert not any(rig.judgeable(h) for h in rig.hosts)
        with pytest.raises(EtcdUnavailableError):
            through(rig, 0).put(b"/rigtest/members", b"no quorum")
        rig.restore_members()
        assert rig.members_up() == 3
        kv = through(rig, 2).get(b"/rigtest/members")
        assert kv is not None and kv.value == b"one down"


class TestReaders:
    def test_readers_record_every_host_and_its_quorum(self, rig: FleetRig) -> None:
        """Readers poll each host's socket; with no daemon there is no token, and a cut host's
        reads are marked as made without a quorum."""
        for host in rig.hosts:
            host.settled_at = 0.0
        with rig.reading(["alpha"]) as reads, rig.cut_off(rig.hosts[0]):
            time.sleep(0.5)
        assert {r.host for r in reads} == {"h0", "h1", "h2"}
        assert all(r.exp is None for r in reads)
        assert not any(r.quorum for r in reads if r.host == "h0")
        assert any(r.quorum for r in reads if r.host == "h1")


class TestCampaignFaults:
    """The campaign's faults applied to an owner named by hand (no fleet daemon runs here)."""

    @pytest.fixture
    def owned(self, rig: FleetRig) -> Iterator[None]:
        lease = rig.etcd.grant(30)
        rig.etcd.put(rig.keys.owner("alpha"), b"h1", lease=lease.id)
        rig.imported = {"alpha": ["0" * 16]}
        for host in rig.hosts:
            host.settled_at = 0.0
        try:
            yield
        finally:
            rig.imported = {}
            rig.etcd.revoke(lease.id)

    def test_a_cut_is_aimed_at_the_owner(self, rig: FleetRig, owned: None) -> None:
        """The owner's link (and no other) is cut for longer than the lease, then healed."""
        with rig.reading(["alpha"]) as reads:
            landed = apply_fault(rig, Fault.CUT, Step.REQUESTED, random.Random(1))
        assert landed.reached and landed.lost_answer is None
        assert not any(r.quorum for r in reads if r.host == "h1")
        assert all(r.quorum for r in reads if r.host == "h0")
        assert not rig.hosts[1].link.is_cut and rig.hosts[1].settled_at > time.monotonic()

    def test_the_leader_killed_comes_back(self, rig: FleetRig, owned: None) -> None:
        """KILL_LEADER kills the leader mid-refresh and restores the cluster afterwards."""
        before = rig.cluster.leader()
        apply_fault(rig, Fault.KILL_LEADER, Step.ANY, random.Random(2))
        assert rig.members_up() == 3 and before.proc is not None
        assert rig.owner("alpha") is rig.hosts[1]
