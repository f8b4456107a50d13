"""The commands behind ``aac-tokend``: argparse, and thin clients of the running daemon.

While a daemon runs, every change goes through its control socket. Without one, commands
that only read state read the encrypted file (never refreshing: only the daemon spends a
refresh token), and ``import``/``remove`` write under the single-owner lock, so no daemon
can start in the middle of the write.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from . import __version__
from .client import ControlClient
from .errors import (
    AacTokendError,
    DaemonNotRunningError,
    InputError,
    ProfileError,
    StateCorruptError,
)
from .paths import Paths, check_token_socket, resolve_paths

__all__ = ["build_parser", "dispatch"]

_EXIT_BY_CODE = {
    "no_token": 69, "unknown_profile": 65, "bad_request": 65, "config_error": 78,
    "busy": 75, "storage_error": 69, "corrupt_state": 69, "transient": 75,
    "endpoint_unavailable": 75, "alert": 69, "refresh_rejected": 69,
}  # fmt: skip


class CommandError(Exception):
    """A one-line failure of a command, with its exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _ask(paths: Paths, op: str, **fields: Any) -> dict[str, Any] | None:
    """The daemon's answer to one request, or None when no daemon is running."""
    try:
        with ControlClient(str(paths.control_socket), timeout=120.0) as client:
            answer = client.request(op, **fields)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError as exc:
        raise CommandError(f"cannot talk to the daemon at {paths.control_socket}: {exc}") from exc
    if not answer.get("ok"):
        code = str(answer.get("code", "error"))
        raise CommandError(str(answer.get("message", code)), _EXIT_BY_CODE.get(code, 1))
    return answer


def _need_daemon(paths: Paths, op: str, **fields: Any) -> dict[str, Any]:
    answer = _ask(paths, op, **fields)
    if answer is None:
        raise DaemonNotRunningError(
            f"the daemon is not running (no {paths.control_socket}); start it with `aac-tokend run`"
        )
    return answer


def _offline_store(paths: Paths) -> Any:
    from .store import FileStore, load_or_create_key

    if not paths.key_file.exists():
        return None
    return FileStore(paths.state_dir, load_or_create_key(paths.config_dir))


# -- commands -------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace, paths: Paths) -> int:
    from .daemon import run_daemon

    return run_daemon(paths)


def _read_tokens(legacy: bool) -> str:
    if sys.stdin.isatty():
        access = getpass.getpass("Access token (input hidden): ")
        if legacy:
            return access
        return access + "\n" + getpass.getpass("Refresh token (input hidden): ")
    return sys.stdin.read(64 * 1024 + 1)


def _parse_when(text: str) -> float:
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InputError(f"--expires {text[:40]!r} is not an ISO date like 2027-01-31") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def cmd_import(args: argparse.Namespace, paths: Paths) -> int:
    from .importer import build_state, parse_import_text

    request = parse_import_text(_read_tokens(args.legacy), profile=args.profile, legacy=args.legacy)
    request = dataclasses.replace(
        request,
        token_endpoint=args.token_endpoint,
        client_id=args.client_id,
        refresh_lifetime_days=args.refresh_lifetime_days,
        api_base_url=args.base_url,
        legacy_expires_at=_parse_when(args.expires) if args.expires else None,
    )
    if request.refresh_lifetime_days is None and request.refresh_expires_in is None:
        from .config import load_config

        days = load_config(paths.config_dir).policy_for(args.profile).refresh_lifetime_days
        request = dataclasses.replace(request, refresh_lifetime_days=days)
    state = build_state(request, time.time())  # every input error surfaces before any write
    check_token_socket(state.profile, paths.token_socket(state.profile))
    answer = _ask(paths, "import", **request.to_wire())
    if answer is None:
        from .owner import OwnerLock
        from .store import FileStore, load_or_create_key

        with OwnerLock(paths.daemon_lock):
            store = FileStore(paths.state_dir, load_or_create_key(paths.config_dir))
            with store.locked(state.profile, 10.0):
                store.save(state)
        where = "saved; `aac-tokend run` will keep it alive"
    else:
        where = "handed to the running daemon"
    print(f"imported profile {state.profile} ({state.kind.value}): {where}")
    return 0


def cmd_token(args: argparse.Namespace, paths: Paths) -> int:
    answer = _ask(paths, "token", profile=args.profile)
    if answer is not None:
        print(answer["token"])
        return 0
    from .policy import access_valid

    store = _offline_store(paths)
    state = store.load(args.profile) if store else None
    if state is None:
        raise ProfileError(f"no profile named {args.profile!r}; import one first")
    if not access_valid(state, time.time()):
        raise CommandError(
            f"profile {args.profile}: the access token has expired and the daemon is not "
            "running to refresh it; start it with `aac-tokend run`",
            69,
        )
    print(state.access_token)
    return 0


