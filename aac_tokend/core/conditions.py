"""Which alertable condition a profile is in, and the one line that tells a person what to do.

Pure: a function of the state and ``now``. The ``alerts`` module turns changes of condition
into log events, hook commands and desktop notifications.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from .policy import access_valid, may_retry, refresh_token_end
from .state import ProfileState, RejectionReason, TokenKind

__all__ = ["AlertEvent", "Condition", "condition_of", "rejection_alert"]

DAY = 86400.0
#: Warn this long before a refresh token (or a legacy access token) reaches its end.
WARN_BEFORE = (1 * DAY, 7 * DAY)

_GENERATE = (
    "generate a new token in AAC (User Preferences > OAuth 2.0 API Tokens) and run "
    "`aac-tokend import --profile {profile}`"
)


class AlertEvent(StrEnum):
    """What happened, as passed to the alert command in AAC_TOKEND_EVENT."""

    REJECTED = "rejected"
    EXPIRED = "expired"
    REFRESH_EXPIRES_SOON = "refresh_expires_soon"
    RECOVERED = "recovered"


@dataclass(frozen=True)
class Condition:
    """An alertable condition; ``key`` changes whenever the alert should be said again."""

    event: AlertEvent
    key: str
    message: str


def rejection_alert(state: ProfileState, lifetime_days: float | None = None) -> str:
    """The one-line instruction for a rejected chain.

    ``lifetime_days`` is config.toml's refresh_lifetime_days: with it (or one stored at
    import) an expired_or_reused verdict comes from a lifetime counted only from the import,
    not from an unknown one, and the advice differs.
    """
    assert state.rejection is not None
    todo = _GENERATE.format(profile=state.profile)
    rej = state.rejection
    match rej.reason:
        case RejectionReason.REUSE_SUSPECTED:
            return (
                "refresh token rejected (invalid_grant) and not by our doing: another party "
                "may have used it; treat the old token as compromised and delete it in AAC, "
                f"then {todo}"
            )
        case RejectionReason.AFTER_LOST_RESPONSE:
            return (
                "refresh token rejected (invalid_grant) after an earlier answer was lost: our "
                f"own refresh probably rotated it; {todo}"
            )
        case RejectionReason.REFRESH_TOKEN_EXPIRED:
            return f"the refresh token reached the end of its lifetime; {todo}"
        case RejectionReason.EXPIRED_OR_REUSED if (
            refresh_token_end(state, lifetime_days) is not None
        ):
            # The lifetime is known but the pair had no iat: counted from the import, the
            # true end came earlier by the paste delay, which we do not know.
            return (
                "refresh token rejected (invalid_grant); its lifetime was counted only from "
                "the import (the pair carried no generation time), so this is either its "
                "natural end or another party using it: if it was generated less than its "
                "lifetime ago (see AAC's OAuth 2.0 API Tokens page), treat it as compromised "
                f"and delete it in AAC; then {todo} with the JWT pair AAC generates, pasted "
                "promptly"
            )
        case RejectionReason.EXPIRED_OR_REUSED:
            return (
                "refresh token rejected (invalid_grant); its lifetime is unknown, so this is "
                "either its natural end or another party using it: if it was generated less "
                "than its lifetime ago (see AAC's OAuth 2.0 API Tokens page), treat it as "
                f"compromised and delete it in AAC; then {todo} with --refresh-lifetime-days"
            )
        case RejectionReason.REFUSED_AFTER_IMPORT:
            return (
                "the first refresh after import was refused (invalid_grant): the pasted pair "
                "is mistyped, for another client, expired or already used elsewhere; "
                f"{todo} with a freshly generated pair"
            )
        case RejectionReason.INVALID_CLIENT:
            return (
                "refresh rejected (invalid_client): the client id or token endpoint does not "
                f"fit this token; check them, then {todo}"
            )
        case _:
            return f"refresh rejected ({rej.error}): a configuration problem; {todo}"


def _days(seconds: float) -> str:
    days = seconds / DAY
    if days >= 1:
        return f"{days:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    minutes = max(math.ceil(seconds / 60), 1)  # never "0.0 hours" while time is left
    return f"{minutes} minute{'s' if minutes > 1 else ''}"


def condition_of(
    state: ProfileState, now: float, lifetime_days: float | None = None
) -> Condition | None:
    """The profile's alertable condition at ``now``, or None when all is well.

    ``lifetime_days`` is config.toml's refresh_lifetime_days: it gives the warnings for a
    profile imported without a lifetime.
    """
    todo = _GENERATE.format(profile=state.profile)
    if state.rejection is not None:
        return Condition(
            AlertEvent.REJECTED,
            f"rejected:{state.rejection.reason}",
            rejection_alert(state, lifetime_days),
        )
    if not access_valid(state, now) and (
        state.kind is TokenKind.LEGACY or not may_retry(state, now)
    ):
        what = "legacy access token" if state.kind is TokenKind.LEGACY else "token chain"
        return Condition(AlertEvent.EXPIRED, "expired", f"the {what} has expired; {todo}")
    if state.kind is TokenKind.LEGACY:
        end = state.access_expires_at
    else:
        estimate = refresh_token_end(state, lifetime_days)
        end = estimate.at if estimate is not None else None
        if end is not None and now >= end:
            # Only an estimate: the chain keeps refreshing until the server refuses it.
            return Condition(
                AlertEvent.REFRESH_EXPIRES_SOON,
                "expires_soon:past",
                "the refresh token's estimated lifetime has passed; refreshes go on until the "
                f"server refuses them; {todo} now",
            )
    if end is not None:
        left = end - now
        for threshold in WARN_BEFORE:
            if left <= threshold:
                what = "legacy access token" if state.kind is TokenKind.LEGACY else "refresh token"
                text = (
                    f"the {what} expires in {_days(left)}; {todo} before then"
                    if left > 0
                    else f"the {what}'s lifetime has ended; {todo}"
                )
                return Condition(
                    AlertEvent.REFRESH_EXPIRES_SOON, f"expires_soon:{int(threshold // DAY)}d", text
                )
    return None
