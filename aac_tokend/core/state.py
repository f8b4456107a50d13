"""The typed state of one profile's token chain, and its (de)serialisation.

A ``ProfileState`` is what the encrypted state file holds. It is immutable: every change
makes a new one (see ``policy`` for the transitions). The write-ahead journal of a refresh
lives inside it (``in_flight``), so a successful refresh replaces journal and tokens in one
atomic rename.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from ..errors import ProfileError, StateCorruptError
from .outcome import UNREACHED_PREFIX, FailureKind

__all__ = [
    "FORMAT_VERSION",
    "Health",
    "InFlight",
    "ProfileState",
    "Rejection",
    "RejectionReason",
    "TokenKind",
    "state_from_json",
    "state_to_json",
    "validate_profile_name",
]

#: Version 2 added the spent-token history, version 3 the pair's issue time, version 4 the
#: kind of the last failure; older files (without them) are still read. (A new field needs a
#: new version: an older daemon refuses a field it does not know, rather than drop it.)
FORMAT_VERSION = 4
_READABLE_FORMATS = (1, 2, 3, 4)

#: Profile names become file and socket names: keep them short and shell-safe.
_PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: The daemon's own files are named so that no profile's can be (``.owner.lock`` starts with
#: a dot, a profile name cannot): tests/test_paths.py derives every profile file name from
#: every daemon file name, so a new daemon file cannot collide unnoticed.


def validate_profile_name(name: str) -> str:
    """Return the name if usable as a profile name, else raise ProfileError."""
    if not _PROFILE_RE.fullmatch(name) or name.endswith((".lock", ".state", ".tmp")):
        raise ProfileError(
            f"profile name {name[:70]!r} is not allowed; use 1-64 letters, digits, '-', '_' "
            "or '.', starting with a letter or digit"
        )
    return name


class TokenKind(StrEnum):
    """How a profile gets new access tokens."""

    OAUTH = "oauth"  # refresh-token rotation at a token endpoint
    LEGACY = "legacy"  # a static, non-refreshable Designer Cloud access token


class Health(StrEnum):
    """How a served profile is doing: the ``state`` its status row reports."""

    OK = "ok"
    RETRYING = "retrying"
    REJECTED = "rejected"
    EXPIRED = "expired"


class RejectionReason(StrEnum):
    """Why a refresh chain ended with an OAuth error."""

    AFTER_LOST_RESPONSE = "after_lost_response"
    REFRESH_TOKEN_EXPIRED = "refresh_token_expired"  # noqa: S105 - a reason, not a secret
    # invalid_grant with the refresh token's lifetime unknown: its natural end or a reuse.
    EXPIRED_OR_REUSED = "expired_or_reused"
    # invalid_grant on the first refresh after an import: the pasted pair never worked here.
    REFUSED_AFTER_IMPORT = "refused_after_import"
    # invalid_grant for a token we got from the server, alive by its lifetime, unspent by us.
    REUSE_SUSPECTED = "reuse_suspected"
    INVALID_CLIENT = "invalid_client"
    OAUTH_ERROR = "oauth_error"


@dataclass(frozen=True)
class Rejection:
    """A refresh the token endpoint refused, with the server's own words."""

    reason: RejectionReason
    error: str
    error_description: str | None
    at: float


@dataclass(frozen=True)
class InFlight:
    """Write-ahead journal entry: a refresh with this refresh token (by hash) may be out."""

    rt_hash: str
    started_at: float


@dataclass(frozen=True)
class ProfileState:
    """Everything known about one profile's chain. Times are Unix epoch seconds."""

    profile: str
    kind: TokenKind
    access_token: str
    refresh_token: str | None
    token_endpoint: str | None
    client_id: str | None
    api_base_url: str
    access_obtained_at: float
    access_expires_at: float | None  # None: a legacy token without expiry
    refresh_expires_at: float | None = None  # None: lifetime not known
    imported_at: float = 0.0
    # The pasted pair's iat: when AAC generated it, where it counts the refresh token's
    # lifetime from. None: not known (an opaque token, no iat, a state from before format 3);
    # then the lifetime counts from imported_at, later by however long the paste took.
    pair_issued_at: float | None = None
    last_refresh_at: float | None = None
    refresh_count: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    # Whether the last failed attempt reached the token endpoint (None: no failure, or one
    # the engine counted without an attempt, such as a courier lost before sending).
    last_failure: FailureKind | None = None
    last_attempt_at: float | None = None
    retry_not_before: float | None = None
    rejection: Rejection | None = None
    in_flight: InFlight | None = None
    ambiguous_rt_hash: str | None = None
    generation: int = field(default=0)
    # Hashes of refresh tokens this profile has sent (see ownership.py for the bounds).
    spent_rt_hashes: tuple[str, ...] = ()
    spent_imported_rt_hashes: tuple[str, ...] = ()

    def bumped(self, **changes: Any) -> ProfileState:
        """A copy with ``changes`` applied and the generation counter advanced."""
        return replace(self, generation=self.generation + 1, **changes)

    def __repr__(self) -> str:
        # Never let a token reach a log or traceback through repr().
        return (
            f"ProfileState(profile={self.profile!r}, kind={self.kind.value}, "
            f"generation={self.generation}, refresh_count={self.refresh_count})"
        )


