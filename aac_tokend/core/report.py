"""What ``status`` says about a profile: a plain dict, times in ISO 8601 UTC."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from .conditions import condition_of
from .policy import access_valid, refresh_token_end, status_of
from .state import ProfileState, TokenKind

__all__ = [
    "CHECK_EXIT",
    "REPORT_FIELDS",
    "check_rows",
    "iso",
    "profile_report",
    "report_row",
    "status_text",
    "verdict",
]

#: Every field of a status row, in order; every row has each of them (README, `status`).
REPORT_FIELDS = (
    "profile", "kind", "state", "token_valid", "access_expires_at", "next_refresh_at",
    "last_refresh_at", "refresh_expires_at", "refresh_count", "consecutive_failures",
    "last_error", "rejection", "alert", "token_socket", "token_endpoint", "client_id",
    "api_base_url",
)  # fmt: skip


#: ``status --check`` exit statuses, worst first: what the script's caller does next.
CHECK_EXIT = {
    "needs_person": 69,  # a rejected/expired/corrupt chain, an alert, or no profile at all
    "no_daemon": 4,  # stored tokens may be fine, but nothing is refreshing them
    "wait": 75,  # no valid token right now, while the daemon retries on its own
    "ok": 0,  # every profile has a valid token and nothing to tell a person
}

#: Profile states that no retry can fix: a person must import a new token (or fix a file).
_NEEDS_PERSON_STATES = frozenset({"rejected", "expired", "corrupt", "unreadable", "misnamed"})


def verdict(row: dict[str, Any]) -> str:
    """What one status row asks of its reader: a key of CHECK_EXIT other than no_daemon.

    The single rule behind both ``status --check`` and the exit status of ``token``, so the
    two never disagree about the same profile at the same moment.
    """
    if row.get("state") in _NEEDS_PERSON_STATES or row.get("alert"):
        return "needs_person"
    if not row.get("token_valid"):
        return "wait"
    return "ok"


def check_rows(rows: list[dict[str, Any]], *, daemon_running: bool) -> tuple[int, list[str]]:
    """The exit status of ``status --check`` for these status rows, and one line per problem.

    Pure: the rows are what ``status --json`` prints, so a script's reading of that JSON and
    this exit status always agree.
    """
    if not rows:
        return CHECK_EXIT["needs_person"], ["no profiles; import one with `aac-tokend import`"]
    person, wait = [], []
    for row in rows:
        name, state, seen = row.get("profile"), row.get("state"), verdict(row)
        if seen == "needs_person":
            person.append(f"{name}: {state}: {row.get('alert') or 'needs a new token'}")
        elif seen == "wait":
            wait.append(f"{name}: {state}: no valid token yet; the daemon is retrying")
    if person:
        return CHECK_EXIT["needs_person"], person
    if not daemon_running:
        return CHECK_EXIT["no_daemon"], ["the daemon is not running; nothing is refreshing"]
    if wait:
        return CHECK_EXIT["wait"], wait
    return CHECK_EXIT["ok"], []


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
) -> dict[str, Any]:
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
        rejection = {
            "reason": state.rejection.reason.value,
            "error": state.rejection.error,
            "error_description": state.rejection.error_description,
            "at": iso(state.rejection.at),
        }
    return report_row(
        profile=state.profile,
        kind=state.kind.value,
        state=status_of(state, now).value,
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


def report_row(**facts: Any) -> dict[str, Any]:
    """A status row with every field of REPORT_FIELDS: the facts given, None for the rest.

    One builder for every row (a served profile, one waiting for a courier, a file the
    daemon cannot use), so a script reading ``status --json`` finds the same keys in each.
    A row without a token says so: ``token_valid`` is False unless given.
    """
    unknown = set(facts) - set(REPORT_FIELDS)
    if unknown:
        raise ValueError(f"not status fields: {sorted(unknown)}")
    row: dict[str, Any] = dict.fromkeys(REPORT_FIELDS)
    row["token_valid"] = False
    row.update(facts)
    return row


_TEXT_FIELDS = ("access_expires_at", "next_refresh_at", "last_refresh_at",
                "refresh_expires_at", "refresh_count", "last_error", "alert")  # fmt: skip


def status_text(rows: list[dict[str, Any]], *, daemon_running: bool) -> str:
    """What ``status`` prints for people: one line per profile, then its known facts."""
    lines = []
    if not daemon_running:
        lines.append("daemon: not running (showing stored state; nothing is being refreshed)")
    for row in rows:
        kind = f" ({row['kind']})" if row.get("kind") else ""
        lines.append(f"{row['profile']}: {row['state']}{kind}")
        lines.extend(
            f"  {key}: {row[key]}" for key in _TEXT_FIELDS if row.get(key) not in (None, "")
        )
    if not rows:
        lines.append("no profiles; import one with `aac-tokend import`")
    return "\n".join(lines)
