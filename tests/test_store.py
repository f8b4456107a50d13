"""The file store's own promises (what every store does: test_store_contract.py)."""

from __future__ import annotations

import base64
import errno
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aac_tokend.core.state import ProfileState
from aac_tokend.errors import BusyError, StateCorruptError, StorageError
from aac_tokend.store.files import FileStore, hold_lock, load_or_create_key
from aac_tokend.testing import FailingFileLayer, oauth_state

ACCESS = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE4MDAwMDM2MDB9.c3RvcmUtdGVzdC1zaWduYXR1cmU"
REFRESH = "refresh-secret-for-store-tests-Qz81"
# Generous bound for a helper subprocess to start Python and take a lock; only a hang
# detector, never a speed assertion.
SUBPROCESS_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parent.parent


def make_state(profile: str = "work", **changes: object) -> ProfileState:
    fields: dict[str, object] = {"access_token": ACCESS, "refresh_token": REFRESH}
    return oauth_state(**{**fields, "profile": profile, **changes})


# -- FileStore's own promises ------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def fstore(state_dir: Path, key: bytes) -> FileStore:
    return FileStore(state_dir, key)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


class TestPermissions:
    """Directories are 0700, files 0600."""

    def test_state_file_and_dir(self, fstore: FileStore, state_dir: Path) -> None:
        """The state directory is 0700 and a state file 0600."""
        fstore.save(make_state())
        assert mode(state_dir) == 0o700
        assert mode(fstore.path("work")) == 0o600

    def test_loose_dir_tightened(self, tmp_path: Path, key: bytes) -> None:
        """An existing state directory with a loose mode is made 0700."""
        loose = tmp_path / "loose"
        loose.mkdir(mode=0o755)
        os.chmod(loose, 0o755)  # noqa: S103 - the loose mode under test
        FileStore(loose, key)
        assert mode(loose) == 0o700

    def test_lock_file_mode(self, fstore: FileStore, state_dir: Path) -> None:
        """The profile's lock file is 0600."""
        with fstore.locked("work", timeout=1.0):
            pass
        assert mode(state_dir / "work.lock") == 0o600

    def test_profiles_ignores_other_files(self, fstore: FileStore, state_dir: Path) -> None:
        """Lock files, temp files and strangers in the directory are not profiles."""
        fstore.save(make_state())
        with fstore.locked("work", timeout=1.0):
            pass
        (state_dir / ".work.123.abcd.tmp").write_bytes(b"x")
        (state_dir / "daemon.lock").write_bytes(b"")
        (state_dir / "notes.txt").write_bytes(b"")
        assert fstore.profiles() == ["work"]


