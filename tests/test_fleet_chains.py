"""FleetChains against a real etcd: who may write a chain key, and what a read refuses.

One etcd member is shared by the module; each test has a fleet of its own (its own keys,
high-water marks and fleet key). At the end every value etcd holds is scanned for the
tokens the tests used: etcd must never hold one in clear.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from aac_tokend.core.outcome import Refreshed
from aac_tokend.core.policy import apply_outcome, begin_attempt
from aac_tokend.core.state import ProfileState
from aac_tokend.core.tokens import token_hash
from aac_tokend.errors import (
    BusyError,
    ChainInUseError,
    EtcdOutcomeUnknownError,
    FenceLostError,
    ProfileError,
    RollbackError,
    StateCorruptError,
    TokenHeldError,
    TokenSpentError,
)
from aac_tokend.fleet.chains import FleetChains, SeenKind, Versioned
from aac_tokend.fleet.etcd import EtcdClient
from aac_tokend.fleet.highwater import HighWater
from aac_tokend.fleet.keys import FleetKeys
from aac_tokend.fleet.records import (
    Attempt,
    ChainRecord,
    cancelled,
    encode_record,
    journal_of,
    new_attempt_id,
    outcome_of,
    resolved_by_heir,
    with_state,
)
from aac_tokend.fleet.sealing import Sealer
from aac_tokend.testing import T0, oauth_state
from tests.etcd_cluster import ETCD, SKIP_REASON, EtcdCluster, ReplyDroppingProxy

pytestmark = pytest.mark.skipif(ETCD is None, reason=SKIP_REASON)

#: Every token a test here puts in a state: none may be found in etcd in clear.
USED_TOKENS: set[str] = set()
#: Only a hang detector for threads racing each other, never a speed assertion.
THREAD_TIMEOUT = 30.0


def tokens(tag: str) -> dict[str, str]:
    """A fresh access/refresh pair, remembered for the final scan of etcd."""
    salt = os.urandom(6).hex()
    pair = {
        "access_token": f"eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE4MDAwMDM2MDB9.{tag}-access-{salt}",
        "refresh_token": f"{tag}-refresh-secret-{salt}",
    }
    USED_TOKENS.update(pair.values())
    return pair


def a_state(profile: str = "work", tag: str = "chain", **changes: Any) -> ProfileState:
    return oauth_state(**{**tokens(tag), "profile": profile, **changes})


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
                assert token.encode() not in kv.key


@dataclass
class Fleet:
    """One fleet on the shared cluster: its name, keys, fleet key and a client."""

    cluster: EtcdCluster
    name: str
    keys: FleetKeys
    key: bytes
    client: EtcdClient
    base: Path

    def host(self, name: str = "a", client: EtcdClient | None = None) -> FleetChains:
        """A host's FleetChains: its own state directory, so its own high-water marks."""
        return FleetChains(
            client or self.client,
            self.keys,
            Sealer(self.key, self.name),
            HighWater(self.base / name, self.name),
        )

    def own(self, profile: str, host: str = "a") -> int:
        """``host`` owns ``profile``: the owner key bound to a fresh lease; its id."""
        lease = self.client.grant(30)
        self.client.put(self.keys.owner(profile), host.encode(), lease=lease.id)
        return lease.id


@pytest.fixture
def fleet(cluster: EtcdCluster, tmp_path: Path) -> Fleet:
    name = "t-" + os.urandom(6).hex()
    return Fleet(
        cluster,
        name,
        FleetKeys(name),
        os.urandom(32),
        EtcdClient(cluster.endpoints, timeout=5),
        tmp_path,
    )


def journal(current: Versioned, host: str = "a") -> ChainRecord:
    """The journal entry a courier of ``host`` would commit over ``current``."""
    state = begin_attempt(current.record.state, T0 + 60)
    return journal_of(current.record, state, Attempt(new_attempt_id(), host, 10.0))


def refreshed(entry: ChainRecord) -> ChainRecord:
    """The courier's outcome of ``entry``: the server rotated the pair."""
    pair = tokens("rotated")
    answer = Refreshed(pair["access_token"], pair["refresh_token"], 3600.0)
    return outcome_of(entry, apply_outcome(entry.state, answer, T0 + 61))


