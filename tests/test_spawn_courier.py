"""The spawned courier (macOS default, forced here): a fresh interpreter and its warm spare.

Real processes against the real sandbox on loopback: couriers are ``python -P -m
aac_tokend.refresh.spawned`` children of this test process, looked at through /proc. Over 300
lines for one concern: each test spells out the processes it starts and what it reads.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aac_tokend.core.importer import build_state, parse_import_text
from aac_tokend.core.tokens import token_hash
from aac_tokend.refresh.endpoint import MAX_BODY_BYTES
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.refresh.spawn import (
    COURIER_MODULE,
    READY,
    SPARE_MAX_AGE_SECONDS,
    WAIT_MARGIN_SECONDS,
    SpawnCourier,
    courier_command,
    spawn_message,
)
from aac_tokend.refresh.transaction import CourierJob
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore, FileStoreSpec

from .crash_rig import ignored_signals, proc_info, wait_for

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

#: The sandbox holds each answer this long after logging the rotation: a courier is then
#: certainly carrying its job while the test looks at it or signals it.
ANSWER_DELAY = 1.0
#: Modules (and their submodules: the prefixes end in a dot) a refresh does not use;
#: importing one in the courier would cost every cold spawn.
NOT_FOR_A_REFRESH = tuple(
    f"{name}."
    for name in (
        "structlog",
        "apscheduler",
        "platformdirs",
        "argparse",
        "tzlocal",
        "asyncio",
        "aac_tokend.daemon",
        "aac_tokend.serve",
        "aac_tokend.service",
        "aac_tokend.commands",
        "aac_tokend.cli",
        "aac_tokend.host",
        "aac_tokend.sandbox",
        "aac_tokend.client",
        "aac_tokend.api",
    )
)
#: A spare let go (EOF on its stdin) ends at once; this only bounds a busy machine.
EXIT_TIMEOUT = 10.0

#: The ``courier_for`` fixture: a SpawnCourier whose couriers open the store of this spec.
CourierFor = Callable[[FileStoreSpec], SpawnCourier]


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=60) as server:
        yield server


@dataclasses.dataclass
class Profile:
    """One stored profile, the spec of its store (what its courier opens), and its job."""

    spec: FileStoreSpec
    store: FileStore
    name: str = "p"

    def job(self) -> CourierJob:
        state = self.store.load(self.name)
        assert state is not None and state.refresh_token is not None
        return CourierJob(self.name, state.refresh_token)

    def rt_hash(self) -> str:
        state = self.store.load(self.name)
        assert state is not None and state.refresh_token is not None
        return token_hash(state.refresh_token)

    def file_bytes(self) -> bytes:
        return self.store.path(self.name).read_bytes()


def _spec(directory: Path) -> FileStoreSpec:
    """A store in ``directory`` under a key of its own (nothing is created until opened)."""
    return FileStoreSpec(str(directory), secrets.token_bytes(32))


def _profile(sandbox: SandboxServer, spec: FileStoreSpec, name: str = "p") -> Profile:
    store = spec.open()
    request = parse_import_text(json.dumps(sandbox.generate()), profile=name)
    request = dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
    store.save(build_state(request, time.time()))
    return Profile(spec, store, name)


@pytest.fixture
def courier_for() -> Iterator[CourierFor]:
    """Builds a SpawnCourier for a store's spec; closes every one built after the test."""
    built: list[SpawnCourier] = []

    def build(spec: FileStoreSpec) -> SpawnCourier:
        built.append(SpawnCourier(spec))
        return built[-1]

    try:
        yield build
    finally:
        for spawner in built:
            spawner.close()


def _spare(courier: SpawnCourier) -> int:
    """The pid of the courier's waiting spare, started if there was none (it must start)."""
    spare = courier.prepare()
    assert spare is not None
    return spare


def _gone(pid: int) -> bool:
    info = proc_info(pid)
    return info is None or info.state in ("Z", "X")