class TestKey:
    """The state key: created once, 0600, never through a symlink, checked on every use."""

    def test_created_0600_once(self, tmp_path: Path) -> None:
        """The first call creates a 32-byte 0600 key; later calls return it unchanged."""
        config = tmp_path / "config"
        first = load_or_create_key(config)
        path = config / "state.key"
        inode = os.stat(path).st_ino
        assert len(first) == 32
        assert mode(path) == 0o600
        assert mode(config) == 0o700
        assert load_or_create_key(config) == first
        assert os.stat(path).st_ino == inode
        assert [p.name for p in config.iterdir()] == ["state.key"]

    def test_concurrent_creators_agree(self, tmp_path: Path) -> None:
        """Processes racing to create the key all end up with the same one."""
        config = tmp_path / "config"
        go = tmp_path / "go"
        script = textwrap.dedent(
            f"""
            import os, sys, time
            from pathlib import Path
            from aac_tokend.store.files import load_or_create_key
            while not os.path.exists({str(go)!r}):
                time.sleep(0.001)
            print(load_or_create_key(Path({str(config)!r})).hex())
            """
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
            for _ in range(6)
        ]
        try:
            time.sleep(0.5)  # let them reach the starting line; correctness needs no timing
            go.touch()
            keys = {p.communicate(timeout=SUBPROCESS_TIMEOUT)[0].strip() for p in procs}
        finally:
            for p in procs:
                p.kill()
                p.wait()
        assert all(p.returncode == 0 for p in procs)
        assert len(keys) == 1
        assert load_or_create_key(config).hex() in keys
        assert [p.name for p in config.iterdir()] == ["state.key"]

    def test_concurrent_threads_agree(self, tmp_path: Path) -> None:
        """Threads racing to create the key all get the same one."""
        config = tmp_path / "config"
        barrier = threading.Barrier(8)
        keys: list[bytes] = []

        def create() -> None:
            barrier.wait()
            keys.append(load_or_create_key(config))

        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(keys)) == 1 and len(keys) == 8

    @pytest.mark.parametrize("loose", [0o640, 0o604, 0o644, 0o660])
    def test_loose_mode_refused(self, tmp_path: Path, loose: int) -> None:
        """A key readable or writable by others is refused with a chmod hint."""
        config = tmp_path / "config"
        load_or_create_key(config)
        os.chmod(config / "state.key", loose)
        with pytest.raises(StorageError, match="chmod 600"):
            load_or_create_key(config)

    def test_symlink_refused(self, tmp_path: Path) -> None:
        """A symlink at the key's path is never followed."""
        config = tmp_path / "config"
        config.mkdir(mode=0o700)
        target = tmp_path / "elsewhere.key"
        target.write_bytes(os.urandom(32))
        os.chmod(target, 0o600)
        (config / "state.key").symlink_to(target)
        with pytest.raises(StorageError, match="symlink"):
            load_or_create_key(config)

    @pytest.mark.parametrize("size", [0, 16, 31, 33, 100])
    def test_damaged_key(self, tmp_path: Path, size: int) -> None:
        """A key of the wrong length is reported as damaged."""
        config = tmp_path / "config"
        config.mkdir(mode=0o700)
        path = config / "state.key"
        path.write_bytes(b"k" * size)
        os.chmod(path, 0o600)
        with pytest.raises(StateCorruptError, match="damaged"):
            load_or_create_key(config)

    def test_key_write_failure(self, tmp_path: Path) -> None:
        """A key that cannot be written durably is a StorageError, with no temp file left."""
        config = tmp_path / "config"
        with pytest.raises(StorageError, match="cannot create the state key"):
            load_or_create_key(config, FailingFileLayer(failures={"fsync": errno.EIO}))
        assert list(config.iterdir()) == []


