"""A refresh outlives the daemon: SIGKILL at any instant loses no chain.

The referee is the sandbox's request log (what the server rotated, and which refresh token
each request presented), read by the test, never the daemon's own account. Daemons are real
``aac-tokend run`` processes killed with SIGKILL; couriers are found in /proc.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from aac_tokend.core.config import Config
from aac_tokend.core.importer import build_state, parse_import_text
from aac_tokend.core.policy import begin_attempt
from aac_tokend.core.report import CHECK_EXIT, StatusRow, check_rows
from aac_tokend.core.state import ProfileState, RejectionReason
from aac_tokend.core.tokens import token_hash
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.daemon.scheduling import SystemClock
from aac_tokend.refresh.courier import MAX_LIFE_SECONDS, ForkCourier, become_courier, disarm
from aac_tokend.refresh.endpoint import TOTAL_DEADLINE_SECONDS, TokenEndpoint
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.refresh.transaction import (
    LOCK_WAIT_SECONDS,
    SAVE_RETRY_SECONDS,
    CourierJob,
    carry,
)
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore, FileStoreSpec
from aac_tokend.testing import FailingFileLayer, FakeScheduler

from .crash_rig import Rig, chains, ignored_signals, proc_info, rotations, wait_for

#: Sandbox answer delay of the kill tests: the window between the server's rotation (logged
#: at once) and the courier's durable save is at least this wide, so a kill lands inside it.
ANSWER_DELAY = 0.4
#: Short access tokens so that the daemon's own schedule also rotates during the test.
ACCESS_TTL = 4.0


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=ACCESS_TTL, answer_delay=ANSWER_DELAY) as server:
        yield server


@pytest.fixture
def rig(sandbox: SandboxServer) -> Iterator[Rig]:
    rig = Rig(sandbox)
    try:
        yield rig
    finally:
        rig.close()


def _new_rotation(sandbox: SandboxServer, seen: int) -> dict[str, object] | None:
    done = rotations(sandbox.log())
    return done[seen] if len(done) > seen else None


def _single_chain(rig: Rig) -> None:
    """The profile's whole history is one unbroken chain, each refresh token sent once."""
    (chain,) = chains(rig.sandbox.log(), rig.first_rt_hashes["default"])
    assert not chain.lost, chain.entries
    assert chain.problems() == []


class TestDaemonKilledAtRotation:
    """SIGKILL of the daemon each time the server rotates: the courier finishes the job."""

    def test_twenty_kills_at_rotation_lose_no_chain(self, rig: Rig) -> None:
        """After each kill the restarted daemon serves the pair the killed one's courier got."""
        rig.import_profile()
        daemon = rig.start()
        rig.wait_ready(daemon)
        landed_in_window = 0
        for _ in range(20):
            seen = len(rotations(rig.sandbox.log()))
            rig.refresh_in_background()
            killed = wait_for("a rotation", partial(_new_rotation, rig.sandbox, seen))
            rig.kill(daemon)
            # The answer is still on its way: the new pair exists only in the courier.
            if rig.durable_rt_hash() != killed["new_rt_hash"]:
                landed_in_window += 1
            daemon = rig.start()
            token = rig.wait_token()
            state = rig.state()
            if len(rotations(rig.sandbox.log())) == seen + 1:  # no rotation since the kill
                assert token_hash(state.refresh_token or "") == killed["new_rt_hash"]
                assert token == state.access_token
            assert rig.api_accepts(token)
            assert state.rejection is None
        seen = len(rotations(rig.sandbox.log()))
        rig.refresh_in_background().join()
        wait_for("one more rotation", lambda: _new_rotation(rig.sandbox, seen))
        _single_chain(rig)
        assert landed_in_window >= 10, "the kills did not land between rotation and save"
        Rig.stop(daemon)


def _rejection(rig: Rig, profile: str = "default") -> dict[str, str] | None:
    """The rejection the running daemon reports for ``profile``, if any."""
    rows = rig.control("status")["profiles"]
    assert isinstance(rows, list)
    row = next(r for r in rows if r["profile"] == profile)
    rejection: dict[str, str] | None = row["rejection"]
    return rejection


