"""A rig for killing aac-tokend: an isolated home, daemons to start and SIGKILL, couriers to find.

Shared by tests/test_courier.py and the crash campaign (tests/crash_campaign.py). Everything
is real: ``aac-tokend run`` processes, their forked (or spawned) couriers, the state files,
and a loopback sandbox whose request log is the referee. The rig learns what happened from
the sandbox's log and from /proc, never from the daemon's own account.

The rig makes its process a child subreaper: a courier whose daemon was killed is re-parented
to us rather than to PID 1 (which, in some containers, never reaps), so it can be reaped, and
killed at the end if it is still running. Only while a rig is open: ``close`` reaps what was
adopted and gives the role up, or every later test's orphans would become our zombies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import requests

from aac_tokend.client import ControlClient, read_token
from aac_tokend.core.state import ProfileState
from aac_tokend.core.tokens import token_hash
from aac_tokend.host.paths import Paths
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore

__all__ = [
    "TIMEOUT",
    "Chain",
    "ProcInfo",
    "Rig",
    "chains",
    "proc_info",
    "rotations",
    "wait_for",
]

#: Generous bound of one wait (a daemon start, a refresh, a courier's end); it only keeps a
#: broken run from hanging. A courier lives at most 50 s (courier.MAX_LIFE_SECONDS).
TIMEOUT = 60.0
#: Polling step of every wait: a rotation must be seen within a small part of the sandbox's
#: answer delay (0.4 s in the tests) for a kill to land inside the window.
POLL_SECONDS = 0.003
AAC_TOKEND = str(Path(sys.executable).with_name("aac-tokend"))
WORKSPACE = "/iam/v1/workspaces/current"
_PR_SET_CHILD_SUBREAPER = 36
#: The daemon with a spawned courier instead of the default fork (no CLI switch exists).
_SPAWN_DAEMON = (
    "import sys\n"
    "from aac_tokend.refresh.spawn import SpawnCourier\n"
    "from aac_tokend.daemon.main import Daemon\n"
    "from aac_tokend.host.paths import resolve_paths\n"
    "sys.exit(Daemon(resolve_paths(), make_refresher=SpawnCourier).run())\n"
)


def wait_for(what: str, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_SECONDS)


@dataclass(frozen=True)
class ProcInfo:
    """What /proc/<pid>/stat says about a process."""

    pid: int
    state: str  # R, S, D, Z...
    ppid: int
    sid: int
    start_ticks: int


def proc_info(pid: int) -> ProcInfo | None:
    """The process's /proc facts, None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return ProcInfo(pid, rest[0], int(rest[1]), int(rest[3]), int(rest[19]))


def ignored_signals(pid: int) -> set[int]:
    """The signals the process ignores, from /proc/<pid>/status's SigIgn mask."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}
    return set()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    info = proc_info(pid)
    return info is not None and info.state not in ("Z", "X")


def rotations(log: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of a sandbox log that rotated a refresh token."""
    return [entry for entry in log if entry["outcome"] == "rotated"]


@dataclass
class Chain:
    """One token family's history in the sandbox log, judged."""

    first_rt_hash: str
    entries: list[dict[str, Any]]

    @property
    def rotated(self) -> int:
        return sum(1 for e in self.entries if e["outcome"] == "rotated")

    @property
    def lost(self) -> bool:
        """True if the family ended revoked: a used refresh token came back."""
        return any(e["outcome"] != "rotated" for e in self.entries)

    @property
    def current_rt_hash(self) -> str:
        done = [e for e in self.entries if e["outcome"] == "rotated"]
        return str(done[-1]["new_rt_hash"]) if done else self.first_rt_hash

    def problems(self) -> list[str]:
        """What breaks the rules: a gap in the chain, or a refresh token sent twice."""
        found, expected, seen = [], self.first_rt_hash, set()
        for e in self.entries:
            if e["rt_hash"] in seen:
                found.append(f"seq {e['seq']}: refresh token {e['rt_hash']} sent twice")
            seen.add(e["rt_hash"])
            if e["outcome"] == "rotated":
                if e["rt_hash"] != expected:
                    found.append(f"seq {e['seq']}: rotated {e['rt_hash']}, expected {expected}")
                expected = str(e["new_rt_hash"])
        return found


def chains(log: Sequence[dict[str, Any]], first_rt_hashes: Sequence[str]) -> list[Chain]:
    """Each family's entries, keyed by the hash of the refresh token it was imported with."""
    by_family: dict[str, str] = {}
    out = {h: Chain(h, []) for h in first_rt_hashes}
    for e in log:
        if e["rt_hash"] in out and e["family"]:
            by_family[str(e["family"])] = e["rt_hash"]
        first = by_family.get(str(e["family"]))
        if first is not None:
            out[first].entries.append(e)
    return list(out.values())


