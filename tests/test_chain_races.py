"""One chain, one holder, under interleavings: memory follows the disk's order of writes.

Each test forces one interleaving with a store that pauses (or lets something else happen)
at a chosen step; the engine, the courier's transaction, the files and the token server
(the sandbox, on loopback) are all real.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aac_tokend.core.config import Config
from aac_tokend.core.importer import ImportRequest, parse_import_text
from aac_tokend.core.state import ProfileState
from aac_tokend.core.tokens import token_hash
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.daemon.scheduling import SystemClock
from aac_tokend.errors import BusyError, HolderUnknownError, TokenHeldError
from aac_tokend.refresh.courier import InProcessRefresher, Refresher
from aac_tokend.refresh.endpoint import TokenEndpoint
from aac_tokend.refresh.result import CourierResult
from aac_tokend.refresh.transaction import CourierJob, carry
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore
from aac_tokend.store.pending import PendingStore
from aac_tokend.testing import FailingFileLayer, FakeScheduler


class SteppedStore(FileStore):
    """A FileStore with two hooks: a load that pauses in one thread, and a callback run
    once just before a lock is taken (what another thread did while this one waited)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pause_load_in: str | None = None  # thread name whose next load pauses
        self.loaded = threading.Event()
        self.go_on = threading.Event()
        self.before_lock: Callable[[], object] | None = None
        self.busy_next = False  # the next lock taken reports another holder (BusyError)
        self.before_unlock: Callable[[str], object] | None = None  # still holding the lock

    def load(self, profile: str) -> ProfileState | None:
        state = super().load(profile)
        if threading.current_thread().name == self.pause_load_in:
            self.pause_load_in = None
            self.loaded.set()
            self.go_on.wait(5)
        return state

    @contextlib.contextmanager
    def locked(self, profile: str, timeout: float) -> Iterator[None]:
        hook, self.before_lock = self.before_lock, None
        if hook is not None:
            hook()
        if self.busy_next:
            self.busy_next = False
            raise BusyError(f"{profile}.lock: held elsewhere (test)")
        with super().locked(profile, timeout):
            yield
            if self.before_unlock is not None:
                self.before_unlock(profile)


class DiskFullAfterAnswer:
    """The courier's transaction in this thread; the disk refuses writes once the server
    answered (a full disk), so the new pair is handed back unsaved."""

    def __init__(self, store: SteppedStore, fs: FailingFileLayer) -> None:
        self.store, self.fs = store, fs
        self.then_busy = False  # the read-back after this courier finds the lock taken

    def _step(self, name: str) -> None:
        if name == "answered":
            self.fs.failures = {"write": errno.ENOSPC}
        if name == "persisted" and self.then_busy:
            self.store.busy_next = True

    def refresh(self, job: CourierJob) -> CourierResult:
        return carry(job, self.store, TokenEndpoint(), time.time, trace=self._step)


def _engine(
    store: FileStore, key: bytes, refresher: Refresher | None, pending: PendingStore
) -> Engine:
    """An engine on ``store``; with no ``refresher``, a courier's own: a plain store on the
    same directories, in this thread."""
    store.pending_store = pending
    if refresher is None:
        refresher = InProcessRefresher(FileStore(store.state_dir, key, pending=pending))
    return Engine(
        store=store, refresher=refresher, scheduler=FakeScheduler(),
        clock=SystemClock(), config=Config(), alerter=Alerter([]),
        socket_path=lambda n: store.state_dir / f"{n}.token.sock",
    )  # fmt: skip


def _serves(engine: Engine, name: str, pair: dict[str, object]) -> bool:
    """True if ``name`` serves ``pair``'s access token (compared here: a failing assert
    prints a bool, never a token)."""
    return engine.current_token(name) == str(pair["access_token"]).encode()


def _request(pair: dict[str, object], profile: str, endpoint: str) -> ImportRequest:
    request = parse_import_text(json.dumps(pair), profile=profile)
    return dataclasses.replace(request, token_endpoint=endpoint)


class TestImportsInterleaved:
    """An import's pair is in memory before its profile lock is let go."""

    def test_memory_holds_the_pair_when_the_lock_is_released(self, tmp_path: Path) -> None:
        """No instant exists where the disk has the new pair and memory the old one."""
        with SandboxServer() as sandbox:
            key = secrets.token_bytes(32)
            store = SteppedStore(tmp_path / "state", key)
            engine = _engine(store, key, None, PendingStore(tmp_path / "run"))
            endpoint = sandbox.token_endpoint
            engine.claim_import(_request(sandbox.generate(), "a", endpoint))
            fresh = sandbox.generate()
            seen: list[bool] = []
            store.before_unlock = lambda name: seen.append(_serves(engine, name, fresh))
            assert engine.claim_import(_request(fresh, "a", endpoint))[1]
            assert seen == [True]