class TestKeyNotARegularFile:
    """Something other than a regular file at state.key is one StorageError, never a hang."""

    def test_fifo_refused_at_once(self, tmp_path: Path) -> None:
        """A FIFO at state.key is refused at once instead of blocking the reader forever."""
        config = tmp_path / "config"
        config.mkdir(mode=0o700)
        os.mkfifo(config / "state.key", 0o600)
        raised: list[BaseException] = []

        def load() -> None:
            try:
                load_or_create_key(config)
            except BaseException as exc:
                raised.append(exc)

        reader = threading.Thread(target=load, daemon=True)
        reader.start()
        reader.join(5.0)
        if reader.is_alive():  # unblock the stuck open so the thread can end
            os.close(os.open(config / "state.key", os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail("load_or_create_key blocked on a FIFO")
        assert len(raised) == 1 and isinstance(raised[0], StorageError)
        assert "not a regular file" in str(raised[0])

    def test_directory_refused(self, tmp_path: Path) -> None:
        """A directory at state.key is a one-line StorageError naming it, not a traceback."""
        config = tmp_path / "config"
        (config / "state.key").mkdir(parents=True)
        with pytest.raises(StorageError, match="not a regular file") as info:
            load_or_create_key(config)
        assert str(config / "state.key") in str(info.value) and "\n" not in str(info.value)


class TestProfileLockNotRegular:
    """Something other than a regular file at a profile's .lock is a one-line StorageError."""

    def test_fifo_refused(self, tmp_path: Path) -> None:
        """A FIFO at the lock path is refused by name (it was "Illegal seek" later on)."""
        lock = tmp_path / "default.lock"
        os.mkfifo(lock, 0o600)
        locking = hold_lock(lock, 1.0)
        with pytest.raises(StorageError, match="not a regular file; move it aside") as info:
            locking.__enter__()
        assert str(lock) in str(info.value) and "\n" not in str(info.value)


class TestMissingKeyBesideStates:
    """A missing key is never replaced while state files exist that only it can read."""

    def test_refused_with_restore_hint(self, tmp_path: Path, key: bytes) -> None:
        """Key gone, one state file left: StateCorruptError saying to restore it; no new key."""
        state_dir = tmp_path / "state"
        FileStore(state_dir, key).save(make_state())
        config = tmp_path / "config"
        with pytest.raises(StateCorruptError, match=r"missing.*restore state\.key") as info:
            load_or_create_key(config, state_dir=state_dir)
        assert "1 state file" in str(info.value)
        assert not (config / "state.key").exists()

    def test_created_when_no_states(self, tmp_path: Path) -> None:
        """An empty or absent state directory does not stop the first key being created."""
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        (state_dir / "daemon.lock").touch()
        assert len(load_or_create_key(tmp_path / "config", state_dir=state_dir)) == 32


class TestEncryption:
    """The file holds no token in any readable form and detects any tampering."""

    def test_no_token_in_file(self, fstore: FileStore) -> None:
        """Neither token appears in the file, raw or base64-encoded, nor does the JSON."""
        fstore.save(make_state())
        raw = fstore.path("work").read_bytes()
        for token in (ACCESS, REFRESH):
            data = token.encode()
            for needle in (
                data,
                base64.b64encode(data),
                base64.urlsafe_b64encode(data),
                base64.b64encode(data).rstrip(b"="),
                data[:16],
            ):
                assert needle not in raw
        assert b"access_token" not in raw and b"refresh_token" not in raw

    def test_fresh_nonce_every_save(self, fstore: FileStore) -> None:
        """Saving the same state twice gives different bytes (a new nonce each time)."""
        fstore.save(make_state())
        first = fstore.path("work").read_bytes()
        fstore.save(make_state())
        assert fstore.path("work").read_bytes() != first

    @pytest.mark.parametrize("where", [0, 4, 5, 10, 17, 40, -17, -1])
    def test_tampered_byte(self, fstore: FileStore, where: int) -> None:
        """Flipping any byte (magic, nonce, ciphertext, tag) makes the file StateCorruptError."""
        fstore.save(make_state())
        path = fstore.path("work")
        raw = bytearray(path.read_bytes())
        raw[where] ^= 0x01
        path.write_bytes(bytes(raw))
        with pytest.raises(StateCorruptError, match="left untouched"):
            fstore.load("work")

    @pytest.mark.parametrize("keep", [0, 5, 16, 33, -1])
    def test_truncated(self, fstore: FileStore, keep: int) -> None:
        """A truncated file is StateCorruptError."""
        fstore.save(make_state())
        path = fstore.path("work")
        path.write_bytes(path.read_bytes()[:keep])
        with pytest.raises(StateCorruptError):
            fstore.load("work")

    def test_other_profiles_file_swapped_in(self, fstore: FileStore) -> None:
        """Another profile's file copied over this one's is detected (profile is in the AAD)."""
        fstore.save(make_state("a"))
        fstore.save(make_state("b"))
        shutil.copyfile(fstore.path("b"), fstore.path("a"))
        with pytest.raises(StateCorruptError):
            fstore.load("a")

    def test_other_key(self, fstore: FileStore, state_dir: Path) -> None:
        """A file written under another key cannot be read."""
        fstore.save(make_state())
        with pytest.raises(StateCorruptError, match="another key"):
            FileStore(state_dir, os.urandom(32)).load("work")

    def test_corrupt_message_has_no_token(self, fstore: FileStore) -> None:
        """The corruption message names the file, not its content."""
        fstore.save(make_state())
        path = fstore.path("work")
        blob = path.read_bytes()
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0x01]))  # always a different byte
        with pytest.raises(StateCorruptError) as info:
            fstore.load("work")
        assert str(path) in str(info.value)
        assert ACCESS not in str(info.value) and REFRESH not in str(info.value)


