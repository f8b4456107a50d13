"""The commands behind ``aac-tokend``: argparse, and thin clients of the running daemon.

While a daemon runs, every change goes through its control socket. Without one, commands
that only read state read the encrypted file (never refreshing: only the daemon spends a
refresh token), and ``import``/``remove`` write under the single-owner lock, so no daemon
can start in the middle of the write.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..client import ask_daemon, format_token, need_daemon
from ..errors import (
    AacTokendError,
    ChainInUseError,
    InputError,
    NoTokenError,
    ProfileError,
    StateCorruptError,
    StorageError,
    UsageError,
)
from ..host.paths import Paths, check_token_socket, resolve_paths

if TYPE_CHECKING:
    from ..core.report import StatusRow
from ..rundir import PROFILE_ENV

__all__ = ["EVERY_COMMAND", "add_profile_option", "build_parser", "default_profile", "dispatch"]


def _ask(paths: Paths, op: str, **fields: Any) -> dict[str, Any] | None:
    """The daemon's answer to one request, or None when no daemon is running."""
    return ask_daemon(str(paths.control_socket), op, **fields)


def _need_daemon(paths: Paths, op: str, **fields: Any) -> dict[str, Any]:
    return need_daemon(str(paths.control_socket), op, **fields)


def _offline_store(paths: Paths) -> Any:
    from ..store.files import FileStore, load_or_create_key, stored_state_count
    from ..store.keystore import KEYRING_POINTER

    no_key = not paths.key_file.exists() and not (paths.config_dir / KEYRING_POINTER).exists()
    # State files without their key: load_or_create_key says so, rather than "no profiles".
    if no_key and not stored_state_count(paths.state_dir):
        return None
    return FileStore(
        paths.state_dir, load_or_create_key(paths.config_dir, state_dir=paths.state_dir)
    )


# -- commands -------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace, paths: Paths) -> int:
    from ..daemon.main import run_daemon

    return run_daemon(paths)


def _read_tokens(legacy: bool) -> str:
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise InputError(
            "import: standard input is closed; pipe the tokens in, or run import at a terminal"
        )
    if sys.stdin.isatty():
        access = getpass.getpass("Access token (input hidden): ")
        if legacy:
            return access
        return access + "\n" + getpass.getpass("Refresh token (input hidden): ")
    # Bytes, whatever the locale: a stray non-UTF-8 byte becomes U+FFFD, which clean_token
    # refuses in one line naming the token, instead of a decoding traceback.
    return sys.stdin.buffer.read(64 * 1024 + 1).decode("utf-8", errors="replace")


def ask_refresh_lifetime(read: Callable[[str], str]) -> float | None:
    """Ask a person at a terminal for the refresh token's lifetime; Enter means unknown.

    Without it an invalid_grant cannot tell the token's natural end from a reuse. The answer
    is never echoed back in an error: a token pasted here by mistake stays unprinted.
    """
    answer = read(
        "Refresh token lifetime in days, as chosen when generating it in AAC (Enter if unknown): "
    ).strip()
    if not answer:
        return None
    try:
        days = float(answer)
    except ValueError:
        days = math.nan
    if not math.isfinite(days) or days <= 0:
        raise InputError(
            "import: the refresh token lifetime must be a number of days (1-365); run import "
            "again and press Enter if you do not know it"
        )
    return days


def cmd_import(args: argparse.Namespace, paths: Paths) -> int:
    from ..core.importer import build_state, parse_expiry_date, parse_import_text

    if args.expires and not args.legacy:
        raise UsageError(
            "import: --expires is the expiry of a static token and goes with --legacy; "
            "add --legacy or drop --expires"
        )
    request = parse_import_text(_read_tokens(args.legacy), profile=args.profile, legacy=args.legacy)
    request = dataclasses.replace(
        request,
        token_endpoint=args.token_endpoint,
        client_id=args.client_id,
        refresh_lifetime_days=args.refresh_lifetime_days,
        api_base_url=args.base_url,
        legacy_expires_at=parse_expiry_date(args.expires) if args.expires else None,
    )
    if request.refresh_lifetime_days is None and request.refresh_expires_in is None:
        from ..core.config import load_config

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
        _confirm_replace_chain(state.profile)
        request = dataclasses.replace(request, replace_chain=True)
        changed, where = _import_state(paths, request, state)
    if not changed:
        print(f"profile {state.profile} already holds this token pair; nothing changed")
        return 0
    print(f"imported profile {state.profile} ({state.kind.value}): {where}")
    return 0