def journaled(fleet: Fleet, chains: FleetChains) -> tuple[Versioned, ChainRecord, int, int]:
    """A chain with an unresolved journal entry: (before, entry, entry revision, lease)."""
    before = chains.create("work", a_state())
    lease = fleet.own("work")
    entry = journal(before)
    rev = chains.commit_journal("work", entry, read_revision=before.revision, lease_id=lease)
    return before, entry, rev, lease


def one_line_without_tokens(exc: BaseException) -> None:
    text = str(exc)
    assert "\n" not in text
    for token in USED_TOKENS:
        assert token not in text


class TestOpen:
    """A read opens the value, checks its sequence against this host's mark, then notes it."""

    def test_round_trip_and_mark_noted(self, fleet: Fleet) -> None:
        """A created chain reads back equal at its revision, and the mark rises to its seq."""
        chains = fleet.host()
        made = chains.create("work", a_state())
        assert chains.read("work") == made
        assert chains.highwater.mark("work") == made.record.seq

    def test_missing_is_none(self, fleet: Fleet) -> None:
        """A profile without a chain key reads as None."""
        assert fleet.host().read("nobody") is None

    def test_blob_of_another_fleet_refused(self, fleet: Fleet, cluster: EtcdCluster) -> None:
        """A value copied from another fleet's key (same fleet key) does not open."""
        chains = fleet.host()
        chains.create("work", a_state())
        kv = chains.peek("work")
        assert kv is not None
        other = FleetKeys(fleet.name + "x")
        fleet.client.put(other.chain("work"), kv.value)
        stranger = FleetChains(
            fleet.client,
            other,
            Sealer(fleet.key, other.fleet),
            HighWater(fleet.base / "s", other.fleet),
        )
        with pytest.raises(StateCorruptError, match="does not open") as caught:
            stranger.read("work")
        one_line_without_tokens(caught.value)

    def test_blob_of_another_profile_refused(self, fleet: Fleet) -> None:
        """A value copied to another profile's key does not open."""
        chains = fleet.host()
        chains.create("work", a_state())
        kv = chains.peek("work")
        assert kv is not None
        fleet.client.put(fleet.keys.chain("play"), kv.value)
        with pytest.raises(StateCorruptError, match="does not open") as caught:
            chains.read("play")
        one_line_without_tokens(caught.value)

    def test_altered_blob_refused(self, fleet: Fleet) -> None:
        """A value with one byte changed does not open, and nothing is noted."""
        chains = fleet.host()
        made = chains.create("work", a_state())
        kv = chains.peek("work")
        assert kv is not None
        altered = bytearray(kv.value)
        altered[-5] ^= 0x40
        fleet.client.put(fleet.keys.chain("work"), bytes(altered))
        fresh = fleet.host("b")
        with pytest.raises(StateCorruptError) as caught:
            fresh.read("work")
        one_line_without_tokens(caught.value)
        assert fresh.highwater.mark("work") == 0
        assert made.record.seq > 0

    def test_sequence_inside_must_match_outside(self, fleet: Fleet) -> None:
        """A record sealed at another generation than its own seq is corrupt."""
        chains = fleet.host()
        record = ChainRecord(4, a_state())
        blob = chains.sealer.seal("work", 5, encode_record(record))
        fleet.client.put(fleet.keys.chain("work"), blob)
        with pytest.raises(StateCorruptError, match="sequence 4 inside and 5 outside"):
            chains.read("work")

    def test_older_seq_is_a_rollback(self, fleet: Fleet) -> None:
        """A value older than this host has seen (etcd restored) is RollbackError, not
        noted, and the message names no token."""
        chains = fleet.host()
        made = chains.create("work", a_state())
        old = chains.peek("work")
        assert old is not None
        newer = with_state(made.record, a_state(refresh_count=1))
        assert chains.commit_resolution("work", newer, entry_revision=made.revision)
        assert chains.read("work") is not None
        fleet.client.put(fleet.keys.chain("work"), old.value)  # the snapshot comes back
        with pytest.raises(RollbackError, match="rollback") as caught:
            chains.read("work")
        one_line_without_tokens(caught.value)
        assert chains.highwater.mark("work") == newer.seq
        # another host that never saw the newer one reads the old value as it is
        assert fleet.host("b").read("work") is not None

    def test_read_all_keeps_unreadable_entries(self, fleet: Fleet) -> None:
        """read_all lists every chain key, a damaged or misnamed one as its error, with a
        header revision no older than any key's."""
        chains = fleet.host()
        made = chains.create("work", a_state())
        fleet.client.put(fleet.keys.chain("broken"), b"garbage")
        fleet.client.put(fleet.keys.chain("bad name"), b"garbage")
        found, revision = chains.read_all()
        assert found["work"] == made
        assert isinstance(found["broken"], StateCorruptError)
        assert isinstance(found["bad name"], ProfileError)
        assert revision >= made.revision


