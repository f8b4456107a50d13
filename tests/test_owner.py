"""The single-owner lock between real processes: a daemon, offline commands, dead holders."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.errors import AlreadyRunningError, BusyError, StorageError
from aac_tokend.refresh.courier import WAIT_SECONDS
from aac_tokend.store.files import hold_lock
from aac_tokend.store.owner import (
    DEAD_HOLDER_GRACE_SECONDS,
    LEGACY_LOCK_NAME,
    OFFLINE_HOLD_SECONDS,
    OwnerLock,
    holder,
)

#: A process holding the lock as the daemon (``daemon``) or as an offline command, for
#: ``seconds``; it prints one line once it holds it.
HOLDER = """
import sys, time
from pathlib import Path
from aac_tokend.store.owner import OwnerLock
lock = OwnerLock(Path(sys.argv[1]))
lock.acquire(record_pid=sys.argv[2] == "daemon")
print("held", flush=True)
time.sleep(float(sys.argv[3]))
"""


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / ".owner.lock"


def _hold(lock_path: Path, role: str, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_path), role, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _dead_daemon_recorded(lock_path: Path) -> int:
    """The lock file as a killed daemon leaves it: naming its pid, now dead."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path.write_text(f"{gone.pid}\n")
    return gone.pid


class TestOfflineHolder:
    """A daemon starting while an offline command holds the lock waits for it."""

    def test_daemon_waits_out_an_offline_command(
        self, lock_path: Path, holders: list[subprocess.Popen[str]]
    ) -> None:
        """Held longer than the dead-holder grace: the daemon takes over, never exit 3."""
        _dead_daemon_recorded(lock_path)
        seconds = DEAD_HOLDER_GRACE_SECONDS + 1.5
        holders.append(offline := _hold(lock_path, "offline", seconds))
        assert holder(lock_path) == (True, offline.pid)
        heard: list[int] = []
        started = time.monotonic()
        daemon = OwnerLock(lock_path)
        daemon.acquire(on_wait=heard.append)
        try:
            assert time.monotonic() - started > DEAD_HOLDER_GRACE_SECONDS
            assert heard == [offline.pid]
            assert holder(lock_path) == (False, os.getpid())
            assert lock_path.read_text() == f"{os.getpid()}\n"
        finally:
            daemon.release()

    def test_an_offline_command_held_too_long_is_busy_not_running(
        self, lock_path: Path, holders: list[subprocess.Popen[str]]
    ) -> None:
        """Past the bound: a one-line BusyError naming the command, not 'already running'."""
        holders.append(offline := _hold(lock_path, "offline", 30))
        with pytest.raises(BusyError) as busy:
            OwnerLock(lock_path, offline_wait=0.5).acquire()
        assert f"offline aac-tokend command (pid {offline.pid})" in str(busy.value)
        assert "\n" not in str(busy.value)

    def test_the_bound_covers_an_offline_remove(self) -> None:
        """An offline remove may wait a courier's whole bound for a profile's lock."""
        assert OFFLINE_HOLD_SECONDS > WAIT_SECONDS + 10


class TestDaemonHolder:
    """Only a live daemon makes a second one give up, at once, naming its pid."""

    def test_live_daemon_is_already_running(
        self, lock_path: Path, holders: list[subprocess.Popen[str]]
    ) -> None:
        """Exit 3's error, within a moment, with the running daemon's pid."""
        holders.append(running := _hold(lock_path, "daemon", 30))
        started = time.monotonic()
        with pytest.raises(AlreadyRunningError) as refused:
            OwnerLock(lock_path).acquire()
        assert refused.value.pid == running.pid and refused.value.exit_code == 3
        assert time.monotonic() - started < 2.0

    def test_offline_command_records_itself_over_a_dead_daemon(self, lock_path: Path) -> None:
        """The file names the offline command while it holds the lock, never a dead daemon."""
        dead = _dead_daemon_recorded(lock_path)
        assert holder(lock_path) == (False, dead)
        with OwnerLock(lock_path):
            assert holder(lock_path) == (True, os.getpid())
            assert lock_path.read_text() == f"offline {os.getpid()}\n"

    @pytest.mark.parametrize(
        "text", ["", "x\n", "offline\n", "offline x\n", "12 13\n", "-4\n", "0\n", "9" * 5000]
    )
    def test_unreadable_content_names_nobody(self, lock_path: Path, text: str) -> None:
        """Garbage in the lock file is no holder (the dead-holder grace applies)."""
        lock_path.parent.mkdir(parents=True)
        lock_path.write_text(text)
        assert holder(lock_path) is None


