"""The fleet campaign's rig: etcd, the sandbox, a cuttable link per host, three daemons as hosts.

All real, on loopback: a 3-member ``EtcdCluster`` (tests/etcd_cluster.py), the sandbox as its
own process (tests/fleet_sandbox.py), and per host a ``CutProxy`` in front of each member, so
that a host can be cut off from etcd or lose the replies to its writes while the others carry
on (tests/fleet_proxy.py). Each host is a ``crash_rig.Rig``: its own home (config, state and
runtime directories), daemons started and SIGKILLed at will, couriers found through /proc; its
``config.toml`` has a ``[fleet]`` table naming its own proxies, every timing scaled down by
configuration (``FLEET_TIMINGS``). The rig looks at etcd directly (not through a link) and
opens chain records with the fleet key: who owns a profile, where a courier's transaction is,
what rejection a host reported. Readers poll every host's token socket and note with each
read whether that host could reach a quorum and had settled after the last fault.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from aac_tokend.client import read_token
from aac_tokend.core.tokens import parse_jwt
from aac_tokend.fleet.etcd import EtcdClient
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.fleet.records import ChainRecord, decode_record
from aac_tokend.fleet.sealing import Sealer, create_fleet_key, export_fleet_key, import_fleet_key
from aac_tokend.fleet.settings import KNOWN_KEYS
from aac_tokend.sandbox.server import SandboxServer

from .crash_rig import AAC_TOKEND, TIMEOUT, Rig, wait_for
from .etcd_cluster import EtcdCluster
from .fleet_proxy import CutProxy, Link
from .fleet_referee import Read
from .fleet_sandbox import SandboxProcess

__all__ = ["FLEET_TIMINGS", "FleetRig", "Host"]

#: The [fleet] timings, scaled down by configuration (fleet/settings.py checks the relations):
#: W 10 >= courier life 8 >= D 1 + request deadline 2.5; W 10 >= D 1 + connect 1 + send 1;
#: lease 2 s, the least etcd grants. Life 8, not the least allowed (3.5): on a loaded 2-core
#: machine a spawned courier takes up to 3 s from its start to its request (uncounted there).
FLEET_TIMINGS = {
    "lease_ttl_seconds": 2,
    "send_window_seconds": 1.0,
    "resolve_wait_seconds": 10.0,
    "max_clock_skew_seconds": 0.5,
    "courier_life_seconds": 8.0,
    "connect_timeout_seconds": 1.0,
    "send_timeout_seconds": 1.0,
    "request_deadline_seconds": 2.5,
}
#: Refresh margin >= lease 2 + W 10 + request 2.5 + skew 0.5 = 15; 16 leaves a second over.
MIN_MARGIN_SECONDS = 16
#: Access tokens of 40 s refreshed at half-life (20 s left, above the margin): a failover
#: (lease TTL, then W for an inherited entry, then the request) ends long before expiry.
ACCESS_TTL = 40.0
#: Three hosts on one machine share one gethostname(): each names itself with ``[fleet] host``
#: where the settings know that key (part D of issue #13 adds it; until then, left out).
NAMES_HOSTS = "host" in KNOWN_KEYS
#: A profile imported on a host is moved into the fleet with ``aac-tokend fleet move-in``
#: where that command exists (part D); before, ``import`` is all there is.
MOVES_IN = importlib.util.find_spec("aac_tokend.commands.fleet") is not None
#: After a fault ends, a host's reads are not judged for this long: a restarted daemon loads
#: its profiles and a healed link resumes its watch (its idle deadline is a few seconds).
SETTLE_SECONDS = 3.0
#: How often each reader polls each profile: 10 reads/s per host is plenty to see a gap of a
#: second, and cheap on a 2-core machine that also runs etcd, the sandbox and three daemons.
READ_EVERY_SECONDS = 0.1


class Host:
    """One host: a crash_rig.Rig home whose [fleet] table names this host's own proxies."""

    def __init__(self, name: str, rig: Rig, link: Link, proxies: Sequence[CutProxy]) -> None:
        self.name = name
        self.rig = rig
        self.link = link
        self.proxies = list(proxies)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.settled_at = 0.0  # monotonic; its reads are judged from then on

    def config_text(self, fleet: str) -> str:
        endpoints = ", ".join(f'"{p.url}"' for p in self.proxies)
        timings = "\n".join(f"{k} = {v}" for k, v in FLEET_TIMINGS.items())
        return (
            f"refresh_fraction = 0.5\nmin_margin_seconds = {MIN_MARGIN_SECONDS}\n"
            "backoff_first_seconds = 0.5\nbackoff_cap_seconds = 2\nnotifications = false\n"
            f'\n[fleet]\nendpoints = [{endpoints}]\nname = "{fleet}"\n{timings}\n'
            + (f'host = "{self.name}"\n' if NAMES_HOSTS else "")
        )

    def start(self) -> subprocess.Popen[bytes]:
        """A daemon started and answering (seconds, on a loaded machine), then settled."""
        self.daemon = self.rig.start()
        self.rig.wait_ready(self.daemon)
        self.settle()
        return self.daemon

    def hold(self) -> None:
        """A fault is in force: this host's reads are not judged until ``settle``."""
        self.settled_at = math.inf

    def settle(self) -> None:
        """The fault is over: judge this host's reads again after SETTLE_SECONDS."""
        self.settled_at = time.monotonic() + SETTLE_SECONDS


