"""A chain has one owner: imports of a held or spent refresh token are refused, pure part.

The end-to-end half (real daemon, real sandbox, offline CLI) is in test_ownership_e2e.py.
"""

from __future__ import annotations

import errno
import json
import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aac_tokend.core.config import Config
from aac_tokend.core.importer import ImportRequest, parse_import_text
from aac_tokend.core.outcome import Refreshed, Transient
from aac_tokend.core.ownership import SPENT_HISTORY, SPENT_IMPORTED_HISTORY, claim, remember_spent
from aac_tokend.core.policy import apply_outcome, begin_attempt, recover_interrupted
from aac_tokend.core.state import (
    FORMAT_VERSION,
    InFlight,
    ProfileState,
    TokenKind,
    state_from_json,
    state_to_json,
)
from aac_tokend.core.tokens import token_hash
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.daemon.scheduling import SystemClock
from aac_tokend.errors import (
    ChainInUseError,
    StateCorruptError,
    TokenHeldError,
    TokenSpentError,
)
from aac_tokend.refresh.courier import InProcessRefresher
from aac_tokend.refresh.endpoint import TokenEndpoint
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.refresh.transaction import CourierJob, carry
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore
from aac_tokend.testing import T0, FailingFileLayer, FakeScheduler, oauth_state

OLD = "refresh-token-rrrrrrrrrrrr"  # oauth_state's refresh token


def rotate(state: ProfileState, new_refresh: str, now: float = T0) -> ProfileState:
    """One successful refresh, journal included, as a courier makes it."""
    outcome = Refreshed("acc-" + new_refresh, new_refresh, 3600)
    return apply_outcome(begin_attempt(state, now), outcome, now + 1)


def pair(refresh: str, profile: str = "work") -> ProfileState:
    """What build_state makes of an import of ``refresh`` into ``profile``."""
    return oauth_state(profile=profile, refresh_token=refresh, access_token="acc-" + refresh)


class TestLegacyOverChain:
    """A static token replaces a live OAuth chain only when the caller says so."""

    def test_refused_without_replace_chain(self) -> None:
        """claim raises ChainInUseError and nothing is returned to save."""
        legacy = replace(pair("x"), kind=TokenKind.LEGACY, refresh_token=None)
        with pytest.raises(ChainInUseError, match="--yes"):
            claim(legacy, [pair(OLD)], [])

    def test_allowed_with_replace_chain_or_over_a_dead_chain(self) -> None:
        """With replace_chain, or when the chain holds no refresh token, the import proceeds."""
        legacy = replace(pair("x"), kind=TokenKind.LEGACY, refresh_token=None)
        assert claim(legacy, [pair(OLD)], [], replace_chain=True) is not None
        assert claim(legacy, [replace(legacy, generation=3)], []) is not None


class TestHeld:
    """A refresh token another profile holds is refused, naming that profile."""

    def test_another_profiles_current_token(self) -> None:
        """Importing 'home''s current refresh token into 'work' says 'home' holds it."""
        home = pair("rt-home", profile="home")
        with pytest.raises(TokenHeldError, match=r"profile 'home' already holds") as caught:
            claim(pair("rt-home"), [], [home])
        assert "rt-home" not in str(caught.value) and "\n" not in str(caught.value)

    def test_a_pending_pair_in_memory_is_held(self) -> None:
        """A newer pair the daemon holds but the disk refused counts, not only the file."""
        on_disk = pair("rt-1", profile="home")
        pending = rotate(on_disk, "rt-2")
        with pytest.raises(TokenHeldError, match="'home'"):
            claim(pair("rt-2"), [], [on_disk, pending])

    def test_the_older_copy_of_a_pending_pair_is_spent_not_held(self) -> None:
        """The disk's token under a newer pending pair was sent: it is spent."""
        on_disk = pair("rt-1", profile="home")
        pending = rotate(on_disk, "rt-2")
        with pytest.raises(TokenSpentError, match="'home'"):
            claim(pair("rt-1"), [], [on_disk, pending])

    def test_a_static_token_is_not_a_chain(self) -> None:
        """A legacy import is never refused for sharing (it has no refresh token)."""
        legacy = replace(pair("x"), kind=TokenKind.LEGACY, refresh_token=None)
        assert claim(legacy, [], [replace(legacy, profile="home")]) == legacy


