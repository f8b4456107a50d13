"""The engine on its interfaces alone: a MemoryStore, a FakeRefresher, a FakeClock and a
FakeScheduler. No files, no sockets, no sandbox, no HTTP: each test takes milliseconds.

The FakeRefresher runs the real refresh transaction against the same store, so what the
engine absorbs is what a courier would have left there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aac_tokend.core.config import Config
from aac_tokend.core.importer import ImportRequest
from aac_tokend.core.outcome import Refreshed, Rejected, Transient
from aac_tokend.core.policy import begin_attempt
from aac_tokend.core.report import RowState, StatusRow
from aac_tokend.core.state import ProfileState
from aac_tokend.core.tokens import token_hash
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.errors import ProfileError, StorageError, TokenHeldError
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.refresh.transaction import CourierJob
from aac_tokend.testing import (
    T0,
    FakeClock,
    FakeRefresher,
    FakeScheduler,
    MemoryStore,
    RecordingSink,
    oauth_state,
)

OLD_ACCESS = "access-token-aaaaaaaaaaaa"  # oauth_state's placeholders
OLD_REFRESH = "refresh-token-rrrrrrrrrrrr"
NEW_ACCESS = "access-after-rotation-bbbbbbbb"
NEW_REFRESH = "refresh-after-rotation-ssssssss"
ENDPOINT = "https://pingauth.alteryxcloud.com/as/token"


@dataclass
class Rig:
    """An engine and the fakes it runs on."""

    store: MemoryStore
    refresher: FakeRefresher
    clock: FakeClock
    scheduler: FakeScheduler
    sink: RecordingSink
    engine: Engine

    def state(self, name: str = "work") -> ProfileState:
        state = self.store.load(name)
        assert state is not None
        return state

    def row(self, name: str = "work") -> StatusRow:
        (row,) = self.engine.status(only=name)
        return row


@pytest.fixture
def rig() -> Iterator[Rig]:
    yield _rig(MemoryStore())


def _rig(store: MemoryStore) -> Rig:
    clock, sink = FakeClock(T0), RecordingSink()
    refresher, scheduler = FakeRefresher(store, clock), FakeScheduler()
    engine = Engine(
        store=store,
        refresher=refresher,
        scheduler=scheduler,
        clock=clock,
        config=Config(notifications=False),
        alerter=Alerter([sink]),
        socket_path=lambda name: Path("/run/test-engine") / f"{name}.token.sock",
    )
    return Rig(store, refresher, clock, scheduler, sink, engine)


def _started(rig: Rig, *states: ProfileState) -> Engine:
    for state in states or (oauth_state(),):
        rig.store.save(state)
    rig.engine.start()
    return rig.engine


def _rotated(expires_in: float = 3600) -> Refreshed:
    return Refreshed(NEW_ACCESS, NEW_REFRESH, expires_in)


class TestAdoption:
    """At start and on each tick, stored profiles are adopted, or reported."""

    def test_stored_profile_is_served_and_scheduled(self, rig: Rig) -> None:
        """A stored profile is served at once and its refresh scheduled before expiry."""
        engine = _started(rig)
        assert engine.current_token("work") == OLD_ACCESS.encode()
        at = rig.scheduler.next_at("work")
        assert at is not None and T0 < at < T0 + 3600

    def test_journal_of_a_dead_courier_is_recovered_as_ambiguous(self, rig: Rig) -> None:
        """A journal left on the store is settled: nothing in flight, its token ambiguous."""
        journal = begin_attempt(oauth_state(), T0)
        engine = _started(rig, journal)
        stored = rig.state()
        assert stored.in_flight is None
        assert stored.ambiguous_rt_hash == token_hash(OLD_REFRESH)
        assert stored.generation > journal.generation
        assert engine.current_token("work") == OLD_ACCESS.encode()
        assert rig.refresher.jobs == []

    def test_corrupt_entry_is_reported_and_retried_each_tick(self, rig: Rig) -> None:
        """A corrupt entry is a status row, not served, and served once repaired."""
        rig.store.save(oauth_state())
        rig.store.corrupt("work")
        engine = _started(rig, oauth_state(profile="other"))
        assert engine.current_token("work") is None
        assert rig.row().state is RowState.CORRUPT
        assert engine.current_token("other") is not None
        engine.tick()
        assert rig.row().state is RowState.CORRUPT
        rig.store.repair("work", oauth_state())
        engine.tick()
        assert engine.current_token("work") == OLD_ACCESS.encode()
        assert rig.row().state is not RowState.CORRUPT

    def test_unreadable_entry_is_retried(self, rig: Rig) -> None:
        """An entry that cannot be read now is 'unreadable' until it reads again."""
        rig.store.save(oauth_state())
        rig.store.unreadable("work")
        engine = _started(rig, oauth_state(profile="other"))
        assert rig.row().state is RowState.UNREADABLE
        rig.store.unreadable("work", broken=False)
        engine.tick()
        assert engine.current_token("work") == OLD_ACCESS.encode()

    def test_misnamed_entry_is_reported_by_where_it_is(self, rig: Rig) -> None:
        """An entry whose name is not a profile's is reported 'misnamed', naming it."""
        rig.store.add_stray("work (conflicted copy)")
        _started(rig)
        row = rig.row("work (conflicted copy)")
        assert row.state is RowState.MISNAMED
        assert "memory:work (conflicted copy)" in str(row.alert)

    def test_pending_outcome_of_the_journal_is_adopted(self, rig: Rig) -> None:
        """A journal with its outcome kept as pending: the outcome is saved and served."""
        journal = begin_attempt(oauth_state(), T0)
        successor = journal.bumped(
            in_flight=None, access_token=NEW_ACCESS, refresh_token=NEW_REFRESH
        )
        rig.store.save(journal)
        rig.store.keep_pending("work", rig.store.seal(successor))
        engine = _started(rig, journal)
        assert engine.current_token("work") == NEW_ACCESS.encode()
        assert rig.state() == successor
        assert rig.store.pending("work") is None

    def test_profile_locked_by_an_earlier_courier_waits_for_it(self, rig: Rig) -> None:
        """A profile whose lock is held is listed as waiting, and served once it is let go."""
        rig.store.save(oauth_state())
        release, adopted = threading.Event(), threading.Event()
        rig.engine._on_profiles_changed = adopted.set

        def courier() -> None:
            with rig.store.locked("work", timeout=1):
                release.wait(10)

        holder = threading.Thread(target=courier)
        holder.start()
        try:
            while rig.store.lock_is_free("work"):
                pass
            rig.engine.start()
            assert rig.engine.waiting_for_courier("work")
            assert rig.engine.current_token("work") is None
        finally:
            release.set()
            holder.join()
        assert adopted.wait(10)
        assert rig.engine.current_token("work") == OLD_ACCESS.encode()