class TestLockFileParsing:
    """Whatever a lock file holds, reading it names a holder or nobody, never raises."""

    @settings(max_examples=200, deadline=None)
    @given(content=st.binary(max_size=64))
    def test_any_content(self, tmp_path_factory: pytest.TempPathFactory, content: bytes) -> None:
        """Bytes of any kind: None, or (offline, pid) with a pid kill() can take."""
        path = tmp_path_factory.mktemp("lock") / "daemon.lock"
        path.write_bytes(content)
        named = holder(path)
        assert named is None or (isinstance(named[0], bool) and 0 < named[1] < 2**31)

    @given(pid=st.integers(min_value=1, max_value=2**22), offline=st.booleans())
    def test_what_we_write_reads_back(
        self, tmp_path_factory: pytest.TempPathFactory, pid: int, offline: bool
    ) -> None:
        """The two forms a holder writes (tails of a longer earlier line after them) round-trip."""
        path = tmp_path_factory.mktemp("lock") / "daemon.lock"
        path.write_text(("offline " if offline else "") + f"{pid}\n" + "offline 99999\n")
        assert holder(path) == (offline, pid)


class TestLockFileNotRegular:
    """Something other than a regular file at the lock path is a one-line StorageError."""

    @pytest.mark.parametrize("kind", ["fifo", "directory"])
    def test_refused(self, lock_path: Path, kind: str) -> None:
        """A FIFO or directory there is refused by name before any pid is written."""
        lock_path.parent.mkdir(mode=0o700)
        if kind == "fifo":
            os.mkfifo(lock_path, 0o600)  # was "Illegal seek" from the pid record
        else:
            lock_path.mkdir()
        with pytest.raises(StorageError, match="not a regular file; move it aside") as info:
            OwnerLock(lock_path).acquire(record_pid=False)
        assert "\n" not in str(info.value)


class TestHolderNeverBlocks:
    """Reading who holds a lock never waits on what is planted there."""

    def test_a_fifo_at_the_old_lock_name_is_nobody(self, lock_path: Path) -> None:
        """A FIFO at daemon.lock (a profile's lock today) names no holder and does not hang."""
        lock_path.parent.mkdir(mode=0o700, exist_ok=True)
        os.mkfifo(lock_path.with_name(LEGACY_LOCK_NAME), 0o600)
        assert holder(lock_path.with_name(LEGACY_LOCK_NAME)) is None
        lock = OwnerLock(lock_path)
        lock.acquire()
        lock.release()


class TestUpgradeFrom010:
    """A 0.1.0 daemon, holding ``daemon.lock``, still owns the state directory."""

    def test_an_old_daemon_still_running_is_already_running(
        self, lock_path: Path, holders: list[subprocess.Popen[str]]
    ) -> None:
        """A new daemon and a new offline command both give up, naming the old daemon."""
        holders.append(old := _hold(lock_path.with_name(LEGACY_LOCK_NAME), "daemon", 30))
        with pytest.raises(AlreadyRunningError) as refused:
            OwnerLock(lock_path).acquire()
        assert refused.value.pid == old.pid
        with pytest.raises(AlreadyRunningError), OwnerLock(lock_path):
            pass

    def test_a_daemon_profiles_lock_is_no_old_daemon(self, lock_path: Path) -> None:
        """A ``daemon`` profile's lock, held, over a dead 0.1.0 daemon's pid, is no owner."""
        _dead_daemon_recorded(lock_path.with_name(LEGACY_LOCK_NAME))
        with hold_lock(lock_path.with_name(LEGACY_LOCK_NAME), 1.0):
            lock = OwnerLock(lock_path)
            lock.acquire()
            lock.release()
