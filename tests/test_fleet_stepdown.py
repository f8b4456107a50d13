"""Step-down (issue #13 acceptance): an owner that is healthy on etcd but cannot reach the
token endpoint steps down, and another host refreshes before the access token expires.

Real daemons as hosts, a real etcd, the real sandbox, no fake: the sandbox speaks HTTPS (a
test CA that both hosts trust through REQUESTS_CA_BUNDLE), and the failing host's
environment names an HTTPS proxy on a loopback port where nothing listens. Its fenced
courier's ``prepare`` (fleet/connection.open_request, which honours the proxy settings as
requests does) then fails before a byte is written: UNREACHED, twice in a row
(runtime.STEP_DOWN_AFTER), while its lease, the watch and every etcd call are fine.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator

import pytest

from aac_tokend.core.tokens import parse_jwt
from aac_tokend.fleet.runtime import STEP_DOWN_AFTER, STEP_DOWN_BACKOFF_TTLS
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster, TlsFiles, free_port
from tests.fleet_hosts import (
    TTL,
    FleetHosts,
    Readers,
    fresh_fleet,
    presented_twice,
    progress_etcd,
    rotations,
)
from tests.helpers_e2e import RecordingSandbox, running_sandbox, wait_until

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: Access tokens of 20 s: the refresh margin is then 5 s (a quarter of the lifetime; a real
#: token's lifetime leaves the configured 11 s), for two failed attempts, the handover and
#: the heir's refresh.
ACCESS_TTL = 20
#: Quick retries, so the owner's two unreached attempts come within a second.
RETRIES = "backoff_first_seconds = 0.5\nbackoff_cap_seconds = 2\n"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member, with watch progress notifications every 300 ms."""
    with progress_etcd(tmp_path_factory.mktemp("etcd-stepdown")) as cluster:
        yield cluster


@pytest.fixture
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles.make(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def sandbox(tls: TlsFiles) -> Iterator[RecordingSandbox]:
    """The sandbox on HTTPS (the proxy settings apply to https only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    with running_sandbox(access_ttl=ACCESS_TTL, tls=context) as server:
        yield server


@pytest.fixture
def fleet(etcd: EtcdCluster, sandbox: RecordingSandbox) -> Iterator[FleetHosts]:
    with fresh_fleet(etcd, sandbox, "s") as hosts:
        yield hosts


class TestStepDown:
    """An owner that cannot reach AAC hands the chain over and keeps out for its backoff."""

    def test_cut_off_owner_steps_down_and_the_heir_refreshes_before_expiry(
        self, fleet: FleetHosts, sandbox: RecordingSandbox, tls: TlsFiles
    ) -> None:
        """host-0 (owner, no route to AAC) steps down after two unreached attempts; host-1
        refreshes before the token expires with no empty read on its socket, and once
        host-1 is stopped host-0 stays out until its backoff has passed."""
        cut, healthy = fleet.add(2, top=RETRIES)
        for host in (cut, healthy):
            fleet.homes[host].env["REQUESTS_CA_BUNDLE"] = str(tls.ca)
        fleet.homes[cut].env["HTTPS_PROXY"] = f"http://127.0.0.1:{free_port()}"
        fleet.move_in(cut)
        fleet.start(cut)
        assert fleet.wait_owner() == cut
        fleet.start(healthy)
        token = fleet.daemons[healthy].token()
        expires = float(parse_jwt(token).exp or 0)

        owner_changes: list[tuple[float, str | None]] = []
        deadline = time.monotonic() + ACCESS_TTL + 5
        with Readers({healthy: fleet.daemons[healthy]}) as readers:
            while time.monotonic() < deadline and rotations(sandbox) == 0:
                owner = fleet.owner()
                if not owner_changes or owner_changes[-1][1] != owner:
                    owner_changes.append((time.monotonic(), owner))
                time.sleep(0.01)
            refreshed_at = time.time()
            wait_until(lambda: fleet.daemons[healthy].token() != token, 5, "the new token")
        assert readers.gaps[healthy] == 0, readers.gap_times
        assert rotations(sandbox) == 1, sandbox.log()
        assert refreshed_at < expires, f"the heir refreshed {refreshed_at - expires:.1f} s late"
        owners = [o for _, o in owner_changes if o is not None]
        assert owners == [cut, healthy], owner_changes
        stepped_down = owner_changes[1][0]  # the owner key deleted (or at once replaced)
        out = fleet.daemons[cut].output()
        assert "fleet_step_down" in out and f"{STEP_DOWN_AFTER} refreshes in a row" in out
        assert sandbox.log()[0]["rt_hash"]  # the heir's: the cut-off host presented nothing
        print(f"the heir refreshed {expires - refreshed_at:.1f} s before the expiry")

        # The healthy host goes: the owner key is free, and the cut-off host keeps out of
        # the election until its backoff (counted from its step-down) has passed.
        backoff = STEP_DOWN_BACKOFF_TTLS * TTL
        fleet.daemons[healthy].stop()
        while time.monotonic() < stepped_down + backoff - 0.5:
            assert fleet.owner() in (None,), "the stepped-down host campaigned in its backoff"
            time.sleep(0.05)
        back = fleet.wait_owner(timeout=TTL + 3)
        assert back == cut
        print(f"host-0 owned again {time.monotonic() - stepped_down:.1f} s after stepping "
              f"down (backoff {backoff:g} s)")  # fmt: skip
        assert presented_twice(sandbox) == []