class TestSpent:
    """A refresh token some profile has already sent is refused as spent."""

    def test_own_rotated_away_token(self) -> None:
        """After one rotation, re-importing the imported pair into the profile is refused."""
        now = rotate(pair(OLD), "rt-2")
        with pytest.raises(TokenSpentError, match="by this profile and is spent"):
            claim(pair(OLD), [now], [])

    def test_another_profiles_spent_token(self) -> None:
        """A token 'home' rotated away from is refused for 'work', naming 'home'."""
        home = rotate(pair("rt-1", profile="home"), "rt-2")
        with pytest.raises(TokenSpentError, match="profile 'home'"):
            claim(pair("rt-1"), [], [home])

    def test_the_journal_names_a_token_that_may_be_spent(self) -> None:
        """A refresh in flight (or interrupted, outcome unknown) marks its token spent."""
        journal = replace(pair("rt-1", profile="home"), in_flight=InFlight(token_hash("rt-x"), T0))
        with pytest.raises(TokenSpentError):
            claim(pair("rt-x"), [], [journal])
        ambiguous = replace(pair("rt-1", profile="home"), ambiguous_rt_hash=token_hash("rt-y"))
        with pytest.raises(TokenSpentError):
            claim(pair("rt-y"), [], [ambiguous])

    def test_history_survives_a_new_import(self) -> None:
        """Importing a fresh pair keeps the profile's spent history, so older pairs stay refused."""
        rotated = rotate(rotate(pair(OLD), "rt-2"), "rt-3")
        fresh = claim(pair("rt-new"), [rotated], [])
        assert fresh is not None and fresh.refresh_token == "rt-new"
        for spent in (OLD, "rt-2"):
            with pytest.raises(TokenSpentError):
                claim(pair(spent), [fresh], [])

    def test_a_replaced_journal_is_remembered(self) -> None:
        """A 0.1.0 file's in-flight token (never in a history) stays spent after an import."""
        journal = replace(pair(OLD), in_flight=InFlight(token_hash(OLD), T0))
        fresh = claim(pair("rt-new"), [journal], [])
        assert fresh is not None
        with pytest.raises(TokenSpentError):
            claim(pair(OLD), [fresh], [])

    def test_an_unsent_replaced_token_may_come_back(self) -> None:
        """A pair replaced before it was ever sent is not spent: importing it again works."""
        first = pair("rt-1")
        second = claim(pair("rt-2"), [first], [])
        assert second is not None
        again = claim(pair("rt-1"), [second], [])
        assert again is not None and again.refresh_token == "rt-1"


class TestCurrentPair:
    """Re-importing the current pair is a no-op."""

    def test_current_pair_is_a_no_op(self) -> None:
        """The profile's own current refresh token gives None: nothing to save or send."""
        current = rotate(pair(OLD), "rt-2")
        assert claim(pair("rt-2"), [current], []) is None

    def test_current_pair_after_a_failed_attempt(self) -> None:
        """A token sent once without an answer is still current: its re-import is a no-op."""
        failed = apply_outcome(begin_attempt(pair(OLD), T0), Transient("HTTP 503"), T0 + 1)
        assert token_hash(OLD) in failed.spent_imported_rt_hashes
        assert claim(pair(OLD), [failed], []) is None

    def test_newest_own_version_is_current(self) -> None:
        """With a pending pair in memory, the disk's older token is spent, the newer current."""
        on_disk = pair(OLD)
        pending = rotate(on_disk, "rt-2")
        assert claim(pair("rt-2"), [on_disk, pending], []) is None
        with pytest.raises(TokenSpentError):
            claim(pair(OLD), [on_disk, pending], [])