class TestNeverClobber:
    """A corrupt file or a planted symlink is left exactly as it is."""

    @pytest.mark.parametrize("content", [b"garbage", b"", b"AATK\x01" + b"\x00" * 40])
    def test_corrupt_file_not_overwritten(self, fstore: FileStore, content: bytes) -> None:
        """save() over a corrupt file fails and leaves its bytes identical."""
        path = fstore.path("work")
        path.write_bytes(content)
        with pytest.raises(StateCorruptError):
            fstore.save(make_state())
        assert path.read_bytes() == content
        assert leftovers(path.parent) == []

    def test_file_from_other_key_not_overwritten(self, fstore: FileStore, state_dir: Path) -> None:
        """A state written with another key (a lost key) is not overwritten either."""
        other = FileStore(state_dir, os.urandom(32))
        other.save(make_state())
        before = fstore.path("work").read_bytes()
        with pytest.raises(StateCorruptError):
            fstore.save(make_state(refresh_count=1))
        assert fstore.path("work").read_bytes() == before

    def test_symlink_not_followed(self, fstore: FileStore, tmp_path: Path) -> None:
        """A symlink planted at the state path is neither read through nor written through."""
        target = tmp_path / "victim"
        target.write_bytes(b"precious")
        path = fstore.path("work")
        path.symlink_to(target)
        with pytest.raises(StateCorruptError, match="symlink"):
            fstore.load("work")
        with pytest.raises((StorageError, StateCorruptError)):
            fstore.save(make_state())
        assert target.read_bytes() == b"precious"
        assert path.is_symlink()
        assert leftovers(path.parent) == []

    def test_dangling_symlink_not_created_through(self, fstore: FileStore, tmp_path: Path) -> None:
        """A symlink to a missing file does not make save() create that file."""
        target = tmp_path / "created-through-link"
        fstore.path("work").symlink_to(target)
        with pytest.raises((StorageError, StateCorruptError)):
            fstore.save(make_state())
        assert not target.exists()


@pytest.fixture
def seeded(state_dir: Path, key: bytes) -> ProfileState:
    """A state already saved by a healthy store."""
    state = make_state(refresh_count=1)
    FileStore(state_dir, key).save(state)
    return state


class TestFailingDisk:
    """Storage failures are StorageError; the previous state stays intact; no temp file."""

    @pytest.mark.parametrize(
        ("op", "code"),
        [
            ("write", errno.ENOSPC),
            ("write", errno.EDQUOT),
            ("fsync", errno.EIO),
            ("rename", errno.EIO),
            # Tests run as root, which chmod 0500 does not stop: a read-only state directory
            # is simulated by the file layer failing the write with EROFS instead.
            ("write", errno.EROFS),
            ("read", errno.EIO),
        ],
    )
    def test_failed_before_rename_keeps_previous(
        self, state_dir: Path, key: bytes, seeded: ProfileState, op: str, code: int
    ) -> None:
        """A failure up to the rename leaves the previous state loadable and no temp file."""
        failing = FileStore(state_dir, key, FailingFileLayer(failures={op: code}))
        with pytest.raises(StorageError) as info:
            failing.save(make_state(refresh_count=2, access_token="new-access-token"))
        assert "\n" not in str(info.value)
        assert ACCESS not in str(info.value)
        if op != "read":
            assert "previous state is kept" in str(info.value)
        assert FileStore(state_dir, key).load("work") == seeded
        assert leftovers(state_dir) == []

    def test_fsync_dir_failure(self, state_dir: Path, key: bytes, seeded: ProfileState) -> None:
        """EIO on the directory fsync is a StorageError saying durability is in doubt."""
        # The rename has happened, so the new (whole) state is what loads; the engine keeps
        # the blob and saves it again. Rolling back would be worse: the old refresh token
        # may already be spent.
        failing = FileStore(state_dir, key, FailingFileLayer(failures={"fsync_dir": errno.EIO}))
        newer = make_state(refresh_count=2)
        with pytest.raises(StorageError, match="may not survive a crash") as info:
            failing.save(newer)
        assert "previous state is kept" not in str(info.value)
        assert FileStore(state_dir, key).load("work") == newer
        assert leftovers(state_dir) == []

    def test_retry_after_failure_succeeds(self, state_dir: Path, key: bytes) -> None:
        """Once the disk recovers, the same store saves normally."""
        layer = FailingFileLayer(failures={"write": errno.ENOSPC}, remaining=1)
        store = FileStore(state_dir, key, layer)
        with pytest.raises(StorageError):
            store.save(make_state())
        store.save(make_state())
        assert store.load("work") == make_state()
        assert layer.raised == 1

    def test_load_read_error(self, state_dir: Path, key: bytes, seeded: ProfileState) -> None:
        """An I/O error reading the state is a StorageError, not 'missing'."""
        failing = FileStore(state_dir, key, FailingFileLayer(failures={"read": errno.EIO}))
        with pytest.raises(StorageError):
            failing.load("work")


