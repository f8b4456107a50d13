"""FleetStore's own promises against a real etcd (the contract suite runs it too).

What only a fleet store does: saves compare the revision last seen, journals are the fenced
courier's, and the local pending record carries the journal entry's revision so that a
restarted daemon still pushes the courier's outcome against it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from aac_tokend.core.outcome import Refreshed
from aac_tokend.core.policy import apply_outcome, begin_attempt
from aac_tokend.core.state import ProfileState
from aac_tokend.errors import BusyError, FenceLostError, StateCorruptError, StorageError
from aac_tokend.fleet.chains import FleetChains, Versioned
from aac_tokend.fleet.etcd import EtcdClient
from aac_tokend.fleet.highwater import HighWater
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.fleet.records import (
    Attempt,
    ChainRecord,
    journal_of,
    new_attempt_id,
    outcome_of,
    resolved_by_heir,
    with_state,
)
from aac_tokend.fleet.sealing import Sealer
from aac_tokend.fleet.store import FleetStore
from aac_tokend.testing import T0, oauth_state
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)


#: Every token a test here puts in a state: none may be found in etcd in clear.
USED_TOKENS: set[str] = set()


def a_state(tag: str = "chain", **changes: Any) -> ProfileState:
    salt = os.urandom(6).hex()
    pair = {"access_token": f"{tag}-access-{salt}", "refresh_token": f"{tag}-refresh-{salt}"}
    USED_TOKENS.update(pair.values())
    return oauth_state(**{**pair, **changes})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One member shared by the module; at the end, no token in clear anywhere in it."""
    with EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1).running() as c:
        yield c
        every = EtcdClient(c.endpoints).range(b"/", prefix=True)
        assert every.kvs, "the tests wrote nothing?"
        for kv in every.kvs:
            for token in USED_TOKENS:
                assert token.encode() not in kv.value, f"a token in clear at {kv.key!r}"


@dataclass
class Rig:
    """One fleet on the shared cluster; ``host`` builds a host's objects afresh (as a
    restarted daemon would), on that host's state directory."""

    name: str
    key: bytes
    client: EtcdClient
    base: Path

    @property
    def keys(self) -> FleetKeys:
        return FleetKeys(self.name)

    def chains(self, host: str = "a") -> FleetChains:
        return FleetChains(
            self.client,
            self.keys,
            Sealer(self.key, self.name),
            HighWater(self.base / host, self.name),
        )

    def store(self, host: str = "a") -> FleetStore:
        return FleetStore(self.chains(host), self.base / host)

    def journaled(self) -> tuple[Versioned, ChainRecord, int]:
        """``work`` with an unresolved journal entry of host a: (before, entry, revision)."""
        chains = self.chains()
        before = chains.create("work", a_state())
        lease = self.client.grant(30).id
        self.client.put(self.keys.owner("work"), b"a", lease=lease)
        entry = journal_of(
            before.record,
            begin_attempt(before.record.state, T0 + 60),
            Attempt(new_attempt_id(), "a", 10.0),
        )
        rev = chains.commit_journal("work", entry, read_revision=before.revision, lease_id=lease)
        self.client.revoke(lease)  # the owner is gone: outcomes never compare the lease
        return before, entry, rev


@pytest.fixture
def rig(cluster: EtcdCluster, tmp_path: Path) -> Rig:
    return Rig("s-" + os.urandom(6).hex(), os.urandom(32), EtcdClient(cluster.endpoints), tmp_path)


def rotated(entry: ChainRecord) -> ChainRecord:
    pair = a_state("rotated")
    assert pair.refresh_token is not None
    answer = Refreshed(pair.access_token, pair.refresh_token, 3600.0)
    return outcome_of(entry, apply_outcome(entry.state, answer, T0 + 61))


