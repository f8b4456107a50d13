"""The refresh policy and state transitions: pure functions, pinned by properties."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.core.outcome import FailureKind, Refreshed, Rejected, Transient
from aac_tokend.core.policy import (
    MIN_REFRESH_INTERVAL_SECONDS,
    REFRESH_SLACK_SECONDS,
    SERVE_MARGIN_SECONDS,
    UNREACHED_RETRY_CAP_SECONDS,
    PolicySettings,
    access_valid,
    apply_outcome,
    backoff_delay,
    begin_attempt,
    classify_rejection,
    health_of,
    may_retry,
    next_refresh_at,
    recover_interrupted,
)
from aac_tokend.core.state import (
    Health,
    InFlight,
    ProfileState,
    Rejection,
    RejectionReason,
    TokenKind,
)
from aac_tokend.core.tokens import token_hash
from aac_tokend.sandbox.jwt_sign import sign_hs256
from aac_tokend.testing import oauth_state

T0 = 1_800_000_000.0
DAY = 86400.0
# Float rounding at epoch magnitudes (~2e9) is below a microsecond; allow a little more.
EPS = 1e-5
DEFAULTS = PolicySettings()


def oauth(**changes: object) -> ProfileState:
    """A healthy OAuth state: access token obtained at T0, one hour of life."""
    return oauth_state(**{"profile": "default", **changes})


profiles = st.from_regex(r"[a-z][a-z0-9_.-]{0,15}", fullmatch=True)
lifetimes = st.floats(min_value=1.0, max_value=DAY)
obtained_times = st.floats(min_value=1.0e9, max_value=2.5e9)
refresh_counts = st.integers(min_value=0, max_value=1_000_000)
policy_settings = st.builds(
    PolicySettings,
    refresh_fraction=st.floats(min_value=0.5, max_value=0.95),
    min_margin_seconds=st.floats(min_value=0.0, max_value=600.0),
    jitter_fraction=st.floats(min_value=0.0, max_value=0.2),
    backoff_first_seconds=st.floats(min_value=0.1, max_value=30.0),
    backoff_cap_seconds=st.floats(min_value=30.0, max_value=3600.0),
)


@st.composite
def healthy_states(draw: st.DrawFn) -> ProfileState:
    obtained = draw(obtained_times)
    return oauth(
        profile=draw(profiles),
        access_obtained_at=obtained,
        access_expires_at=obtained + draw(lifetimes),
        refresh_count=draw(refresh_counts),
    )


class TestProactiveRefresh:
    """A healthy chain refreshes about 75% into the access lifetime, before a margin."""

    @given(healthy_states(), policy_settings, st.floats(min_value=-DAY, max_value=2 * DAY))
    @settings(max_examples=500)
    def test_bounds(self, state: ProfileState, policy: PolicySettings, offset: float) -> None:
        """The refresh is never after expiry minus the margin, never before the jittered
        fraction (when that comes first), and never before now."""
        assert state.access_expires_at is not None
        now = state.access_obtained_at + offset
        at = next_refresh_at(state, now, policy)
        assert at is not None
        lifetime = state.access_expires_at - state.access_obtained_at
        margin_bound = state.access_expires_at - min(policy.min_margin_seconds, lifetime / 2)
        serving_bound = state.access_expires_at - min(
            SERVE_MARGIN_SECONDS + REFRESH_SLACK_SECONDS, lifetime / 2
        )
        earliest = state.access_obtained_at + lifetime * (
            policy.refresh_fraction - policy.jitter_fraction
        )
        assert at >= now
        assert at <= max(min(margin_bound, serving_bound), now) + EPS
        if earliest <= min(margin_bound, serving_bound):
            assert at >= max(earliest, now) - EPS

    @given(healthy_states(), st.floats(min_value=-DAY, max_value=2 * DAY))
    @settings(max_examples=300)
    def test_default_settings(self, state: ProfileState, offset: float) -> None:
        """With the defaults, refreshes land within 70-75% of the lifetime, and at least 60 s
        (half the lifetime, if shorter) before expiry: the margin holds whatever the fraction."""
        assert state.access_expires_at is not None
        now = state.access_obtained_at + offset
        at = next_refresh_at(state, now, DEFAULTS)
        assert at is not None
        lifetime = state.access_expires_at - state.access_obtained_at
        if now <= state.access_obtained_at + 0.50 * lifetime:  # else: now, as pinned above
            assert at <= state.access_expires_at - min(60.0, lifetime / 2) + EPS
            if lifetime >= 240.0:  # shorter: the 60 s margin comes before 70 %
                assert at >= state.access_obtained_at + 0.70 * lifetime - EPS

    @given(healthy_states())
    @settings(max_examples=200)
    def test_refresh_lands_before_serving_stops(self, state: ProfileState) -> None:
        """Even a seconds-long token is refreshed before it stops being served (no gap)."""
        assert state.access_expires_at is not None
        at = next_refresh_at(state, state.access_obtained_at, DEFAULTS)
        assert at is not None
        lifetime = state.access_expires_at - state.access_obtained_at
        slack = min(SERVE_MARGIN_SECONDS + REFRESH_SLACK_SECONDS, lifetime / 2)
        assert at <= state.access_expires_at - slack + EPS

    def test_three_second_token_refreshes_before_serving_stops(self) -> None:
        """A 3 s token refreshes by 1.5 s, well before it stops being served at 2 s."""
        at = next_refresh_at(oauth(access_expires_at=T0 + 3), T0, DEFAULTS)
        assert at is not None and at <= T0 + 1.5 + EPS

    def test_one_hour_token(self) -> None:
        """A one-hour token refreshes between 42 and 45 minutes in."""
        at = next_refresh_at(oauth(), T0, DEFAULTS)
        assert at is not None
        assert T0 + 0.70 * 3600 <= at <= T0 + 0.75 * 3600

    def test_five_minute_token_keeps_margin(self) -> None:
        """A five-minute token refreshes no later than 60 s before it expires."""
        state = oauth(access_expires_at=T0 + 300)
        at = next_refresh_at(state, T0, DEFAULTS)
        assert at is not None
        assert at <= T0 + 240

    def test_a_margin_beyond_the_fraction_holds(self) -> None:
        """A margin larger than the fraction leaves (a fleet's failover room, 100 s of a
        300 s token) moves the refresh earlier: 100 s before expiry, not at 75 %."""
        state = oauth(access_expires_at=T0 + 300)
        wide = PolicySettings(min_margin_seconds=100.0, jitter_fraction=0.0)
        assert next_refresh_at(state, T0, wide) == T0 + 200

    def test_late_start_refreshes_now(self) -> None:
        """A daemon that wakes after the planned time refreshes at once, not in the past."""
        assert next_refresh_at(oauth(), T0 + 3500, DEFAULTS) == T0 + 3500

    @given(healthy_states(), policy_settings, st.floats(min_value=0, max_value=DAY))
    @settings(max_examples=200)
    def test_deterministic(self, state: ProfileState, policy: PolicySettings, dt: float) -> None:
        """The same state, time and settings always give the same schedule."""
        now = state.access_obtained_at + dt
        assert next_refresh_at(state, now, policy) == next_refresh_at(state, now, policy)
        assert backoff_delay(state, policy) == backoff_delay(state, policy)

    def test_jitter_spreads_profiles(self) -> None:
        """Different profiles with the same token lifetime do not all refresh at one instant."""
        times = {next_refresh_at(oauth(profile=f"p{i}"), T0, DEFAULTS) for i in range(20)}
        assert len(times) > 10


class TestMinimumInterval:
    """A healthy chain never refreshes sooner than MIN_REFRESH_INTERVAL_SECONDS after the last."""

    def test_token_dead_on_arrival_waits_the_interval(self) -> None:
        """A refresh that brought a token already expired does not make the next one due now."""
        state = oauth(access_obtained_at=T0, access_expires_at=T0 + 0.001, last_refresh_at=T0)
        assert next_refresh_at(state, T0, DEFAULTS) == T0 + MIN_REFRESH_INTERVAL_SECONDS

    @given(healthy_states(), policy_settings, st.floats(min_value=0.0, max_value=DAY))
    @settings(max_examples=300)
    def test_never_sooner_than_the_interval(
        self, state: ProfileState, policy: PolicySettings, since: float
    ) -> None:
        """For any healthy state, the next refresh is at least the interval after the last."""
        state = replace(state, last_refresh_at=state.access_obtained_at)
        now = state.access_obtained_at + since
        at = next_refresh_at(state, now, policy)
        assert at is not None and at >= state.access_obtained_at + MIN_REFRESH_INTERVAL_SECONDS


def ceiling(failures: int, policy: PolicySettings) -> float:
    """The backoff ceiling the policy promises for a failure count."""
    exponent = min(max(failures - 1, 0), 64)  # 2**64 s is past any cap, and no overflow
    return min(policy.backoff_cap_seconds, policy.backoff_first_seconds * 2.0**exponent)


class TestBackoff:
    """Failed attempts back off exponentially with jitter, capped, honouring Retry-After."""

    @given(profiles, st.integers(min_value=1, max_value=10_000), policy_settings)
    @settings(max_examples=500)
    def test_within_half_to_full_ceiling(
        self, profile: str, failures: int, policy: PolicySettings
    ) -> None:
        """The delay lies in [ceiling/2, ceiling], and the ceiling never exceeds the cap."""
        delay = backoff_delay(oauth(profile=profile, consecutive_failures=failures), policy)
        top = ceiling(failures, policy)
        assert top / 2 - EPS <= delay <= top + EPS
        assert delay <= policy.backoff_cap_seconds + EPS

    @given(st.integers(min_value=1, max_value=200), policy_settings)
    @settings(max_examples=200)
    def test_ceiling_non_decreasing(self, failures: int, policy: PolicySettings) -> None:
        """More failures never lower the ceiling, and the lowest delay after n+1 failures is
        at least half the highest after n."""
        assert ceiling(failures + 1, policy) >= ceiling(failures, policy)
        later = backoff_delay(oauth(consecutive_failures=failures + 1), policy)
        assert later >= ceiling(failures, policy) / 2 - EPS

    @given(profiles)
    @settings(max_examples=200)
    def test_first_retry_within_two_seconds(self, profile: str) -> None:
        """With the defaults, the first retry comes after 1 to 2 seconds."""
        delay = backoff_delay(oauth(profile=profile, consecutive_failures=1), DEFAULTS)
        assert 1.0 <= delay <= 2.0

    def test_capped(self) -> None:
        """After many failures the retries still come at least every backoff_cap seconds."""
        for failures in (9, 10, 50, 10**6):
            delay = backoff_delay(oauth(consecutive_failures=failures), DEFAULTS)
            assert 150.0 <= delay <= 300.0

    @given(
        st.integers(min_value=1, max_value=40),
        st.floats(min_value=0, max_value=3600),
        st.floats(min_value=-100, max_value=7200),
    )
    @settings(max_examples=300)
    def test_next_retry_is_backoff_after_last_attempt(
        self, failures: int, retry_after: float, offset: float
    ) -> None:
        """A failing chain retries at last attempt + backoff, not before Retry-After, not
        before now."""
        state = oauth(
            consecutive_failures=failures,
            last_attempt_at=T0 + 100,
            retry_not_before=T0 + 100 + retry_after,
            last_error="token endpoint answered HTTP 503",
        )
        now = T0 + 100 + offset
        at = next_refresh_at(state, now, DEFAULTS)
        assert at is not None
        expected = max(T0 + 100 + backoff_delay(state, DEFAULTS), T0 + 100 + retry_after)
        assert at == pytest.approx(max(expected, now))

    def test_retry_after_recorded_from_outcome(self) -> None:
        """A Transient with retry_after sets retry_not_before, which delays the retry."""
        after = apply_outcome(oauth(), Transient("HTTP 429", retry_after=120.0), T0 + 10)
        assert after.retry_not_before == T0 + 130
        at = next_refresh_at(after, T0 + 10, DEFAULTS)
        assert at is not None
        assert at >= T0 + 130

    def test_unreached_failure_retries_within_the_cap(self) -> None:
        """A failure typed unreached, with no token to serve, retries within the fast cap."""
        state = apply_outcome(
            oauth(consecutive_failures=8, access_expires_at=T0 - 1),
            Transient("down", failure=FailureKind.UNREACHED),
            T0,
        )
        assert state.last_failure is FailureKind.UNREACHED
        at = next_refresh_at(state, T0, DEFAULTS)
        assert at is not None and at <= T0 + UNREACHED_RETRY_CAP_SECONDS

    def test_the_kind_decides_not_the_words(self) -> None:
        """The same words without the unreached kind keep the normal backoff."""
        state = oauth(
            consecutive_failures=8,
            access_expires_at=T0 - 1,
            last_attempt_at=T0,
            last_error="cannot reach the token endpoint: ConnectTimeout",
            last_failure=FailureKind.AMBIGUOUS,
        )
        at = next_refresh_at(state, T0, DEFAULTS)
        assert at is not None and at > T0 + UNREACHED_RETRY_CAP_SECONDS

    def test_no_retry_after_clears_old_one(self) -> None:
        """A later failure without Retry-After drops the earlier server's wish."""
        state = oauth(consecutive_failures=1, retry_not_before=T0 + 999)
        assert apply_outcome(state, Transient("reset"), T0).retry_not_before is None


