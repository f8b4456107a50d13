"""The pending pair: a rotated state the state disk refused survives the daemon (issue 11, 12).

Real files, the real courier transaction, the loopback sandbox, and for the kill a real
process SIGKILLed while it holds the only copy on a failing state disk.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aac_tokend.core.config import Config
from aac_tokend.core.importer import build_state, parse_import_text
from aac_tokend.core.policy import begin_attempt
from aac_tokend.core.state import ProfileState
from aac_tokend.core.tokens import token_hash
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.daemon.scheduling import SystemClock
from aac_tokend.errors import StorageError
from aac_tokend.refresh.courier import InProcessRefresher
from aac_tokend.refresh.endpoint import TokenEndpoint
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.refresh.transaction import CourierJob, carry
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore, load_or_create_key
from aac_tokend.store.pending import PendingStore, follows
from aac_tokend.testing import FailingFileLayer, FakeScheduler, oauth_state
from tests.helpers_e2e import E2EHome, RecordingSandbox, import_pair


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(access_ttl=600) as server:
        yield server


def _engine(store: FileStore, pending: PendingStore, key: bytes, **kwargs: object) -> Engine:
    store.pending_store = pending  # the store keeps refused pairs there from now on
    # By default a courier's own: a plain store on the same directories, in this thread.
    plain = InProcessRefresher(FileStore(store.state_dir, key, pending=pending))
    engine = Engine(
        store=store,
        refresher=kwargs.pop("refresher", plain),  # type: ignore[arg-type]
        scheduler=FakeScheduler(),
        clock=SystemClock(),
        config=Config(),
        alerter=Alerter([]),
        socket_path=lambda name: store.state_dir / f"{name}.token.sock",
    )
    engine.start()
    return engine


def _import(sandbox: SandboxServer, store: FileStore, profile: str = "work") -> ProfileState:
    request = parse_import_text(json.dumps(sandbox.generate()), profile=profile)
    request = dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
    state = build_state(request, time.time())
    store.save(state)
    return state


def _journal_and_successor(store: FileStore) -> tuple[ProfileState, ProfileState]:
    """A state file holding a refresh's journal, and that refresh's (unsaved) outcome."""
    journal = begin_attempt(oauth_state(), time.time())
    store.save(journal)
    successor = journal.bumped(
        in_flight=None, access_token="access-after-rotation", refresh_token="refresh-after"
    )
    return journal, successor


class TestPendingStore:
    """The pending record's file: private, atomic, and readable only with the state key."""

    def test_round_trip_private_and_atomic(self, root: Path) -> None:
        """A kept record reads back; it is 0600 in a 0700 directory; no temp file remains."""
        pending = PendingStore(root / "run" / "pending")
        pending.put("work", b"sealed-bytes")
        assert pending.get("work") == b"sealed-bytes"
        assert stat.S_IMODE(os.stat(pending.path("work")).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(pending.directory).st_mode) == 0o700
        assert sorted(os.listdir(pending.directory)) == ["work.pending"]
        pending.clear("work")
        assert pending.get("work") is None
        pending.clear("work")  # clearing nothing is fine

    def test_failed_write_is_one_line_and_leaves_nothing(self, root: Path) -> None:
        """A failing write raises a one-line StorageError and leaves no temp file behind."""
        fs = FailingFileLayer(failures={"fsync": errno.EIO})
        pending = PendingStore(root / "pending", fs)
        with pytest.raises(StorageError) as info:
            pending.put("work", b"sealed")
        assert "\n" not in str(info.value) and "pending" in str(info.value)
        assert os.listdir(root / "pending") == []


