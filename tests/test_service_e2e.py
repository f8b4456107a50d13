"""End to end: the real daemon (``python -m aac_tokend run``) under a service manager's protocols.

Socket activation is driven by the real ``systemd-socket-activate``; sd_notify is received on
a datagram socket the test binds and names in ``$NOTIFY_SOCKET``, the way systemd does. The
tokens come from a loopback sandbox running in this process.

Not covered here: that a hung scheduler thread stops the watchdog pings. The real daemon's
scheduler cannot be hung from outside, and the stall bound is 30 s (SCHEDULER_STALL_SECONDS).
A forked courier's environment cannot be read either (/proc/PID/environ shows the block the
daemon was exec'd with, whatever it unset since), so the courier test uses a spawned one,
whose environment is the daemon's at the time of the spawn, as a fork's is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aac_tokend.core.importer import ImportRequest, build_state
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore, load_or_create_key
from tests.helpers_e2e import (
    CliResult,
    E2EHome,
    e2e_home,
    import_pair,
    running_sandbox,
    token_like_runs,
    wait_until,
)

#: Generous bound of one wait (a daemon start, a refresh, a CLI command) on a loaded 2-core
#: machine; it only keeps a broken run from hanging.
TIMEOUT = 30.0
#: The product promise: SIGTERM ends the daemon within 2 s (daemon.MAIN_WAIT_SECONDS).
STOP_LIMIT = 2.0
#: WatchdogSec=1s as systemd passes it: the daemon should ping every 0.5 s.
WATCHDOG_USEC = 1_000_000
#: How long the pings are counted: about 6 expected; 3..10 allows for a loaded machine.
COUNT_WINDOW = 3.0
#: Profiles in the store when a request starts the daemon: loading them takes long enough
#: (tens of ms) that a control socket answering too early would be caught every time.
PROFILES = 30
#: Polling step of the waits for a file or a process to appear.
POLL = 0.02
#: What a service manager passes to its service, and no child of the daemon may inherit.
MANAGER_VARIABLES = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)
#: The Flags bit of a listening socket in /proc/net/unix (the kernel's __SO_ACCEPTCON).
_SO_ACCEPTCON = 0x10000
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
#: The daemon with a spawned courier instead of the default fork (no CLI switch exists).
SPAWN_DAEMON = (
    "import sys\n"
    "from aac_tokend.refresh.spawn import SpawnCourier\n"
    "from aac_tokend.daemon.main import Daemon\n"
    "from aac_tokend.host.paths import resolve_paths\n"
    "sys.exit(Daemon(resolve_paths(), make_refresher=SpawnCourier).run())\n"
)

needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate is not installed (Debian: apt-get install systemd)",
)


# -- helpers ------------------------------------------------------------------------------------


class Home:
    """An E2EHome (tests/helpers_e2e.py) plus processes started with an environment of our own.

    The helpers' Daemon runs ``aac-tokend run`` with the home's environment; these tests
    need the service manager's variables in it, or systemd-socket-activate in front of it.
    """

    def __init__(self, base: E2EHome) -> None:
        self.base = base
        self.root = base.home  # AAC_TOKEND_HOME
        paths = base.paths
        self.run_dir = paths.runtime_dir
        self.control = paths.control_socket
        self.token_sock = paths.token_socket("default")
        self.log_path = base.logs / "service.log"
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, **extra: str) -> dict[str, str]:
        """The home's environment without any service-manager variable, plus ``extra``."""
        env = {k: v for k, v in self.base.env.items() if k not in MANAGER_VARIABLES}
        return {**env, **extra}

    def cli(self, *args: str, stdin: str | None = None) -> CliResult:
        """Run ``aac-tokend ARGS`` against this home."""
        return self.base.cli(*args, input=stdin, env=self.env())

    def start(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a process logging to service.log; it is killed at the end of the test."""
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.base.root
            )
        self.procs.append(proc)
        return proc

    def start_daemon(self, **extra: str) -> subprocess.Popen[bytes]:
        """Start ``aac-tokend run`` directly, with ``extra`` in its environment."""
        return self.start([sys.executable, "-m", "aac_tokend", "run"], self.env(**extra))

    def log(self) -> str:
        """The processes' output so far, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def import_pair(self, sandbox: SandboxServer) -> str:
        """Import a new sandbox pair as profile "default"; its access token."""
        return str(import_pair(self.base, sandbox)["access_token"])

    def store_pairs(self, sandbox: SandboxServer, names: list[str]) -> None:
        """Save new sandbox pairs as ``names`` straight into the store (after import_pair)."""
        paths = self.base.paths
        store = FileStore(paths.state_dir, load_or_create_key(paths.config_dir))
        for name in names:
            pair = sandbox.generate()
            request = ImportRequest(
                profile=name,
                access_token=str(pair["access_token"]),
                refresh_token=str(pair["refresh_token"]),
                token_endpoint=sandbox.token_endpoint,
                refresh_lifetime_days=30,
            )
            with store.locked(name, TIMEOUT):
                store.save(build_state(request, time.time()))

    def close(self) -> None:
        """Kill what we started (the E2EHome then kills stray couriers and removes it all)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=TIMEOUT)


class Manager:
    """The service manager's end of sd_notify: a bound AF_UNIX datagram socket."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        #: every message received, in order
        self.seen: list[str] = []

    def receive(self, timeout: float) -> str | None:
        """The next message, or None when none comes within ``timeout``."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            message = self.sock.recv(4096).decode("utf-8")
        except TimeoutError:
            return None
        self.seen.append(message)
        return message

    def until(self, assignment: str, what: str, log: Callable[[], str]) -> list[str]:
        """Messages up to and including the first carrying the line ``assignment``."""
        got: list[str] = []
        deadline = time.monotonic() + TIMEOUT
        while True:
            message = self.receive(deadline - time.monotonic())
            if message is None:
                raise AssertionError(f"no {assignment} for {what}; got {got}\n{log()}")
            got.append(message)
            if assignment in message.split("\n"):
                return got

    def during(self, seconds: float) -> list[str]:
        """Every message received in the next ``seconds``."""
        got: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                got.append(message)
        return got

    def close(self) -> None:
        self.sock.close()


def has(messages: list[str], assignment: str) -> int:
    """How many of ``messages`` carry the line ``assignment``."""
    return sum(assignment in m.split("\n") for m in messages)


def wait_for(what: str, check: Callable[[], Any], log: Callable[[], str]) -> Any:
    """Poll ``check`` until it returns something truthy; the log goes with a failure."""
    try:
        return wait_until(check, TIMEOUT, what, interval=POLL)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{log()}") from None


def request(path: Path, op: str) -> dict[str, Any]:
    """One control request on a fresh connection; raises if nothing listens at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT)
        conn.connect(str(path))
        conn.sendall(json.dumps({"op": op}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            assert chunk, f"the daemon hung up without answering {op}"
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def read_all(path: Path) -> bytes:
    """Connect to ``path`` and read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(TIMEOUT)
        conn.connect(str(path))
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def socket_inode(path: Path) -> int | None:
    """The inode of the socket file at ``path``, or None when there is none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def terminate(proc: subprocess.Popen[bytes], home: Home) -> None:
    """SIGTERM, and the daemon ends with status 0."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=TIMEOUT) == 0, home.log()


def listening(path: Path) -> bool:
    """True once a socket at ``path`` listens (bind() makes the file; listen() comes after)."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7] == str(path) and int(fields[3], 16) & _SO_ACCEPTCON:
            return True
    return False


def proc_environ(pid: int) -> dict[str, str] | None:
    """The environment process ``pid`` was exec'd with, or None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def find_courier(home: Home) -> tuple[int, dict[str, str]] | None:
    """A spawned courier of ``home``'s daemon, alive now, with its environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"aac_tokend.refresh.spawned" not in cmdline.split(b"\0"):
            continue
        env = proc_environ(int(entry.name))
        if env is not None and env.get("AAC_TOKEND_HOME") == str(home.root):
            return int(entry.name), env
    return None


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def home() -> Iterator[Home]:
    with e2e_home() as base:
        h = Home(base)
        try:
            yield h
        finally:
            h.close()


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with running_sandbox() as server:  # hour-long access tokens: no refresh unless asked
        yield server


@pytest.fixture
def manager(home: Home) -> Iterator[Manager]:
    m = Manager(home.base.root)
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def notified(home: Home, sandbox: SandboxServer, manager: Manager) -> subprocess.Popen[bytes]:
    """A daemon serving one profile, notifying ``manager``, with WatchdogSec=1s; up and READY."""
    home.import_pair(sandbox)
    proc = home.start_daemon(NOTIFY_SOCKET=manager.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    manager.until("READY=1", "the start", home.log)
    return proc


# -- tests --------------------------------------------------------------------------------------


@needs_socket_activate
class TestSocketActivation:
    def _activate(self, home: Home, names: list[str], paths: list[Path]) -> subprocess.Popen[bytes]:
        """systemd-socket-activate listening on ``paths``; it execs the daemon on a connection."""
        home.run_dir.mkdir(mode=0o700, parents=True)
        argv = [str(SOCKET_ACTIVATE)]
        for path in paths:
            argv += ["-l", str(path)]
        argv += [f"--fdname={':'.join(names)}", "-E", f"AAC_TOKEND_HOME={home.root}"]
        if "PYTHONPATH" in home.base.env:  # it passes on only PATH, HOME, TERM and these
            argv += ["-E", f"PYTHONPATH={home.base.env['PYTHONPATH']}"]
        proc = home.start([*argv, sys.executable, "-m", "aac_tokend", "run"], home.env())
        for path in paths:
            wait_for(f"a listener at {path}", lambda: listening(path), home.log)  # noqa: B023
        return proc

    def test_control_socket_is_the_passed_one(self, home: Home, sandbox: SandboxServer) -> None:
        """The daemon answers on the control socket it was passed and never replaces it."""
        access = home.import_pair(sandbox)
        # Enough profiles that loading them takes a while: the request that starts the
        # daemon must not be answered before they are all loaded.
        others = [f"p{i:02}" for i in range(PROFILES)]
        home.store_pairs(sandbox, others)
        proc = self._activate(home, ["control"], [home.control])
        inode = socket_inode(home.control)
        # The first connection makes systemd-socket-activate exec the daemon in its place;
        # it waits in the passed socket's backlog until the daemon accepts it.
        answer = request(home.control, "status")
        assert answer["ok"] is True, answer
        assert [row["profile"] for row in answer["profiles"]] == ["default", *others]
        assert b"aac_tokend" in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert socket_inode(home.control) == inode, "the daemon bound its own control socket"
        status = home.cli("status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["daemon_running"] is True
        token = home.cli("token")
        assert token.returncode == 0, token.stderr
        assert token.stdout == access + "\n"
        terminate(proc, home)
        assert socket_inode(home.control) == inode, "the daemon unlinked a socket it did not bind"

    def test_token_socket_is_the_passed_one(self, home: Home, sandbox: SandboxServer) -> None:
        """A reader of the passed default.token socket starts the daemon and gets the token."""
        access = home.import_pair(sandbox)
        proc = self._activate(home, ["control", "default.token"], [home.control, home.token_sock])
        inodes = [socket_inode(home.control), socket_inode(home.token_sock)]
        assert read_all(home.token_sock) == access.encode() + b"\n", home.log()
        assert read_all(home.token_sock) == access.encode() + b"\n", home.log()
        assert request(home.control, "status")["ok"] is True
        assert [socket_inode(home.control), socket_inode(home.token_sock)] == inodes
        terminate(proc, home)
        assert [socket_inode(home.control), socket_inode(home.token_sock)] == inodes

    def test_passed_token_socket_outlives_remove(self, home: Home, sandbox: SandboxServer) -> None:
        """After `remove` and a new `import` of the profile, its passed socket serves again."""
        home.import_pair(sandbox)
        proc = self._activate(home, ["control", "default.token"], [home.control, home.token_sock])
        inode = socket_inode(home.token_sock)
        assert request(home.control, "status")["ok"] is True
        removed = home.cli("remove", "--yes", "default")
        assert removed.returncode == 0, removed.stderr
        access = home.import_pair(sandbox)
        assert read_all(home.token_sock) == access.encode() + b"\n", home.log()
        assert socket_inode(home.token_sock) == inode
        terminate(proc, home)


class TestReadiness:
    def test_ready_only_once_the_sockets_answer(
        self, home: Home, sandbox: SandboxServer, manager: Manager
    ) -> None:
        """At the moment READY=1 arrives, the control socket answers and the token is served."""
        access = home.import_pair(sandbox)
        home.start_daemon(NOTIFY_SOCKET=manager.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
        before = manager.until("READY=1", "the start", home.log)
        assert has(before, "READY=1") == 1
        # No wait from here: these fail with ENOENT if READY came before the listeners.
        answer = request(home.control, "status")
        assert answer["ok"] is True, answer
        assert [row["profile"] for row in answer["profiles"]] == ["default"]
        assert read_all(home.token_sock) == access.encode() + b"\n"

    def test_status_lines(
        self, home: Home, manager: Manager, notified: subprocess.Popen[bytes]
    ) -> None:
        """STATUS= lines say how many profiles are served, and no message carries a token."""
        statuses = [
            line for m in manager.seen for line in m.split("\n") if line.startswith("STATUS=")
        ]
        assert any(re.search(r"\b1 profile", line) for line in statuses), manager.seen
        ready = next(m for m in manager.seen if "READY=1" in m.split("\n"))
        assert any(line.startswith("STATUS=") for line in ready.split("\n"))
        assert [run for m in manager.seen for run in token_like_runs(m)] == []


class TestWatchdog:
    def test_pings_at_half_the_timeout(
        self, home: Home, manager: Manager, notified: subprocess.Popen[bytes]
    ) -> None:
        """With WATCHDOG_USEC=1000000 the daemon sends WATCHDOG=1 about every 0.5 s."""
        pings = has(manager.during(COUNT_WINDOW), "WATCHDOG=1")
        assert 3 <= pings <= 10, f"{pings} pings in {COUNT_WINDOW} s\n{home.log()}"

    def test_no_pings_for_another_process(
        self, home: Home, sandbox: SandboxServer, manager: Manager
    ) -> None:
        """A WATCHDOG_PID naming another process means no pings, but READY=1 still comes."""
        home.import_pair(sandbox)
        home.start_daemon(
            NOTIFY_SOCKET=manager.path, WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID="1"
        )
        manager.until("READY=1", "the start", home.log)
        assert has(manager.during(COUNT_WINDOW / 2), "WATCHDOG=1") == 0
        assert has(manager.seen, "WATCHDOG=1") == 0


class TestReload:
    def _reloaded(self, manager: Manager, what: str, home: Home) -> None:
        got = manager.until("READY=1", what, home.log)
        reloading = [m for m in got if "RELOADING=1" in m.split("\n")]
        assert reloading, f"READY=1 without RELOADING=1 before it: {got}"
        assert re.search(r"^MONOTONIC_USEC=\d+$", reloading[0], re.M), reloading[0]

    def test_reload_command(
        self, home: Home, manager: Manager, notified: subprocess.Popen[bytes]
    ) -> None:
        """`aac-tokend reload` makes the daemon send RELOADING=1, then READY=1."""
        done = home.cli("reload")
        assert done.returncode == 0, done.stderr
        self._reloaded(manager, "aac-tokend reload", home)

    def test_sighup(self, home: Home, manager: Manager, notified: subprocess.Popen[bytes]) -> None:
        """SIGHUP makes the daemon send RELOADING=1, then READY=1, and keep running."""
        notified.send_signal(signal.SIGHUP)
        self._reloaded(manager, "SIGHUP", home)
        assert notified.poll() is None
        assert request(home.control, "status")["ok"] is True


class TestStop:
    def test_sigterm(self, home: Home, manager: Manager, notified: subprocess.Popen[bytes]) -> None:
        """SIGTERM makes the daemon send STOPPING=1 and exit 0 within 2 s."""
        sent = time.monotonic()
        notified.send_signal(signal.SIGTERM)
        manager.until("STOPPING=1", "SIGTERM", home.log)
        left = sent + STOP_LIMIT - time.monotonic()
        try:
            status = notified.wait(timeout=max(left, 0.0))
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_LIMIT} s after SIGTERM\n{home.log()}")
        assert status == 0, home.log()


class TestChildEnvironment:
    def test_courier_inherits_no_manager_variables(
        self, home: Home, sandbox: SandboxServer, manager: Manager
    ) -> None:
        """A courier's environment has no NOTIFY_SOCKET/WATCHDOG_*/LISTEN_*; pings go on."""
        home.import_pair(sandbox)
        proc = home.start(
            [sys.executable, "-c", SPAWN_DAEMON],
            home.env(NOTIFY_SOCKET=manager.path, WATCHDOG_USEC=str(WATCHDOG_USEC)),
        )
        manager.until("READY=1", "the start", home.log)
        sandbox.set_answer_delay(3.0)  # keeps the courier alive while we read its environment
        refresh = subprocess.Popen(
            [sys.executable, "-m", "aac_tokend", "refresh"],
            env=home.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        home.procs.append(refresh)
        pid, env = wait_for("a spawned courier", lambda: find_courier(home), home.log)
        assert pid != proc.pid
        assert sorted(set(MANAGER_VARIABLES) & set(env)) == []
        _, err = refresh.communicate(timeout=TIMEOUT)
        assert refresh.returncode == 0, err
        # The daemon unset the variables, yet still notifies its manager.
        assert has(manager.during(1.5), "WATCHDOG=1") >= 1, home.log()
        proc.send_signal(signal.SIGTERM)
        manager.until("STOPPING=1", "SIGTERM", home.log)
        assert proc.wait(timeout=TIMEOUT) == 0, home.log()
