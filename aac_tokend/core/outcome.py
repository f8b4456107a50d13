"""What a refresh attempt came to, classified by what happens next."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "UNREACHED_PREFIX",
    "FailureKind",
    "RefreshOutcome",
    "Refreshed",
    "Rejected",
    "Transient",
]

#: How the endpoint words an attempt that never reached the server. Only people read it:
#: the state keeps the fact itself (``FailureKind.UNREACHED``), except in files written
#: before it did, where it is derived from these words once, at load (``state``).
UNREACHED_PREFIX = "cannot reach the token endpoint"


class FailureKind(StrEnum):
    """Whether a failed attempt reached the token endpoint: under rotation, the one question.

    The value is what the state file stores (``ProfileState.last_failure``).
    """

    UNREACHED = "unreached"  # provably never left: the refresh token is unspent
    AMBIGUOUS = "ambiguous"  # may have reached the server, which may have rotated
    ANSWERED = "answered"  # the server's own answer, and it did not rotate unseen


@dataclass(frozen=True)
class Refreshed:
    """The server rotated the chain: a new access token and (usually) a new refresh token."""

    access_token: str
    refresh_token: str | None  # None: the server kept the old one (RFC 6749 s6)
    expires_in: float

    def __repr__(self) -> str:
        return f"Refreshed(expires_in={self.expires_in})"


@dataclass(frozen=True)
class Rejected:
    """The server refused with an OAuth error: never retried, a person must act."""

    error: str
    error_description: str | None
    status: int


@dataclass(frozen=True)
class Transient:
    """No usable answer: retry later with the same refresh token.

    ``failure`` says whether the request reached the server: ``AMBIGUOUS`` when it may have
    (a read timeout, a reset after sending, a garbled success), so the server may have
    rotated the token; ``UNREACHED`` when it provably never left. ``rotated_refresh_token``
    is a new refresh token from a success without a usable access token: the server
    rotated, the old one is spent, retry with this one.
    """

    reason: str
    retry_after: float | None = None
    failure: FailureKind = FailureKind.ANSWERED
    rotated_refresh_token: str | None = None

    @property
    def ambiguous(self) -> bool:
        """True if the server may have rotated the refresh token we sent."""
        return self.failure is FailureKind.AMBIGUOUS

    def __repr__(self) -> str:
        rotated = self.rotated_refresh_token is not None
        return f"Transient(reason={self.reason!r}, failure={self.failure.value}, rotated={rotated})"


RefreshOutcome = Refreshed | Rejected | Transient