LOCK_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from aac_tokend.store.files import FileStore
    store = FileStore(Path(sys.argv[1]), bytes(32))
    with store.locked("work", timeout=5):
        print("held", flush=True)
        sys.stdin.read()
    """
)


@pytest.fixture
def lock_holder(state_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """A separate process holding the profile lock until its stdin closes."""
    FileStore(state_dir, bytes(32))
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(state_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


class TestLockAcrossProcesses:
    """The profile lock is an flock, so it excludes other processes too."""

    def test_other_process_excludes(
        self, fstore: FileStore, lock_holder: subprocess.Popen[str]
    ) -> None:
        """While another process holds the lock, this one gets BusyError after its timeout."""
        with pytest.raises(BusyError, match="another refresh"), fstore.locked("work", 0.3):
            pass
        assert not fstore.lock_is_free("work")

    def test_released_when_process_ends(
        self, fstore: FileStore, lock_holder: subprocess.Popen[str]
    ) -> None:
        """When the holder exits, the lock is free."""
        assert lock_holder.stdin is not None
        lock_holder.stdin.close()
        lock_holder.wait(SUBPROCESS_TIMEOUT)
        with fstore.locked("work", timeout=SUBPROCESS_TIMEOUT):
            pass

    def test_released_when_process_killed(
        self, fstore: FileStore, lock_holder: subprocess.Popen[str]
    ) -> None:
        """A SIGKILLed holder does not leave the lock taken."""
        lock_holder.kill()
        lock_holder.wait(SUBPROCESS_TIMEOUT)
        assert fstore.lock_is_free("work")


SAVER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from aac_tokend.core.state import ProfileState, TokenKind
    from aac_tokend.store.files import FileStore
    state = ProfileState(
        profile="work", kind=TokenKind.OAUTH, access_token="a" * 20, refresh_token="r" * 20,
        token_endpoint=None, client_id=None, api_base_url="https://x",
        access_obtained_at=0.0, access_expires_at=1.0,
    )
    FileStore(Path(sys.argv[1]), bytes(32)).save(state)
    """
)
OPENAT = re.compile(r'^\d+\s+openat\(AT_FDCWD, "([^"]+)", ([A-Z_|]+).*\)\s+= (\d+)$')
FSYNC = re.compile(r"^\d+\s+fsync\((\d+)\)\s+= 0$")
RENAME = re.compile(
    r'^\d+\s+rename(?:at2?)?\((?:AT_FDCWD, )?"([^"]+)", (?:AT_FDCWD, )?"([^"]+)".*\)\s+= 0$'
)


def trace_events(trace: str) -> list[tuple[str, str]]:
    """(syscall, path) for fsyncs (resolved through openat) and renames (destination)."""
    fds: dict[str, str] = {}
    events: list[tuple[str, str]] = []
    for line in trace.splitlines():
        if m := OPENAT.match(line):
            fds[m.group(3)] = m.group(1)
        elif m := FSYNC.match(line):
            events.append(("fsync", fds.get(m.group(1), "?")))
        elif m := RENAME.match(line):
            events.append(("rename:" + m.group(1), m.group(2)))
    return events


