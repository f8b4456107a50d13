"""The refresh policy and the state transitions: pure functions of state, outcome and ``now``.

No clock reads, no randomness: jitter is derived from a hash of the profile name and its
counters, so the same inputs always give the same schedule (and tests can pin it).

Over 300 lines: when to refresh and what an outcome does to the state share every constant
here (the serve margin, the lifetime estimate, the backoff) and are tested against each
other; split, each half would import the other's privates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import TokenFormatError
from .outcome import FailureKind, Refreshed, RefreshOutcome, Rejected
from .ownership import remember_spent
from .state import Health, InFlight, ProfileState, Rejection, RejectionReason, TokenKind
from .tokens import parse_jwt, token_hash

__all__ = [
    "LifetimeEnd",
    "PolicySettings",
    "access_valid",
    "apply_outcome",
    "backoff_delay",
    "begin_attempt",
    "classify_rejection",
    "health_of",
    "may_retry",
    "next_refresh_at",
    "recover_interrupted",
    "refresh_token_end",
]

DAY = 86400.0

#: A served token must outlive the read by this much, so a reader never gets a token that
#: dies while its API call is in flight.
SERVE_MARGIN_SECONDS = 1.0

#: Time a refresh needs to land before a token stops being served (a loopback round trip
#: takes milliseconds; a slow proxy may take most of a second).
REFRESH_SLACK_SECONDS = 1.0

#: When a token endpoint answers without any expiry, assume this short lifetime: refreshing
#: early is cheap, serving a dead token is not.
ASSUMED_LIFETIME_SECONDS = 300.0

#: A healthy chain never refreshes sooner than this after its last refresh. Lifetimes under
#: a second are refused (import, and the server's expires_in), so a well-behaved chain never
#: needs more; a server handing out tokens already dead on arrival is held to one rotation a
#: second rather than as fast as the scheduler can go. Not more: the sandbox's 2 s tokens
#: (tests, demo) refresh every second and must be served without a gap.
MIN_REFRESH_INTERVAL_SECONDS = 1.0

#: While there is no valid access token to serve and the last attempt never reached the token
#: endpoint (no network yet after a resume, DNS, proxy, TLS), retry at least this often: such
#: an attempt costs the server nothing, and a person waits for a token until the network is
#: back. A server that answers (5xx, 429) keeps the normal backoff, so an outage is not hammered.
UNREACHED_RETRY_CAP_SECONDS = 5.0

#: An invalid_grant this close before our estimate of the refresh token's end is its natural
#: end, not a theft (see ``refresh_token_at_its_end``). The end is AAC's own instant, read on
#: its clock; ours may differ. A synchronised host is off by well under a second, one whose
#: clock drifts freely by seconds a day, i.e. minutes over a chain's months: an hour covers
#: that with room, and still calls a theft one unless it falls in the chain's last hour.
#: At most a tenth of the lifetime, so that a short-lived chain (a refresh_token_expires_in
#: of minutes) keeps its early part for the theft verdict.
CLOCK_SKEW_SLACK_SECONDS = 3600.0
CLOCK_SKEW_SLACK_FRACTION = 0.1


@dataclass(frozen=True)
class PolicySettings:
    """Tunables of the refresh policy (config.toml may override each, per profile)."""

    refresh_fraction: float = 0.75  # refresh after this share of the access lifetime
    min_margin_seconds: float = 60.0  # and never later than this before expiry
    jitter_fraction: float = 0.05  # spread refreshes earlier by up to this share
    backoff_first_seconds: float = 2.0  # first retry within seconds
    backoff_cap_seconds: float = 300.0  # retries at least every 5 minutes
    refresh_lifetime_days: float | None = None  # AAC: 1-365 days, per token


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from its inputs (jitter without randomness)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def access_valid(state: ProfileState, now: float) -> bool:
    """True if the access token may be served at ``now``."""
    if state.access_expires_at is None:
        return True
    return now + SERVE_MARGIN_SECONDS < state.access_expires_at


@dataclass(frozen=True)
class LifetimeEnd:
    """Our estimate of the refresh token's end, and what it counts from."""

    at: float
    origin: float
    # Counted from the pair's iat, AAC's own origin. False: from the import, which came
    # later by however long the paste took, so the estimate is late by that much.
    from_issue: bool