class TestPendingOutcome:
    """A courier's outcome etcd could not take is kept locally with its entry's revision."""

    def test_restarted_daemon_pushes_it(self, rig: Rig) -> None:
        """Kept by one store, opened by a new one (a restarted daemon), and saved: committed
        against the entry's revision, with the owner's lease long gone."""
        _, entry, rev = rig.journaled()
        outcome = rotated(entry)
        rig.store().keep_pending("work", rig.store().seal_outcome(outcome, rev))
        restarted = rig.store()
        kept = restarted.pending("work")
        assert kept is not None
        state = restarted.unseal("work", kept)
        assert state == outcome.state
        restarted.save(state)
        current = rig.chains().read("work")
        assert current is not None and current.record == outcome
        assert current.revision > rev

    def test_heir_resolved_first(self, rig: Rig) -> None:
        """An heir that resolved the entry first wins: the push is FenceLostError
        ("superseded") and the chain keeps the heir's record."""
        _, entry, rev = rig.journaled()
        store = rig.store()
        state = store.unseal("work", store.seal_outcome(rotated(entry), rev))
        heirs = resolved_by_heir(entry, T0 + 300)
        assert rig.chains("b").commit_resolution("work", heirs, entry_revision=rev)
        with pytest.raises(FenceLostError, match="superseded"):
            store.save(state)
        current = rig.chains().read("work")
        assert current is not None and current.record == heirs

    def test_push_that_landed_before_is_done(self, rig: Rig) -> None:
        """If an earlier push landed (its reply lost), pushing again finds it and is done."""
        _, entry, rev = rig.journaled()
        outcome = rotated(entry)
        store = rig.store()
        state = store.unseal("work", store.seal_outcome(outcome, rev))
        landed = rig.chains().commit_resolution("work", outcome, entry_revision=rev)
        store.save(state)
        assert rig.chains().read("work") == Versioned(outcome, landed or 0)

    def test_only_that_very_state(self, rig: Rig) -> None:
        """A different state of the same generation is not the outcome: it is a plain save,
        refused over the unresolved entry, which stays as it was."""
        _, entry, rev = rig.journaled()
        store = rig.store()
        outcome = rotated(entry)
        store.unseal("work", store.seal_outcome(outcome, rev))
        other = replace(outcome.state, refresh_count=outcome.state.refresh_count + 5)
        with pytest.raises(BusyError, match="not resolved"):
            store.save(other)
        assert rig.chains().read("work") == Versioned(entry, rev)
        store.save(outcome.state)  # that very state still goes through
        current = rig.chains().read("work")
        assert current is not None and current.record == outcome

    def test_pending_file_is_local_private_and_sealed(self, rig: Rig) -> None:
        """The record is state_dir/fleet-NAME/PROFILE.pending, 0600 in a 0700 directory,
        and holds no token in clear."""
        _, entry, rev = rig.journaled()
        outcome = rotated(entry)
        store = rig.store()
        store.keep_pending("work", store.seal_outcome(outcome, rev))
        path = rig.base / "a" / f"fleet-{rig.name}" / "work.pending"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        data = path.read_bytes()
        for token in (outcome.state.access_token, outcome.state.refresh_token):
            assert token is not None and token.encode() not in data
        store.clear_pending("work")
        assert not path.exists()

    def test_not_interchangeable_with_chain_values(self, rig: Rig) -> None:
        """A chain value is not a pending record, and a pending record put in etcd does not
        read as a chain: both are sealed with the fleet key, neither stands in for the other."""
        store = rig.store()
        store.save(a_state())
        kv = store.chains.peek("work")
        assert kv is not None
        with pytest.raises(StateCorruptError, match="not a pending record"):
            store.unseal("work", kv.value)
        pending = store.seal(a_state(generation=kv.version))
        rig.client.put(rig.keys.chain("other"), store.seal(a_state(profile="other")))
        with pytest.raises(StateCorruptError):
            rig.chains("b").read("other")
        assert store.unseal("work", pending).profile == "work"

    def test_outcome_needs_an_entry(self, rig: Rig) -> None:
        """seal_outcome refuses a record that resolves nothing or has no entry revision."""
        store = rig.store()
        with pytest.raises(ValueError):
            store.seal_outcome(ChainRecord(3, a_state()), 5)
        _, entry, _ = rig.journaled()
        with pytest.raises(ValueError):
            store.seal_outcome(rotated(entry), 0)


class TestSave:
    """A save commits against the revision last seen, never over a chain that moved on."""

    def test_moved_on_is_fence_lost(self, rig: Rig) -> None:
        """Another host's write after our load: FenceLostError, theirs kept; a new load
        lets the save through."""
        mine, theirs = rig.store("a"), rig.store("b")
        mine.save(a_state())
        assert mine.load("work") is not None
        loaded = theirs.load("work")
        assert loaded is not None
        theirs.save(replace(loaded, refresh_count=7))
        with pytest.raises(FenceLostError, match="moved on"):
            mine.save(a_state(refresh_count=1))
        assert theirs.load("work") == replace(loaded, refresh_count=7)
        assert mine.load("work") == replace(loaded, refresh_count=7)
        mine.save(a_state(refresh_count=2))
        reloaded = theirs.load("work")
        assert reloaded is not None and reloaded.refresh_count == 2

    def test_seq_rises_with_each_save(self, rig: Rig) -> None:
        """Each save is the next sequence number of the chain."""
        store = rig.store()
        store.save(a_state())
        first = store.chains.read("work")
        store.save(a_state())
        second = store.chains.read("work")
        assert first is not None and second is not None
        assert second.record.seq == first.record.seq + 1
        assert second.record == with_state(first.record, second.record.state)

    def test_unresolved_journal_not_saved_over(self, rig: Rig) -> None:
        """A plain save never replaces an unresolved journal entry (BusyError), loaded or
        not: only the attempt's resolution may, and the courier's outcome still lands."""
        _, entry, rev = rig.journaled()
        blind, loaded = rig.store("a"), rig.store("b")
        assert loaded.load("work") == entry.state
        for store in (blind, loaded):
            with pytest.raises(BusyError, match="not resolved"):
                store.save(a_state())
        outcome = rotated(entry)
        assert rig.chains().commit_resolution("work", outcome, entry_revision=rev)

    def test_save_journal_refused(self, rig: Rig) -> None:
        """save_journal writes nothing: journals are the fenced courier's."""
        store = rig.store()
        store.save(a_state())
        before = store.chains.peek("work")
        with pytest.raises(StorageError, match="fenced courier"):
            store.save_journal(begin_attempt(a_state(), T0))
        assert store.chains.peek("work") == before

    def test_lock_is_per_host_and_local(self, rig: Rig) -> None:
        """The profile lock is a file in the host's fleet directory."""
        with rig.store().locked("work", timeout=1.0):
            assert (rig.base / "a" / f"fleet-{rig.name}" / "work.lock").exists()
            assert rig.store("b").lock_is_free("work")  # another host: etcd orders them
            assert not rig.store("a").lock_is_free("work")