class TestRefreshOutcomes:
    """What each outcome of a refresh makes of the served token and the schedule."""

    def test_refreshed_serves_the_new_token(self, rig: Rig) -> None:
        """A rotation is durable on the store and its access token served at once."""
        engine = _started(rig)
        rig.refresher.script(_rotated())
        state = engine.refresh("work")
        assert rig.refresher.sent == [OLD_REFRESH]
        assert [job.profile for job in rig.refresher.jobs] == ["work"]
        assert state.refresh_token == NEW_REFRESH and rig.state() == state
        assert engine.current_token("work") == NEW_ACCESS.encode()
        assert rig.refresher.results[-1].kind is CourierKind.REFRESHED

    def test_rejected_is_not_retried_and_not_served_after_expiry(self, rig: Rig) -> None:
        """A rejection ends the chain: no retry; the last token serves until it expires."""
        engine = _started(rig)
        rig.refresher.script(Rejected("invalid_grant", "revoked", 400))
        state = engine.refresh("work")
        assert state.rejection is not None and rig.state().rejection is not None
        assert rig.scheduler.next_at("work") is None
        assert engine.refresh("work").rejection is not None
        assert rig.refresher.sent == [OLD_REFRESH]
        assert engine.current_token("work") == OLD_ACCESS.encode()
        rig.clock.advance(3600)
        assert engine.current_token("work") is None

    def test_transient_backs_off(self, rig: Rig) -> None:
        """A transient failure is counted and retried later, not at once."""
        engine = _started(rig)
        rig.clock.advance(3000)  # due
        rig.refresher.script(Transient("timeout"))
        state = engine.refresh("work")
        assert state.consecutive_failures == 1 and state.refresh_token == OLD_REFRESH
        at = rig.scheduler.next_at("work")
        assert at is not None and at > rig.clock.now()
        assert engine.current_token("work") == OLD_ACCESS.encode()

    def test_scheduled_refresh_runs_when_due(self, rig: Rig) -> None:
        """The scheduled job, run when due, refreshes through the refresher."""
        _started(rig)
        at = rig.scheduler.next_at("work")
        assert at is not None
        rig.refresher.script(_rotated())
        rig.clock.set(at)
        assert rig.scheduler.run_due(at) == 1
        assert rig.engine.current_token("work") == NEW_ACCESS.encode()


