"""One function per ``aac-tokend`` subcommand: a thin client of the running daemon.

While a daemon runs, every change goes through its control socket (``client``). Without
one, the commands that can do without it do what ``offline`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from ..client import ask_daemon, format_token, need_daemon
from ..errors import (
    AacTokendError,
    ChainInUseError,
    DaemonNotRunningError,
    NoTokenError,
    ProfileError,
    UsageError,
)
from ..host.paths import Paths, check_token_socket
from . import offline
from .prompts import ask_refresh_lifetime, confirm_remove, confirm_replace_chain, read_tokens

if TYPE_CHECKING:
    from ..core.importer import ImportRequest
    from ..core.state import ProfileState

__all__ = [
    "STOP_WAIT_SECONDS",
    "cmd_import",
    "cmd_profiles",
    "cmd_refresh",
    "cmd_reload",
    "cmd_remove",
    "cmd_run",
    "cmd_status",
    "cmd_stop",
    "cmd_token",
]


def _ask(paths: Paths, op: str, *, deadline: float = 0.0, **fields: Any) -> dict[str, Any] | None:
    """The daemon's answer to one request, or None when no daemon is running."""
    return ask_daemon(str(paths.control_socket), op, deadline=deadline, **fields)


def _need_daemon(paths: Paths, op: str, **fields: Any) -> dict[str, Any]:
    return need_daemon(str(paths.control_socket), op, **fields)


def cmd_run(args: argparse.Namespace, paths: Paths) -> int:
    from ..daemon.main import run_daemon

    return run_daemon(paths)


def cmd_import(args: argparse.Namespace, paths: Paths) -> int:
    from ..core.importer import build_state, parse_expiry_date, parse_import_text

    if args.expires and not args.legacy:
        raise UsageError(
            "import: --expires is the expiry of a static token and goes with --legacy; "
            "add --legacy or drop --expires"
        )
    request = parse_import_text(read_tokens(args.legacy), profile=args.profile, legacy=args.legacy)
    request = dataclasses.replace(
        request,
        token_endpoint=args.token_endpoint,
        client_id=args.client_id,
        refresh_lifetime_days=args.refresh_lifetime_days,
        api_base_url=args.base_url,
        legacy_expires_at=parse_expiry_date(args.expires) if args.expires else None,
    )
    if request.refresh_lifetime_days is None and request.refresh_expires_in is None:
        from ..host.configfile import load_config

        # config.toml's lifetime is not stored: it is read at use time, so correcting it
        # later applies to this profile too. Only a lifetime the person gives is stored.
        configured = load_config(paths.config_dir).policy_for(args.profile).refresh_lifetime_days
        if configured is None and not args.legacy and sys.stdin.isatty():
            request = dataclasses.replace(
                request, refresh_lifetime_days=ask_refresh_lifetime(input)
            )
    request = dataclasses.replace(request, replace_chain=args.yes)
    state = build_state(request, time.time())  # every input error surfaces before any write
    check_token_socket(state.profile, paths.token_socket(state.profile))
    try:
        changed, where = _import_state(paths, request, state)
    except ChainInUseError:  # from the daemon or from the store, alike
        if not sys.stdin.isatty():
            raise
        confirm_replace_chain(state.profile)
        request = dataclasses.replace(request, replace_chain=True)
        changed, where = _import_state(paths, request, state)
    if not changed:
        print(f"profile {state.profile} already holds this token pair; nothing changed")
        return 0
    print(f"imported profile {state.profile} ({state.kind.value}): {where}")
    return 0


def _import_state(paths: Paths, request: ImportRequest, state: ProfileState) -> tuple[bool, str]:
    """Hand the import to the daemon, or claim it in the store; (changed, where it went)."""
    answer = _ask(paths, "import", **request.to_wire())
    if answer is None:
        changed = offline.import_state(paths, request, state)
        return changed, "saved; `aac-tokend run` will keep it alive"
    return answer["changed"], "handed to the running daemon"