def refresh_token_end(
    state: ProfileState, lifetime_days: float | None = None
) -> LifetimeEnd | None:
    """The refresh token's estimated end: stored at import, else from the configured days.

    ``lifetime_days`` is config.toml's refresh_lifetime_days: it counts for a profile imported
    without a lifetime (also one imported before the key was set), from the same origin the
    import would have used.
    """
    from_issue = state.pair_issued_at is not None
    origin = state.pair_issued_at if state.pair_issued_at is not None else state.imported_at
    if state.refresh_expires_at is not None:
        return LifetimeEnd(state.refresh_expires_at, origin, from_issue)
    if lifetime_days is not None:
        return LifetimeEnd(origin + lifetime_days * DAY, origin, from_issue)
    return None


def refresh_token_at_its_end(
    state: ProfileState, now: float, lifetime_days: float | None = None
) -> bool:
    """True once the refresh token may have reached its end, by the server's reckoning.

    AAC counts the lifetime from generation. Counted from the pair's iat, our estimate is
    that instant, give or take the clocks' skew (the slack). Counted from the import, it
    is late by the paste delay, so past it the end has surely come.
    """
    end = refresh_token_end(state, lifetime_days)
    if end is None:
        return False
    lifetime = max(end.at - end.origin, 0.0)
    slack = min(CLOCK_SKEW_SLACK_SECONDS, lifetime * CLOCK_SKEW_SLACK_FRACTION)
    return now >= end.at - slack


def may_retry(state: ProfileState, now: float) -> bool:
    """True while the server may still refresh: an OAuth chain it has not refused.

    Our estimate of the refresh token's end never stops refreshes: it is a guess (a lifetime
    typed at import, a config default), and only the server knows. Past it the chain keeps
    refreshing, and an invalid_grant then ends it with the verdict refresh_token_expired.
    """
    return state.kind is TokenKind.OAUTH and state.rejection is None


def backoff_delay(state: ProfileState, settings: PolicySettings) -> float:
    """Capped exponential backoff with jitter, by the number of consecutive failures."""
    exponent = min(max(state.consecutive_failures - 1, 0), 30)
    ceiling = min(settings.backoff_cap_seconds, settings.backoff_first_seconds * 2.0**exponent)
    return ceiling * (0.5 + 0.5 * _unit(state.profile, "backoff", state.consecutive_failures))


def proactive_refresh_at(state: ProfileState, settings: PolicySettings) -> float:
    """When a healthy chain should refresh: ~75% into the lifetime, with a margin."""
    assert state.access_expires_at is not None
    lifetime = max(state.access_expires_at - state.access_obtained_at, 0.0)
    jitter = lifetime * settings.jitter_fraction * _unit(state.profile, state.refresh_count)
    at_fraction = state.access_obtained_at + lifetime * settings.refresh_fraction - jitter
    # The margin holds whatever the fraction says (the fleet's failover room depends on it),
    # reduced only so that it fits: at most half the lifetime.
    margin = min(settings.min_margin_seconds, lifetime / 2)
    # Tokens stop being served SERVE_MARGIN_SECONDS before expiry; refresh before that (with
    # time for the round trip), or a very short-lived token leaves readers a gap each cycle.
    serving_ends = state.access_expires_at - min(SERVE_MARGIN_SECONDS + REFRESH_SLACK_SECONDS,
                                                 lifetime / 2)  # fmt: skip
    return min(at_fraction, state.access_expires_at - margin, serving_ends)