class TestNeverRefresh:
    """Rejected, legacy and long-dead chains are never scheduled."""

    def test_rejected(self) -> None:
        """A rejected chain gets no next refresh."""
        rej = Rejection(RejectionReason.REUSE_SUSPECTED, "invalid_grant", None, T0)
        assert next_refresh_at(oauth(rejection=rej), T0, DEFAULTS) is None

    def test_legacy(self) -> None:
        """A legacy token cannot be refreshed."""
        state = oauth(kind=TokenKind.LEGACY, refresh_token=None, token_endpoint=None)
        assert next_refresh_at(state, T0, DEFAULTS) is None

    def test_no_access_expiry(self) -> None:
        """Without an access expiry there is nothing to schedule against."""
        assert next_refresh_at(oauth(access_expires_at=None), T0, DEFAULTS) is None


class TestEstimateNeverStopsRefreshes:
    """Our estimate of the refresh token's end is a guess: only the server ends a chain."""

    @given(st.floats(min_value=0, max_value=400 * DAY), st.integers(min_value=0, max_value=9))
    @settings(max_examples=200)
    def test_past_the_estimate_refreshes_go_on(self, late: float, failures: int) -> None:
        """Any time past the estimated end, a refresh is still scheduled and may be retried."""
        state = oauth(
            refresh_expires_at=T0 + DAY, consecutive_failures=failures, last_attempt_at=T0
        )
        now = T0 + DAY + late
        assert may_retry(state, now)
        at = next_refresh_at(state, now, DEFAULTS)
        assert at is not None and at >= now
        assert health_of(state, now) is not Health.EXPIRED