class TestCourierKeepsThePair:
    """The courier, which outlives the daemon, keeps the refused pair before it reports."""

    def test_refused_outcome_is_kept_encrypted(
        self, root: Path, key: bytes, sandbox: SandboxServer
    ) -> None:
        """The pending record decrypts (profile authenticated) to the pair the server issued."""
        fs = FailingFileLayer()
        pending = PendingStore(root / "run")
        store = FileStore(root / "state", key, fs, pending=pending)
        state = _import(sandbox, store)
        assert state.refresh_token is not None

        def step(name: str) -> None:
            if name == "journaled":
                fs.failures = {"write": errno.ENOSPC}

        job = CourierJob("work", state.refresh_token)
        result = carry(job, store, TokenEndpoint(), time.time, trace=step)
        assert result.kind is CourierKind.STORAGE_FAILED and result.unsaved is not None
        blob = pending.get("work")
        assert blob == result.unsaved
        held = store.unseal("work", blob)
        assert held.refresh_token is not None
        assert token_hash(held.refresh_token) == sandbox.log()[-1]["new_rt_hash"]
        assert b"refresh" not in blob and held.refresh_token.encode() not in blob


class TestAdoption:
    """At start the daemon adopts a pending record only if it follows the state file."""

    def test_pending_outcome_of_the_journal_wins(self, root: Path, key: bytes) -> None:
        """A journal on disk plus its outcome pending: the outcome is saved, served, cleared."""
        store, pending = FileStore(root / "state", key), PendingStore(root / "run")
        _journal, successor = _journal_and_successor(store)
        pending.put("work", store.seal(successor))
        engine = _engine(store, pending, key)
        assert engine.current_token("work") == b"access-after-rotation"
        assert store.load("work") == successor
        assert pending.get("work") is None

    def test_state_file_that_moved_on_wins(self, root: Path, key: bytes) -> None:
        """A state file without the journal (saved late, imported anew) wins; the record goes."""
        store, pending = FileStore(root / "state", key), PendingStore(root / "run")
        _journal, successor = _journal_and_successor(store)
        fresh = oauth_state(access_token="freshly-imported-access")
        store.save(fresh)
        pending.put("work", store.seal(successor))
        engine = _engine(store, pending, key)
        assert engine.current_token("work") == b"freshly-imported-access"
        assert store.load("work") == fresh and pending.get("work") is None

    def test_still_failing_disk_holds_the_pending_pair(self, root: Path, key: bytes) -> None:
        """If the disk still refuses it, the pair is served, kept, and saved once it heals."""
        fs = FailingFileLayer()
        store, pending = FileStore(root / "state", key, fs), PendingStore(root / "run")
        journal, successor = _journal_and_successor(store)
        pending.put("work", store.seal(successor))
        fs.failures = {"rename": errno.EIO}
        engine = _engine(store, pending, key)
        assert engine.current_token("work") == b"access-after-rotation"
        assert engine.status()[0].alert and pending.get("work") is not None
        assert engine.refresh("work").generation == successor.generation  # nothing is spent
        fs.failures = {}
        engine.tick()
        assert store.load("work") == successor and pending.get("work") is None
        assert journal.in_flight is not None

    def test_import_drops_an_old_chains_record(
        self, root: Path, key: bytes, sandbox: SandboxServer
    ) -> None:
        """Importing a new pair removes the pending record of the chain it replaces."""
        store, pending = FileStore(root / "state", key), PendingStore(root / "run")
        engine = _engine(store, pending, key)
        pending.put("work", b"an old chain's pair")
        request = parse_import_text(json.dumps(sandbox.generate()), profile="work")
        engine.import_profile(dataclasses.replace(request, token_endpoint=sandbox.token_endpoint))
        assert pending.get("work") is None


class _UnclearablePending(PendingStore):
    """A pending directory whose records cannot be removed (EACCES, EIO on unlink)."""

    def clear(self, profile: str) -> None:
        raise StorageError(
            f"cannot remove the pending state {self.path(profile)}: Permission denied"
        )


