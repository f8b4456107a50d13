"""The StateStore contract: one suite, run against every store (as keyring tests backends).

A new store is added by giving the ``harness`` fixture one more parameter: a way to build
it and a way to damage one of its entries. Each store's own promises stay in its own file
(FileStore's in test_store.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aac_tokend.core.state import ProfileState
from aac_tokend.errors import BusyError, ProfileError, StateCorruptError, StorageError
from aac_tokend.store.files import FileStore
from aac_tokend.store.interface import StateStore
from aac_tokend.store.pending import PendingStore
from aac_tokend.testing import MemoryStore, oauth_state
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

ACCESS = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE4MDAwMDM2MDB9.Y29udHJhY3QtdGVzdC1zaWduYXR1cmU"
REFRESH = "refresh-secret-for-contract-tests-Wp40"
#: Only a hang detector for threads waiting on each other, never a speed assertion.
THREAD_TIMEOUT = 30.0


def make_state(profile: str = "work", **changes: object) -> ProfileState:
    fields: dict[str, object] = {"access_token": ACCESS, "refresh_token": REFRESH}
    return oauth_state(**{**fields, "profile": profile, **changes})


@dataclass
class Harness:
    """A store under test, and what only its own kind knows how to do to it."""

    store: StateStore
    #: Leave the profile's entry damaged for good, as a foreign or truncated file.
    damage: Callable[[str], None]
    #: Let the store's listing stamp age, so a change is not lost in one clock granule (a
    #: directory's mtime moves in kernel ticks); a no-op where the stamp is a counter.
    settle: Callable[[], None]
    #: Journals are committed by a fenced writer of the store's own (fleet mode's courier),
    #: so ``save_journal`` refuses with StorageError and changes nothing.
    fenced_journals: bool = False


def _file_harness(tmp_path: Path) -> Harness:
    store = FileStore(tmp_path / "state", os.urandom(32), pending=PendingStore(tmp_path / "run"))

    def damage(profile: str) -> None:
        store.path(profile).write_bytes(b"not a state file at all")

    def settle() -> None:
        past = os.stat(store.state_dir).st_mtime - 10
        os.utime(store.state_dir, (past, past))

    return Harness(store, damage, settle)


def _memory_harness(_tmp_path: Path) -> Harness:
    store = MemoryStore()
    return Harness(store, store.corrupt, lambda: None)


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member for this module's fleet runs (each test has a fleet of its own)."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1).running() as cluster:
        yield cluster
        # etcd holds ciphertext only: no token of the suite in clear in any value
        from aac_tokend.fleet.etcd import EtcdClient

        for kv in EtcdClient(cluster.endpoints).range(b"/", prefix=True).kvs:
            assert ACCESS.encode() not in kv.value and REFRESH.encode() not in kv.value


def _fleet_harness(tmp_path: Path, cluster: EtcdCluster) -> Harness:
    # Imported here: fleet code is imported only where fleet mode is on.
    from aac_tokend.fleet.chains import FleetChains
    from aac_tokend.fleet.etcd import EtcdClient
    from aac_tokend.fleet.highwater import HighWater
    from aac_tokend.fleet.keys import FleetKeys
    from aac_tokend.fleet.sealing import Sealer
    from aac_tokend.fleet.store import FleetStore

    fleet = "contract-" + os.urandom(6).hex()
    client = EtcdClient(cluster.endpoints, timeout=5)
    keys = FleetKeys(fleet)
    state_dir = tmp_path / "state"
    chains = FleetChains(client, keys, Sealer(os.urandom(32), fleet), HighWater(state_dir, fleet))
    store = FleetStore(chains, state_dir)

    def damage(profile: str) -> None:
        client.put(keys.chain(profile), b"not a sealed fleet record at all")

    return Harness(store, damage, lambda: None, fenced_journals=True)


@pytest.fixture(
    params=[_file_harness, _memory_harness, _fleet_harness], ids=["file", "memory", "fleet"]
)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    if request.param is _fleet_harness:
        return _fleet_harness(tmp_path, request.getfixturevalue("etcd_cluster"))
    build: Callable[[Path], Harness] = request.param
    return build(tmp_path)


@pytest.fixture
def store(harness: Harness) -> StateStore:
    return harness.store


class TestStateStoreContract:
    """What every StateStore does."""

    def test_round_trip(self, store: StateStore) -> None:
        """A saved state loads back equal."""
        state = make_state()
        store.save(state)
        assert store.load("work") == state

    def test_journal_round_trip(self, harness: Harness) -> None:
        """A journal saved with save_journal loads back as the current state (a store whose
        journals are fenced refuses it with StorageError and keeps what it held)."""
        store = harness.store
        journal = make_state(generation=3)
        if harness.fenced_journals:
            store.save(make_state())
            with pytest.raises(StorageError, match="fenced"):
                store.save_journal(journal)
            assert store.load("work") == make_state()
            return
        store.save_journal(journal)
        assert store.load("work") == journal

    def test_save_replaces(self, store: StateStore) -> None:
        """A second save replaces the first."""
        store.save(make_state())
        newer = make_state(refresh_count=5, access_token="newer-access-token")
        store.save(newer)
        assert store.load("work") == newer

    def test_load_missing_is_none(self, store: StateStore) -> None:
        """A profile without state loads as None."""
        assert store.load("nobody") is None

    def test_delete(self, store: StateStore) -> None:
        """A deleted profile loads as None and is no longer listed."""
        store.save(make_state())
        store.delete("work")
        assert store.load("work") is None
        assert store.profiles() == []

    def test_delete_missing(self, store: StateStore) -> None:
        """Deleting a profile that has no state is a ProfileError."""
        with pytest.raises(ProfileError, match="no profile named"):
            store.delete("nobody")

    def test_profiles_listed_sorted(self, store: StateStore) -> None:
        """profiles() lists every saved profile, sorted."""
        for name in ("zeta", "alpha", "mid"):
            store.save(make_state(name))
        assert store.profiles() == ["alpha", "mid", "zeta"]

    def test_profiles_kept_apart(self, store: StateStore) -> None:
        """Each profile has its own state."""
        store.save(make_state("a", refresh_count=1))
        store.save(make_state("b", refresh_count=2))
        a, b = store.load("a"), store.load("b")
        assert a is not None and b is not None
        assert (a.refresh_count, b.refresh_count) == (1, 2)

    @pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden"])
    def test_bad_profile_name(self, store: StateStore, name: str) -> None:
        """An unusable profile name is a ProfileError, on load and on save."""
        with pytest.raises(ProfileError):
            store.load(name)
        with pytest.raises(ProfileError):
            store.save(make_state(name))

    def test_where_names_the_profile(self, store: StateStore) -> None:
        """where() names the entry of any name, for messages."""
        assert "work" in store.where("work")
        assert "not a name" in store.where("not a name")

    def test_listing_stamp_changes(self, harness: Harness) -> None:
        """The listing stamp changes when a profile comes and when it goes."""
        store = harness.store
        harness.settle()
        before = store.listing_stamp()
        store.save(make_state())
        added = store.listing_stamp()
        assert added != before
        harness.settle()
        settled = store.listing_stamp()
        store.delete("work")
        assert store.listing_stamp() != settled


@contextlib.contextmanager
def held_by_a_thread(store: StateStore, profile: str) -> Iterator[threading.Event]:
    """``profile``'s lock held by another thread until the yielded event is set or the block
    ends (the thread is joined then)."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with store.locked(profile, timeout=1.0):
            held.set()
            release.wait(THREAD_TIMEOUT)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(THREAD_TIMEOUT)
        yield release
    finally:
        release.set()
        thread.join()