class TestApplyOutcome:
    """apply_outcome: the state after a refresh attempt."""

    def test_refreshed_resets_failures_journal_and_ambiguity(self) -> None:
        """Success clears failures, errors, Retry-After, the journal and the ambiguity mark."""
        state = begin_attempt(
            oauth(
                consecutive_failures=4,
                last_error="boom",
                retry_not_before=T0 + 50,
                ambiguous_rt_hash="0123456789abcdef",
            ),
            T0,
        )
        after = apply_outcome(state, Refreshed("new-access", "new-refresh", 600.0), T0 + 1)
        assert (after.consecutive_failures, after.last_error, after.retry_not_before) == (
            0,
            None,
            None,
        )
        assert after.in_flight is None
        assert after.ambiguous_rt_hash is None
        assert after.rejection is None
        assert after.last_failure is None

    def test_refreshed_stores_new_pair_and_times(self) -> None:
        """The new tokens are stored, obtained now, expiring now + expires_in."""
        after = apply_outcome(oauth(), Refreshed("new-access", "new-refresh", 600.0), T0 + 5)
        assert (after.access_token, after.refresh_token) == ("new-access", "new-refresh")
        assert (after.access_obtained_at, after.access_expires_at) == (T0 + 5, T0 + 605)
        assert after.last_refresh_at == T0 + 5

    def test_refreshed_without_refresh_token_keeps_old(self) -> None:
        """A server that returns no refresh token leaves the old one in force (RFC 6749 s6)."""
        state = oauth()
        after = apply_outcome(state, Refreshed("new-access", None, 600.0), T0)
        assert after.refresh_token == state.refresh_token

    @given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=10**6))
    @settings(max_examples=100)
    def test_counters_advance(self, count: int, generation: int) -> None:
        """Each success adds one to refresh_count; every transition adds one to generation."""
        state = oauth(refresh_count=count, generation=generation)
        after = apply_outcome(state, Refreshed("a", "r", 60.0), T0)
        assert after.refresh_count == count + 1
        assert after.generation == generation + 1
        for outcome in (Rejected("invalid_grant", None, 400), Transient("x")):
            assert apply_outcome(state, outcome, T0).generation == generation + 1
            assert apply_outcome(state, outcome, T0).refresh_count == count

    def test_rejected_is_final(self) -> None:
        """A rejection is recorded with the server's words and never scheduled again."""
        state = oauth(refresh_count=3, refresh_expires_at=T0 + 30 * DAY)
        after = apply_outcome(
            begin_attempt(state, T0), Rejected("invalid_grant", "expired token", 400), T0 + 1
        )
        assert after.rejection == Rejection(
            RejectionReason.REUSE_SUSPECTED, "invalid_grant", "expired token", T0 + 1
        )
        assert after.in_flight is None
        assert next_refresh_at(after, T0 + 1, DEFAULTS) is None
        assert next_refresh_at(after, T0 + 10 * DAY, DEFAULTS) is None
        assert health_of(after, T0 + 1) is Health.REJECTED

    def test_transient_counts_a_failure(self) -> None:
        """A transient failure adds a failure, records the reason and clears the journal."""
        after = apply_outcome(begin_attempt(oauth(), T0), Transient("HTTP 503"), T0 + 1)
        assert after.consecutive_failures == 1
        assert after.last_error == "HTTP 503"
        assert after.last_attempt_at == T0 + 1
        assert after.in_flight is None
        assert after.ambiguous_rt_hash is None

    def test_ambiguous_transient_marks_the_sent_token(self) -> None:
        """A possibly-landed request records the hash of the refresh token it carried."""
        state = oauth()
        after = apply_outcome(state, Transient("read timeout", failure=FailureKind.AMBIGUOUS), T0)
        assert state.refresh_token is not None
        assert after.ambiguous_rt_hash == token_hash(state.refresh_token)

    def test_clear_transient_keeps_earlier_ambiguity(self) -> None:
        """A later failure that surely did not land does not forget an earlier ambiguity."""
        state = oauth(ambiguous_rt_hash="feedfacefeedface")
        after = apply_outcome(state, Transient("connection refused"), T0)
        assert after.ambiguous_rt_hash == "feedfacefeedface"

    def test_input_state_is_unchanged(self) -> None:
        """Transitions build new states; the old one is untouched (frozen)."""
        state = oauth()
        apply_outcome(state, Refreshed("a", "b", 1.0), T0)
        assert state == oauth()