class TestCourierKilledInWindow:
    """The one loss left: the courier itself killed between the server's answer and the save."""

    def test_loss_is_reported_after_lost_response(self, rig: Rig) -> None:
        """The journal marks the attempt ambiguous; the retry's invalid_grant is not reuse."""
        rig.import_profile()
        daemon = rig.start()
        rig.wait_ready(daemon)
        rig.refresh_in_background()
        couriers = wait_for("the courier", lambda: rig.couriers(daemon.pid))
        wait_for("the rotation", lambda: _new_rotation(rig.sandbox, 0))
        os.kill(couriers[0], signal.SIGKILL)
        report = wait_for("the daemon to report the rejection", lambda: _rejection(rig))
        assert report["reason"] == "after_lost_response"
        rejection = rig.state().rejection
        assert rejection is not None
        assert rejection.reason is RejectionReason.AFTER_LOST_RESPONSE
        log = rig.sandbox.log()
        assert [e["outcome"] for e in log] == ["rotated", "reuse_revoked"]
        assert log[1]["rt_hash"] == log[0]["rt_hash"]  # the retry presented the same token
        Rig.stop(daemon)


class TestRestartWhileCourierRuns:
    """A daemon started while the previous one's courier is finishing waits for it."""

    def test_new_daemon_starts_waits_and_never_resends(self, sandbox: SandboxServer) -> None:
        """It gets the owner lock at once, then reads the courier's durable outcome."""
        sandbox.set_answer_delay(2.0)
        rig = Rig(sandbox)
        try:
            rig.import_profile()
            first = rig.start()
            rig.wait_ready(first)
            rig.refresh_in_background()
            courier = wait_for("the courier", lambda: rig.couriers(first.pid))[0]
            killed = wait_for("the rotation", lambda: _new_rotation(sandbox, 0))
            rig.kill(first)
            second = rig.start()
            rig.wait_ready(second)  # the courier does not hold the single-owner lock
            assert proc_info(courier) is not None and proc_info(courier).state != "Z"  # type: ignore[union-attr]
            # Not served until it is done, yet listed: no valid token, the daemon will serve it.
            assert rig.control("profiles")["profiles"] == ["default"]
            (row,) = rig.control("status")["profiles"]  # type: ignore[misc]
            assert row["profile"] == "default" and row["state"] == "retrying"
            assert row["token_valid"] is False and row["alert"] is None
            assert row["token_socket"] == str(rig.paths.token_socket("default"))
            assert (
                check_rows([StatusRow.from_wire(row)], daemon_running=True)[0] == CHECK_EXIT["wait"]
            )
            token = rig.wait_token()
            assert token == rig.state().access_token
            assert rig.durable_rt_hash() == killed["new_rt_hash"], (
                sandbox.log(),
                rig.daemon_log()[-3000:],
            )
            assert "waiting_for_courier" in rig.daemon_log()
            sandbox.set_answer_delay(0.0)
            rig.refresh_in_background().join()
            log = sandbox.log()
            assert log[1]["rt_hash"] == killed["new_rt_hash"]
            hashes = [e["rt_hash"] for e in log]
            assert len(hashes) == len(set(hashes)) == 2
            _single_chain(rig)
            Rig.stop(second)
        finally:
            rig.close()


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while we looked
    return out


def _unix_socket_inodes() -> set[str]:
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return {f"socket:[{line.split()[6]}]" for line in lines if len(line.split()) > 6}


class TestCourierIsolation:
    """A courier is out of the daemon's reach: own session, deaf, no inherited descriptors."""

    @pytest.mark.parametrize("kind", ["fork", "spawn"])
    def test_courier_is_isolated_and_finishes_despite_signals(
        self, sandbox: SandboxServer, kind: str
    ) -> None:
        """TERM/INT/HUP do not stop it; it holds only its pipe of the daemon's descriptors."""
        rig = Rig(sandbox, courier=kind)
        try:
            rig.import_profile()
            daemon = rig.start()
            rig.wait_ready(daemon)
            daemon_fds = set(_fd_targets(daemon.pid).values())
            rig.refresh_in_background()
            courier = wait_for("the courier", lambda: rig.couriers(daemon.pid))[0]
            wait_for("the rotation", lambda: _new_rotation(sandbox, 0))
            assert os.getsid(courier) == courier != os.getsid(daemon.pid)
            assert {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= ignored_signals(courier)
            targets = _fd_targets(courier)
            pipes = [t for t in targets.values() if t.startswith("pipe:")]
            assert len(pipes) == (1 if kind == "fork" else 2)  # spawn: stdin and stdout
            shared = {t for t in targets.values() if t in daemon_fds} - {"/dev/null"}
            assert shared <= set(pipes), f"inherited from the daemon: {shared - set(pipes)}"
            assert not set(targets.values()) & _unix_socket_inodes()
            assert str(rig.paths.daemon_lock) not in targets.values()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                os.kill(courier, sig)
            killed = _new_rotation(sandbox, 0)
            assert killed is not None
            wait_for("the save", lambda: rig.durable_rt_hash() == killed["new_rt_hash"])
            wait_for("the courier's end", lambda: courier not in rig.couriers(daemon.pid))
            assert rig.state().rejection is None
            Rig.stop(daemon)
        finally:
            rig.close()


# -- the transaction in process ------------------------------------------------------------


@pytest.fixture
def quick_sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=60) as server:
        yield server