class FleetRig:
    """etcd, the sandbox, and ``hosts`` daemons in one fleet; ``close()`` ends everything."""

    def __init__(self, *, hosts: int = 3, access_ttl: float = ACCESS_TTL) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="atkfleet", dir="/tmp"))
        self.fleet = f"campaign-{os.getpid()}"
        self.keys = FleetKeys(self.fleet)
        self.cluster = EtcdCluster(self.base / "etcd")
        self.hosts: list[Host] = []
        self.imported: dict[str, list[str]] = {}  # profile -> first rt hash of each family
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(self.cluster.running())
            self.sandbox = SandboxProcess(access_ttl, self.base / "sandbox.log")
            self._stack.callback(self.sandbox.stop)
            self.etcd = EtcdClient(self.cluster.endpoints, timeout=2.0)
            self.fleet_key = b""
            for i in range(hosts):
                self.hosts.append(self._host(f"h{i}"))
            self.sealer = Sealer(self.fleet_key, self.fleet)
        except BaseException:
            self.close()
            raise

    def _host(self, name: str) -> Host:
        link = Link()
        proxies = [CutProxy(m.client_port, link) for m in self.cluster.members]
        for proxy in proxies:
            self._stack.callback(proxy.close)
        rig = Rig(cast(SandboxServer, self.sandbox))
        self._stack.callback(rig.close)
        host = Host(name, rig, link, proxies)
        config = rig.paths.config_dir
        config.mkdir(mode=0o700, parents=True, exist_ok=True)
        (config / "config.toml").write_text(host.config_text(self.fleet))
        if not self.fleet_key:
            self.fleet_key = create_fleet_key(config)
        else:
            import_fleet_key(config, export_fleet_key(self.fleet_key))
        return host

    # -- profiles and daemons ---------------------------------------------------------------
    def import_profile(self, profile: str) -> str:
        """A new family imported on the first host; its first rt hash. The first import of a
        profile is moved into the fleet (before the daemons start); later ones go through the
        running daemon, which replaces the fleet's chain."""
        host = self.hosts[0]
        first = host.rig.import_profile(profile)
        if MOVES_IN and profile not in self.imported:
            cmd = [AAC_TOKEND, "fleet", "move-in", profile]
            done = subprocess.run(cmd, env=host.rig.env, capture_output=True, timeout=TIMEOUT)
            if done.returncode != 0:
                raise AssertionError(f"move-in failed: {done.stderr.decode(errors='replace')}")
        self.imported.setdefault(profile, []).append(first)
        return first

    def owner(self, profile: str) -> Host | None:
        """The host whose name the owner key holds (etcd's own word), None if there is none."""
        kv = self.etcd.get(self.keys.owner(profile))
        if kv is None:
            return None
        return next(h for h in self.hosts if h.name == kv.value.decode())

    def wait_owner(self, profile: str, timeout: float = TIMEOUT) -> Host:
        return cast(Host, wait_for(f"an owner of {profile}", lambda: self.owner(profile), timeout))

    def record(self, profile: str) -> ChainRecord | None:
        """The chain record in etcd, opened with the fleet key (None: no chain key)."""
        kv = self.etcd.get(self.keys.chain(profile))
        if kv is None:
            return None
        return decode_record(self.sealer.unseal(profile, kv.value)[1], profile)

    def couriers(self, host: Host) -> list[int]:
        """The live couriers of the host's daemon."""
        if host.daemon is None or host.daemon.poll() is not None:
            return []
        return host.rig.couriers(host.daemon.pid)

    # -- faults ---------------------------------------------------------------------------
    def kill_daemon(self, host: Host) -> None:
        """SIGKILL the host's daemon (not its couriers) and start another at once."""
        host.hold()
        if host.daemon is not None:
            Rig.kill(host.daemon)
        host.rig.reap()
        host.start()

    @contextlib.contextmanager
    def paused(self, host: Host, pid: int) -> Iterator[None]:
        """SIGSTOP ``pid`` (the host's daemon or one of its couriers) for the block."""
        daemon = host.daemon is not None and pid == host.daemon.pid
        if daemon:
            host.hold()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            if daemon:
                host.settle()

    @contextlib.contextmanager
    def cut_off(self, host: Host) -> Iterator[None]:
        """The host cut off from every etcd member for the block."""
        host.hold()
        host.link.cut()
        try:
            yield
        finally:
            host.link.heal()
            host.settle()

    def members_up(self) -> int:
        return sum(m.proc is not None for m in self.cluster.members)

    def kill_members(self, count: int) -> None:
        """SIGKILL ``count`` members, the leader first (two of three: no quorum until restored)."""
        victims = [self.cluster.leader()]
        victims += [m for m in self.cluster.members if m is not victims[0] and m.proc][: count - 1]
        for m in victims:
            self.cluster.kill(m)
            for host in self.hosts:
                host.proxies[self.cluster.members.index(m)].refuse()

    def restore_members(self) -> None:
        """Every member back, healthy; every host settles anew."""
        self.cluster.restore()
        for host in self.hosts:
            for proxy in host.proxies:
                proxy.accept_again()
        for host in self.hosts:
            host.settle()

    def judgeable(self, host: Host) -> bool:
        """The host could reach a quorum, its daemon ran, and it settled after the last fault."""
        return (
            self.members_up() * 2 > len(self.cluster.members)
            and not host.link.is_cut
            and time.monotonic() >= host.settled_at
        )

    # -- readers --------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self, profiles: Sequence[str]) -> Iterator[list[Read]]:
        """A reader thread per host for the block; the list fills with their reads."""
        reads: list[Read] = []
        done = threading.Event()
        threads = [
            threading.Thread(target=self._read, args=(h, profiles, reads, done), daemon=True)
            for h in self.hosts
        ]
        for t in threads:
            t.start()
        try:
            yield reads
        finally:
            done.set()
            for t in threads:
                t.join()

    def _read(self, host: Host, profiles: Sequence[str], into: list[Read], done: Any) -> None:
        while not done.wait(READ_EVERY_SECONDS):
            for profile in profiles:
                before = self.judgeable(host)
                try:
                    token = read_token(str(host.rig.paths.token_socket(profile)), timeout=1.0)
                except OSError:
                    token = ""
                exp = parse_jwt(token).exp if token else None
                into.append(
                    Read(time.time(), host.name, profile, exp, before and self.judgeable(host))
                )

    def close(self) -> None:
        """Every daemon, courier, proxy, the sandbox and etcd stopped; the base removed."""
        self._stack.close()
        shutil.rmtree(self.base, ignore_errors=True)