class TestCreate:
    """Import and move in are create-only, and above every sequence a host has seen."""

    def test_second_create_refused(self, fleet: Fleet) -> None:
        """A second create of the same profile is ChainInUseError and leaves it untouched."""
        chains = fleet.host()
        chains.create("work", a_state())
        before = chains.peek("work")
        with pytest.raises(ChainInUseError, match="already in fleet") as caught:
            fleet.host("b").create("work", a_state())
        one_line_without_tokens(caught.value)
        assert chains.peek("work") == before

    def test_state_of_another_profile_refused(self, fleet: Fleet) -> None:
        """create refuses a state whose profile is not the key's."""
        with pytest.raises(ValueError, match="another profile"):
            fleet.host().create("work", a_state("play"))

    def test_after_remove_above_the_tombstone(self, fleet: Fleet) -> None:
        """After a move out, a create on a host that saw nothing continues above the
        tombstone's seq, so a host that saw the old chain reads the new one."""
        old_host, new_host = fleet.host("old"), fleet.host("new")
        made = old_host.create("work", a_state())
        for n in range(3):  # the chain moves on a little
            current = old_host.read("work")
            assert current is not None
            nxt = with_state(current.record, a_state(refresh_count=n))
            assert old_host.commit_resolution("work", nxt, entry_revision=current.revision)
        last = old_host.read("work")
        assert last is not None and last.record.seq == made.record.seq + 3
        old_host.remove("work", expected_revision=last.revision)
        assert fleet.client.get(fleet.keys.gone("work")) is not None
        again = new_host.create("work", a_state())
        assert again.record.seq == last.record.seq + 1
        assert fleet.client.get(fleet.keys.gone("work")) is None  # the tombstone is used up
        assert old_host.read("work") == again  # no RollbackError on the host that saw seq 4

    def test_above_this_hosts_mark(self, fleet: Fleet) -> None:
        """Without a tombstone, the creating host's own mark sets the floor."""
        chains = fleet.host()
        chains.highwater.note("work", 41)
        assert chains.create("work", a_state()).record.seq == 42

    def test_racing_creates_one_wins(self, fleet: Fleet) -> None:
        """Two hosts creating one profile at once: exactly one chain, the other refused."""
        for round_ in range(5):
            profile = f"race{round_}"
            hosts = [fleet.host("a"), fleet.host("b")]
            states = [a_state(profile, tag="racer-a"), a_state(profile, tag="racer-b")]
            pairs = zip(hosts, states, strict=True)
            results = race([functools.partial(h.create, profile, s) for h, s in pairs])
            won = [r for r in results if isinstance(r, Versioned)]
            lost = [r for r in results if isinstance(r, ChainInUseError)]
            assert len(won) == 1 and len(lost) == 1, results
            assert hosts[0].read(profile) == won[0]