class TestAccessExpiry:
    """A refreshed access token never counts as valid past what the server meant."""

    def test_expires_in_counts_from_when_the_request_left(self) -> None:
        """An answer that took 50 s to arrive leaves 600 - 50 s, not 600 s, of life."""
        journal = begin_attempt(oauth(), T0)
        after = apply_outcome(journal, Refreshed("opaque-access", "r2", 600.0), T0 + 50)
        assert after.access_expires_at == T0 + 600

    def test_never_past_the_jwt_exp(self) -> None:
        """A JWT whose exp comes before sent + expires_in expires at its exp."""
        token = sign_hs256({"exp": T0 + 300, "iat": T0 + 1}, b"k" * 32)
        journal = begin_attempt(oauth(), T0)
        after = apply_outcome(journal, Refreshed(token, "r2", 600.0), T0 + 5)
        assert after.access_expires_at == T0 + 300

    def test_jwt_of_a_clock_that_disagrees_is_not_read_on_ours(self) -> None:
        """A server (or our wall clock) a day off: its exp is ignored, no refresh loop."""
        token = sign_hs256({"exp": T0 - DAY + 3600, "iat": T0 - DAY}, b"k" * 32)
        journal = begin_attempt(oauth(), T0)
        after = apply_outcome(journal, Refreshed(token, "r2", 3600.0), T0 + 1)
        assert after.access_expires_at == T0 + 3600

    @settings(max_examples=200, deadline=None)
    @given(
        delay=st.floats(min_value=0.0, max_value=120.0),
        expires_in=st.floats(min_value=1.0, max_value=DAY),
        exp_offset=st.none() | st.floats(min_value=-60.0, max_value=DAY),
        iat_offset=st.none() | st.floats(min_value=-2 * DAY, max_value=2 * DAY),
    )
    def test_expiry_is_the_earliest_bound(
        self, delay: float, expires_in: float, exp_offset: float | None, iat_offset: float | None
    ) -> None:
        """The expiry is min(request sent + expires_in, the JWT's exp when its iat agrees)."""
        claims = {"exp": T0 + (exp_offset or 0.0)}
        if iat_offset is not None:
            claims["iat"] = T0 + iat_offset
        token = "opaque" if exp_offset is None else sign_hs256(claims, b"k" * 32)
        journal = begin_attempt(oauth(), T0)
        after = apply_outcome(journal, Refreshed(token, "r2", expires_in), T0 + delay)
        bounds = [T0 + expires_in]
        agree = iat_offset is not None and -60.0 <= iat_offset <= delay + 60.0
        if exp_offset is not None and agree:
            bounds.append(T0 + exp_offset)
        assert after.access_expires_at == pytest.approx(min(bounds), abs=EPS)


