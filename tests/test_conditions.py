"""Alertable conditions: which one a profile is in, and the one line telling a person what to do."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.core.conditions import AlertEvent, condition_of, rejection_alert
from aac_tokend.core.state import ProfileState, Rejection, RejectionReason, TokenKind
from aac_tokend.testing import oauth_state

T0 = 1_800_000_000.0
DAY = 86400.0
IMPORT_HINT = "`aac-tokend import --profile work`"


def oauth(**changes: object) -> ProfileState:
    """A healthy OAuth state for profile 'work', refresh token good for 30 days."""
    return oauth_state(**{"refresh_expires_at": T0 + 30 * DAY, **changes})


def legacy(expires_at: float | None) -> ProfileState:
    return oauth(
        kind=TokenKind.LEGACY,
        refresh_token=None,
        token_endpoint=None,
        client_id=None,
        access_expires_at=expires_at,
        refresh_expires_at=None,
    )


def rejected(reason: RejectionReason, error: str = "invalid_grant") -> ProfileState:
    return oauth(rejection=Rejection(reason, error, "server words", T0))


class TestRejected:
    """A rejected chain gets a message that fits why it was rejected."""

    @pytest.mark.parametrize("reason", list(RejectionReason))
    def test_every_reason_says_import(self, reason: RejectionReason) -> None:
        """Every rejection alert tells the person to generate a token and run import."""
        condition = condition_of(rejected(reason), T0)
        assert condition is not None
        assert condition.event is AlertEvent.REJECTED
        assert condition.key == f"rejected:{reason}"
        assert IMPORT_HINT in condition.message
        assert "\n" not in condition.message

    def test_reuse_suspected_says_compromised(self) -> None:
        """Suspected reuse tells the person to treat the old token as compromised and delete it."""
        message = rejection_alert(rejected(RejectionReason.REUSE_SUSPECTED))
        assert "treat the old token as compromised" in message
        assert "delete it in AAC" in message

    def test_after_lost_response_blames_ourselves(self) -> None:
        """After a lost answer the message says our own refresh probably rotated the token."""
        message = rejection_alert(rejected(RejectionReason.AFTER_LOST_RESPONSE))
        assert "lost" in message
        assert "compromised" not in message

    def test_expired_refresh_token(self) -> None:
        """An expired refresh token is called the end of its lifetime."""
        message = rejection_alert(rejected(RejectionReason.REFRESH_TOKEN_EXPIRED))
        assert "end of its lifetime" in message

    def test_lifetime_unknown_names_both_and_what_to_do(self) -> None:
        """expired_or_reused names the natural end and a reuse, and how to tell and avoid it."""
        rejection = Rejection(RejectionReason.EXPIRED_OR_REUSED, "invalid_grant", "w", T0)
        message = rejection_alert(oauth(refresh_expires_at=None, rejection=rejection))
        assert "lifetime is unknown" in message
        assert "natural end" in message and "another party" in message
        assert "--refresh-lifetime-days" in message

    @pytest.mark.parametrize(("stored", "configured"), [(T0 + 30 * DAY, None), (None, 30.0)])
    def test_lifetime_counted_from_import_says_so(
        self, stored: float | None, configured: float | None
    ) -> None:
        """A lifetime known but counted from the import is not called unknown."""
        state = oauth(
            refresh_expires_at=stored,
            pair_issued_at=None,
            rejection=Rejection(RejectionReason.EXPIRED_OR_REUSED, "invalid_grant", "w", T0),
        )
        condition = condition_of(state, T0, configured)
        assert condition is not None
        assert "unknown" not in condition.message
        assert "--refresh-lifetime-days" not in condition.message
        assert "counted only from the import" in condition.message
        assert "natural end" in condition.message and "another party" in condition.message
        assert "JWT pair AAC generates, pasted promptly" in condition.message

    def test_refused_after_import_is_not_theft(self) -> None:
        """A first refresh refused after import blames the pasted pair, not a thief."""
        message = rejection_alert(rejected(RejectionReason.REFUSED_AFTER_IMPORT))
        assert "first refresh after import" in message
        assert "compromised" not in message

    def test_invalid_client(self) -> None:
        """invalid_client points at the client id and token endpoint."""
        message = rejection_alert(rejected(RejectionReason.INVALID_CLIENT, "invalid_client"))
        assert "client id" in message

    def test_other_error_names_it(self) -> None:
        """Another OAuth error is named in the message."""
        message = rejection_alert(rejected(RejectionReason.OAUTH_ERROR, "unauthorized_client"))
        assert "unauthorized_client" in message

    def test_rejection_wins_over_expiry(self) -> None:
        """A rejected chain reports the rejection even once everything has expired."""
        condition = condition_of(rejected(RejectionReason.REUSE_SUSPECTED), T0 + 400 * DAY)
        assert condition is not None
        assert condition.event is AlertEvent.REJECTED


class TestExpired:
    """A token that can no longer be had is expired; an OAuth chain only by the server's word."""

    @given(st.floats(min_value=0.0, max_value=400 * DAY))
    @settings(max_examples=100)
    def test_chain_past_its_estimate_is_not_expired(self, late: float) -> None:
        """Past the estimated end the chain keeps refreshing: the alert says so, not expired."""
        condition = condition_of(oauth(), T0 + 30 * DAY + late)
        assert condition is not None
        assert (condition.event, condition.key) == (
            AlertEvent.REFRESH_EXPIRES_SOON,
            "expires_soon:past",
        )
        assert "estimated lifetime has passed" in condition.message
        assert "until the server refuses them" in condition.message
        assert IMPORT_HINT in condition.message

    def test_legacy_expired(self) -> None:
        """A legacy token past its own expiry is expired."""
        condition = condition_of(legacy(T0 + 100), T0 + 100)
        assert condition is not None
        assert condition.event is AlertEvent.EXPIRED
        assert "legacy access token has expired" in condition.message
        assert IMPORT_HINT in condition.message

    def test_access_expired_but_refreshable_is_not_alerted(self) -> None:
        """An expired access token with a live refresh token is not an alert (it is retried)."""
        assert condition_of(oauth(consecutive_failures=3), T0 + 7200) is None