class Rig:
    """One isolated aac-tokend home against one sandbox; daemons started and killed at will."""

    def __init__(self, sandbox: SandboxServer, *, courier: str = "fork") -> None:
        if courier not in ("fork", "spawn"):
            raise ValueError("courier must be 'fork' or 'spawn'")
        self.sandbox = sandbox
        self.courier = courier
        self.home = Path(tempfile.mkdtemp(prefix="atk", dir="/tmp"))
        self.paths = Paths(self.home / "config", self.home / "state", self.home / "run")
        self.env = {**os.environ, "AAC_TOKEND_HOME": str(self.home)}
        self.env.pop("NOTIFY_SOCKET", None)
        self.first_rt_hashes: dict[str, list[str]] = {}  # profile -> every family imported
        self._log: IO[bytes] = open(self.home / "daemon.log", "ab")  # noqa: SIM115
        self._daemons: list[subprocess.Popen[bytes]] = []
        self._store: FileStore | None = None
        self._become_subreaper()

    @staticmethod
    def _become_subreaper(on: bool = True) -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)

    # -- profiles and state ----------------------------------------------------------------
    def import_profile(self, profile: str = "default") -> str:
        """A new family from the sandbox, imported with the CLI; the first rt hash."""
        pair = self.sandbox.generate()
        cmd = [AAC_TOKEND, "import", "-p", profile, "--token-endpoint", self.sandbox.token_endpoint]
        done = subprocess.run(
            cmd, input=json.dumps(pair).encode(), env=self.env, capture_output=True, timeout=TIMEOUT
        )
        if done.returncode != 0:
            raise AssertionError(f"import failed: {done.stderr.decode(errors='replace')}")
        first = token_hash(str(pair["refresh_token"]))
        self.first_rt_hashes.setdefault(profile, []).append(first)
        return first

    def store(self) -> FileStore:
        if self._store is None:
            key = (self.paths.config_dir / "state.key").read_bytes()
            self._store = FileStore(self.paths.state_dir, key)
        return self._store

    def state(self, profile: str = "default") -> ProfileState:
        state = self.store().load(profile)
        assert state is not None, f"no state for {profile}"
        return state

    def durable_rt_hash(self, profile: str = "default") -> str:
        """Hash of the refresh token in the state file right now."""
        token = self.state(profile).refresh_token
        assert token is not None
        return token_hash(token)

    # -- daemons ---------------------------------------------------------------------------
    def start(self) -> subprocess.Popen[bytes]:
        """Start a daemon (not waiting for it to be ready)."""
        if self.courier == "fork":
            cmd = [AAC_TOKEND, "run"]
        else:
            cmd = [sys.executable, "-c", _SPAWN_DAEMON]
        proc = subprocess.Popen(
            cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        self._daemons.append(proc)
        return proc

    def control(self, op: str, timeout: float = TIMEOUT, **fields: object) -> dict[str, object]:
        with ControlClient(str(self.paths.control_socket), timeout=timeout) as client:
            return client.request(op, **fields)

    def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Until the daemon answers on its control socket."""

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}; see {self._log.name}")
            try:
                return bool(self.control("status", timeout=5.0).get("ok"))
            except (OSError, ValueError):
                return False

        wait_for("the daemon to answer", answers)

    def served_token(self, profile: str = "default") -> str:
        """The token the daemon serves on the profile's socket ("" if none)."""
        try:
            return read_token(str(self.paths.token_socket(profile)), timeout=5.0)
        except OSError:
            return ""

    def wait_token(self, profile: str = "default") -> str:
        try:
            return str(wait_for(f"a token for {profile}", lambda: self.served_token(profile)))
        except AssertionError as exc:
            # Say what the daemon said: the home directory is gone once the test ends.
            tail = "\n".join(self.daemon_log().splitlines()[-40:])
            raise AssertionError(f"{exc}; last daemon log lines:\n{tail}") from None

    def refresh_in_background(self, profile: str = "default") -> threading.Thread:
        """Ask for a refresh without waiting (the daemon may be killed before it answers)."""

        def ask() -> None:
            with contextlib.suppress(OSError, ValueError):
                self.control("refresh", profile=profile)

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        return thread

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the daemon itself (not its process group) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM, then SIGKILL if the daemon does not end."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def couriers(self, daemon_pid: int) -> list[int]:
        """Live children of ``daemon_pid`` in a session of their own running the daemon's
        program (a fork) or ``aac_tokend.refresh.spawn`` (a spawn): its couriers, not its
        alerts."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            info = proc_info(pid)
            if info and info.ppid == daemon_pid and info.sid == pid and info.state != "Z":
                cmdline = _cmdline(pid)
                if cmdline == _cmdline(daemon_pid) or b"aac_tokend.refresh.spawn" in cmdline:
                    found.append(pid)
        return found

    def processes(self) -> list[int]:
        """Every live process of this rig's home (daemons and couriers, orphaned or not)."""
        return [pid for pid in self._pids() if _alive(pid)]

    def _pids(self) -> list[int]:
        mine = f"AAC_TOKEND_HOME={self.home}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if mine in environ.split(b"\0"):
                pids.append(int(entry))
        return pids

    def reap(self) -> None:
        """Collect couriers that died after their daemon (they were re-parented to us).

        A zombie's environment is gone, so it cannot be told by its AAC_TOKEND_HOME: it is
        told by its session. A courier runs in a session of its own (setsid); the children
        we started ourselves (and wait for through their Popen) share ours.
        """
        me, ours = os.getpid(), os.getsid(0)
        for entry in os.listdir("/proc"):
            info = proc_info(int(entry)) if entry.isdigit() else None
            if info and info.ppid == me and info.state == "Z" and info.sid != ours:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.pid, os.WNOHANG)

    def wait_couriers_gone(self) -> None:
        """Until no courier of this home is alive (orphans included)."""
        daemons = {p.pid for p in self._daemons}

        def gone() -> bool:
            self.reap()
            return not [p for p in self.processes() if p not in daemons]

        wait_for("the couriers to finish", gone)

    # -- the API -------------------------------------------------------------------------
    def api_accepts(self, access_token: str) -> bool:
        """True if the sandbox's API call answers 200 for this access token."""
        answer = requests.get(
            self.sandbox.api_url + WORKSPACE,
            headers={"Authorization": f"Bearer {access_token}"},
            timeout=TIMEOUT,
        )
        return answer.status_code == 200

    def close(self) -> None:
        """Kill every process of this home, reap what we can, remove the home."""
        for proc in self._daemons:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.processes() and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
        self.reap()
        self._become_subreaper(False)
        self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def daemon_log(self) -> str:
        self._log.flush()
        return (self.home / "daemon.log").read_text(errors="replace")