def _confirm_replace_chain(name: str) -> None:
    """Ask on a terminal before a static token replaces a live chain's refresh token."""
    sys.stderr.write(
        f"Profile {name!r} holds a live OAuth chain; replace it with this static token? Its "
        "refresh token is deleted for good (this may be the only copy). [y/N] "
    )
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise InputError(f"import: not confirmed; profile {name} was kept")


def _import_state(paths: Paths, request: Any, state: Any) -> tuple[bool, str]:
    """Hand the import to the daemon, or claim it in the store; (changed, where it went)."""
    answer = _ask(paths, "import", **request.to_wire())
    if answer is None:
        from ..core.ownership import claim, stored_states
        from ..store.files import FileStore, load_or_create_key
        from ..store.owner import OwnerLock
        from ..store.pending import PendingStore

        with OwnerLock(paths.daemon_lock):
            store = FileStore(
                paths.state_dir, load_or_create_key(paths.config_dir, state_dir=paths.state_dir)
            )
            pending = PendingStore(paths.pending_dir)
            with store.locked(state.profile, 10.0):
                current = store.load(state.profile)
                own = [current] if current is not None else []
                # A pair a dead daemon could not save: its generation counts too (claim).
                with contextlib.suppress(AacTokendError):
                    blob = pending.get(state.profile)
                    if blob is not None:
                        own.append(store.decrypt(state.profile, blob))
                others = stored_states(store, skip={state.profile})
                claimed = claim(state, own, others, replace_chain=request.replace_chain)
                if claimed is not None:
                    store.save(claimed)
                    pending.clear(state.profile)  # a new chain: an old one's pair is moot
        return claimed is not None, "saved; `aac-tokend run` will keep it alive"
    return bool(answer.get("changed", True)), "handed to the running daemon"


def cmd_token(args: argparse.Namespace, paths: Paths) -> int:
    answer = _ask(paths, "token", profile=args.profile)
    if answer is not None:
        sys.stdout.write(format_token(answer["token"], args.form))
        return 0
    from ..core.policy import access_valid

    store = _offline_store(paths)
    state = _offline_load(store, args.profile) if store else None
    if state is None:
        raise ProfileError(f"no profile named {args.profile!r}; import one first")
    if not access_valid(state, time.time()):
        raise NoTokenError(
            f"profile {args.profile}: the access token has expired and the daemon is not "
            "running to refresh it; start it with `aac-tokend run`"
        )
    sys.stdout.write(format_token(state.access_token, args.form))
    return 0


def _offline_load(store: Any, name: str) -> Any:
    """``store.load(name)``, with a misnamed file refused as the daemon refuses it (69)."""
    try:
        return store.load(name)
    except ProfileError as exc:
        if name not in store.profiles():
            raise  # no such file: a bad name typed, not a bad file found
        from ..daemon.engine import _misnamed  # the daemon's advice, word for word

        raise StorageError(_misnamed(store.state_dir, name, exc)) from exc


def _offline_status(paths: Paths) -> list[StatusRow]:
    from ..core.config import load_config
    from ..core.report import RowState, profile_report, report_row

    store = _offline_store(paths)
    try:
        config = load_config(paths.config_dir)
    except AacTokendError:
        config = None  # status still answers; `aac-tokend run` says what is wrong with it
    rows = []
    for name in store.profiles() if store else []:
        try:
            state = store.load(name)
        except AacTokendError as exc:
            # The daemon's words for it (engine.UNUSABLE_STATES), without importing it.
            state, alert = RowState.UNREADABLE, str(exc)
            if isinstance(exc, StateCorruptError):
                state = RowState.CORRUPT
            elif isinstance(exc, ProfileError):
                from ..daemon.engine import _misnamed

                state, alert = RowState.MISNAMED, _misnamed(store.state_dir, name, exc)
            rows.append(report_row(profile=name, state=state, alert=alert))
            continue
        if state is not None:
            days = config.policy_for(name).refresh_lifetime_days if config else None
            rows.append(
                profile_report(
                    state, time.time(), next_refresh=None, token_socket=None, lifetime_days=days
                )
            )
    return rows


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    answer = _ask(paths, "status")
    key_error = None
    try:
        rows = _rows_from_wire(answer["profiles"]) if answer else _offline_status(paths)
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
    from ..core.report import RowState, Verdict, verdict

    (row,) = _rows_from_wire([_need_daemon(paths, "refresh", profile=args.profile)["profile"]])
    if args.json:
        print(json.dumps(row.to_wire(), indent=2))
    elif row.token_valid:
        print(f"{row.profile}: {row.state.value}, token valid until {row.access_expires_at}")
    else:
        print(f"{row.profile}: {row.state.value}, no valid token (the access token expired at "
              f"{row.access_expires_at}): {row.alert or row.last_error}")  # fmt: skip
    if row.state is RowState.OK:
        return 0
    # the rule of `status --check` and `token`
    return 75 if verdict(row) is Verdict.WAIT else 69