class TestClassifyRejection:
    """Why a chain broke, in order of precedence."""

    def test_after_lost_response_first(self) -> None:
        """invalid_grant for a token whose earlier answer was lost is our own rotation."""
        state = oauth(refresh_expires_at=T0 - 1)  # expired too: the lost answer still wins
        assert state.refresh_token is not None
        state = replace(state, ambiguous_rt_hash=token_hash(state.refresh_token))
        reason = classify_rejection(state, Rejected("invalid_grant", None, 400), T0)
        assert reason is RejectionReason.AFTER_LOST_RESPONSE

    def test_ambiguity_about_another_token_does_not_count(self) -> None:
        """An ambiguity mark for a different token is not an excuse for this one."""
        state = oauth(
            ambiguous_rt_hash="0000000000000000", refresh_count=1, refresh_expires_at=T0 + DAY
        )
        reason = classify_rejection(state, Rejected("invalid_grant", None, 400), T0)
        assert reason is RejectionReason.REUSE_SUSPECTED

    def test_refresh_token_expired(self) -> None:
        """invalid_grant past the refresh token's lifetime is expiry."""
        state = oauth(refresh_expires_at=T0)
        reason = classify_rejection(state, Rejected("invalid_grant", None, 400), T0)
        assert reason is RejectionReason.REFRESH_TOKEN_EXPIRED

    def test_reuse_suspected_otherwise(self) -> None:
        """invalid_grant for a token the server gave us, alive by its known lifetime: reuse."""
        state = oauth(refresh_expires_at=T0 + DAY, refresh_count=1)
        reason = classify_rejection(state, Rejected("invalid_grant", "revoked", 400), T0)
        assert reason is RejectionReason.REUSE_SUSPECTED

    def test_lifetime_unknown_cannot_tell(self) -> None:
        """With the refresh lifetime unknown, invalid_grant is expired_or_reused, not theft."""
        state = oauth(refresh_expires_at=None, refresh_count=5)
        reason = classify_rejection(state, Rejected("invalid_grant", None, 400), T0 + 400 * DAY)
        assert reason is RejectionReason.EXPIRED_OR_REUSED

    def test_lifetime_known_and_run_out_is_expired(self) -> None:
        """The same chain with its lifetime known is refresh_token_expired at its end."""
        state = oauth(refresh_expires_at=T0 + 30 * DAY, refresh_count=5)
        reason = classify_rejection(state, Rejected("invalid_grant", None, 400), T0 + 30 * DAY)
        assert reason is RejectionReason.REFRESH_TOKEN_EXPIRED

    @pytest.mark.parametrize("lifetime", [None, 30 * DAY])
    def test_first_refresh_after_import_is_its_own_reason(self, lifetime: float | None) -> None:
        """invalid_grant before any refresh succeeded: the pasted pair never worked here."""
        expires = None if lifetime is None else T0 + lifetime
        state = oauth(refresh_expires_at=expires, refresh_count=0)
        reason = classify_rejection(state, Rejected("invalid_grant", None, 400), T0 + 60)
        assert reason is RejectionReason.REFUSED_AFTER_IMPORT

    def test_invalid_client(self) -> None:
        """invalid_client is its own reason, whatever else is known."""
        assert state_ambiguous_reason("invalid_client") is RejectionReason.INVALID_CLIENT

    @pytest.mark.parametrize(
        "error", ["invalid_request", "unauthorized_client", "invalid_scope", "server_error", ""]
    )
    def test_other_errors(self, error: str) -> None:
        """Any other OAuth error is a configuration problem."""
        assert state_ambiguous_reason(error) is RejectionReason.OAUTH_ERROR