def race(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls on threads released together; each one's result or exception."""
    start = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait(THREAD_TIMEOUT)
        try:
            results[i] = calls[i]()
        except Exception as exc:  # the race's loser: its exception is its result
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(THREAD_TIMEOUT)
    return results


class TestCommitJournal:
    """A journal is written only by the owner key's lease, over the chain as read."""

    def test_owner_and_revision_right(self, fleet: Fleet) -> None:
        """With the owner's lease and the read revision, the entry is the chain's record."""
        chains = fleet.host()
        before = chains.create("work", a_state())
        lease = fleet.own("work")
        entry = journal(before)
        rev = chains.commit_journal("work", entry, read_revision=before.revision, lease_id=lease)
        assert chains.read("work") == Versioned(entry, rev)
        assert entry.unresolved is not None

    def test_lease_of_another_host(self, fleet: Fleet) -> None:
        """The owner key bound to another lease: FenceLostError, nothing written."""
        chains = fleet.host()
        before = chains.create("work", a_state())
        fleet.own("work", host="b")
        mine = fleet.client.grant(30).id
        with pytest.raises(FenceLostError, match="no longer owns"):
            chains.commit_journal(
                "work", journal(before), read_revision=before.revision, lease_id=mine
            )
        assert chains.read("work") == before

    def test_owner_key_absent(self, fleet: Fleet) -> None:
        """No owner key (the lease expired or was revoked): FenceLostError."""
        chains = fleet.host()
        before = chains.create("work", a_state())
        lease = fleet.own("work")
        fleet.client.revoke(lease)
        with pytest.raises(FenceLostError):
            chains.commit_journal(
                "work", journal(before), read_revision=before.revision, lease_id=lease
            )
        assert chains.read("work") == before

    def test_owner_key_without_lease(self, fleet: Fleet) -> None:
        """An owner key with no lease at all (written by hand) fences nobody in."""
        chains = fleet.host()
        before = chains.create("work", a_state())
        fleet.client.put(fleet.keys.owner("work"), b"a")
        lease = fleet.client.grant(30).id
        with pytest.raises(FenceLostError):
            chains.commit_journal(
                "work", journal(before), read_revision=before.revision, lease_id=lease
            )

    def test_chain_moved_on(self, fleet: Fleet) -> None:
        """The right lease over a chain that moved on since the read: FenceLostError."""
        chains = fleet.host()
        before = chains.create("work", a_state())
        lease = fleet.own("work")
        moved = with_state(before.record, a_state(refresh_count=3))
        assert chains.commit_resolution("work", moved, entry_revision=before.revision)
        with pytest.raises(FenceLostError, match="moved on"):
            chains.commit_journal(
                "work", journal(before), read_revision=before.revision, lease_id=lease
            )
        current = chains.read("work")
        assert current is not None and current.record == moved

    def test_no_fence_without_lease_or_chain(self, fleet: Fleet) -> None:
        """Lease 0 or revision 0 would match an absent key: refused before etcd."""
        chains = fleet.host()
        before = chains.create("work", a_state())
        with pytest.raises(ValueError):
            chains.commit_journal(
                "work", journal(before), read_revision=before.revision, lease_id=0
            )
        with pytest.raises(ValueError):
            chains.commit_journal("nobody", journal(before), read_revision=0, lease_id=7)


class TestCommitResolution:
    """Resolutions compare the chain's revision alone: of two, exactly one wins."""

    def test_outcome_without_the_lease(self, fleet: Fleet) -> None:
        """The courier's outcome lands after its lease is gone (the revision decides)."""
        chains = fleet.host()
        _, entry, rev, lease = journaled(fleet, chains)
        fleet.client.revoke(lease)
        fleet.own("work", host="b")  # another owner already
        outcome = refreshed(entry)
        new_rev = chains.commit_resolution("work", outcome, entry_revision=rev)
        assert new_rev is not None
        assert chains.read("work") == Versioned(outcome, new_rev)

    def test_racing_resolutions_one_wins(self, fleet: Fleet) -> None:
        """The courier's outcome and an heir's resolution of one entry, released together:
        one gets a revision, the other None, and the chain holds the winner's record."""
        for _ in range(5):
            courier, heir = fleet.host("a"), fleet.host("b")
            profile = "r" + os.urandom(3).hex()
            before = courier.create(profile, a_state(profile))
            lease = fleet.own(profile)
            entry = journal(before)
            rev = courier.commit_journal(
                profile, entry, read_revision=before.revision, lease_id=lease
            )
            mine, theirs = refreshed(entry), resolved_by_heir(entry, T0 + 200)
            results = race(
                [
                    functools.partial(courier.commit_resolution, profile, mine, entry_revision=rev),
                    functools.partial(heir.commit_resolution, profile, theirs, entry_revision=rev),
                ]
            )
            assert sorted(r is None for r in results) == [False, True], results
            winner = mine if results[0] is not None else theirs
            current = heir.read(profile)
            assert current is not None and current.record == winner

    def test_second_resolution_gets_none(self, fleet: Fleet) -> None:
        """A resolution against an entry already resolved gets None and changes nothing."""
        chains = fleet.host()
        _, entry, rev, _ = journaled(fleet, chains)
        heirs = resolved_by_heir(entry, T0 + 200)
        assert chains.commit_resolution("work", heirs, entry_revision=rev)
        assert chains.commit_resolution("work", refreshed(entry), entry_revision=rev) is None
        current = chains.read("work")
        assert current is not None and current.record == heirs


class TestFindAttempt:
    """After a reply lost with the write applied, a read tells what became of an attempt."""

    @contextlib.contextmanager
    def dropping(self, fleet: Fleet) -> Iterator[tuple[FleetChains, ReplyDroppingProxy]]:
        proxy = ReplyDroppingProxy(fleet.cluster.members[0].client_port)
        try:
            yield fleet.host("a", EtcdClient([proxy.url], timeout=3)), proxy
        finally:
            proxy.close()

    def test_journal_applied_reply_lost(self, fleet: Fleet) -> None:
        """A journal commit whose reply was dropped is EtcdOutcomeUnknownError, and the
        read finds the entry: JOURNAL."""
        chains = fleet.host()
        before = chains.create("work", a_state())
        lease = fleet.own("work")
        entry = journal(before)
        with self.dropping(fleet) as (lossy, proxy):
            with pytest.raises(EtcdOutcomeUnknownError):
                lossy.commit_journal("work", entry, read_revision=before.revision, lease_id=lease)
            assert proxy.requests_forwarded == 1
        assert entry.attempt is not None
        seen = chains.find_attempt("work", entry.attempt.id)
        assert seen.kind is SeenKind.JOURNAL
        assert seen.versioned is not None and seen.versioned.record == entry

    def test_outcome_applied_reply_lost(self, fleet: Fleet) -> None:
        """An outcome commit whose reply was dropped: the read finds it, RESOLVED, with the
        courier's own record."""
        chains = fleet.host()
        _, entry, rev, _ = journaled(fleet, chains)
        outcome = refreshed(entry)
        with self.dropping(fleet) as (lossy, _), pytest.raises(EtcdOutcomeUnknownError):
            lossy.commit_resolution("work", outcome, entry_revision=rev)
        assert entry.attempt is not None
        seen = chains.find_attempt("work", entry.attempt.id)
        assert seen.kind is SeenKind.RESOLVED
        assert seen.versioned is not None and seen.versioned.record == outcome

    def test_cancellation_found_resolved(self, fleet: Fleet) -> None:
        """A cancelled entry is RESOLVED too (the courier took it back)."""
        chains = fleet.host()
        before, entry, rev, _ = journaled(fleet, chains)
        assert chains.commit_resolution(
            "work", cancelled(entry, before.record.state), entry_revision=rev
        )
        assert entry.attempt is not None
        assert chains.find_attempt("work", entry.attempt.id).kind is SeenKind.RESOLVED

    def test_refused_journal_reply_lost_is_absent(self, fleet: Fleet) -> None:
        """A journal whose compare failed (not the owner), reply dropped: ABSENT."""
        chains = fleet.host()
        before = chains.create("work", a_state())
        fleet.own("work", host="b")
        entry = journal(before)
        mine = fleet.client.grant(30).id
        with self.dropping(fleet) as (lossy, _), pytest.raises(EtcdOutcomeUnknownError):
            lossy.commit_journal("work", entry, read_revision=before.revision, lease_id=mine)
        assert entry.attempt is not None
        seen = chains.find_attempt("work", entry.attempt.id)
        assert seen.kind is SeenKind.ABSENT
        assert seen.versioned == before

    def test_heirs_resolution_is_not_the_couriers(self, fleet: Fleet) -> None:
        """An heir's resolution names the same attempt: RESOLVED, but with the heir's record,
        which the courier tells from its own outcome by comparing them."""
        chains = fleet.host()
        _, entry, rev, _ = journaled(fleet, chains)
        heirs = resolved_by_heir(entry, T0 + 200)
        assert chains.commit_resolution("work", heirs, entry_revision=rev)
        assert entry.attempt is not None
        seen = chains.find_attempt("work", entry.attempt.id)
        assert seen.kind is SeenKind.RESOLVED
        assert seen.versioned is not None and seen.versioned.record != refreshed(entry)

    def test_moved_past_is_absent(self, fleet: Fleet) -> None:
        """Once the chain moved past the resolution, the attempt is ABSENT."""
        chains = fleet.host()
        _, entry, rev, _ = journaled(fleet, chains)
        outcome = refreshed(entry)
        new_rev = chains.commit_resolution("work", outcome, entry_revision=rev)
        assert new_rev is not None
        later = with_state(outcome, replace(outcome.state, refresh_count=99))
        assert chains.commit_resolution("work", later, entry_revision=new_rev)
        assert entry.attempt is not None
        assert chains.find_attempt("work", entry.attempt.id).kind is SeenKind.ABSENT

    def test_no_chain_is_absent(self, fleet: Fleet) -> None:
        """No chain key at all: ABSENT with nothing read."""
        seen = fleet.host().find_attempt("work", new_attempt_id())
        assert seen.kind is SeenKind.ABSENT and seen.versioned is None


class TestReplace:
    """An import over a fleet chain never takes a token the chain holds or may have sent."""

    def test_current_token_refused(self, fleet: Fleet) -> None:
        """The chain's current refresh token: TokenHeldError, chain untouched."""
        chains = fleet.host()
        made = chains.create("work", a_state())
        same = replace(a_state(), refresh_token=made.record.state.refresh_token)
        with pytest.raises(TokenHeldError, match="current one") as caught:
            chains.replace("work", same, expected_revision=made.revision)
        one_line_without_tokens(caught.value)
        assert chains.read("work") == made

    def test_unresolved_journals_token_refused(self, fleet: Fleet) -> None:
        """The token an unresolved journal names (it may be on the wire): TokenSpentError."""
        chains = fleet.host()
        before, entry, rev, _ = journaled(fleet, chains)
        token = before.record.state.refresh_token
        assert token is not None and entry.state.in_flight is not None
        assert entry.state.in_flight.rt_hash == token_hash(token)
        with pytest.raises(TokenSpentError, match="not resolved") as caught:
            chains.replace("work", replace(a_state(), refresh_token=token), expected_revision=rev)
        one_line_without_tokens(caught.value)
        assert chains.read("work") == Versioned(entry, rev)

    def test_spent_token_refused(self, fleet: Fleet) -> None:
        """A token the chain already sent (rotated away): TokenSpentError."""
        chains = fleet.host()
        before, entry, rev, _ = journaled(fleet, chains)
        outcome = refreshed(entry)
        new_rev = chains.commit_resolution("work", outcome, entry_revision=rev)
        assert new_rev is not None
        old = replace(a_state(), refresh_token=before.record.state.refresh_token)
        with pytest.raises(TokenSpentError, match="spent"):
            chains.replace("work", old, expected_revision=new_rev)

    def test_new_pair_replaces(self, fleet: Fleet) -> None:
        """A new pair is committed above the chain's seq, continuing its generation."""
        chains = fleet.host()
        made = chains.create("work", a_state(generation=7))
        new = chains.replace("work", a_state(tag="pasted"), expected_revision=made.revision)
        assert new.record.seq == made.record.seq + 1
        assert new.record.state.generation == 8
        assert chains.read("work") == new

    def test_stale_revision(self, fleet: Fleet) -> None:
        """A replace against a revision the chain moved past: FenceLostError."""
        chains = fleet.host()
        made = chains.create("work", a_state())
        chains.replace("work", a_state(tag="first"), expected_revision=made.revision)
        with pytest.raises(FenceLostError):
            chains.replace("work", a_state(tag="second"), expected_revision=made.revision)

    def test_missing_profile(self, fleet: Fleet) -> None:
        """Replacing a profile with no chain is ProfileError."""
        with pytest.raises(ProfileError):
            fleet.host().replace("work", a_state(), expected_revision=1)


class TestRemove:
    """A move out deletes the chain and leaves its seq behind, never mid-attempt."""

    def test_refused_while_unresolved(self, fleet: Fleet) -> None:
        """A chain with an unresolved journal is not removed (BusyError)."""
        chains = fleet.host()
        _, entry, rev, _ = journaled(fleet, chains)
        with pytest.raises(BusyError, match="not resolved"):
            chains.remove("work", expected_revision=rev)
        assert chains.read("work") == Versioned(entry, rev)

    def test_stale_revision(self, fleet: Fleet) -> None:
        """A remove against an old revision: FenceLostError, chain kept."""
        chains = fleet.host()
        made = chains.create("work", a_state())
        newer = chains.replace("work", a_state(tag="next"), expected_revision=made.revision)
        with pytest.raises(FenceLostError):
            chains.remove("work", expected_revision=made.revision)
        assert chains.read("work") == newer

    def test_damaged_chain_removed_above_the_mark(self, fleet: Fleet) -> None:
        """A chain that does not open can be moved out; its tombstone keeps this host's
        mark, so the next create is above it."""
        chains = fleet.host()
        made = chains.create("work", a_state())
        fleet.client.put(fleet.keys.chain("work"), b"garbage")
        kv = chains.peek("work")
        assert kv is not None
        chains.remove("work", expected_revision=kv.mod_revision)
        assert fleet.host("fresh").create("work", a_state()).record.seq == made.record.seq + 1