class TestLostCourier:
    """A courier that died after its journal: the attempt is settled as ambiguous."""

    def test_lost_after_journal(self, rig: Rig) -> None:
        """The journal it left is recovered, the failure counted, nothing served stale."""
        engine = _started(rig)
        rig.refresher.die_after_journal()
        state = engine.refresh("work")
        assert rig.refresher.results[-1].kind is CourierKind.LOST
        assert rig.refresher.sent == []
        assert rig.state().in_flight is None
        assert state.ambiguous_rt_hash == token_hash(OLD_REFRESH)
        assert state.consecutive_failures == 1
        assert engine.current_token("work") == OLD_ACCESS.encode()


class TestUnsavedPair:
    """A rotated pair the store refused is held, served, never spent, and written late."""

    def test_held_served_not_spent_then_written_by_the_tick(self, rig: Rig) -> None:
        """Served at once; a second refresh sends nothing; the tick saves it once it can."""
        engine = _started(rig)
        rig.refresher.refuse_outcome()
        rig.refresher.script(_rotated())
        state = engine.refresh("work")
        assert rig.refresher.results[-1].kind is CourierKind.STORAGE_FAILED
        assert state.refresh_token == NEW_REFRESH
        assert engine.current_token("work") == NEW_ACCESS.encode()
        assert rig.state().in_flight is not None  # the store holds only the journal
        assert rig.store.pending("work") is not None
        assert rig.row().alert
        assert engine.refresh("work") is state
        assert len(rig.refresher.jobs) == 1 and rig.refresher.sent == [OLD_REFRESH]
        rig.store.fail_saves = True
        engine.tick()
        assert rig.state().in_flight is not None
        rig.store.fail_saves = False
        engine.tick()
        assert rig.state() == state
        assert rig.store.pending("work") is None
        assert not rig.row().alert


def _request(profile: str, access: str, refresh: str) -> ImportRequest:
    return ImportRequest(
        profile=profile,
        access_token=access,
        refresh_token=refresh,
        expires_in=3600,
        token_endpoint=ENDPOINT,
        client_id="client",
    )


class TestImportAndRemove:
    """An import takes effect at once; a removal stops serving and deletes."""

    def test_import_serves_the_new_chain(self, rig: Rig) -> None:
        """An imported pair is stored and served, and a refresh spends its token."""
        engine = _started(rig)
        state = engine.import_profile(_request("team", "imported-access-cccc", "imported-rt-dd"))
        assert rig.state("team") == state
        assert engine.current_token("team") == b"imported-access-cccc"
        rig.refresher.script(_rotated())
        engine.refresh("team")
        assert rig.refresher.sent == ["imported-rt-dd"]

    def test_token_held_by_another_profile_is_refused(self, rig: Rig) -> None:
        """A refresh token another profile holds is refused; neither chain changes."""
        engine = _started(rig)
        with pytest.raises(TokenHeldError, match="'work'"):
            engine.import_profile(_request("team", "imported-access-cccc", OLD_REFRESH))
        assert rig.store.load("team") is None and engine.current_token("team") is None
        assert rig.state() == oauth_state()

    def test_import_replaces_an_unsaved_pair(self, rig: Rig) -> None:
        """An import over a pair the store refused drops that pair and its pending copy."""
        engine = _started(rig)
        rig.refresher.refuse_outcome()
        rig.refresher.script(_rotated())
        engine.refresh("work")
        engine.import_profile(_request("work", "imported-access-cccc", "imported-rt-dd"))
        assert rig.store.pending("work") is None
        engine.tick()
        assert rig.state().refresh_token == "imported-rt-dd"

    def test_remove_stops_serving_and_deletes(self, rig: Rig) -> None:
        """A removed profile is not served, not scheduled, not stored; removing again fails."""
        engine = _started(rig)
        engine.remove("work")
        assert engine.current_token("work") is None
        assert rig.scheduler.next_at("work") is None
        assert rig.store.load("work") is None and engine.profiles() == []
        with pytest.raises(ProfileError):
            engine.remove("work")

    def test_refresh_of_an_unknown_profile(self, rig: Rig) -> None:
        """Refreshing a profile the engine does not hold is a ProfileError."""
        _started(rig)
        with pytest.raises(ProfileError):
            rig.engine.refresh("nobody")
        assert rig.refresher.jobs == []


