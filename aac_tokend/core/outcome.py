"""What a refresh attempt came to, classified by what happens next."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RefreshOutcome", "Refreshed", "Rejected", "Transient"]


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

    ``ambiguous`` is True when the request may have reached the server (a read timeout,
    a reset after sending, a garbled success): the server may have rotated the token.
    ``rotated_refresh_token`` is a new refresh token from a success without a usable access
    token: the server rotated, the old one is spent, retry with this one.
    """

    reason: str
    retry_after: float | None = None
    ambiguous: bool = False
    rotated_refresh_token: str | None = None

    def __repr__(self) -> str:
        rotated = self.rotated_refresh_token is not None
        return f"Transient(reason={self.reason!r}, ambiguous={self.ambiguous}, rotated={rotated})"


RefreshOutcome = Refreshed | Rejected | Transient
