"""The ``aac-tokend`` command line: the parser, and ``dispatch``, which runs a command.

The commands themselves are in ``handlers`` (thin clients of the daemon) and ``offline``
(what they do without one); the rarer ones in modules mounted lazily (``_mount``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import AacTokendError, InputError, ProfileError
from ..host.paths import resolve_paths
from ..rundir import PROFILE_ENV
from .handlers import (
    cmd_import,
    cmd_profiles,
    cmd_refresh,
    cmd_reload,
    cmd_remove,
    cmd_run,
    cmd_status,
    cmd_stop,
    cmd_token,
)

__all__ = ["EVERY_COMMAND", "add_profile_option", "build_parser", "default_profile", "dispatch"]


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
    # An explicit --profile is not checked here: `token -p` and `remove` of a misnamed
    # file ("work (copy)") give that file's advice. No path is built from a bad name:
    # rundir.token_socket_name and the store refuse one (ProfileError, 65).
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
    _mount(sub, "fleet", "commands.fleet", "share profiles between hosts through etcd", wanted)
    return parser


#: Commands that may hold a token: read from you (import), from the daemon (token, api,
#: exec) or from the encrypted store when the daemon is not running (token, status, remove).
#: No core file may carry it off. (``run`` sets the daemon's own limit in daemon.py.)
TOKEN_COMMANDS = frozenset({"import", "token", "api", "exec", "status", "remove", "fleet"})


def dispatch(argv: list[str], *, deadline: float = 0.0) -> int:
    """Parse and run; errors become one line on stderr and an exit status. ``deadline``
    (time.monotonic()) is what is left of `token`'s one budget after its fast path."""
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    args.deadline = deadline
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