class TestBetweenCourierAndEngine:
    """An import or remove landing after the courier let go of the lock wins over its result."""

    def test_remove_after_a_refused_save_stays_removed(self, rig: Rig) -> None:
        """The refused pair is dropped, not held: nothing served, kept or listed, ever."""
        engine = _started(rig)
        rig.refresher.refuse_outcome()
        rig.refresher.script(_rotated())
        rig.refresher.after_unlock = lambda: engine.remove("work")
        with pytest.raises(ProfileError, match="removed during the refresh"):
            engine.refresh("work")
        assert rig.refresher.results[-1].kind is CourierKind.STORAGE_FAILED
        for _ in range(2):
            assert engine.profiles() == [] and engine.status() == []
            assert engine.current_token("work") is None
            assert rig.store.pending("work") is None and rig.store.load("work") is None
            assert rig.scheduler.next_at("work") is None
            engine.tick()

    def test_import_after_a_refused_save_wins(self, rig: Rig) -> None:
        """The import is served and held, so its pair cannot be imported elsewhere."""
        engine = _started(rig)
        rig.refresher.refuse_outcome()
        rig.refresher.script(_rotated())
        imported = _request("work", "imported-access-cccc", "imported-rt-dd")
        rig.refresher.after_unlock = lambda: engine.import_profile(imported)
        state = engine.refresh("work")
        assert state.refresh_token == "imported-rt-dd" and state == rig.state()
        assert engine.current_token("work") == b"imported-access-cccc"
        assert rig.store.pending("work") is None and not rig.row().alert
        with pytest.raises(TokenHeldError, match="'work'"):
            engine.import_profile(_request("team", "imported-access-cccc", "imported-rt-dd"))
        engine.tick()
        assert rig.state() == state and rig.store.load("team") is None

    def test_remove_after_a_rotation_is_a_profile_error(self, rig: Rig) -> None:
        """A durable outcome read back after a remove: the refresh says so, typed."""
        engine = _started(rig)
        rig.refresher.script(_rotated())
        rig.refresher.after_unlock = lambda: engine.remove("work")
        with pytest.raises(ProfileError, match="removed during the refresh"):
            engine.refresh("work")
        assert engine.profiles() == [] and engine.current_token("work") is None

    def test_remove_after_a_lost_courier_is_a_profile_error(self, rig: Rig) -> None:
        """A lost courier's profile removed before the engine adopts its journal: typed too."""
        engine = _started(rig)
        rig.refresher.die_after_journal()
        rig.refresher.after_unlock = lambda: engine.remove("work")
        with pytest.raises(ProfileError, match="removed during the refresh"):
            engine.refresh("work")
        assert engine.profiles() == [] and rig.store.load("work") is None

    def test_import_before_the_courier_locks_is_not_a_failure(self, rig: Rig) -> None:
        """A courier that finds a fresh import sends nothing and charges it no failure."""
        engine = _started(rig)
        imported = _request("work", "imported-access-cccc", "imported-rt-dd")
        rig.refresher.before_lock = lambda: engine.import_profile(imported)
        state = engine.refresh("work")
        assert rig.refresher.results[-1].kind is CourierKind.STATE_CHANGED
        assert rig.refresher.sent == []
        assert state == rig.state() and state.refresh_token == "imported-rt-dd"
        assert state.consecutive_failures == 0 and state.last_error is None
        assert rig.row().state is RowState.OK


class _JournalStays(MemoryStore):
    """A disk that takes the journal but fails its directory's fsync, then every write."""

    armed = False

    def save_journal(self, journal: ProfileState) -> None:
        super().save_journal(journal)
        if self.armed:
            self.armed, self.fail_saves = False, True
            raise StorageError("cannot write memory:work (test: EIO after the rename)")


class TestJournalLeftOnTheStore:
    """A journal that stays after a failed attempt: the attempt counts as a failure."""

    def test_journal_write_and_its_undo_fail(self) -> None:
        """The journal stays (maybe sent); status shows retrying, one failure, the error."""
        rig = _rig(_JournalStays())
        engine = _started(rig)
        assert isinstance(rig.store, _JournalStays)
        rig.store.armed = True
        state = engine.refresh("work")
        rig.store.fail_saves = False
        assert rig.refresher.results[-1].kind is CourierKind.STORAGE_FAILED
        assert rig.refresher.sent == [] and rig.state().in_flight is not None
        assert state.consecutive_failures == 1 and state.last_error
        row = rig.row()
        assert row.state is RowState.RETRYING and row.consecutive_failures == 1
        at = rig.scheduler.next_at("work")
        assert at is not None and at > rig.clock.now()

    def test_lost_courier_whose_recovery_cannot_be_saved(self, rig: Rig) -> None:
        """A lost courier's journal that cannot be settled on the store still counts."""
        engine = _started(rig)
        rig.refresher.die_after_journal()

        def disk_fails() -> None:
            rig.store.fail_saves = True

        rig.refresher.after_unlock = disk_fails
        state = engine.refresh("work")
        rig.store.fail_saves = False
        assert rig.refresher.results[-1].kind is CourierKind.LOST
        assert rig.state().in_flight is not None
        assert state.consecutive_failures == 1
        assert rig.row().state is RowState.RETRYING


