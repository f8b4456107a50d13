"""The fleet benchmark's rig: a 3-member etcd, three daemons as hosts, a counting proxy.

Not collected by pytest; tests/bench_fleet.py uses it. The hosts are configured as
``aac-tokend demo --fleet`` configures them (sandbox/demo_fleet.write_fleet_config: its
scaled timings, one fleet key on every host), and run by tests/bench_procs.run_daemon. The
first host reaches etcd only through a ``CountingProxy`` and is started alone, so it wins
the election and every request the owner (daemon and couriers) makes is counted and timed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aac_tokend.client import ControlClient, read_token
from aac_tokend.fleet.sealing import create_fleet_key, export_fleet_key, import_fleet_key
from aac_tokend.sandbox.demo_fleet import write_fleet_config
from tests.bench_procs import Daemon, Sandbox, import_request, run_daemon, short_dir
from tests.etcd_cluster import EtcdCluster

__all__ = ["CountingProxy", "FleetRig", "Reply", "TokenPoller", "fleet_rig"]

HOSTS = ("host-a", "host-b", "host-c")
FLEET = "bench"
PROFILE = "default"
#: A request line of the JSON gateway. Bodies are JSON with base64 keys and values, so this
#: never matches inside one.
REQUEST_LINE = re.compile(rb"(?:POST|GET|PUT) (/v3/[A-Za-z0-9_/]+) HTTP/1\.[01]\r\n")
#: Bytes kept from the end of one read, so a request line split across reads is still seen.
CARRY = 64
#: The daemon's promise is to stop within 2 s of a SIGTERM (daemon/main.py); past this the
#: benchmark kills it (the figure then says so).
STOP_LIMIT = 3.0
#: An election, a watch or a status change that takes longer than this is broken, not slow.
WAIT_LIMIT = 30.0


@dataclass(frozen=True)
class Reply:
    """One request through the proxy: its path and when each end of it passed."""

    path: str
    sent: float  # time.monotonic() when the request line passed
    answered: float | None = None  # when the first bytes of etcd's answer passed


class CountingProxy:
    """A loopback TCP proxy in front of one etcd member that records every HTTP request.

    The gateway's connections are kept alive and answer in order, so each reply is matched
    to the oldest unanswered request of its connection (a watch's later events match none).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.replies: list[Reply] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        """The proxy's URL, this host's only etcd endpoint."""
        return f"http://127.0.0.1:{self.port}"

    def since(self, index: int) -> list[Reply]:
        """The requests recorded from ``index`` on (``len(proxy.replies)`` marks a point)."""
        with self._lock:
            return self.replies[index:]

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        pending: list[int] = []  # indexes in self.replies, oldest first
        tail = b""
        with (
            client,
            socket.create_connection(("127.0.0.1", self.upstream_port)) as up,
            contextlib.suppress(OSError),
        ):
            while True:
                ready, _, _ = select.select([client, up], [], [])
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        return
                    now = time.monotonic()
                    buf, end = tail + data, 0
                    for match in REQUEST_LINE.finditer(buf):
                        with self._lock:
                            pending.append(len(self.replies))
                            self.replies.append(Reply(match[1].decode(), now))
                        end = match.end()
                    tail = buf[max(end, len(buf) - CARRY) :]
                    up.sendall(data)
                if up in ready:
                    data = up.recv(65536)
                    if not data:
                        return
                    if pending:
                        now = time.monotonic()
                        with self._lock:
                            i = pending.pop(0)
                            self.replies[i] = Reply(self.replies[i].path, self.replies[i].sent, now)
                    client.sendall(data)

    def close(self) -> None:
        """Stop accepting."""
        self.listener.close()


def _poll(path: str, conn: Connection) -> None:
    """Child process: on each ``arm``, read ``path`` until the token changes; send the time."""
    last = read_token(path)
    while conn.recv():
        deadline = time.monotonic() + WAIT_LIMIT
        while (token := read_token(path)) == last and time.monotonic() < deadline:
            time.sleep(0.0002)  # a reading every ~0.3 ms, without taking a whole core
        conn.send(time.monotonic() if token != last else None)
        last = token


class TokenPoller:
    """A forked reader of one token socket that reports when the token next changes.

    A process of its own, so that the bench's proxy threads do not delay its readings.
    """

    def __init__(self, path: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_poll, args=(path, child), daemon=True)
        self._proc.start()

    def arm(self) -> None:
        """Start watching for the next change (before the refresh that causes it)."""
        self._conn.send(True)

    def changed_at(self) -> float:
        """time.monotonic() when the token changed (the poller must have been armed)."""
        if not self._conn.poll(WAIT_LIMIT + 5):
            raise SystemExit("fleet benchmark: the follower's token poller did not answer")
        at: float | None = self._conn.recv()
        if at is None:
            raise SystemExit("fleet benchmark: the follower never served the new token")
        return at

    def close(self) -> None:
        self._conn.send(False)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()


def fleet_facts(daemon: Daemon) -> dict[str, Any] | None:
    """The ``fleet`` object of the profile's status row (None if it cannot be read now)."""
    try:
        with ControlClient(daemon.control_socket, timeout=2.0) as client:
            rows = client.request("status").get("profiles")
    except (OSError, ValueError):
        return None
    first = rows[0] if isinstance(rows, list) and rows else None
    facts = first.get("fleet") if isinstance(first, dict) else None
    return facts if isinstance(facts, dict) else None


def wait_until(what: str, check: Callable[[], object], step: float = 0.01) -> float:
    """Poll ``check()`` every ``step`` s until true; the time.monotonic() it was seen true."""
    deadline = time.monotonic() + WAIT_LIMIT
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"fleet benchmark: {what} did not happen within {WAIT_LIMIT:.0f} s")
        time.sleep(step)
    return time.monotonic()


