"""Hosts of one fleet as real ``aac-tokend run`` processes, for the fleet's end-to-end tests.

Each host is an ``E2EHome`` (its own AAC_TOKEND_HOME and runtime directory) whose config.toml
is the demo's (``demo_fleet.fleet_config_text``: the scaled timings and the margin they
need) with its own host name; the first host creates the fleet key and the others import it
on stdin, as a person would. The sandbox runs in the test's process (``running_sandbox``),
so the test reads its request log, the referee of "each refresh token presented once".
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aac_tokend.fleet.etcd import EtcdClient
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.sandbox.demo_fleet import FLEET_TIMINGS, fleet_config_text
from tests.etcd_cluster import EtcdCluster
from tests.helpers_e2e import (
    Daemon,
    E2EHome,
    RecordingSandbox,
    e2e_home,
    import_pair,
    wait_until,
)

__all__ = [
    "TTL",
    "FleetHosts",
    "Readers",
    "fleet_hosts",
    "presented_twice",
    "rotations",
    "steady",
]

#: The lease TTL the hosts are configured with (seconds).
TTL = float(FLEET_TIMINGS["lease_ttl_seconds"])


class FleetHosts:
    """Hosts ``host-0``.. of fleet ``name`` on ``endpoints``, torn down by ``close``."""

    def __init__(self, endpoints: list[str], name: str, sandbox: RecordingSandbox) -> None:
        self.endpoints, self.name, self.sandbox = endpoints, name, sandbox
        self.homes: dict[str, E2EHome] = {}
        self.daemons: dict[str, Daemon] = {}
        self._stack = contextlib.ExitStack()
        self.etcd = EtcdClient(endpoints, timeout=2, connect_timeout=0.5)
        self.keys = FleetKeys(name)

    def add(
        self,
        count: int,
        extra: str = "",
        timings: dict[str, float] | None = None,
        top: str = "",
    ) -> list[str]:
        """``count`` more hosts with config (``top``: top-level lines; ``extra``: [fleet]
        lines; ``timings`` replacing the demo's) and the fleet key (the first creates it)."""
        made = []
        for _ in range(count):
            host = f"host-{len(self.homes)}"
            home = self._stack.enter_context(e2e_home())
            self.homes[host] = home
            self.write_config(host, extra, timings, top)
            if len(self.homes) == 1:
                self.cli(host, "fleet", "key", "create")
            else:
                exported = self.cli(next(iter(self.homes)), "fleet", "key", "export")
                self.cli(host, "fleet", "key", "import", input=exported)
            made.append(host)
        return made

    def write_config(
        self,
        host: str,
        extra: str = "",
        timings: dict[str, float] | None = None,
        top: str = "",
    ) -> None:
        config = self.homes[host].paths.config_dir / "config.toml"
        config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = fleet_config_text(self.endpoints, host, self.name, extra, timings)
        config.write_text(top + text)

    def config_file(self, host: str) -> Path:
        return self.homes[host].paths.config_dir / "config.toml"

    def cli(self, host: str, *args: str, input: str | None = None) -> str:
        result = self.homes[host].cli(*args, input=input)
        assert result.returncode == 0, str(result)
        return result.stdout

    def move_in(self, host: str, profile: str = "default") -> None:
        """Import a fresh pair from the sandbox on ``host`` and move it into the fleet."""
        import_pair(self.homes[host], self.sandbox, profile=profile)
        self.cli(host, "fleet", "move-in", profile)

    def start(self, *hosts: str, profiles: tuple[str, ...] = ("default",)) -> None:
        """Start the daemons of ``hosts`` (all if none) together, then wait for each to serve."""
        chosen = hosts or tuple(self.homes)
        for host in chosen:
            self.daemons[host] = self.homes[host].daemon().start(wait=False)
        for host in chosen:
            self.daemons[host].wait_ready(profiles=profiles)

    def owner(self, profile: str = "default") -> str | None:
        """The host named by the profile's owner key in etcd (None: no owner now)."""
        kv = self.etcd.get(self.keys.owner(profile))
        return None if kv is None else kv.value.decode()

    def wait_owner(self, timeout: float = 15.0, besides: str | None = None) -> str:
        """The owner, once there is one (other than ``besides``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            owner = self.owner()
            if owner is not None and owner != besides:
                return owner
            time.sleep(0.01)
        raise AssertionError(f"no owner (besides {besides}) within {timeout} s")

    def running(self) -> list[str]:
        return [h for h, d in self.daemons.items() if d.alive]

    def fleet_row(self, host: str, profile: str = "default") -> dict[str, Any]:
        """The ``fleet`` object of the profile's row in ``status --json`` on ``host``."""
        import json

        out = json.loads(self.cli(host, "status", "--json"))
        rows = [r for r in out["profiles"] if r["profile"] == profile]
        assert rows and rows[0].get("fleet"), out
        fleet: dict[str, Any] = rows[0]["fleet"]
        return fleet

    def close(self) -> None:
        self._stack.close()


def presented_twice(sandbox: RecordingSandbox) -> list[str]:
    """Refresh-token hashes the sandbox saw more than once (the referee: none)."""
    seen = collections.Counter(str(e["rt_hash"]) for e in sandbox.log() if e.get("rt_hash"))
    return [h for h, n in seen.items() if n > 1]


def rotations(sandbox: RecordingSandbox) -> int:
    """The refreshes the sandbox answered with a new pair."""
    return sum(1 for e in sandbox.log() if e.get("outcome") == "rotated")


def steady(fleet: FleetHosts, sandbox: RecordingSandbox) -> str:
    """Wait for the fleet's first refresh to be served on every running host: the imported
    pair aged while the daemons started, so readers are counted from here on."""
    wait_until(lambda: rotations(sandbox) >= 1, 20, "the owner's first refresh")
    running = [fleet.daemons[h] for h in fleet.running()]
    token = wait_until(lambda: len({d.token() for d in running}) == 1 and running[0].token(),
                       10, "the same token on every host")  # fmt: skip
    return token


class Readers:
    """A thread reading every host's token socket every 20 ms: reads and empty reads."""

    def __init__(self, daemons: dict[str, Daemon]) -> None:
        self._daemons = dict(daemons)
        self.reads: collections.Counter[str] = collections.Counter()
        self.gaps: collections.Counter[str] = collections.Counter()
        self.gap_times: dict[str, list[float]] = collections.defaultdict(list)
        self.served: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Readers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def drop(self, host: str) -> None:
        """Stop reading ``host`` (it is about to be stopped)."""
        self._daemons.pop(host, None)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for host, daemon in list(self._daemons.items()):
                token = daemon.token()
                self.reads[host] += 1
                if not token:
                    self.gaps[host] += 1
                    self.gap_times[host].append(time.monotonic())
                changes = self.served[host]
                if token and (not changes or changes[-1][1] != token):
                    changes.append((time.monotonic(), token))


@contextlib.contextmanager
def fleet_hosts(endpoints: list[str], name: str, sandbox: RecordingSandbox) -> Iterator[FleetHosts]:
    """``FleetHosts`` closed (daemons stopped, homes removed) at the end of the block."""
    hosts = FleetHosts(endpoints, name, sandbox)
    try:
        yield hosts
    finally:
        hosts.close()


#: Fleet names no two tests share (a test's prefix, a counter, the clock).
_FLEET_NAMES = itertools.count()


@contextlib.contextmanager
def progress_etcd(base: Path) -> Iterator[EtcdCluster]:
    """One etcd member under ``base``, with watch progress notifications every 300 ms: the
    daemon tests' etcd (a module's fixture)."""
    progress = "--experimental-watch-progress-notify-interval=300ms"
    with EtcdCluster(base, size=1, extra_args=(progress,)).running() as cluster:
        yield cluster


@contextlib.contextmanager
def fresh_fleet(etcd: EtcdCluster, sandbox: RecordingSandbox, prefix: str) -> Iterator[FleetHosts]:
    """A fleet no other test uses; its daemons are stopped and every etcd member runs again
    after (a test may have stopped one)."""
    name = f"{prefix}{next(_FLEET_NAMES)}x{time.monotonic_ns()}"
    with fleet_hosts(etcd.endpoints, name, sandbox) as hosts:
        yield hosts
    etcd.restore()