class TestLockContract:
    """The per-profile lock orders writers, across threads as across processes."""

    def test_lock_excludes_second_holder(self, store: StateStore) -> None:
        """While one holder has the lock, another gets BusyError after its timeout."""
        with (
            store.locked("work", timeout=1.0),
            pytest.raises(BusyError),
            store.locked("work", timeout=0.2),
        ):
            pass

    def test_lock_excludes_another_thread(self, store: StateStore) -> None:
        """A lock held by one thread times out in another with BusyError, and is not free."""
        with held_by_a_thread(store, "work"):
            assert not store.lock_is_free("work")
            with pytest.raises(BusyError), store.locked("work", timeout=0.1):
                pass
        assert store.lock_is_free("work")

    def test_lock_is_free(self, store: StateStore) -> None:
        """lock_is_free is True when nobody holds the lock, and does not take it."""
        assert store.lock_is_free("work")
        assert store.lock_is_free("work")
        with store.locked("work", timeout=0):
            assert not store.lock_is_free("work")

    def test_lock_zero_timeout(self, store: StateStore) -> None:
        """A zero timeout tries once."""
        with store.locked("work", timeout=0), pytest.raises(BusyError):  # noqa: SIM117
            with store.locked("work", timeout=0):
                pass

    def test_lock_released(self, store: StateStore) -> None:
        """After the holder leaves, the lock can be taken again."""
        with store.locked("work", timeout=1.0):
            pass
        with store.locked("work", timeout=0):
            pass

    def test_lock_released_on_exception(self, store: StateStore) -> None:
        """An exception inside the locked block releases the lock."""
        with pytest.raises(RuntimeError), store.locked("work", timeout=1.0):
            raise RuntimeError("inside")
        with store.locked("work", timeout=0):
            pass

    def test_locks_per_profile(self, store: StateStore) -> None:
        """Holding one profile's lock does not block another profile."""
        with store.locked("a", timeout=1.0), store.locked("b", timeout=0):
            pass

    def test_waiter_gets_lock_when_freed(self, store: StateStore) -> None:
        """A waiter with a long timeout gets the lock once the holder (a thread) lets go."""
        with held_by_a_thread(store, "work") as release:
            threading.Timer(0.2, release.set).start()
            with store.locked("work", timeout=THREAD_TIMEOUT):
                assert release.is_set()