def state_to_json(state: ProfileState) -> bytes:
    """Serialise a state (tokens included: only ever passed to the encrypting store)."""
    # asdict copies a tuple element by element (~5 us each): the hash histories, hundreds
    # long, are added as plain lists instead (1.5 ms -> 0.2 ms per save).
    data = asdict(replace(state, spent_rt_hashes=(), spent_imported_rt_hashes=()))
    data["spent_rt_hashes"] = list(state.spent_rt_hashes)
    data["spent_imported_rt_hashes"] = list(state.spent_imported_rt_hashes)
    data["format"] = FORMAT_VERSION
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _corrupt(what: str) -> StateCorruptError:
    return StateCorruptError(f"state: {what}; the file was left untouched")


def state_from_json(raw: bytes) -> ProfileState:
    """Parse a decrypted state; raise StateCorruptError on any surprise."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also 4300+ digit ints and deep nesting
        raise _corrupt("decrypted content is not JSON") from exc
    if not isinstance(data, dict):
        raise _corrupt("decrypted content is not an object")
    version = data.pop("format", None)
    if type(version) is not int or version not in _READABLE_FORMATS:  # true == 1 otherwise
        raise _corrupt(f"unknown format (expected version {FORMAT_VERSION})")
    known = {f.name for f in fields(ProfileState)}
    if set(data) - known or not {"profile", "kind", "access_token"} <= set(data):
        raise _corrupt("unexpected or missing fields")
    try:
        data["kind"] = TokenKind(data["kind"])
        rej = data.get("rejection")
        if rej is not None:
            data["rejection"] = _typed(
                Rejection(
                    reason=RejectionReason(rej["reason"]),
                    error=rej["error"],
                    error_description=rej.get("error_description"),
                    at=rej["at"],
                )
            )
        failure = data.get("last_failure")
        if failure is not None:
            data["last_failure"] = FailureKind(failure)
        elif version < 4:
            data["last_failure"] = _failure_from_words(data.get("last_error"))
        inf = data.get("in_flight")
        if inf is not None:
            data["in_flight"] = _typed(InFlight(inf["rt_hash"], inf["started_at"]))
        for name in ("spent_rt_hashes", "spent_imported_rt_hashes"):
            if name in data:
                data[name] = _hashes(data[name])
        state = _typed(ProfileState(**data))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise _corrupt("a field has the wrong type") from exc
    validate_profile_name(state.profile)
    return state


def _failure_from_words(last_error: object) -> FailureKind | None:
    """The failure kind of a state written before format 4 kept it: until then the only
    trace of an unreached attempt was the endpoint's wording of it. Read once, at load;
    nothing else in the package looks at the words."""
    if isinstance(last_error, str) and last_error.startswith(UNREACHED_PREFIX):
        return FailureKind.UNREACHED
    return None


def _hashes(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise TypeError("a token-hash history must be a list of strings")
    return tuple(value)


_Typed = TypeVar("_Typed", ProfileState, Rejection, InFlight)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    # Evaluating the string annotations costs ~0.4 ms; once per class is enough.
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _typed(value: _Typed) -> _Typed:
    """``value`` with whole-number times as floats; TypeError if a field has the wrong type.

    Dataclasses do not check types, and a state with a string for a time would only fail
    later, far from the file that caused it. JSON admits NaN and Infinity, which no time we
    write can be: they are refused here rather than compared (always False) forever after.
    """
    hints = _hints(type(value))
    floats: dict[str, Any] = {}
    for f in fields(value):
        field_value = getattr(value, f.name)
        if get_origin(hints[f.name]) is tuple:  # a hash history, checked by _hashes
            continue
        allowed = get_args(hints[f.name]) or (hints[f.name],)
        if isinstance(field_value, bool) and bool not in allowed:
            raise TypeError(f.name)
        if float in allowed and isinstance(field_value, int) and not isinstance(field_value, bool):
            floats[f.name] = float(field_value)
        elif not isinstance(field_value, allowed) or (
            isinstance(field_value, float) and not math.isfinite(field_value)
        ):
            raise TypeError(f.name)
    return replace(value, **floats) if floats else value