def _stored(sandbox: SandboxServer, store: FileStore, profile: str = "p") -> str:
    pair = sandbox.generate()
    request = parse_import_text(json.dumps(pair), profile=profile)
    request = dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
    store.save(build_state(request, time.time()))
    return str(pair["refresh_token"])


def _stored_state(sandbox: SandboxServer, store: FileStore) -> tuple[str, ProfileState]:
    """A new chain stored as profile p: its refresh token and the state as loaded back."""
    rt = _stored(sandbox, store)
    state = store.load("p")
    assert state is not None
    return rt, state


class TestCarry:
    """The transaction a courier carries, run in this process against the sandbox."""

    def test_steps_are_traced_in_order(self, quick_sandbox: SandboxServer, tmp_path: Path) -> None:
        """The trace hook hears journaled, answered, persisted: the window's two ends."""
        key = secrets.token_bytes(32)
        store = FileStore(tmp_path, key)
        rt = _stored(quick_sandbox, store)
        steps: list[str] = []
        result = carry(
            CourierJob("p", rt), store, TokenEndpoint(), time.time,
            trace=steps.append,
        )  # fmt: skip
        assert result == CourierResult(CourierKind.REFRESHED)
        assert steps == ["journaled", "answered", "persisted"]

    def test_stale_job_sends_nothing(self, quick_sandbox: SandboxServer, tmp_path: Path) -> None:
        """A job whose refresh token is no longer the stored one is dropped unsent."""
        key = secrets.token_bytes(32)
        store = FileStore(tmp_path, key)
        rt = _stored(quick_sandbox, store)
        job = CourierJob("p", rt)
        assert carry(job, store, TokenEndpoint(), time.time).kind is CourierKind.REFRESHED
        assert carry(job, store, TokenEndpoint(), time.time).kind is CourierKind.STATE_CHANGED
        assert len(quick_sandbox.log()) == 1

    def test_leftover_journal_makes_the_loss_after_lost_response(
        self, quick_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A journal left by a killed courier turns the retry's invalid_grant into a lost answer."""
        key = secrets.token_bytes(32)
        store = FileStore(tmp_path, key)
        rt = _stored(quick_sandbox, store)
        job = CourierJob("p", rt)

        def die_after_answer(step: str) -> None:
            if step == "answered":
                raise _CourierKilledError

        with pytest.raises(_CourierKilledError):
            carry(job, store, TokenEndpoint(), time.time, trace=die_after_answer)
        assert store.load("p").in_flight is not None  # type: ignore[union-attr]
        assert carry(job, store, TokenEndpoint(), time.time).kind is CourierKind.REJECTED
        state = store.load("p")
        assert state is not None and state.rejection is not None
        assert state.rejection.reason is RejectionReason.AFTER_LOST_RESPONSE
        assert [e["outcome"] for e in quick_sandbox.log()] == ["rotated", "reuse_revoked"]


class _CourierKilledError(Exception):
    """Stands for a SIGKILL at a given step of the transaction."""


class _StoreRefresher:
    """Carries each refresh in this thread through a given (failing) store."""

    def __init__(self, store: FileStore) -> None:
        self.store = store

    def refresh(self, job: CourierJob) -> CourierResult:
        return carry(job, self.store, TokenEndpoint(), time.time)


class TestJournalNotWritten:
    """A disk that refuses the journal: nothing is sent, and the daemon backs off."""

    def test_refusal_backs_off_and_is_reported(self, tmp_path: Path) -> None:
        """The retry is scheduled later, not at once (no spin), and status says why."""
        with SandboxServer(access_ttl=2) as sandbox:
            key = secrets.token_bytes(32)
            fs = FailingFileLayer()
            store = FileStore(tmp_path, key, fs=fs)
            _stored(sandbox, store)
            scheduler = FakeScheduler()
            engine = Engine(
                store=store, refresher=_StoreRefresher(store), scheduler=scheduler,
                clock=SystemClock(), config=Config(), alerter=Alerter([]),
                socket_path=lambda n: tmp_path / n,
            )  # fmt: skip
            engine.start()
            time.sleep(1.6)  # the 2 s token is now due for its refresh
            fs.failures = {"write": errno.EROFS}
            before = time.time()
            state = engine.refresh("p")
            assert sandbox.log() == []
            assert state.consecutive_failures == 1
            next_at = scheduler.next_at("p")
            assert next_at is not None and next_at >= before + 0.9  # backoff_first 2 s, jittered
            row = engine.status()[0]
            assert row.state == "retrying" and "EROFS" in str(row.last_error)
            fs.failures = {}
            assert engine.refresh("p").refresh_count == 1
            assert [e["outcome"] for e in sandbox.log()] == ["rotated"]

    def test_courier_dead_before_its_journal_backs_off(self, tmp_path: Path) -> None:
        """A courier that ends without an answer or a trace is retried later, not at once."""
        with SandboxServer(access_ttl=2) as sandbox:
            key = secrets.token_bytes(32)
            store = FileStore(tmp_path, key)
            _stored(sandbox, store)
            scheduler = FakeScheduler()
            engine = Engine(
                store=store, refresher=_DeadCourier(), scheduler=scheduler,
                clock=SystemClock(), config=Config(), alerter=Alerter([]),
                socket_path=lambda n: tmp_path / n,
            )  # fmt: skip
            engine.start()
            time.sleep(1.6)  # due
            before = time.time()
            assert engine.refresh("p").consecutive_failures == 1
            next_at = scheduler.next_at("p")
            assert next_at is not None and next_at >= before + 0.9
            assert engine.refresh("p").consecutive_failures == 2
            assert sandbox.log() == []


class _DeadCourier:
    """A courier that dies at once, before its journal (e.g. it cannot start)."""

    def refresh(self, job: CourierJob) -> CourierResult:
        return CourierResult(CourierKind.LOST, "the courier ended without an answer")


_GATEWAY_TIMEOUT_PAGE = "<html><body><h1>504 Gateway Time-out</h1></body></html>"


class TestGatewayVerdicts:
    """Through a real forked courier: a gateway's failure is never called a theft."""

    def test_gateway_504_after_rotation_is_after_lost_response(
        self, quick_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """The server rotates, the gateway answers 504: the retry's invalid_grant is ours."""
        key = secrets.token_bytes(32)
        store = FileStore(tmp_path, key)
        rt = _stored(quick_sandbox, store)
        job, courier = CourierJob("p", rt), ForkCourier(FileStoreSpec(str(tmp_path), key))
        quick_sandbox.fail_next(1, status=504, body=_GATEWAY_TIMEOUT_PAGE, forward=True)
        assert courier.refresh(job).kind is CourierKind.TRANSIENT
        assert quick_sandbox.log()[-1]["outcome"] == "failed_after_rotation"
        assert courier.refresh(job).kind is CourierKind.REJECTED
        state = store.load("p")
        assert state is not None and state.rejection is not None
        assert state.rejection.reason is RejectionReason.AFTER_LOST_RESPONSE
        assert [e["outcome"] for e in quick_sandbox.log()] == [
            "failed_after_rotation",
            "reuse_revoked",
        ]

    def test_server_error_once_and_the_chain_goes_on(
        self, quick_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A 400 server_error is a reason to try again, not the end of the chain."""
        key = secrets.token_bytes(32)
        store = FileStore(tmp_path, key)
        rt = _stored(quick_sandbox, store)
        job, courier = CourierJob("p", rt), ForkCourier(FileStoreSpec(str(tmp_path), key))
        quick_sandbox.fail_next(1, status=400, body='{"error": "server_error"}')
        assert courier.refresh(job).kind is CourierKind.TRANSIENT
        state = store.load("p")
        assert state is not None and state.rejection is None and state.consecutive_failures == 1
        assert courier.refresh(job).kind is CourierKind.REFRESHED
        state = store.load("p")
        assert state is not None and state.refresh_count == 1 and state.rejection is None


class _SlowSaveStore(FileStore):
    """A store whose save of an outcome (not of a journal) takes ``delay`` seconds."""

    def __init__(self, root: Path, key: bytes, delay: float) -> None:
        super().__init__(root, key)
        self.delay = delay

    def save(self, state: ProfileState) -> None:
        if state.in_flight is None:
            time.sleep(self.delay)
        super().save(state)


class TestAlarmSparesTheAnswer:
    """The courier's alarm bounds the wait for an answer, never the write after it."""

    def test_deadline_fits_the_life(self) -> None:
        """Lock wait, the request's one deadline and the saves fit well inside the alarm."""
        budget = LOCK_WAIT_SECONDS + TOTAL_DEADLINE_SECONDS + SAVE_RETRY_SECONDS
        assert budget + 5 <= MAX_LIFE_SECONDS

    def test_alarm_due_during_the_write_does_not_fire(
        self, quick_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A courier whose alarm falls between answer and save still saves the new pair."""
        key = secrets.token_bytes(32)
        rt = _stored(quick_sandbox, FileStore(tmp_path, key))
        job = CourierJob("p", rt)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                become_courier(life=1)
                store = _SlowSaveStore(tmp_path, key, delay=1.5)
                carry(job, store, TokenEndpoint(), time.time, on_answer=disarm)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status), f"the courier was killed by signal {os.WTERMSIG(status)}"
        state = FileStore(tmp_path, key).load("p")
        assert state is not None and state.refresh_count == 1 and state.in_flight is None


class TestGenerationFence:
    """A courier sends only if the stored state still has the generation its job names."""

    def test_a_late_courier_sends_nothing_under_a_retrys_journal(
        self, quick_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """Same token, but a retry journaled it since: STATE_CHANGED, nothing sent."""
        store = FileStore(tmp_path, secrets.token_bytes(32))
        rt, before = _stored_state(quick_sandbox, store)
        job = CourierJob("p", rt, generation=before.generation)
        store.save_journal(begin_attempt(before, time.time()))  # the retry, then a full disk
        result = carry(job, store, TokenEndpoint(), time.time)
        assert result.kind is CourierKind.STATE_CHANGED
        assert quick_sandbox.log() == []
        after = store.load("p")
        assert after is not None and after.in_flight is not None  # left for the daemon

    def test_a_job_built_from_the_journal_still_recovers_it(
        self, quick_sandbox: SandboxServer, tmp_path: Path
    ) -> None:
        """A courier that died after journaling: the next job, built from that state, goes."""
        store = FileStore(tmp_path, secrets.token_bytes(32))
        rt, before = _stored_state(quick_sandbox, store)
        journal = begin_attempt(before, time.time())
        store.save_journal(journal)
        job = CourierJob("p", rt, generation=journal.generation)
        assert carry(job, store, TokenEndpoint(), time.time).kind is CourierKind.REFRESHED
        after = store.load("p")
        assert after is not None and after.refresh_count == 1 and after.in_flight is None
        assert len(rotations(quick_sandbox.log())) == 1


#: A daemon out of descriptors asks its ForkCourier for a refresh; prints the result.
_OUT_OF_DESCRIPTORS = """
import os, resource, sys
from aac_tokend.refresh.courier import ForkCourier
from aac_tokend.refresh.transaction import CourierJob
from aac_tokend.store.files import FileStoreSpec
courier = ForkCourier(FileStoreSpec(sys.argv[1], b"k" * 32))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
sys.stdout.write(courier.refresh(CourierJob("p", "rt")).to_bytes().decode())
"""


class TestForkNotStarted:
    """A courier that cannot be forked is a typed result, not an exception."""

    def test_no_descriptor_for_the_pipe_is_not_started(self, tmp_path: Path) -> None:
        """os.pipe failing (EMFILE) comes back NOT_STARTED, naming the reason."""
        done = subprocess.run(
            [sys.executable, "-c", _OUT_OF_DESCRIPTORS, str(tmp_path)],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        result = CourierResult.from_bytes(done.stdout)
        assert result.kind is CourierKind.NOT_STARTED
        assert not result.kind.durable
        assert "could not be started" in result.detail and "Too many open files" in result.detail