def _offline_status(paths: Paths) -> list[dict[str, Any]]:
    from .report import profile_report

    store = _offline_store(paths)
    rows = []
    for name in store.profiles() if store else []:
        try:
            state = store.load(name)
        except AacTokendError as exc:
            # The daemon's words for it (engine.UNUSABLE_STATES), without importing it.
            state = "unreadable"
            if isinstance(exc, StateCorruptError):
                state = "corrupt"
            elif isinstance(exc, ProfileError):
                state = "misnamed"
            rows.append({"profile": name, "state": state, "alert": str(exc)})
            continue
        if state is not None:
            rows.append(profile_report(state, time.time(), next_refresh=None, token_socket=None))
    return rows


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    answer = _ask(paths, "status")
    rows = answer["profiles"] if answer else _offline_status(paths)
    if args.json:
        print(json.dumps({"daemon_running": answer is not None, "profiles": rows}, indent=2))
        return 0
    if answer is None:
        print("daemon: not running (showing stored state; nothing is being refreshed)")
    for row in rows:
        print(f"{row['profile']}: {row['state']}" + (f" ({row['kind']})" if "kind" in row else ""))
        for key in ("access_expires_at", "next_refresh_at", "last_refresh_at",
                    "refresh_expires_at", "refresh_count", "last_error", "alert"):  # fmt: skip
            if row.get(key) not in (None, ""):
                print(f"  {key}: {row[key]}")
    if not rows:
        print("no profiles; import one with `aac-tokend import`")
    return 0


def cmd_refresh(args: argparse.Namespace, paths: Paths) -> int:
    row = _need_daemon(paths, "refresh", profile=args.profile)["profile"]
    print(f"{row['profile']}: {row['state']}, token valid until {row['access_expires_at']}")
    return 0 if row["state"] in ("ok",) else 69


def cmd_remove(args: argparse.Namespace, paths: Paths) -> int:
    if _ask(paths, "remove", profile=args.name) is None:
        from .owner import OwnerLock
        from .store import FileStore, load_or_create_key

        with OwnerLock(paths.daemon_lock):
            FileStore(paths.state_dir, load_or_create_key(paths.config_dir)).delete(args.name)
    print(f"removed profile {args.name}")
    return 0


def cmd_profiles(args: argparse.Namespace, paths: Paths) -> int:
    answer = _ask(paths, "profiles")
    if answer is not None:
        names = answer["profiles"]
    else:
        store = _offline_store(paths)
        names = store.profiles() if store else []
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
    from .errors import AlreadyRunningError
    from .owner import OwnerLock

    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while True:
        try:
            with OwnerLock(paths.daemon_lock):
                return 0
        except AlreadyRunningError as exc:
            if time.monotonic() > deadline:
                raise CommandError(
                    f"the daemon (pid {exc.pid}) was asked to stop but still runs after "
                    f"{STOP_WAIT_SECONDS:.0f} s; see its log"
                ) from exc
            time.sleep(0.05)


def _mount(sub: Any, name: str, module: str, help_text: str, wanted: str | None) -> None:
    """A subcommand implemented in its own module, imported only when it is the one run."""
    parser = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    if wanted != name:
        return
    import importlib

    mod = importlib.import_module(f"aac_tokend.{module}")
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    mod.add_arguments(parser)
    parser.set_defaults(func=lambda a, _p: mod.run_cli(a))


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(
        prog="aac-tokend",
        description="Keeps Alteryx Analytics Cloud OAuth token chains alive and serves the "
        "access token locally. AAC_TOKEND_HOME=DIR relocates all files.",
        epilog="exit status: 0 ok, 1 failure, 2 usage, 3 already running, 4 daemon not "
        "running, 65 bad input, 69 rejected/expired chain, 75 try again later, 78 bad config",
    )
    parser.add_argument("--version", action="version", version=f"aac-tokend {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def profile_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", "-p", default="default", help="profile name (default: default)")

    add("run", cmd_run, "run the daemon in the foreground (what systemd/launchd start)")
    p = add("import", cmd_import, "import a token pair from stdin (two lines or token JSON)")
    profile_opt(p)
    p.add_argument("--token-endpoint", help="token endpoint URL (default: the JWT's iss + /token)")
    p.add_argument("--client-id", help="OAuth client id (default: the JWT's client_id)")
    p.add_argument("--refresh-lifetime-days", type=float, help="refresh token lifetime (1-365)")
    p.add_argument("--base-url", help="AAC API base URL (default https://api.us1.alteryxcloud.com)")
    p.add_argument("--legacy", action="store_true", help="a static, non-refreshable token")
    p.add_argument("--expires", help="with --legacy: expiry date (ISO 8601)")
    profile_opt(add("token", cmd_token, "print the current access token"))
    add("status", cmd_status, "show each profile's state").add_argument(
        "--json", action="store_true", help='print {"profiles": [...]} as JSON'
    )
    profile_opt(add("refresh", cmd_refresh, "refresh a profile now (through the daemon)"))
    add("remove", cmd_remove, "remove a profile and its state").add_argument("name")
    add("profiles", cmd_profiles, "list profile names")
    add("reload", cmd_reload, "make the daemon re-read config.toml")
    add("stop", cmd_stop, "stop the running daemon")
    _mount(sub, "sandbox", "sandbox", "run a local AAC-like token server on loopback", wanted)
    _mount(
        sub, "demo", "demo", "show the daemon at work against the sandbox (about a minute)", wanted
    )
    _mount(
        sub, "service", "service", "install/uninstall/show the systemd or launchd service", wanted
    )
    _mount(sub, "api", "api", "call the AAC API with the current token", wanted)
    _mount(sub, "exec", "execwrap", "run a command with AAC_ACCESS_TOKEN set", wanted)
    return parser


def dispatch(argv: list[str]) -> int:
    """Parse and run; errors become one line on stderr and an exit status."""
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        result: int = args.func(args, resolve_paths(os.environ))
        return result
    except AacTokendError as exc:
        print(f"aac-tokend: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except CommandError as exc:
        print(f"aac-tokend: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