def _reaped(pid: int) -> bool:
    """True if ``pid`` was our child and has been waited for (no zombie left)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def _our_couriers() -> list[int]:
    """Living children of this process running the courier module."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        info = proc_info(int(entry))
        if info is None or info.ppid != os.getpid() or info.state in ("Z", "X"):
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if COURIER_MODULE.encode() in cmdline.split(b"\0"):
            found.append(int(entry))
    return found


class _Background:
    """One refresh in a thread, so the test can look at the courier while it carries."""

    def __init__(self, courier: SpawnCourier, job: CourierJob) -> None:
        self.result: CourierResult | None = None
        self._thread = threading.Thread(target=self._run, args=(courier, job))
        self._thread.start()

    def _run(self, courier: SpawnCourier, job: CourierJob) -> None:
        self.result = courier.refresh(job)

    def join(self) -> CourierResult:
        self._thread.join(timeout=60)
        assert self.result is not None, "the refresh did not end"
        return self.result


class TestRefresh:
    """A spawned courier carries a refresh end to end, cold or from the spare."""

    def test_cold_courier_refreshes_and_saves_the_rotated_token(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """Without a spare, a fresh courier rotates the chain and the new pair is on disk."""
        profile = _profile(sandbox, _spec(tmp_path))
        with contextlib.closing(SpawnCourier(profile.spec, warm=False)) as cold:
            result = cold.refresh(profile.job())
        assert result.kind is CourierKind.REFRESHED, result.detail
        [entry] = sandbox.log()
        assert entry["outcome"] == "rotated"
        assert profile.rt_hash() == entry["new_rt_hash"]
        state = profile.store.load("p")
        assert state is not None and state.in_flight is None and state.refresh_count == 1
        assert _our_couriers() == []

    def test_the_spare_carries_the_job_and_is_replaced(
        self, sandbox: SandboxServer, tmp_path: Path, courier_for: CourierFor
    ) -> None:
        """The waiting spare takes the job; a new spare waits after the answer."""
        profile = _profile(sandbox, _spec(tmp_path))
        courier = courier_for(profile.spec)
        spare = _spare(courier)
        result = courier.refresh(profile.job())
        assert result.kind is CourierKind.REFRESHED, result.detail
        assert profile.rt_hash() == sandbox.log()[0]["new_rt_hash"]
        assert _reaped(spare)
        replacement = courier.prepare()
        assert replacement is not None and replacement != spare
        assert _our_couriers() == [replacement]

    def test_chain_goes_on_through_many_spares(
        self, sandbox: SandboxServer, tmp_path: Path, courier_for: CourierFor
    ) -> None:
        """Three refreshes in a row each rotate once, presenting the token the last saved."""
        profile = _profile(sandbox, _spec(tmp_path))
        courier = courier_for(profile.spec)
        spares = []
        for _ in range(3):
            pid = _spare(courier)
            spares.append(pid)
            assert courier.refresh(profile.job()).kind is CourierKind.REFRESHED
        log = sandbox.log()
        assert [e["outcome"] for e in log] == ["rotated"] * 3
        assert [e["rt_hash"] for e in log[1:]] == [e["new_rt_hash"] for e in log[:-1]]
        courier.close()
        assert all(_reaped(pid) for pid in spares)  # no zombie left behind

    def test_a_second_concurrent_refresh_spawns_cold(
        self, sandbox: SandboxServer, tmp_path: Path, courier_for: CourierFor
    ) -> None:
        """Two refreshes at once: one takes the spare, one spawns; one spare waits after."""
        spec = _spec(tmp_path)  # one store of two profiles, as a daemon has
        first, second = _profile(sandbox, spec, "a"), _profile(sandbox, spec, "b")
        courier = courier_for(spec)
        assert courier.prepare() is not None
        sandbox.set_answer_delay(ANSWER_DELAY)
        runs = [_Background(courier, first.job()), _Background(courier, second.job())]
        assert [run.join().kind for run in runs] == [CourierKind.REFRESHED] * 2
        assert len(sandbox.log()) == 2
        assert courier.prepare() is not None
        assert len(_our_couriers()) == 1


class TestSpare:
    """The spare waits deaf and bound to its daemon; it is let go, aged out and reaped."""

    def test_spare_exits_when_its_parent_dies_and_touches_nothing(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """SIGKILL of the daemon: its spare reads EOF and exits; no request, no write."""
        profile = _profile(sandbox, _spec(tmp_path))
        before = profile.file_bytes()
        files = sorted(tmp_path.iterdir())
        parent = subprocess.Popen(
            [sys.executable, "-c",
             "import json, sys\n"
             "from aac_tokend.refresh.spawn import SpawnCourier\n"
             "from aac_tokend.store.files import FileStoreSpec\n"
             "spec = FileStoreSpec.from_dict(json.loads(sys.stdin.readline()))\n"
             "print(SpawnCourier(spec).prepare(), flush=True)\n"
             "sys.stdin.read()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert parent.stdin is not None and parent.stdout is not None
            parent.stdin.write(json.dumps(profile.spec.to_dict()).encode() + b"\n")
            parent.stdin.flush()
            spare = int(parent.stdout.readline())
            assert not _gone(spare)
        finally:
            parent.kill()
            parent.wait()
        wait_for("the spare's exit", lambda: _gone(spare), EXIT_TIMEOUT)
        assert sandbox.log() == []
        assert profile.file_bytes() == before
        assert sorted(tmp_path.iterdir()) == files

    def test_close_lets_the_spare_go(self, tmp_path: Path, courier_for: CourierFor) -> None:
        """close() ends a waiting spare through EOF and reaps it."""
        courier = courier_for(_spec(tmp_path))
        spare = _spare(courier)
        courier.close()
        assert _reaped(spare)

    def test_spare_waits_in_its_own_session_deaf_to_signals(
        self, sandbox: SandboxServer, tmp_path: Path, courier_for: CourierFor
    ) -> None:
        """TERM/INT/HUP while waiting do not end it: it still carries the next refresh."""
        profile = _profile(sandbox, _spec(tmp_path))
        courier = courier_for(profile.spec)
        spare = _spare(courier)
        assert os.getsid(spare) == spare != os.getsid(0)
        assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= ignored_signals(spare)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(spare, sig)
        time.sleep(0.2)
        assert not _gone(spare)
        assert courier.refresh(profile.job()).kind is CourierKind.REFRESHED
        assert _reaped(spare)

    def test_spare_ignores_signals_while_carrying_a_job(
        self, sandbox: SandboxServer, tmp_path: Path, courier_for: CourierFor
    ) -> None:
        """TERM/HUP/INT after the server rotated: the rotated pair is still saved."""
        profile = _profile(sandbox, _spec(tmp_path))
        courier = courier_for(profile.spec)
        spare = _spare(courier)
        sandbox.set_answer_delay(ANSWER_DELAY)
        run = _Background(courier, profile.job())
        wait_for("the rotation", sandbox.log)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            os.kill(spare, sig)
        assert run.join().kind is CourierKind.REFRESHED
        assert profile.rt_hash() == sandbox.log()[0]["new_rt_hash"]

    def test_a_dead_spare_is_reaped_and_the_refresh_goes_cold(
        self, sandbox: SandboxServer, tmp_path: Path, courier_for: CourierFor
    ) -> None:
        """A spare killed while waiting is not handed the job: a cold courier carries it."""
        profile = _profile(sandbox, _spec(tmp_path))
        courier = courier_for(profile.spec)
        spare = _spare(courier)
        os.kill(spare, signal.SIGKILL)
        wait_for("the spare's death", lambda: _gone(spare), EXIT_TIMEOUT)
        assert courier.refresh(profile.job()).kind is CourierKind.REFRESHED
        assert profile.rt_hash() == sandbox.log()[0]["new_rt_hash"]
        assert _reaped(spare)

    def test_an_old_spare_is_let_go_on_the_refresh_path(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A spare older than the age limit is not used (old code); the refresh still goes."""
        profile = _profile(sandbox, _spec(tmp_path))
        now = [1_000_000.0]
        with contextlib.closing(SpawnCourier(profile.spec, clock=lambda: now[0])) as spawner:
            old = _spare(spawner)
            now[0] += SPARE_MAX_AGE_SECONDS + 1
            assert spawner.refresh(profile.job()).kind is CourierKind.REFRESHED
            wait_for("the old spare's end", lambda: _gone(old), EXIT_TIMEOUT)
            assert spawner.prepare() not in (None, old)
        assert _reaped(old)

    def test_the_keeper_replaces_an_aging_spare_without_a_refresh(self, tmp_path: Path) -> None:
        """Between refreshes the keeper thread lets an old spare go and starts a new one."""
        with contextlib.closing(SpawnCourier(_spec(tmp_path), max_age=1.0)) as spawner:
            old = _spare(spawner)
            wait_for("the old spare's end", lambda: _gone(old), EXIT_TIMEOUT)
            assert spawner.prepare() not in (None, old)


@linux_only
class TestIsolation:
    """Nothing secret reaches argv or the environment; nothing of ours but the pipes."""

    def test_job_is_never_in_cmdline_or_environ(
        self, sandbox: SandboxServer, tmp_path: Path, courier_for: CourierFor
    ) -> None:
        """While the spare carries its job, its argv and environment hold neither the
        refresh token nor the store's key (both travel on stdin)."""
        profile = _profile(sandbox, _spec(tmp_path))
        courier = courier_for(profile.spec)
        job, key = profile.job(), profile.spec.key
        spare = _spare(courier)
        sandbox.set_answer_delay(ANSWER_DELAY)
        run = _Background(courier, job)
        wait_for("the rotation", sandbox.log)
        cmdline = Path(f"/proc/{spare}/cmdline").read_bytes()
        environ = Path(f"/proc/{spare}/environ").read_bytes()
        assert run.join().kind is CourierKind.REFRESHED
        assert cmdline.split(b"\0")[:-1] == [arg.encode() for arg in courier_command()]
        secrets_ = (job.refresh_token.encode(), key, base64.b64encode(key), key.hex().encode())
        for secret in secrets_:
            assert secret not in cmdline
            assert secret not in environ

    def test_spare_holds_only_its_pipes(self, tmp_path: Path, courier_for: CourierFor) -> None:
        """A listening socket and an open file of the daemon do not reach the spare."""
        courier = courier_for(_spec(tmp_path))
        with socket.socket(socket.AF_UNIX) as listener, open(tmp_path / "f", "wb") as held:
            listener.bind(str(tmp_path / "s"))
            listener.listen()
            spare = _spare(courier)
            fds = {int(fd): os.readlink(f"/proc/{spare}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{spare}/fd")}  # fmt: skip
            assert held.fileno() >= 0
        assert sorted(fds) == [0, 1, 2]
        assert fds[0].startswith("pipe:") and fds[1].startswith("pipe:")
        assert fds[2] == "/dev/null"


class TestImports:
    """The courier imports what one refresh needs and nothing of the daemon."""

    def test_a_refresh_imports_nothing_heavy_it_does_not_use(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A courier run under -X importtime, through a real refresh, lists none of them."""
        profile = _profile(sandbox, _spec(tmp_path))
        command = courier_command()
        done = subprocess.run(
            [command[0], "-X", "importtime", *command[1:]],
            input=spawn_message(profile.spec, profile.job()), capture_output=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith(READY)
        result = CourierResult.from_bytes(done.stdout[len(READY) :])
        assert result.kind is CourierKind.REFRESHED, result.detail
        lines = done.stderr.decode().splitlines()
        names = {
            line.split("|")[-1].strip() + "." for line in lines if line.startswith("import time:")
        }
        assert {"requests.", "cryptography.", "aac_tokend.refresh.endpoint."} <= names  # parsed
        unused = [n for n in names if n.startswith(NOT_FOR_A_REFRESH)]
        assert sorted(unused) == []


def _ended(pid: int) -> bool:
    """True once ``pid`` has ended and been reaped by its parent (no zombie left)."""
    return proc_info(pid) is None


def _cold_run(message: bytes) -> CourierResult:
    """A cold courier given ``message`` on stdin, run to its end; its answer."""
    done = subprocess.run(courier_command(), input=message, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(READY)
    return CourierResult.from_bytes(done.stdout[len(READY) :])


@linux_only
class TestDeadline:
    """A courier's bound counts from the handover: late, it sends nothing."""

    def test_a_spare_stopped_with_its_job_sends_nothing_after_the_daemon_gave_up(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """SIGSTOP before it reads its job, LOST, SIGCONT: the spare sends nothing."""
        profile = _profile(sandbox, _spec(tmp_path))
        before = profile.file_bytes()
        with contextlib.closing(SpawnCourier(profile.spec, life=1.0)) as spawner:
            spare = _spare(spawner)
            os.kill(spare, signal.SIGSTOP)
            started = time.monotonic()
            result = spawner.refresh(profile.job())
            assert result.kind is CourierKind.LOST
            assert time.monotonic() - started >= 1.0 + WAIT_MARGIN_SECONDS  # the bound, and more
            os.kill(spare, signal.SIGCONT)
            wait_for("the old spare's end", lambda: _ended(spare), EXIT_TIMEOUT)
        assert sandbox.log() == []
        assert profile.file_bytes() == before

    def test_a_courier_stopped_when_its_alarm_comes_due_ends_on_sigcont(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """Stopped while waiting for the lock, past its deadline, then resumed with the lock
        free: SIGALRM ends it before it runs any code; nothing is sent or written."""
        profile = _profile(sandbox, _spec(tmp_path))
        before = profile.file_bytes()
        with contextlib.closing(SpawnCourier(profile.spec, life=3.0)) as spawner:
            spare = _spare(spawner)
            with profile.store.locked(profile.name, 10):
                run = _Background(spawner, profile.job())
                time.sleep(1.5)  # the spare reads its job, arms its alarm, waits for the lock
                os.kill(spare, signal.SIGSTOP)
                time.sleep(2.5)  # its deadline passes while it is stopped
            os.kill(spare, signal.SIGCONT)  # the lock is free now
            result = run.join()
        assert result.kind is CourierKind.LOST
        assert result.detail == "the courier ended without an answer"
        assert sandbox.log() == []
        assert profile.file_bytes() == before

    def test_a_job_read_past_its_deadline_is_not_started(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A message whose deadline has passed: NOT_STARTED, no request, no write."""
        profile = _profile(sandbox, _spec(tmp_path))
        before = profile.file_bytes()
        message = spawn_message(profile.spec, profile.job(), time.monotonic() - 0.1)
        result = _cold_run(message)
        assert result.kind is CourierKind.NOT_STARTED, result.detail
        assert sandbox.log() == []
        assert profile.file_bytes() == before


class TestNotStarted:
    """A courier that cannot be started is a typed result the engine counts."""

    def test_a_missing_interpreter_is_not_started(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """The venv's interpreter gone: NOT_STARTED with the reason, nothing sent."""
        profile = _profile(sandbox, _spec(tmp_path))
        gone = str(tmp_path / "venv" / "bin" / "python")
        for warm in (False, True):
            with contextlib.closing(
                SpawnCourier(profile.spec, warm=warm, interpreter=gone)
            ) as spawner:
                result = spawner.refresh(profile.job())
            assert result.kind is CourierKind.NOT_STARTED
            assert "could not be started" in result.detail and gone in result.detail
        assert sandbox.log() == []


class TestMessage:
    """The message to a spawned courier holds any job the endpoint can give."""

    def test_a_token_as_long_as_an_answer_reaches_the_courier(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A refresh token of a whole answer's bytes, each escaped to six: read whole."""
        profile = _profile(sandbox, _spec(tmp_path))
        job = CourierJob(profile.name, "\x7f" * MAX_BODY_BYTES)  # \u007f in the message
        message = spawn_message(profile.spec, job)
        assert len(message) > 6 * MAX_BODY_BYTES
        result = _cold_run(message)
        # Read and parsed: the stored token differs, so nothing is sent (not LOST).
        assert result.kind is CourierKind.STATE_CHANGED, result.detail
        assert sandbox.log() == []


@linux_only
class TestKeeper:
    """The keeper replaces a spare that died, and reaps couriers let go at once."""

    def test_the_keeper_replaces_a_dead_spare(self, tmp_path: Path) -> None:
        """A spare killed while waiting is reaped and replaced without a refresh."""
        with contextlib.closing(SpawnCourier(_spec(tmp_path), tick=0.5)) as spawner:
            spare = _spare(spawner)
            os.kill(spare, signal.SIGKILL)
            wait_for("the dead spare reaped", lambda: _ended(spare), EXIT_TIMEOUT)
            wait_for("a new spare", lambda: [p for p in _our_couriers() if p != spare])
            assert spawner.prepare() not in (None, spare)

    def test_a_spare_let_go_is_reaped_within_seconds(self, tmp_path: Path) -> None:
        """An aged spare let go leaves no zombie for a whole keeper tick."""
        now = [1_000_000.0]
        with contextlib.closing(SpawnCourier(_spec(tmp_path), clock=lambda: now[0])) as spawner:
            old = _spare(spawner)
            now[0] += SPARE_MAX_AGE_SECONDS + 1
            new = spawner.prepare()  # lets the old one go
            assert new not in (None, old)
            wait_for("the old spare reaped", lambda: _ended(old), 5.0)


@linux_only
class TestWorkingDirectory:
    """The courier runs none of the code in the daemon's working directory."""

    def test_a_module_planted_in_the_cwd_is_not_imported(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A netrc.py beside the daemon (the courier imports netrc) is never run."""
        profile = _profile(sandbox, _spec(tmp_path / "store"))
        planted, marker = tmp_path / "cwd", tmp_path / "ran"
        planted.mkdir()
        (planted / "netrc.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        here = os.getcwd()
        os.chdir(planted)
        try:
            with contextlib.closing(SpawnCourier(profile.spec)) as spawner:
                spare = _spare(spawner)
                assert os.readlink(f"/proc/{spare}/cwd") == "/"
                assert spawner.refresh(profile.job()).kind is CourierKind.REFRESHED
        finally:
            os.chdir(here)
        assert not marker.exists()


@linux_only
class TestDeafFromTheStart:
    """A cold courier holds its job from its first instant: no signal ends it then."""

    def test_sigterm_during_the_imports_does_not_end_a_cold_courier(
        self, sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """SIGTERM sent again and again from the moment it exists: the refresh goes."""
        profile = _profile(sandbox, _spec(tmp_path))
        with contextlib.closing(SpawnCourier(profile.spec, warm=False)) as spawner:
            run = _Background(spawner, profile.job())
            hit = set()
            deadline = time.monotonic() + 30
            while run.result is None and time.monotonic() < deadline:
                for pid in _our_couriers():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                        hit.add(pid)
                time.sleep(0.002)
            result = run.join()
        assert hit, "the courier was never seen"
        assert result.kind is CourierKind.REFRESHED, result.detail
        assert profile.rt_hash() == sandbox.log()[0]["new_rt_hash"]