def state_ambiguous_reason(error: str) -> RejectionReason:
    """The reason for ``error`` on a state that would otherwise read as a lost response."""
    state = oauth()
    assert state.refresh_token is not None
    state = replace(state, ambiguous_rt_hash=token_hash(state.refresh_token))
    return classify_rejection(state, Rejected(error, None, 400), T0)


class TestJournal:
    """The write-ahead journal and recovery from an attempt nobody finished."""

    def test_begin_attempt_journals_the_token_hash(self) -> None:
        """begin_attempt records the hash of the refresh token about to be sent, and when."""
        state = oauth()
        journal = begin_attempt(state, T0 + 7)
        assert state.refresh_token is not None
        assert journal.in_flight == InFlight(token_hash(state.refresh_token), T0 + 7)
        assert journal.last_attempt_at == T0 + 7
        assert journal.generation == state.generation + 1

    def test_recover_marks_ambiguity_for_same_token(self) -> None:
        """An interrupted attempt with the current token makes that token ambiguous."""
        journal = begin_attempt(oauth(), T0)
        recovered = recover_interrupted(journal, T0 + 60)
        assert recovered.in_flight is None
        assert journal.in_flight is not None
        assert recovered.ambiguous_rt_hash == journal.in_flight.rt_hash
        assert recovered.consecutive_failures == 1
        assert recovered.last_attempt_at == T0
        assert recovered.last_error is not None

    def test_recover_ignores_journal_for_other_token(self) -> None:
        """A journal about an older token (already replaced) marks nothing ambiguous."""
        journal = replace(oauth(), in_flight=InFlight("0000000000000000", T0))
        recovered = recover_interrupted(journal, T0 + 60)
        assert recovered.ambiguous_rt_hash is None
        assert recovered.in_flight is None

    def test_recover_without_journal_is_identity(self) -> None:
        """With no journal entry there is nothing to recover."""
        state = oauth()
        assert recover_interrupted(state, T0) is state

    def test_lost_response_then_invalid_grant(self) -> None:
        """Crash mid-request, then invalid_grant: classified as our own lost rotation."""
        recovered = recover_interrupted(begin_attempt(oauth(), T0), T0 + 5)
        after = apply_outcome(recovered, Rejected("invalid_grant", None, 400), T0 + 6)
        assert after.rejection is not None
        assert after.rejection.reason is RejectionReason.AFTER_LOST_RESPONSE