class TestHistory:
    """The spent history is recorded before a token leaves, and bounded."""

    def test_recorded_in_the_journal(self) -> None:
        """begin_attempt's journal already lists the token it is about to send."""
        journal = begin_attempt(pair(OLD), T0)
        assert token_hash(OLD) in journal.spent_imported_rt_hashes
        recovered = recover_interrupted(journal, T0 + 5)
        assert token_hash(OLD) in recovered.spent_imported_rt_hashes

    def test_retries_of_one_token_are_one_entry(self) -> None:
        """A token retried a hundred times is recorded once."""
        state = pair(OLD)
        for i in range(100):
            state = apply_outcome(begin_attempt(state, T0 + i), Transient("down"), T0 + i)
        assert state.spent_imported_rt_hashes == (token_hash(OLD),)
        assert state.spent_rt_hashes == ()

    def test_long_rotation_stays_bounded(self) -> None:
        """Thousands of rotations keep the newest 256 rotated hashes and the imported one."""
        state = pair(OLD)
        sends = 8 * SPENT_HISTORY
        for i in range(sends):
            state = remember_spent(replace(state, refresh_count=i), f"rt-{i}")
        assert len(state.spent_rt_hashes) == SPENT_HISTORY
        assert state.spent_rt_hashes[0] == token_hash(f"rt-{sends - SPENT_HISTORY}")
        assert state.spent_rt_hashes[-1] == token_hash(f"rt-{sends - 1}")
        assert state.spent_imported_rt_hashes == (token_hash("rt-0"),)
        assert len(state_to_json(state)) < 8 * 1024

    @given(st.lists(st.tuples(st.booleans(), st.integers(0, 5000)), max_size=400))
    def test_bounds_hold_for_any_sequence(self, sends: list[tuple[bool, int]]) -> None:
        """Whatever is sent, the histories stay within their bounds and keep the newest."""
        state = pair(OLD)
        for imported, n in sends:
            state = remember_spent(replace(state, refresh_count=0 if imported else 1), f"t{n}")
            assert token_hash(f"t{n}") in (*state.spent_rt_hashes, *state.spent_imported_rt_hashes)
        assert len(state.spent_rt_hashes) <= SPENT_HISTORY
        assert len(state.spent_imported_rt_hashes) <= SPENT_IMPORTED_HISTORY


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)


class TestFormat:
    """The history is serialised; old files without it are still read."""

    def test_round_trip(self) -> None:
        """A state with both histories reads back equal."""
        state = rotate(rotate(pair(OLD), "rt-2"), "rt-3")
        assert state.spent_rt_hashes and state.spent_imported_rt_hashes
        assert state_from_json(state_to_json(state)) == state

    def test_version_1_file_is_read(self) -> None:
        """A 0.1.0 file (format 1, no history fields) reads with empty histories."""
        data = json.loads(state_to_json(pair(OLD)))
        del data["spent_rt_hashes"], data["spent_imported_rt_hashes"]
        data["format"] = 1
        state = state_from_json(json.dumps(data).encode())
        assert state.spent_rt_hashes == () and state == pair(OLD)
        assert FORMAT_VERSION >= 2  # 3 added pair_issued_at

    @given(json_values)
    def test_any_history_value_is_a_tuple_of_strings_or_refused(self, value: object) -> None:
        """Whatever a file holds in a history field, the state has strings or is refused."""
        data = json.loads(state_to_json(pair(OLD)))
        data["spent_rt_hashes"] = value
        try:
            state = state_from_json(json.dumps(data).encode())
        except StateCorruptError:
            return
        assert isinstance(state.spent_rt_hashes, tuple)
        assert all(isinstance(h, str) for h in state.spent_rt_hashes)