@dataclass
class FleetRig:
    """The running fleet: the cluster, the owner's proxy, and a daemon per host."""

    cluster: EtcdCluster
    proxy: CountingProxy
    root: Path
    stack: ExitStack
    hosts: dict[str, Daemon] = field(default_factory=dict)

    def home(self, host: str) -> Path:
        return self.root / host

    def start(self, host: str) -> Daemon:
        """Start (or start again) ``host``'s daemon; it is stopped when the rig closes."""
        self.hosts[host] = self.stack.enter_context(run_daemon(self.home(host)))
        return self.hosts[host]

    def spare_ready(self, host: str) -> None:
        """Wait until ``host``'s spare courier is ready: blocked reading its job on stdin.

        A daemon's spare has minutes between refreshes to get ready; a benchmark forcing them
        back to back would time the replacement's imports instead (as bench_courier waits).
        """
        wait_until(f"{host}'s spare courier", partial(_waiting_spare, self.hosts[host].pid))

    def stop_all(self) -> float:
        """SIGTERM every host at once; the seconds the slowest took (killed at STOP_LIMIT)."""
        running = [d.proc for d in self.hosts.values() if d.proc.poll() is None]
        start = time.monotonic()
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(max(0.0, start + STOP_LIMIT - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return time.monotonic() - start

    def dead(self) -> str:
        """A host whose daemon is not running (there must be one)."""
        return next(host for host, daemon in self.hosts.items() if daemon.proc.poll() is not None)

    def owner(self) -> str | None:
        """The host whose status says it owns the chain now (None: none does)."""
        for host, daemon in self.hosts.items():
            facts = daemon.proc.poll() is None and fleet_facts(daemon)
            if facts and facts.get("role") == "owner":
                return host
        return None


@contextmanager
def fleet_rig(sandbox: Sandbox) -> Iterator[FleetRig]:
    """Three hosts serving one chain from ``sandbox``; host-a owns it, through the proxy."""
    root = short_dir("atkf")
    with ExitStack() as stack:
        stack.callback(_remove, root)
        cluster = stack.enter_context(EtcdCluster(root / "etcd").running())
        proxy = CountingProxy(cluster.members[0].client_port)
        stack.callback(proxy.close)
        rig = FleetRig(cluster, proxy, root, stack)
        for host in HOSTS:
            rig.home(host).mkdir(mode=0o700)
            endpoints = [proxy.url] if host == HOSTS[0] else cluster.endpoints
            write_fleet_config(rig.home(host), endpoints, host, FLEET)
        key = export_fleet_key(create_fleet_key(rig.home(HOSTS[0]) / "config"))
        for host in HOSTS[1:]:
            import_fleet_key(rig.home(host) / "config", key)
        first = rig.start(HOSTS[0])
        first.import_profile(import_request(sandbox, PROFILE, sandbox.generate()))
        wait_until("host-a's election", lambda: rig.owner() == HOSTS[0])
        for host in HOSTS[1:]:
            rig.start(host)
        for daemon in rig.hosts.values():
            wait_until("a host's token", partial(_serves, daemon))
        yield rig


def _waiting_spare(pid: int) -> bool:
    """True if a child of ``pid`` is a spawned courier blocked in read(0, ...) (Linux)."""
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                call = Path(f"/proc/{child}/syscall").read_text().split()
                if b"aac_tokend.refresh.spawned" in argv and call[:2] == ["0", "0x0"]:
                    return True
    return False


def _serves(daemon: Daemon) -> bool:
    try:
        return bool(read_token(daemon.token_socket(PROFILE)))
    except OSError:
        return False


def _remove(root: Path) -> None:
    import shutil

    shutil.rmtree(root, ignore_errors=True)