class TestStatus:
    """health_of: what a person sees."""

    def test_ok(self) -> None:
        """A healthy chain is ok."""
        assert health_of(oauth(), T0) is Health.OK

    def test_retrying(self) -> None:
        """A chain with failures but still refreshable is retrying."""
        assert health_of(oauth(consecutive_failures=2), T0) is Health.RETRYING

    def test_retrying_even_when_access_expired(self) -> None:
        """An expired access token with a live refresh token is retrying, not expired."""
        state = oauth(consecutive_failures=2)
        assert health_of(state, T0 + 7200) is Health.RETRYING

    def test_rejected(self) -> None:
        """A rejection wins over everything."""
        rej = Rejection(RejectionReason.INVALID_CLIENT, "invalid_client", None, T0)
        assert health_of(oauth(rejection=rej), T0 + 10 * DAY) is Health.REJECTED

    def test_chain_past_its_estimate_is_not_expired(self) -> None:
        """Access dead and the estimated end long past: still retrying, the server decides."""
        state = oauth(refresh_expires_at=T0 + 100, consecutive_failures=1)
        assert health_of(state, T0 + 100 + 30 * DAY) is Health.RETRYING

    def test_expired_legacy(self) -> None:
        """A legacy token past its expiry is expired; before it, ok."""
        state = oauth(kind=TokenKind.LEGACY, refresh_token=None)
        assert health_of(state, T0) is Health.OK
        assert health_of(state, T0 + 3600) is Health.EXPIRED

    def test_legacy_without_expiry_stays_ok(self) -> None:
        """A legacy token without a known expiry is always served."""
        state = oauth(kind=TokenKind.LEGACY, refresh_token=None, access_expires_at=None)
        assert health_of(state, T0 + 1000 * DAY) is Health.OK

    def test_serve_margin(self) -> None:
        """A token is not served within the serve margin of its expiry."""
        state = oauth()
        assert state.access_expires_at is not None
        assert access_valid(state, state.access_expires_at - SERVE_MARGIN_SECONDS - 0.01)
        assert not access_valid(state, state.access_expires_at - SERVE_MARGIN_SECONDS)