class _DiskFullAfterAnswer:
    """A courier in this thread whose disk fills up once the server has answered."""

    def __init__(self, store: FileStore, fs: FailingFileLayer) -> None:
        self.store, self.fs = store, fs
        self.results: list[CourierResult] = []

    def _step(self, name: str) -> None:
        if name == "answered":
            self.fs.failures = {"write": errno.ENOSPC}

    def refresh(self, job: CourierJob) -> CourierResult:
        result = carry(job, self.store, TokenEndpoint(), time.time, trace=self._step)
        self.results.append(result)
        return result


def _request(pair: dict[str, object], profile: str, endpoint: str) -> ImportRequest:
    request = parse_import_text(json.dumps(pair), profile=profile)
    return replace(request, token_endpoint=endpoint)


class TestEngineHolders:
    """The daemon's import sees the pair it holds in memory, not only the files."""

    def test_a_pair_the_disk_refused_is_held(self, tmp_path: Path) -> None:
        """After a refresh whose outcome could not be saved, its new pair is 'p''s alone."""
        with SandboxServer() as sandbox:
            key = secrets.token_bytes(32)
            fs = FailingFileLayer()
            store = FileStore(tmp_path, key, fs=fs)
            refresher = _DiskFullAfterAnswer(store, fs)
            engine = Engine(
                store=store, refresher=refresher, scheduler=FakeScheduler(),
                clock=SystemClock(), config=Config(), alerter=Alerter([]),
                socket_path=lambda n: tmp_path / n,
            )  # fmt: skip
            engine.import_profile(_request(sandbox.generate(), "p", sandbox.token_endpoint))
            old = store.load("p")
            engine.refresh("p")
            (result,) = refresher.results
            assert result.kind is CourierKind.STORAGE_FAILED and result.unsaved
            fs.failures = {}
            pending = store.unseal("p", result.unsaved)
            on_disk = store.load("p")  # the journal: only memory has the new pair
            assert old is not None and on_disk is not None
            assert on_disk.refresh_token == old.refresh_token != pending.refresh_token
            new_pair = {
                "access_token": pending.access_token,
                "refresh_token": pending.refresh_token,
            }
            with pytest.raises(TokenHeldError, match="'p'"):
                engine.claim_import(_request(new_pair, "q", sandbox.token_endpoint))
            old_pair = {"access_token": old.access_token, "refresh_token": old.refresh_token}
            with pytest.raises(TokenSpentError, match="'p'"):
                engine.claim_import(_request(old_pair, "q", sandbox.token_endpoint))
            assert engine.profiles() == ["p"] and store.profiles() == ["p"]
            assert [e["outcome"] for e in sandbox.log()] == ["rotated"]

    def test_two_imports_of_one_pair_race_to_one_owner(self, tmp_path: Path) -> None:
        """The same new pair imported into two profiles at once: one holds it, one is refused."""

        class SlowStore(FileStore):
            """A disk whose writes take 0.3 s: wide open for a check-then-save race."""

            def save(self, state: ProfileState) -> None:
                time.sleep(0.3)
                super().save(state)

        with SandboxServer() as sandbox:
            key = secrets.token_bytes(32)
            store = SlowStore(tmp_path, key)
            engine = Engine(
                store=store, refresher=InProcessRefresher(FileStore(tmp_path, key)),
                scheduler=FakeScheduler(), clock=SystemClock(), config=Config(),
                alerter=Alerter([]), socket_path=lambda n: tmp_path / n,
            )  # fmt: skip
            pair = sandbox.generate()
            outcomes: dict[str, str] = {}

            def claim_as(profile: str) -> None:
                try:
                    engine.claim_import(_request(pair, profile, sandbox.token_endpoint))
                    outcomes[profile] = "imported"
                except TokenHeldError:
                    outcomes[profile] = "held"

            threads = [threading.Thread(target=claim_as, args=(p,)) for p in ("a", "b")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert sorted(outcomes.values()) == ["held", "imported"], outcomes
            assert len(store.profiles()) == 1