def _old_chain_at(store: FileStore, generation: int) -> ProfileState:
    """An old chain's state file, rotated until ``generation``; no journal on it."""
    state = oauth_state()
    for n in range(generation):
        state = state.bumped(refresh_token=f"old-chain-refresh-{n}", spent_rt_hashes=(f"{n:016x}",))
    store.save(state)
    return state


class TestStaleRecordAfterImport:
    """An old chain's pending record never replaces a newer import, whatever it survived."""

    def test_follows_only_the_journal_of_the_token_it_spent(self, root: Path, key: bytes) -> None:
        """A newer generation is not enough: the disk's journal must name a token held spent."""
        store = FileStore(root / "state", key)
        journal, successor = _journal_and_successor(store)
        assert follows(successor, journal)
        other = begin_attempt(oauth_state(refresh_token="another-chain-refresh"), time.time())
        assert other.generation < successor.generation
        assert not follows(successor, other)

    def test_an_import_continues_the_generation(
        self, root: Path, key: bytes, sandbox: SandboxServer
    ) -> None:
        """Through the daemon, an import's state is newer than any version known before it."""
        store = FileStore(root / "state", key)
        _old_chain_at(store, 5)
        engine = _engine(store, PendingStore(root / "run"), key)
        request = parse_import_text(json.dumps(sandbox.generate()), profile="work")
        engine.import_profile(dataclasses.replace(request, token_endpoint=sandbox.token_endpoint))
        loaded = store.load("work")
        assert loaded is not None and loaded.generation == 6

    def test_a_record_left_behind_loses_to_the_new_chains_journal(
        self, root: Path, key: bytes, sandbox: SandboxServer
    ) -> None:
        """Import over a record that could not be removed, journal, restart: the import stays."""
        store = FileStore(root / "state", key)
        old = _old_chain_at(store, 3)
        stale = old.bumped(refresh_token="old-chain-successor", access_token="old-chain-access")
        pending = _UnclearablePending(root / "run")
        pending.put("work", store.seal(stale))
        engine = _engine(store, pending, key)  # drops the record, which stays on disk
        request = parse_import_text(json.dumps(sandbox.generate()), profile="work")
        imported = engine.import_profile(
            dataclasses.replace(request, token_endpoint=sandbox.token_endpoint)
        )
        assert imported.generation > stale.generation
        assert pending.get("work") is not None
        store.save(begin_attempt(imported, time.time()))  # a courier killed after its journal
        restarted = _engine(store, PendingStore(root / "run"), key)
        held = store.load("work")
        assert held is not None and held.refresh_token == imported.refresh_token
        assert restarted.current_token("work") != b"old-chain-access"
        assert PendingStore(root / "run").get("work") is None