class TestExpiresSoon:
    """Warnings 7 days and 1 day before the end, each said once (distinct keys)."""

    def test_healthy_is_quiet(self) -> None:
        """More than 7 days left: no condition."""
        assert condition_of(oauth(), T0) is None

    def test_seven_day_warning(self) -> None:
        """Within 7 days of the refresh token's end: a warning keyed 7d, with import."""
        condition = condition_of(oauth(), T0 + 30 * DAY - 6 * DAY)
        assert condition is not None
        assert condition.event is AlertEvent.REFRESH_EXPIRES_SOON
        assert condition.key == "expires_soon:7d"
        assert "refresh token expires in 6.0 days" in condition.message
        assert IMPORT_HINT in condition.message

    def test_one_day_warning(self) -> None:
        """Within 1 day: a different key, so the alert is said again; hours are shown."""
        condition = condition_of(oauth(), T0 + 30 * DAY - 5 * 3600)
        assert condition is not None
        assert condition.key == "expires_soon:1d"
        assert "5.0 hours" in condition.message

    @given(st.floats(min_value=-10 * DAY, max_value=40 * DAY))
    @settings(max_examples=200)
    def test_key_by_time_left(self, left: float) -> None:
        """The key depends only on which threshold the time left is under."""
        state = oauth(access_expires_at=T0 + 60 * DAY)  # keep the access token alive
        now = T0 + 30 * DAY - left
        left = T0 + 30 * DAY - now  # as the epoch's float rounding leaves it
        condition = condition_of(state, now)
        if left > 7 * DAY:
            assert condition is None
        else:
            assert condition is not None
            keys = {True: "expires_soon:1d", False: "expires_soon:7d"}
            expected = "expires_soon:past" if left <= 0 else keys[left <= DAY]
            assert condition.key == expected
            assert "expires in -" not in condition.message

    def test_configured_lifetime_warns_for_a_profile_without_one(self) -> None:
        """config.toml's lifetime counts for a profile imported without one, from its iat."""
        state = oauth(refresh_expires_at=None, pair_issued_at=T0 - 2 * DAY)
        condition = condition_of(state, T0 + 25 * DAY, lifetime_days=30)
        assert condition is not None
        assert condition.key == "expires_soon:7d"
        assert "refresh token expires in 3.0 days" in condition.message

    def test_under_an_hour_is_shown_in_minutes(self) -> None:
        """A few seconds or minutes left are shown as minutes, rounded up."""
        condition = condition_of(oauth(), T0 + 30 * DAY - 90)
        assert condition is not None and "expires in 2 minutes" in condition.message
        condition = condition_of(oauth(), T0 + 30 * DAY - 5)
        assert condition is not None and "expires in 1 minute;" in condition.message

    def test_unknown_refresh_lifetime_is_quiet(self) -> None:
        """Without a known refresh-token lifetime there is nothing to warn about."""
        assert condition_of(oauth(refresh_expires_at=None), T0) is None
        assert condition_of(oauth(refresh_expires_at=None), T0 + 400 * DAY) is None

    def test_legacy_uses_access_expiry(self) -> None:
        """A legacy token warns by its access expiry, naming the legacy access token."""
        condition = condition_of(legacy(T0 + 3 * DAY), T0)
        assert condition is not None
        assert condition.key == "expires_soon:7d"
        assert "legacy access token expires in 3.0 days" in condition.message
        condition = condition_of(legacy(T0 + 3600), T0)
        assert condition is not None
        assert condition.key == "expires_soon:1d"

    def test_legacy_without_expiry_is_quiet(self) -> None:
        """A legacy token with no known expiry never warns."""
        assert condition_of(legacy(None), T0 + 1000 * DAY) is None