class TestSealContract:
    """A sealed state opens only as its own profile's, and only unaltered."""

    def test_round_trip(self, store: StateStore) -> None:
        """unseal gives back the sealed state."""
        state = make_state(refresh_count=7)
        assert store.unseal("work", store.seal(state)) == state

    def test_tampered_blob(self, store: StateStore) -> None:
        """A blob with one byte changed is StateCorruptError."""
        blob = bytearray(store.seal(make_state()))
        blob[-1] ^= 0x01
        with pytest.raises(StateCorruptError):
            store.unseal("work", bytes(blob))

    def test_other_profiles_blob(self, store: StateStore) -> None:
        """A blob sealed for another profile is StateCorruptError."""
        with pytest.raises(StateCorruptError):
            store.unseal("work", store.seal(make_state("other")))

    def test_garbage(self, store: StateStore) -> None:
        """Bytes that were never sealed are StateCorruptError."""
        with pytest.raises(StateCorruptError):
            store.unseal("work", b"short")


class TestPendingContract:
    """An outcome the store refused is kept, read back and cleared."""

    def test_keep_get_clear(self, store: StateStore) -> None:
        """A kept blob is returned until cleared; clearing twice is harmless."""
        assert store.pending("work") is None
        blob = store.seal(make_state(refresh_count=2))
        store.keep_pending("work", blob)
        kept = store.pending("work")
        assert kept is not None
        assert store.unseal("work", kept) == make_state(refresh_count=2)
        store.clear_pending("work")
        store.clear_pending("work")
        assert store.pending("work") is None

    def test_keep_replaces(self, store: StateStore) -> None:
        """A second kept blob replaces the first."""
        store.keep_pending("work", store.seal(make_state(refresh_count=1)))
        store.keep_pending("work", store.seal(make_state(refresh_count=2)))
        kept = store.pending("work")
        assert kept is not None and store.unseal("work", kept).refresh_count == 2

    def test_kept_per_profile(self, store: StateStore) -> None:
        """Each profile has its own kept blob."""
        store.keep_pending("a", store.seal(make_state("a")))
        assert store.pending("b") is None

    def test_record_of_another_profile_is_corrupt(self, store: StateStore) -> None:
        """A record that is not the profile's own is StateCorruptError, not returned."""
        store.keep_pending("a", store.seal(make_state("b")))
        with pytest.raises(StateCorruptError):
            store.pending("a")


class TestCorruptContract:
    """An entry that cannot be read back is reported, listed, and never written over."""

    def test_load_raises(self, harness: Harness) -> None:
        """Loading a damaged entry is StateCorruptError, and the entry is still listed."""
        harness.store.save(make_state())
        harness.damage("work")
        with pytest.raises(StateCorruptError):
            harness.store.load("work")
        assert harness.store.profiles() == ["work"]

    def test_never_overwritten(self, harness: Harness) -> None:
        """save over a damaged entry is StateCorruptError and leaves it damaged."""
        harness.store.save(make_state())
        harness.damage("work")
        with pytest.raises(StateCorruptError):
            harness.store.save(make_state(refresh_count=9))
        with pytest.raises(StateCorruptError):
            harness.store.save_journal(make_state(refresh_count=9))
        with pytest.raises(StateCorruptError):
            harness.store.load("work")

    def test_delete_removes_it(self, harness: Harness) -> None:
        """A damaged entry can be deleted (moved aside), after which the name is free."""
        harness.store.save(make_state())
        harness.damage("work")
        harness.store.delete("work")
        assert harness.store.profiles() == []
        harness.store.save(make_state())
        assert harness.store.load("work") == make_state()