def _rows_from_wire(rows: Any) -> list[StatusRow]:
    """The daemon's status rows, typed; one line if it sent something else."""
    from ..core.report import StatusRow

    try:
        return [StatusRow.from_wire(row) for row in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise AacTokendError(
            f"the daemon sent a status row this aac-tokend cannot read ({exc!r}); "
            "is it another version? restart it"
        ) from exc


def _confirm_remove(name: str, yes: bool) -> None:
    """Ask on a terminal before deleting what may be the only copy of a refresh token."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise InputError(
            f"remove: refusing to delete profile {name!r} without confirmation (its refresh "
            "token cannot be recovered); pass --yes"
        )
    sys.stderr.write(
        f"Remove profile {name!r}? Its refresh token is deleted for good (this may be the "
        "only copy). [y/N] "
    )
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise AacTokendError(f"remove: not confirmed; profile {name} was kept")


def cmd_remove(args: argparse.Namespace, paths: Paths) -> int:
    _confirm_remove(args.name, args.yes)
    if _ask(paths, "remove", profile=args.name) is None:
        from ..refresh.courier import WAIT_SECONDS
        from ..store.files import FileStore, load_or_create_key
        from ..store.owner import OwnerLock
        from ..store.pending import PendingStore

        with OwnerLock(paths.daemon_lock):
            store = FileStore(
                paths.state_dir, load_or_create_key(paths.config_dir, state_dir=paths.state_dir)
            )
            # Like the daemon: a courier (of a daemon killed mid-refresh) holds the lock
            # until its outcome is on disk; deleting under it would let it write back.
            if not store.lock_is_free(args.name):
                print(f"waiting for a refresh of {args.name} to finish...", file=sys.stderr)
            with store.locked(args.name, WAIT_SECONDS):
                store.delete(args.name)
                PendingStore(paths.pending_dir).clear(args.name)  # never adopted back
    print(f"removed profile {args.name}")
    return 0


def cmd_profiles(args: argparse.Namespace, paths: Paths) -> int:
    answer = _ask(paths, "profiles")
    if answer is not None:
        names = answer["profiles"]
    else:
        store = _offline_store(paths)
        names = store.profiles() if store else []
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


#: ``build_parser(EVERY_COMMAND)`` mounts every lazy subcommand's options too (completions).
EVERY_COMMAND = "*"


def _mount(sub: Any, name: str, module: str, help_text: str, wanted: str | None) -> None:
    """A subcommand implemented in its own module, imported only when it is the one run."""
    parser = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    if wanted not in (name, EVERY_COMMAND):
        return
    import importlib

    mod = importlib.import_module(f"aac_tokend.{module}")
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    mod.add_arguments(parser)
    parser.set_defaults(func=lambda a, _p: mod.run_cli(a))


def default_profile() -> str:
    """The profile a command uses without ``--profile``: $AAC_TOKEND_PROFILE, else default."""
    return os.environ.get(PROFILE_ENV) or "default"


def add_profile_option(parser: argparse.ArgumentParser) -> None:
    """``--profile/-p NAME``, the same on every command that takes one."""
    parser.add_argument(
        "--profile", "-p", default=None,
        help=f"profile name (default: ${PROFILE_ENV}, else default)",
    )  # fmt: skip


def _check_profile_env(args: argparse.Namespace) -> None:
    """Fill in a profile not given with --profile; a bad $AAC_TOKEND_PROFILE is named as
    such, and only when it is used (an explicit --profile wins, and is checked as itself)."""
    if not hasattr(args, "profile") or args.profile is not None:
        return
    args.profile = default_profile()
    value = os.environ.get(PROFILE_ENV)
    if value:
        from ..core.state import validate_profile_name

        try:
            validate_profile_name(value)
        except ProfileError as exc:
            raise InputError(f"{PROFILE_ENV}: {exc}; fix or unset it") from exc


def build_parser(wanted: str | None = None) -> argparse.ArgumentParser:
    """The whole command line (``wanted``: the lazy subcommand to mount fully, or every one)."""
    parser = argparse.ArgumentParser(
        prog="aac-tokend",
        description="Keeps Alteryx Analytics Cloud OAuth token chains alive and serves the "
        "access token locally. AAC_TOKEND_HOME=DIR relocates all files; "
        "AAC_TOKEND_PROFILE=NAME is the default profile.",
        epilog="exit status: 0 ok, 1 failure, 2 usage, 3 already running, 4 daemon not "
        "running, 65 bad input, 69 rejected/expired chain, 75 try again later, 78 bad config",
    )
    parser.add_argument("--version", action="version", version=f"aac-tokend {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "run the daemon in the foreground (what systemd/launchd start)")
    p = add("import", cmd_import, "import a token pair from stdin (two lines or token JSON)")
    add_profile_option(p)
    p.add_argument("--token-endpoint", help="token endpoint URL (default: the JWT's iss + /token)")
    p.add_argument("--client-id", help="OAuth client id (default: the JWT's client_id)")
    p.add_argument("--refresh-lifetime-days", type=float, help="refresh token lifetime (1-365)")
    p.add_argument("--base-url", help="AAC API base URL (default https://api.us1.alteryxcloud.com)")
    p.add_argument("--legacy", action="store_true", help="a static, non-refreshable token")
    p.add_argument("--expires", help="with --legacy: expiry date (ISO 8601)")
    p.add_argument(
        "--yes", "-y", action="store_true",
        help="with --legacy: replace a live OAuth chain in the profile without asking",
    )  # fmt: skip
    p = add("token", cmd_token, "print the current access token")
    add_profile_option(p)
    form = p.add_mutually_exclusive_group()
    form.add_argument(
        "--header", dest="form", action="store_const", const="header", default="plain",
        help="print 'Authorization: Bearer TOKEN', for `curl -H @-` (curl 7.55+)",
    )  # fmt: skip
    form.add_argument(
        "--curl-config", dest="form", action="store_const", const="curl-config",
        help="print a curl config line with the header, for `curl -K -` (any curl)",
    )  # fmt: skip
    p = add("status", cmd_status, "show each profile's state")
    p.add_argument("--json", action="store_true", help='print {"profiles": [...]} as JSON')
    p.add_argument(
        "--check", action="store_true",
        help="exit 0 only if every profile has a valid token; 69 if one needs a person, "
        "4 if the daemon is not running, 75 if a token is still being retried",
    )  # fmt: skip
    p = add("refresh", cmd_refresh, "refresh a profile now (through the daemon)")
    add_profile_option(p)
    p.add_argument("--json", action="store_true", help="print the profile's status as JSON")
    p = add("remove", cmd_remove, "remove a profile and its state (asks first on a terminal)")
    p.add_argument("name")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask (for scripts)")
    add("profiles", cmd_profiles, "list profile names").add_argument(
        "--json", action="store_true", help='print {"profiles": [names]} as JSON'
    )
    add("reload", cmd_reload, "make the daemon re-read config.toml")
    add("stop", cmd_stop, "stop the running daemon")
    _mount(sub, "sandbox", "sandbox.cli", "run a local AAC-like token server on loopback", wanted)
    _mount(
        sub,
        "demo",
        "sandbox.demo",
        "show the daemon at work against the sandbox (about a minute)",
        wanted,
    )
    _mount(
        sub,
        "service",
        "service.install",
        "install/uninstall/show the systemd or launchd service",
        wanted,
    )
    _mount(sub, "api", "api", "call the AAC API with the current token", wanted)
    _mount(sub, "exec", "commands.execwrap", "run a command with AAC_ACCESS_TOKEN set", wanted)
    _mount(
        sub, "completion", "commands.completion", "print shell completions or the man page", wanted
    )
    _mount(
        sub, "key", "store.keystore", "keep the state key in the OS keyring or in its file", wanted
    )
    return parser


#: Commands that may hold a token: read from you (import), from the daemon (token, api,
#: exec) or from the encrypted store when the daemon is not running (token, status, remove).
#: No core file may carry it off. (``run`` sets the daemon's own limit in daemon.py.)
TOKEN_COMMANDS = frozenset({"import", "token", "api", "exec", "status", "remove"})


def dispatch(argv: list[str]) -> int:
    """Parse and run; errors become one line on stderr and an exit status."""
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    if args.command in TOKEN_COMMANDS:
        from ..host.coredump import forbid_core_dumps

        forbid_core_dumps()
    try:
        _check_profile_env(args)
        result: int = args.func(args, resolve_paths(os.environ))
        return result
    except AacTokendError as exc:
        print(f"aac-tokend: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