def next_refresh_at(state: ProfileState, now: float, settings: PolicySettings) -> float | None:
    """When the next refresh should start (never before ``now``), or None for never."""
    if not may_retry(state, now) or state.access_expires_at is None:
        return None
    if state.consecutive_failures > 0:
        base = state.last_attempt_at if state.last_attempt_at is not None else now
        delay = backoff_delay(state, settings)
        if state.last_failure is FailureKind.UNREACHED and not access_valid(state, now):
            delay = min(delay, UNREACHED_RETRY_CAP_SECONDS)
        at = base + delay
        if state.retry_not_before is not None:
            at = max(at, state.retry_not_before)
    else:
        at = proactive_refresh_at(state, settings)
        if state.last_refresh_at is not None:
            at = max(at, state.last_refresh_at + MIN_REFRESH_INTERVAL_SECONDS)
    return max(at, now)


def health_of(state: ProfileState, now: float) -> Health:
    """The status a person sees: rejected, expired, retrying or ok.

    Expired is a legacy token past its expiry: an OAuth chain ends only when the server
    refuses it (rejected), never on our estimate of its lifetime.
    """
    if state.rejection is not None:
        return Health.REJECTED
    if not access_valid(state, now) and not may_retry(state, now):
        return Health.EXPIRED
    if state.consecutive_failures > 0:
        return Health.RETRYING
    return Health.OK


def begin_attempt(state: ProfileState, now: float) -> ProfileState:
    """The write-ahead journal entry, made durable before the request leaves."""
    assert state.refresh_token is not None
    # The token is recorded as spent here, durably before it leaves: see ownership.py.
    return remember_spent(state, state.refresh_token).bumped(
        in_flight=InFlight(token_hash(state.refresh_token), now), last_attempt_at=now
    )


def recover_interrupted(state: ProfileState, now: float) -> ProfileState:
    """A journal entry with nobody to finish it: the attempt's outcome is ambiguous."""
    if state.in_flight is None:
        return state
    same_token = (
        state.refresh_token is not None
        and token_hash(state.refresh_token) == state.in_flight.rt_hash
    )
    return state.bumped(
        in_flight=None,
        ambiguous_rt_hash=state.in_flight.rt_hash if same_token else state.ambiguous_rt_hash,
        consecutive_failures=state.consecutive_failures + 1,
        last_attempt_at=state.in_flight.started_at,
        last_error="interrupted: the previous refresh attempt ended without a known outcome",
        last_failure=FailureKind.AMBIGUOUS,
    )


def classify_rejection(
    state: ProfileState, rejected: Rejected, now: float, lifetime_days: float | None = None
) -> RejectionReason:
    """Why the chain broke, from what we know of our own history.

    An invalid_grant is called a theft (reuse_suspected) only when the daemon knows the token
    was alive and unspent by us: no answer of ours was lost with it, the server itself handed
    it to us (a refresh since the import), and its lifetime, counted from the pair's
    generation, had not run out. Short of that the verdict says what we cannot tell.
    """
    if rejected.error == "invalid_grant":
        sent = token_hash(state.refresh_token) if state.refresh_token else None
        if sent is not None and state.ambiguous_rt_hash == sent:
            return RejectionReason.AFTER_LOST_RESPONSE
        if refresh_token_at_its_end(state, now, lifetime_days):
            return RejectionReason.REFRESH_TOKEN_EXPIRED
        if state.refresh_count == 0:
            return RejectionReason.REFUSED_AFTER_IMPORT
        end = refresh_token_end(state, lifetime_days)
        if end is None or not end.from_issue:
            # Counted from the import, the true end came earlier by the paste delay, which
            # we do not know: before our estimate a natural end and a theft look the same.
            return RejectionReason.EXPIRED_OR_REUSED
        return RejectionReason.REUSE_SUSPECTED
    if rejected.error == "invalid_client":
        return RejectionReason.INVALID_CLIENT
    return RejectionReason.OAUTH_ERROR