class TestOfflineCommands:
    """Without a daemon, import and remove drop the profile's pending record too."""

    def test_offline_import_continues_and_drops_the_record(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """The import is newer than the record, which is gone after it."""
        sandbox = sandboxes()
        store = FileStore(home.paths.state_dir, load_or_create_key(home.paths.config_dir))
        pending = PendingStore(home.paths.pending_dir)
        old = _old_chain_at(store, 2)
        pending.put("work", store.seal(old.bumped(refresh_token="old-chain-successor")))
        import_pair(home, sandbox, profile="work")
        loaded = store.load("work")
        assert loaded is not None and loaded.generation == 4
        assert pending.get("work") is None

    def test_offline_remove_drops_the_record(self, home: E2EHome) -> None:
        """A removed profile is never brought back from its pending record at start."""
        store = FileStore(home.paths.state_dir, load_or_create_key(home.paths.config_dir))
        pending = PendingStore(home.paths.pending_dir)
        old = _old_chain_at(store, 2)
        pending.put("work", store.seal(old.bumped(refresh_token="old-chain-successor")))
        assert home.cli("remove", "--yes", "work").returncode == 0
        assert store.load("work") is None and pending.get("work") is None


class TestCourierLostAfterKeeping:
    """A courier killed after it kept the refused pair, before it reported, loses nothing."""

    def test_lost_courier_pending_record_is_used(
        self, root: Path, key: bytes, sandbox: SandboxServer
    ) -> None:
        """The daemon takes the pending record instead of marking the attempt ambiguous."""
        fs = FailingFileLayer()
        pending = PendingStore(root / "run")
        store = FileStore(root / "state", key, fs, pending=pending)
        _import(sandbox, store)

        class DiesAfterKeeping:
            """Carries the refresh on a disk that fails after the journal, then 'dies'."""

            def refresh(self, job: CourierJob) -> CourierResult:
                def step(name: str) -> None:
                    if name == "journaled":
                        fs.failures = {"write": errno.EROFS}

                carry(job, store, TokenEndpoint(), time.time, trace=step)
                return CourierResult(CourierKind.LOST, "the courier ended without an answer")

        engine = _engine(store, pending, key, refresher=DiesAfterKeeping())
        state = engine.refresh("work")
        assert state.rejection is None and state.in_flight is None
        assert state.refresh_token is not None
        assert token_hash(state.refresh_token) == sandbox.log()[-1]["new_rt_hash"]
        fs.failures = {}
        engine.tick()
        assert store.load("work") == state and pending.get("work") is None
        assert engine.refresh("work").refresh_count == state.refresh_count + 1
        assert [e["outcome"] for e in sandbox.log()] == ["rotated", "rotated"]


class TestDaemonKill:
    """A real process killed while it holds the only copy of a rotated pair loses nothing."""

    def test_pending_pair_survives_sigkill_and_is_adopted(
        self, root: Path, sandbox: SandboxServer
    ) -> None:
        """SIGKILL on a failing state disk; the next engine serves and saves that same pair."""
        config, state_dir, pending_dir = root / "config", root / "state", root / "run" / "pending"
        key = load_or_create_key(config)
        store = FileStore(state_dir, key)
        first = _import(sandbox, store)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_storage", "hold",
             str(config), str(state_dir), str(pending_dir), "work"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "held\n", f"the dying daemon said {line!r}, not that it holds the pair"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        issued = sandbox.log()[-1]
        assert issued["outcome"] == "rotated"
        on_disk = store.load("work")
        assert on_disk is not None and on_disk.in_flight is not None  # only the journal
        assert (pending_dir / "work.pending").exists()

        engine = _engine(store, PendingStore(pending_dir), key)
        adopted = store.load("work")
        assert adopted is not None and adopted.refresh_token is not None
        assert token_hash(adopted.refresh_token) == issued["new_rt_hash"]
        assert engine.current_token("work") == adopted.access_token.encode()
        assert not (pending_dir / "work.pending").exists()
        after = engine.refresh("work")
        assert after.rejection is None and after.refresh_count == adopted.refresh_count + 1
        assert [e["outcome"] for e in sandbox.log()] == ["rotated", "rotated"]
        assert first.refresh_token != adopted.refresh_token


class TestStillOwed:
    """Which refused outcome must still be written: the rule of absorbing and of the late retry."""

    def test_a_state_the_disk_holds_but_could_not_confirm_is_owed(self) -> None:
        """The rename landed and the directory's fsync failed: the very state is owed again."""
        from aac_tokend.store.pending import still_owed
        from aac_tokend.testing import oauth_state

        held = oauth_state(generation=5, refresh_token="rt-new")
        assert still_owed(held, dataclasses.replace(held))

    def test_a_state_that_moved_on_is_not_owed(self) -> None:
        """An import (another token, any generation) on disk wins: nothing is owed."""
        from aac_tokend.store.pending import still_owed
        from aac_tokend.testing import oauth_state

        held = oauth_state(generation=5, refresh_token="rt-new")
        imported = oauth_state(generation=6, refresh_token="rt-imported")
        assert not still_owed(held, imported)
        assert not still_owed(held, dataclasses.replace(imported, generation=5))
