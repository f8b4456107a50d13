"""What ``status`` says about a profile: a typed ``StatusRow``, a plain dict only at the wire.

Times are shown in ISO 8601 UTC: a row is the report a person or a script reads, so its
facts are already in the form ``status --json`` prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ..errors import AacTokendError
from .conditions import condition_of
from .policy import access_valid, health_of, refresh_token_end
from .state import ProfileState, TokenKind

__all__ = [
    "CHECK_EXIT",
    "REPORT_FIELDS",
    "RowRejection",
    "RowState",
    "StatusRow",
    "Verdict",
    "check_rows",
    "iso",
    "profile_report",
    "report_row",
    "rows_from_wire",
    "status_text",
    "verdict",
]


class RowState(StrEnum):
    """The ``state`` of a status row: a served profile's ``Health``, or why a file is unusable."""

    OK = "ok"
    RETRYING = "retrying"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CORRUPT = "corrupt"  # the file cannot be decrypted or parsed
    UNREADABLE = "unreadable"  # the file (or its lock) cannot be read at all
    MISNAMED = "misnamed"  # the file's name is not a profile's (often a sync conflict)

    @property
    def unusable(self) -> bool:
        """True for a state file the daemon cannot use (no token, nothing to refresh)."""
        return self in _UNUSABLE


_UNUSABLE = frozenset({RowState.CORRUPT, RowState.UNREADABLE, RowState.MISNAMED})


