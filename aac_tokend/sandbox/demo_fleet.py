"""``aac-tokend demo --fleet``: one chain, three hosts, one etcd, and the owner killed.

Real processes in a throw-away directory: a local etcd (Debian's ``etcd-server``), the
sandbox token server with short tokens, and three daemons as three hosts (each its own
AAC_TOKEND_HOME, runtime directory and host name) sharing one fleet key. It shows the owner
refreshing and the followers serving the same token from their own sockets, then SIGKILLs
the owner and counts the reads on every host while another host takes over: a read without
a valid token is a gap, and the demo says how many there were. Every timing is scaled down
by configuration (``[fleet]`` keys), never by a code path of its own. Tokens are shown only
by their short hash.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from ..client import ControlClient, read_token
from ..core.tokens import token_hash

__all__ = [
    "FLEET_TIMINGS",
    "MARGIN_SECONDS",
    "fleet_config_text",
    "run_fleet_demo",
    "write_fleet_config",
]

HOSTS = ("host-a", "host-b", "host-c")
#: The fleet's timings, scaled down so that a failover fits in seconds; the relations the
#: config check enforces (fleet/settings.py) hold: W >= courier life >= D + request, and the
#: margin >= lease TTL + W + request + skew.
FLEET_TIMINGS = {
    "lease_ttl_seconds": 2,
    "send_window_seconds": 1.0,
    "resolve_wait_seconds": 5.0,
    "courier_life_seconds": 4.0,
    "connect_timeout_seconds": 1.0,
    "send_timeout_seconds": 1.0,
    "request_deadline_seconds": 3.0,
    "max_clock_skew_seconds": 0.5,
}
MARGIN_SECONDS = 11


def _say(text: str) -> None:
    print(text, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _FleetDemo:
    def __init__(self, seconds: float, ttl: int) -> None:
        self.seconds, self.ttl = seconds, max(ttl, 30)
        self.root = Path(tempfile.mkdtemp(prefix="atk-fleet-", dir="/tmp"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.cmd = [sys.executable, "-m", "aac_tokend"]

    def home(self, host: str) -> Path:
        return self.root / host

    def env(self, host: str) -> dict[str, str]:
        return dict(os.environ, AAC_TOKEND_HOME=str(self.home(host)))

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        out = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        self.procs[name] = subprocess.Popen(args, env=env, stdout=out, stderr=out)

    def aac(self, host: str, *args: str, stdin: bytes | None = None) -> str:
        done = subprocess.run(
            [*self.cmd, *args], env=self.env(host), input=stdin, capture_output=True,
            timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"demo: `aac-tokend {args[0]}` on {host} failed: "
                               f"{done.stderr.decode().strip()}")  # fmt: skip
        return done.stdout.decode()

    def status(self, host: str) -> dict[str, Any] | None:
        try:
            with ControlClient(str(self.home(host) / "run" / "control.sock")) as client:
                rows = client.request("status")["profiles"]
        except (OSError, ValueError, KeyError):
            return None
        return rows[0] if isinstance(rows, list) and rows else None

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise RuntimeError(f"demo: {what} did not happen within {timeout:.0f} s")

    def socket_of(self, host: str) -> str:
        return str(self.home(host) / "run" / "default.token.sock")

    def owner(self) -> str | None:
        for host in HOSTS:
            if self.procs[host].poll() is None:
                row = self.status(host)
                if row and row.get("fleet"):
                    return str(row["fleet"]["owner"]) if row["fleet"]["owner"] else None
        return None

    def run(self) -> int:
        etcd = shutil.which("etcd")
        if etcd is None:
            _say("demo --fleet needs etcd (Debian: `apt-get install etcd-server`; "
                 "`make demo-fleet` installs it when run as root)")  # fmt: skip
            return 2
        _say(f"== aac-tokend fleet demo (files under {self.root}, removed at the end)")
        client, peer = _free_port(), _free_port()
        url = f"http://127.0.0.1:{client}"
        self.start("etcd", [etcd, "--name=demo", f"--data-dir={self.root / 'etcd'}",
                            f"--listen-client-urls={url}", f"--advertise-client-urls={url}",
                            f"--listen-peer-urls=http://127.0.0.1:{peer}",
                            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                            f"--initial-cluster=demo=http://127.0.0.1:{peer}",
                            "--experimental-watch-progress-notify-interval=5s",
                            "--log-level=error", "--logger=zap"])  # fmt: skip
        self.wait_for("etcd's start", lambda: _healthy(url))
        _say(f"1. etcd runs at {url} (one member here; a real fleet runs three or five).")
        self.start("sandbox", [*self.cmd, "sandbox", "--port", "0", "--access-ttl",
                               str(self.ttl)])  # fmt: skip
        log = self.root / "sandbox.log"
        self.wait_for("the sandbox start", lambda: "listening" in log.read_text())
        aac = log.read_text().split("listening on ", 1)[1].split()[0]
        _say(f"2. The sandbox token server runs at {aac}; its access tokens live {self.ttl} s.")
        for host in HOSTS:
            self.home(host).mkdir(mode=0o700)
            self.write_config(host, url)
        self.aac(HOSTS[0], "fleet", "key", "create")
        exported = self.aac(HOSTS[0], "fleet", "key", "export")
        for host in HOSTS[1:]:
            self.aac(host, "fleet", "key", "import", stdin=exported.encode())
        _say(f"3. {HOSTS[0]} made the fleet key; {', '.join(HOSTS[1:])} imported it (on "
             "stdin). etcd will hold only what this key seals.")  # fmt: skip
        pair = requests.post(f"{aac}/sandbox/generate", json={}, timeout=5).json()
        subprocess.run([*self.cmd, "import", "--token-endpoint", f"{aac}/as/token"],
                       input=json.dumps(pair).encode(), env=self.env(HOSTS[0]),
                       check=True, capture_output=True)  # fmt: skip
        self.aac(HOSTS[0], "fleet", "move-in", "default")
        _say(f"4. Imported a token pair on {HOSTS[0]} and moved it into the fleet.")
        for host in HOSTS:
            self.start(host, [*self.cmd, "run"], self.env(host))
        for host in HOSTS:
            self.wait_for(f"{host}'s token socket", lambda h=host: bool(_read(self.socket_of(h))))  # type: ignore[misc]
        self.wait_for("an owner", lambda: self.owner() is not None)
        _say(f"5. Three daemons run; {self.owner()} owns the chain, the others follow. "
             "Every host serves the token from its own socket:")  # fmt: skip
        readers = _Readers({h: self.socket_of(h) for h in HOSTS})
        readers.start()
        try:
            self.watch(self.seconds)
            victim = self.owner()
            assert victim is not None
            _say(f"6. SIGKILL of the owner, {victim} (no goodbye: its lease must run out).")
            self.procs[victim].send_signal(signal.SIGKILL)
            readers.drop(victim)
            killed_at = time.monotonic()
            self.wait_for("a new owner", lambda: self.owner() not in (None, victim), 60)
            _say(f"   {self.owner()} took over {time.monotonic() - killed_at:.1f} s later "
                 f"(lease TTL {FLEET_TIMINGS['lease_ttl_seconds']} s).")  # fmt: skip
            self.watch(max(self.ttl * 1.2, 20))
        finally:
            readers.stop()
        _say(f"7. Reads on the surviving hosts: {readers.reads} in all, "
             f"{readers.gaps} without a valid token.")  # fmt: skip
        rotations = [e for e in requests.get(f"{aac}/sandbox/log", timeout=5).json()
                     if e.get("outcome") == "rotated"]  # fmt: skip
        reused = [e for e in requests.get(f"{aac}/sandbox/log", timeout=5).json()
                  if e.get("outcome") == "reuse_revoked"]  # fmt: skip
        _say(f"   The sandbox saw {len(rotations)} refreshes and {len(reused)} reused refresh "
             "tokens.")  # fmt: skip
        _say("== fleet demo finished; stopping everything.")
        return 0 if readers.gaps == 0 and not reused else 1

    def watch(self, seconds: float) -> None:
        start, shown = time.monotonic(), ""
        while time.monotonic() - start < seconds:
            line = "  ".join(f"{h}: {token_hash(t) if t else '-':>8}"
                             for h in HOSTS if self.procs[h].poll() is None
                             for t in [_read(self.socket_of(h))])  # fmt: skip
            if line != shown:
                _say(f"   t={time.monotonic() - start:4.0f}s  owner {self.owner()}  {line}")
                shown = line
            time.sleep(0.5)

    def write_config(self, host: str, url: str) -> None:
        write_fleet_config(self.home(host), [url], host)

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def fleet_config_text(
    endpoints: list[str],
    host: str,
    name: str = "demo",
    extra: str = "",
    timings: dict[str, float] | None = None,
) -> str:
    """A host's config.toml for the demo's fleet (the tests use it too): the scaled timings
    (``timings`` replaces some), the margin they need, and ``extra`` [fleet] lines."""
    chosen = {**FLEET_TIMINGS, **(timings or {})}
    lines = "\n".join(f"{k} = {v}" for k, v in chosen.items())
    urls = ", ".join(f'"{url}"' for url in endpoints)
    return (
        f"min_margin_seconds = {MARGIN_SECONDS}\nnotifications = false\n\n[fleet]\n"
        f'endpoints = [{urls}]\nname = "{name}"\nhost = "{host}"\n{lines}\n{extra}'
    )


def write_fleet_config(home: Path, endpoints: list[str], host: str, name: str = "demo") -> None:
    """``home``'s config.toml for one host of the fleet, with the demo's scaled timings
    (shared with the fleet benchmark, tests/bench_fleet.py, which runs the same hosts)."""
    config_dir = home / "config"
    config_dir.mkdir(mode=0o700, exist_ok=True)
    (config_dir / "config.toml").write_text(fleet_config_text(endpoints, host, name))


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=1).ok
    except requests.RequestException:
        return False


def _read(sock: str) -> str | None:
    try:
        return read_token(sock) or None
    except OSError:
        return None


class _Readers:
    """A thread polling every host's socket every 50 ms, counting reads with no token."""

    def __init__(self, sockets: dict[str, str]) -> None:
        self._sockets = dict(sockets)
        self._stop = threading.Event()
        self.reads = self.gaps = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def drop(self, host: str) -> None:
        self._sockets.pop(host, None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for sock in list(self._sockets.values()):
                self.reads += 1
                self.gaps += _read(sock) is None


def run_fleet_demo(seconds: float, ttl: int) -> int:
    """Run the fleet demo; it always cleans up its processes and files."""
    demo = _FleetDemo(seconds, ttl)
    try:
        return demo.run()
    except RuntimeError as exc:  # one of the demo's own steps did not happen: say which
        print(f"aac-tokend: {exc}; the logs were under {demo.root}", file=sys.stderr)
        return 1
    finally:
        demo.cleanup()