def cmd_token(args: argparse.Namespace, paths: Paths) -> int:
    answer = _ask(paths, "token", deadline=getattr(args, "deadline", 0.0), profile=args.profile)
    if answer is not None:
        sys.stdout.write(format_token(answer["token"], args.form))
        return 0
    from ..core.policy import access_valid
    from ..core.report import Verdict, verdict

    state = offline.load_profile(paths, args.profile)
    if state is None:
        raise ProfileError(f"no profile named {args.profile!r}; import one first")
    if not access_valid(state, time.time()):
        # The daemon's rule for `token` (op_token) and that of `status --check`: what needs
        # a person is an alert (69); anything else only needs the daemon running (4).
        row = offline.profile_row(paths, state)
        if verdict(row) is Verdict.NEEDS_PERSON:
            reason = row.alert or row.last_error or "needs a new token"
            raise NoTokenError(
                f"profile {row.profile}: no valid token ({row.state.value}): {reason}"
            )
        raise DaemonNotRunningError(
            f"profile {args.profile}: the access token has expired and the daemon is not "
            "running to refresh it; start it with `aac-tokend run`"
        )
    sys.stdout.write(format_token(state.access_token, args.form))
    return 0


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    from ..core.report import rows_from_wire

    answer = _ask(paths, "status")
    key_error = None
    try:
        rows = rows_from_wire(answer["profiles"]) if answer else offline.status_rows(paths)
    except AacTokendError as exc:
        # The state key cannot be loaded (a locked keyring, say): every profile is unknown,
        # and a script still gets its JSON and a check line saying what to do.
        if not (args.check or args.json):
            raise
        rows, key_error = [], exc
    status = 0
    if args.check:
        from ..core.report import CHECK_EXIT, Verdict, check_rows

        status, problems = check_rows(rows, daemon_running=answer is not None)
        if key_error is not None:
            status, problems = (
                CHECK_EXIT[Verdict.NEEDS_PERSON],
                [f"cannot read the stored profiles: {key_error}"],
            )
        for line in problems:
            print(f"aac-tokend: check: {line}", file=sys.stderr)
    if args.json:
        report: dict[str, Any] = {
            "daemon_running": answer is not None,
            "profiles": [row.to_wire() for row in rows],
        }
        if key_error is not None:
            report["error"] = str(key_error)
            status = status or key_error.exit_code
        print(json.dumps(report, indent=2))
        return status
    from ..core.report import status_text

    print(status_text(rows, daemon_running=answer is not None))
    return status


def cmd_refresh(args: argparse.Namespace, paths: Paths) -> int:
    from ..core.report import CHECK_EXIT, rows_from_wire, verdict

    (row,) = rows_from_wire([_need_daemon(paths, "refresh", profile=args.profile)["profile"]])
    if args.json:
        print(json.dumps(row.to_wire(), indent=2))
    elif row.token_valid:
        until = f"until {row.access_expires_at}" if row.access_expires_at else "(no expiry known)"
        print(f"{row.profile}: {row.state.value}, token valid {until}")
    else:
        print(f"{row.profile}: {row.state.value}, no valid token (the access token expired at "
              f"{row.access_expires_at}): {row.alert or row.last_error}")  # fmt: skip
    # The rule of `status --check` and `token` (a retry under way while the token is still
    # valid is fine: 0, as --check says).
    return CHECK_EXIT[verdict(row)]


def cmd_remove(args: argparse.Namespace, paths: Paths) -> int:
    confirm_remove(args.name, args.yes)
    if _ask(paths, "remove", profile=args.name) is None:
        offline.remove_profile(paths, args.name)
    print(f"removed profile {args.name}")
    return 0


def cmd_profiles(args: argparse.Namespace, paths: Paths) -> int:
    answer = _ask(paths, "profiles")
    names = answer["profiles"] if answer is not None else offline.profile_names(paths)
    if args.json:
        print(json.dumps({"daemon_running": answer is not None, "profiles": names}, indent=2))
        return 0
    for name in names:
        print(name)
    return 0


def cmd_reload(args: argparse.Namespace, paths: Paths) -> int:
    _need_daemon(paths, "reload")
    return 0


#: The daemon exits within 2 s of a shutdown request; past this, `stop` says it still runs.
STOP_WAIT_SECONDS = 10.0


def cmd_stop(args: argparse.Namespace, paths: Paths) -> int:
    _need_daemon(paths, "shutdown")
    # Return only once the daemon has let go of the owner lock: `stop && run` must work.
    from ..errors import AlreadyRunningError
    from ..store.owner import OwnerLock

    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while True:
        try:
            with OwnerLock(paths.daemon_lock):
                return 0
        except AlreadyRunningError as exc:
            if time.monotonic() > deadline:
                raise AacTokendError(
                    f"the daemon (pid {exc.pid}) was asked to stop but still runs after "
                    f"{STOP_WAIT_SECONDS:.0f} s; see its log"
                ) from exc
            time.sleep(0.05)