@dataclass(frozen=True)
class RowRejection:
    """How a chain's refusal shows in a row (``ProfileState.rejection``, times in ISO)."""

    reason: str
    error: str
    error_description: str | None
    at: str | None

    def to_wire(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class StatusRow:
    """One profile's row in ``status``: every field always there (None when not known).

    One type for every row (a served profile, one waiting for a courier, a file the daemon
    cannot use), so a script reading ``status --json`` finds the same keys in each. A row
    without a token says so: ``token_valid`` is False unless given.
    """

    profile: str
    kind: TokenKind | None = None
    state: RowState
    token_valid: bool = False
    access_expires_at: str | None = None
    next_refresh_at: str | None = None
    last_refresh_at: str | None = None
    refresh_expires_at: str | None = None
    refresh_count: int | None = None
    consecutive_failures: int | None = None
    last_error: str | None = None
    rejection: RowRejection | None = None
    alert: str | None = None
    token_socket: str | None = None
    token_endpoint: str | None = None
    client_id: str | None = None
    api_base_url: str | None = None
    #: Fleet mode only (None on a single host): ``role``, ``owner``, ``lease_left_seconds``,
    #: ``etcd`` and ``clock_skew_seconds`` of the profile on this host.
    fleet: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """The row as ``status --json`` prints it and the control socket sends it."""
        row: dict[str, Any] = {name: getattr(self, name) for name in REPORT_FIELDS}
        row["kind"] = self.kind.value if self.kind is not None else None
        row["state"] = self.state.value
        row["rejection"] = self.rejection.to_wire() if self.rejection is not None else None
        return row

    @classmethod
    def from_wire(cls, row: Mapping[str, Any]) -> StatusRow:
        """A row the daemon sent (``to_wire``'s dict); fields it does not know are ignored."""
        facts = {name: row[name] for name in REPORT_FIELDS if name in row}
        facts["state"] = RowState(row["state"])
        if facts.get("kind") is not None:
            facts["kind"] = TokenKind(facts["kind"])
        if facts.get("rejection") is not None:
            facts["rejection"] = RowRejection(**facts["rejection"])
        facts["token_valid"] = bool(facts.get("token_valid"))
        return cls(**facts)


def rows_from_wire(rows: object) -> list[StatusRow]:
    """The status rows a daemon sent, typed; one line (AacTokendError) if it sent something
    else (a daemon of another version, say)."""
    try:
        if not isinstance(rows, list):
            raise TypeError(f"a list of rows, not {type(rows).__name__}")
        return [StatusRow.from_wire(row) for row in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise AacTokendError(
            f"the daemon sent a status row this aac-tokend cannot read ({exc!r}); "
            "is it another version? restart it"
        ) from exc


#: Every field of a status row, in order; every row has each of them (README, `status`).
REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(StatusRow))


class Verdict(StrEnum):
    """What one status row asks of its reader: what the script's caller does next."""

    NEEDS_PERSON = "needs_person"  # a rejected/expired/corrupt chain, an alert, or no profile
    NO_DAEMON = "no_daemon"  # stored tokens may be fine, but nothing is refreshing them
    WAIT = "wait"  # no valid token right now, while the daemon retries on its own
    OK = "ok"  # every profile has a valid token and nothing to tell a person


#: ``status --check`` exit statuses, worst first.
CHECK_EXIT = {Verdict.NEEDS_PERSON: 69, Verdict.NO_DAEMON: 4, Verdict.WAIT: 75, Verdict.OK: 0}

#: Row states that no retry can fix: a person must import a new token (or fix a file).
_NEEDS_PERSON_STATES = frozenset({RowState.REJECTED, RowState.EXPIRED, *_UNUSABLE})


def verdict(row: StatusRow) -> Verdict:
    """What one status row asks of its reader (never NO_DAEMON: that is of the daemon).

    The single rule behind both ``status --check`` and the exit status of ``token``, so the
    two never disagree about the same profile at the same moment.
    """
    if row.state in _NEEDS_PERSON_STATES or row.alert:
        return Verdict.NEEDS_PERSON
    if not row.token_valid:
        return Verdict.WAIT
    return Verdict.OK


def check_rows(rows: Iterable[StatusRow], *, daemon_running: bool) -> tuple[int, list[str]]:
    """The exit status of ``status --check`` for these status rows, and one line per problem.

    Pure: the rows are what ``status --json`` prints, so a script's reading of that JSON and
    this exit status always agree.
    """
    rows = list(rows)
    if not rows:
        return CHECK_EXIT[Verdict.NEEDS_PERSON], [
            "no profiles; import one with `aac-tokend import`"
        ]
    # Every profile that is not fine gets its line, whichever group decides the exit status:
    # the most severe, in the order of ``groups``.
    groups: dict[Verdict, list[str]] = {v: [] for v in (Verdict.NEEDS_PERSON, Verdict.NO_DAEMON)}
    groups[Verdict.WAIT] = []
    retrying = "the daemon is retrying" if daemon_running else "nothing is refreshing it"
    for row in rows:
        name, state, seen = row.profile, row.state.value, verdict(row)
        if seen is Verdict.NEEDS_PERSON:
            groups[seen].append(f"{name}: {state}: {row.alert or 'needs a new token'}")
        elif seen is Verdict.WAIT:
            groups[seen].append(f"{name}: {state}: no valid token yet; {retrying}")
    if not daemon_running:
        groups[Verdict.NO_DAEMON].append("the daemon is not running; nothing is refreshing")
    worst = next((v for v, lines in groups.items() if lines), Verdict.OK)
    return CHECK_EXIT[worst], [line for lines in groups.values() for line in lines]


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC with a Z, or None; a time no calendar date can show says so instead.

    ``status`` must render whatever the store holds: a date past year 9999 (a far-future
    ``exp`` plus a backoff, say) is reported, not raised.
    """
    if ts is None:
        return None
    try:
        when = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        return f"out of range ({ts:.6g} s since 1970)"
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def profile_report(
    state: ProfileState,
    now: float,
    *,
    next_refresh: float | None,
    token_socket: str | None,
    storage_error: bool = False,
    lifetime_days: float | None = None,
) -> StatusRow:
    """The status of one profile; no token, only facts about it.

    ``lifetime_days`` is config.toml's refresh_lifetime_days: the refresh token's end for a
    profile imported without a lifetime.
    """
    condition = condition_of(state, now, lifetime_days)
    end = refresh_token_end(state, lifetime_days) if state.kind is TokenKind.OAUTH else None
    alert = condition.message if condition else None
    if storage_error:
        alert = "the newest tokens could not be written to disk; free space or fix the state dir"
    rejection = None
    if state.rejection is not None:
        rejection = RowRejection(
            state.rejection.reason.value,
            state.rejection.error,
            state.rejection.error_description,
            iso(state.rejection.at),
        )
    return StatusRow(
        profile=state.profile,
        kind=state.kind,
        state=RowState(health_of(state, now).value),
        token_valid=access_valid(state, now),
        access_expires_at=iso(state.access_expires_at),
        next_refresh_at=iso(next_refresh),
        last_refresh_at=iso(state.last_refresh_at),
        refresh_expires_at=iso(end.at if end is not None else state.refresh_expires_at),
        refresh_count=state.refresh_count,
        consecutive_failures=state.consecutive_failures,
        last_error=state.last_error,
        rejection=rejection,
        alert=alert,
        token_socket=token_socket,
        token_endpoint=state.token_endpoint,
        client_id=state.client_id,
        api_base_url=state.api_base_url,
    )


def report_row(**facts: Any) -> StatusRow:
    """A status row from the facts given (``state`` may be its name), None for the rest.

    A misspelt field fails at once (ValueError) rather than reaching a script's JSON.
    """
    unknown = set(facts) - set(REPORT_FIELDS)
    if unknown:
        raise ValueError(f"not status fields: {sorted(unknown)}")
    return StatusRow(**{**facts, "state": RowState(facts["state"])})


_TEXT_FIELDS = ("access_expires_at", "next_refresh_at", "last_refresh_at",
                "refresh_expires_at", "refresh_count", "last_error", "alert")  # fmt: skip


def status_text(rows: Iterable[StatusRow], *, daemon_running: bool) -> str:
    """What ``status`` prints for people: one line per profile, then its known facts."""
    lines = []
    if not daemon_running:
        lines.append("daemon: not running (showing stored state; nothing is being refreshed)")
    rows = list(rows)
    for row in rows:
        kind = f" ({row.kind.value})" if row.kind else ""
        lines.append(f"{row.profile}: {row.state.value}{kind}")
        lines.extend(
            f"  {key}: {getattr(row, key)}"
            for key in _TEXT_FIELDS
            if getattr(row, key) not in (None, "")
        )
    if not rows:
        lines.append("no profiles; import one with `aac-tokend import`")
    return "\n".join(lines)