class _Unlistable(MemoryStore):
    """A store whose listing can fail (a state directory that cannot be read)."""

    listing_fails = False

    def profiles(self) -> list[str]:
        if self.listing_fails:
            raise StorageError("cannot list memory: (test: EIO)")
        return super().profiles()


class TestFileMovedAway:
    """A served profile whose stored entry went away outside the daemon."""

    def test_leaves_status_at_the_next_tick(self, rig: Rig) -> None:
        """Not listed, served nor scheduled any more once the tick sees it gone."""
        engine = _started(rig, oauth_state(), oauth_state(profile="other"))
        rig.store.delete("work")
        engine.tick()
        assert engine.profiles() == ["other"]
        assert [row.profile for row in engine.status()] == ["other"]
        assert engine.current_token("work") is None and rig.scheduler.next_at("work") is None

    def test_with_an_unsaved_pair_leaves_too(self, rig: Rig) -> None:
        """A pair the store refused is dropped with it, never written back."""
        engine = _started(rig)
        rig.refresher.refuse_outcome()
        rig.refresher.script(_rotated())
        engine.refresh("work")
        rig.store.delete("work")
        engine.tick()
        engine.tick()
        assert engine.profiles() == [] and rig.store.load("work") is None
        assert rig.store.pending("work") is None

    def test_unsaved_pair_not_written_back_while_unlisted(self) -> None:
        """With the listing failing, the late retry itself forgets the profile it finds gone."""
        rig = _rig(_Unlistable())
        engine = _started(rig)
        rig.refresher.refuse_outcome()
        rig.refresher.script(_rotated())
        engine.refresh("work")
        assert isinstance(rig.store, _Unlistable)
        rig.store.delete("work")
        rig.store.listing_fails = True
        engine.tick()
        assert engine.profiles() == [] and rig.store.load("work") is None
        assert rig.store.pending("work") is None and rig.scheduler.next_at("work") is None

    def test_remove_succeeds(self, rig: Rig) -> None:
        """remove of a served profile whose entry is already gone forgets it."""
        engine = _started(rig)
        rig.store.delete("work")
        engine.remove("work")
        assert engine.profiles() == [] and engine.current_token("work") is None
        with pytest.raises(ProfileError):
            engine.remove("work")


class TestStatus:
    """status() lists served profiles first, then those it cannot use."""

    def test_served_then_unusable(self, rig: Rig) -> None:
        """One row per profile, served or not."""
        rig.store.corrupt("broken")
        _started(rig)
        assert [row.profile for row in rig.engine.status()] == ["work", "broken"]


class _Unstartable:
    """A refresher whose courier cannot be started (no interpreter, no process slot)."""

    def __init__(self) -> None:
        self.jobs: list[CourierJob] = []

    def refresh(self, job: CourierJob) -> CourierResult:
        self.jobs.append(job)
        return CourierResult(CourierKind.NOT_STARTED, "the courier could not be started: gone")


class TestCourierNotStarted:
    """A courier that could not start is a failure like any other: counted, backed off."""

    def test_not_started_is_counted_and_backs_off(self, rig: Rig) -> None:
        """The failure and its reason show in the state; the retry waits."""
        refresher = _Unstartable()
        engine = Engine(
            store=rig.store,
            refresher=refresher,
            scheduler=rig.scheduler,
            clock=rig.clock,
            config=Config(notifications=False),
            alerter=Alerter([rig.sink]),
            socket_path=lambda name: Path("/run/test-engine") / f"{name}.token.sock",
        )
        rig.store.save(oauth_state())
        engine.start()
        rig.clock.advance(3000)  # due
        state = engine.refresh("work")
        assert state.consecutive_failures == 1 and state.refresh_token == OLD_REFRESH
        assert state.last_error == "the courier could not be started: gone"
        at = rig.scheduler.next_at("work")
        assert at is not None and at > rig.clock.now()
        assert engine.current_token("work") == OLD_ACCESS.encode()
        assert engine.refresh("work").consecutive_failures == 2

    def test_the_job_names_the_generation_it_was_built_from(self, rig: Rig) -> None:
        """The courier's fence: the job carries the served state's generation."""
        engine = _started(rig)
        generation = rig.state().generation
        rig.refresher.script(_rotated())
        engine.refresh("work")
        assert rig.refresher.jobs[-1].generation == generation