# The token's own ``exp`` is read on our clock only when its ``iat`` says the server's clock
# and ours agree to within this (NTP keeps both within milliseconds; a minute is generous).
# A server or a wall clock off by more than that (a step, a skew) would otherwise make every
# new token look expired at once, and the daemon refresh in a loop.
CLOCK_AGREEMENT_SECONDS = 60.0


def _access_expiry(journal: ProfileState, outcome: Refreshed, now: float) -> float:
    """When the new access token expires: never later than the server can have meant.

    The server counts ``expires_in`` from when it issued the token, which is before its answer
    arrived (a slow answer took seconds to minutes): so count from when the request left
    (the journal's start), and never past the token's own ``exp`` when it is a JWT issued
    (``iat``) while the request was out, by a clock that agrees with ours.
    """
    sent_at = min(journal.in_flight.started_at if journal.in_flight is not None else now, now)
    expires = sent_at + outcome.expires_in
    try:
        claims = parse_jwt(outcome.access_token)
    except TokenFormatError:
        return expires
    issued = claims.iat
    if (
        issued is not None
        and sent_at - CLOCK_AGREEMENT_SECONDS <= issued <= now + CLOCK_AGREEMENT_SECONDS
    ):
        return min(expires, claims.exp)
    return expires


def apply_outcome(
    state: ProfileState, outcome: RefreshOutcome, now: float, lifetime_days: float | None = None
) -> ProfileState:
    """The state after a refresh attempt that started from ``state``.

    ``lifetime_days`` is config.toml's refresh_lifetime_days (see ``refresh_token_end``).
    """
    sent = token_hash(state.refresh_token) if state.refresh_token else None
    if isinstance(outcome, Refreshed):
        return state.bumped(
            access_token=outcome.access_token,
            refresh_token=outcome.refresh_token or state.refresh_token,
            access_obtained_at=now,
            access_expires_at=_access_expiry(state, outcome, now),
            last_refresh_at=now,
            refresh_count=state.refresh_count + 1,
            consecutive_failures=0,
            last_error=None,
            last_failure=None,
            last_attempt_at=now,
            retry_not_before=None,
            rejection=None,
            in_flight=None,
            # A success without a new refresh token: the server kept the old one (RFC 6749
            # s6 allows it), or it rotated and the new one was lost on the way (a gateway
            # rewriting the body). We cannot tell which, so the token just sent stays
            # marked: if it is refused later, our own lost rotation is the likely cause.
            ambiguous_rt_hash=None if outcome.refresh_token else sent,
        )
    if isinstance(outcome, Rejected):
        reason = classify_rejection(state, outcome, now, lifetime_days)
        return state.bumped(
            rejection=Rejection(reason, outcome.error, outcome.error_description, now),
            in_flight=None,
            last_attempt_at=now,
            last_error=f"rejected: {outcome.error}",
            last_failure=FailureKind.ANSWERED,
        )
    if outcome.rotated_refresh_token is not None:
        # The server rotated and handed us the new refresh token, but no usable access token:
        # keep the new refresh token (the old one is spent) and retry for the access token.
        # It came from the server, so it counts as a refresh for the verdicts.
        return state.bumped(
            refresh_token=outcome.rotated_refresh_token,
            refresh_count=state.refresh_count + 1,
            consecutive_failures=state.consecutive_failures + 1,
            last_error=outcome.reason,
            last_failure=outcome.failure,
            last_attempt_at=now,
            retry_not_before=None,
            in_flight=None,
            ambiguous_rt_hash=None,
        )
    return state.bumped(
        consecutive_failures=state.consecutive_failures + 1,
        last_error=outcome.reason,
        last_failure=outcome.failure,
        last_attempt_at=now,
        retry_not_before=now + outcome.retry_after if outcome.retry_after else None,
        in_flight=None,
        ambiguous_rt_hash=sent if outcome.ambiguous else state.ambiguous_rt_hash,
    )