class TestWriteOrder:
    """The syscalls of a save come in the order that makes it crash-safe."""

    def test_fsync_rename_fsync_dir(self) -> None:
        """The temp file is fsynced before the rename, and the directory after it."""
        strace = "/usr/bin/strace"
        if not os.access(strace, os.X_OK):
            pytest.skip("strace is not installed at /usr/bin/strace")
        tmp = Path(tempfile.mkdtemp(prefix="atk", dir="/tmp"))
        try:
            state_dir = tmp / "state"
            out = tmp / "trace"
            result = subprocess.run(
                [strace, "-f", "-e", "trace=openat,write,fsync,rename,renameat,renameat2",
                 "-o", str(out), sys.executable, "-c", SAVER, str(state_dir)],
                capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, cwd=REPO,
            )  # fmt: skip
            if result.returncode != 0 and "ptrace" in result.stderr:
                pytest.skip(f"strace cannot trace here: {result.stderr.strip()[:200]}")
            assert result.returncode == 0, result.stderr
            events = trace_events(out.read_text())
        finally:
            shutil.rmtree(tmp)
        final = str(state_dir / "work.state")
        renames = [i for i, (what, dst) in enumerate(events) if what.startswith("rename:")]
        assert len(renames) == 1, events
        rename_at = renames[0]
        temp = events[rename_at][0].removeprefix("rename:")
        assert events[rename_at][1] == final
        assert Path(temp).parent == state_dir and temp.endswith(".tmp")
        assert ("fsync", temp) in events[:rename_at], events
        assert ("fsync", str(state_dir)) in events[rename_at + 1 :], events


class TestNotARegularFile:
    """A FIFO or a directory named like a state file is reported, never waited on."""

    def test_fifo_is_refused_at_once(self, fstore: FileStore, state_dir: Path) -> None:
        """Loading over a FIFO raises StorageError instead of blocking the daemon for ever."""
        os.mkfifo(state_dir / "work.state", 0o600)
        outcome: list[BaseException | None] = []

        def load() -> None:
            try:
                fstore.load("work")
                outcome.append(None)
            except BaseException as exc:  # handed to the test thread
                outcome.append(exc)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        worker.join(5.0)
        assert outcome, "load() blocked on a FIFO"
        assert isinstance(outcome[0], StorageError) and "not a regular file" in str(outcome[0])

    def test_directory_is_refused(self, fstore: FileStore, state_dir: Path) -> None:
        """A directory in a state file's place is a one-line StorageError that says what to do."""
        (state_dir / "work.state").mkdir()
        with pytest.raises(StorageError, match=r"directory.*move it aside") as info:
            fstore.load("work")
        assert "\n" not in str(info.value)


class TestFileStorePending:
    """A FileStore keeps refused outcomes in its PendingStore, or nowhere without one."""

    def test_without_pending_store(self, fstore: FileStore) -> None:
        """Without a PendingStore, keep_pending keeps nothing and pending is None."""
        fstore.keep_pending("work", fstore.seal(make_state()))
        assert fstore.pending("work") is None
        fstore.clear_pending("work")

    def test_damaged_record_names_the_pending_file(self, state_dir: Path, key: bytes) -> None:
        """A pending record that is not the profile's is StateCorruptError naming its file."""
        from aac_tokend.store.pending import PendingStore

        pending = PendingStore(state_dir.parent / "run")
        store = FileStore(state_dir, key, pending=pending)
        store.keep_pending("work", store.seal(make_state("other")))
        with pytest.raises(StateCorruptError, match=r"work\.pending"):
            store.pending("work")

    def test_listing_stamp_of_a_missing_dir(self, fstore: FileStore, state_dir: Path) -> None:
        """A state directory that is gone is StorageError, for listing and for its stamp."""
        shutil.rmtree(state_dir)
        with pytest.raises(StorageError):
            fstore.listing_stamp()
        with pytest.raises(StorageError):
            fstore.profiles()