class TestRefreshAndImportInterleaved:
    """A refresh's outcome read back late never undoes an import that landed meanwhile."""

    def test_import_during_read_back_wins_and_stays_held(self, tmp_path: Path) -> None:
        """Memory ends with the imported pair, so a second profile cannot import it too."""
        with SandboxServer() as sandbox:
            key = secrets.token_bytes(32)
            store = SteppedStore(tmp_path / "state", key)
            engine = _engine(store, key, None, PendingStore(tmp_path / "run"))
            endpoint = sandbox.token_endpoint
            engine.claim_import(_request(sandbox.generate(), "a", endpoint))
            engine.claim_import(_request(sandbox.generate(), "b", endpoint))
            fresh = sandbox.generate()
            store.pause_load_in = "refresh-a"  # the courier is done; its outcome is read back
            refresh = threading.Thread(target=engine.refresh, args=("a",), name="refresh-a")
            refresh.start()
            assert store.loaded.wait(10)
            imported = threading.Thread(
                target=engine.claim_import, args=(_request(fresh, "a", endpoint),)
            )
            imported.start()
            imported.join(0.5)  # lands now, or waits for the read-back to end
            store.go_on.set()
            refresh.join(10)
            imported.join(10)
            on_disk = store.load("a")
            assert on_disk is not None and on_disk.refresh_token == fresh["refresh_token"]
            assert _serves(engine, "a", fresh)
            with pytest.raises(TokenHeldError, match="'a'"):
                engine.claim_import(_request(fresh, "b", endpoint))
            b_state = store.load("b")
            assert b_state is not None and b_state.refresh_token != fresh["refresh_token"]


class TestUnsavedPairRetried:
    """The tick writes a pair the disk refused only over the journal it follows."""

    def _refused_pair(
        self, tmp_path: Path, sandbox: SandboxServer, *, then_busy: bool = False
    ) -> tuple[Engine, SteppedStore]:
        key = secrets.token_bytes(32)
        fs = FailingFileLayer()
        store = SteppedStore(tmp_path / "state", key, fs)
        pending = PendingStore(tmp_path / "run")
        courier = DiskFullAfterAnswer(store, fs)
        courier.then_busy = then_busy
        engine = _engine(store, key, courier, pending)
        engine.claim_import(_request(sandbox.generate(), "p", sandbox.token_endpoint))
        engine.refresh("p")
        assert engine.status("p")[0].alert  # the new pair is held in memory only
        fs.failures = {}  # the disk has room again
        return engine, store

    def test_read_back_finding_the_lock_taken_keeps_the_pair_unspent(self, tmp_path: Path) -> None:
        """If the read-back cannot take the lock, the refused pair is held, not re-sent."""
        with SandboxServer() as sandbox:
            engine, store = self._refused_pair(tmp_path, sandbox, then_busy=True)
            journal = store.load("p")
            assert journal is not None and journal.in_flight is not None
            served = engine.current_token("p")
            assert served is not None
            moved_on = served != journal.access_token.encode()
            assert moved_on
            engine.refresh("p")  # not spent while its successor is not on disk
            assert [e["outcome"] for e in sandbox.log()] == ["rotated"]
            engine.tick()
            saved = store.load("p")
            assert saved is not None and saved.in_flight is None
            same = saved.access_token.encode() == served
            assert same
            engine.refresh("p")
            assert [e["outcome"] for e in sandbox.log()] == ["rotated", "rotated"]

    def test_a_remove_meanwhile_is_not_undone(self, tmp_path: Path) -> None:
        """A profile removed while the tick waited for its lock stays removed."""
        with SandboxServer() as sandbox:
            engine, store = self._refused_pair(tmp_path, sandbox)
            store.before_lock = lambda: engine.remove("p")
            engine.tick()
            assert store.load("p") is None and store.profiles() == []
            assert engine.profiles() == []

    def test_an_import_meanwhile_is_not_undone(self, tmp_path: Path) -> None:
        """A pair imported while the tick waited for the lock stays on disk and in memory."""
        with SandboxServer() as sandbox:
            engine, store = self._refused_pair(tmp_path, sandbox)
            fresh = sandbox.generate()
            request = _request(fresh, "p", sandbox.token_endpoint)
            store.before_lock = lambda: engine.claim_import(request)
            engine.tick()
            on_disk = store.load("p")
            assert on_disk is not None and on_disk.refresh_token == fresh["refresh_token"]
            assert _serves(engine, "p", fresh)
            assert not engine.status("p")[0].alert
            assert engine.refresh("p").refresh_count == 1
            sent = [e["rt_hash"] for e in sandbox.log()]
            assert sent[-1] == token_hash(str(fresh["refresh_token"]))


def _spoil(state_dir: Path, how: str) -> Path:
    """A state file the store cannot read, as a disk or a sync tool leaves one."""
    if how == "unreadable":  # a read fails (EISDIR here; EIO on a failing disk)
        path = state_dir / "lost.state"
        path.mkdir()
    elif how == "corrupt":
        path = state_dir / "lost.state"
        path.write_bytes(b"AATK\x01" + secrets.token_bytes(80))
    else:  # misnamed: a sync tool's conflict copy of some profile's file
        path = state_dir / "lost (conflicted copy).state"
        path.write_bytes(secrets.token_bytes(80))
    return path


class TestUnreadableStateFile:
    """While a state file cannot be read, its token is unknown: imports are refused."""

    @pytest.mark.parametrize("how", ["unreadable", "corrupt", "misnamed"])
    def test_daemon_import_refused_naming_the_file(self, tmp_path: Path, how: str) -> None:
        """The refusal is one line naming the file; once it is moved away, the import works."""
        with SandboxServer() as sandbox:
            key = secrets.token_bytes(32)
            store = FileStore(tmp_path / "state", key)
            engine = _engine(store, key, None, PendingStore(tmp_path / "run"))
            spoiled = _spoil(store.state_dir, how)
            engine.start()
            request = _request(sandbox.generate(), "a", sandbox.token_endpoint)
            with pytest.raises(HolderUnknownError) as refused:
                engine.claim_import(request)
            message = str(refused.value)
            assert "\n" not in message and str(spoiled) in message
            assert "move it out of the state directory" in message
            assert store.load("a") is None and engine.profiles() == []
            spoiled.rename(tmp_path / "aside")
            assert engine.claim_import(request)[1] is True
            assert sandbox.log() == []
