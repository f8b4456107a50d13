"""``aac-tokend fleet ...``: the fleet key, moving a profile into the fleet and back, status.

Mounted lazily by ``commands/main.py``: nothing here (nor the etcd client) is imported
unless a fleet command runs. Every command works with the daemon stopped. ``key`` and
``status`` also work while it runs (they change no chain). ``move-in`` and ``move-out`` take
the single-owner lock, as ``import`` and ``remove`` do without a daemon, and so refuse while
this host's daemon runs: it would serve, or refresh, a chain that is changing places under it.

The moves themselves are in ``fleet_move``, the status report in ``fleet_status``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import AlreadyRunningError, ConfigError, InputError, UsageError
from ..host.paths import Paths, resolve_paths
from .fleet_markers import Move

if TYPE_CHECKING:
    from ..fleet.chains import FleetChains
    from ..fleet.etcd import EtcdClient
    from ..fleet.keys import FleetKeys
    from ..fleet.settings import FleetSettings
    from .fleet_move import Moved

__all__ = ["Fleet", "add_arguments", "open_fleet", "run_cli"]

#: An export line is about 60 characters; more than this on stdin is not one.
MAX_KEY_TEXT = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")
    key = sub.add_parser("key", help="create, export or import the fleet key")
    key_sub = key.add_subparsers(dest="key_command", required=True, metavar="KEY_COMMAND")
    key_sub.add_parser("create", help="create fleet.key in the config directory (never replaced)")
    export = key_sub.add_parser(
        "export", help="print the fleet key as one line, to carry it to another host (a secret)"
    )
    export.add_argument(
        "--yes-print", action="store_true",
        help="print it even when standard output is a terminal",
    )  # fmt: skip
    key_sub.add_parser("import", help="install the line `fleet key export` printed, from stdin")
    for move, text in (
        (Move.IN, "move a local profile's chain into the fleet (the daemon stopped)"),
        (Move.OUT, "move a profile's chain out of the fleet into a local state file"),
    ):
        moving = sub.add_parser(move.value, help=text, description=text)
        moving.add_argument("profile")
        moving.set_defaults(move=move)
    status = sub.add_parser("status", help="etcd's health, and each fleet profile's owner")
    status.add_argument("--json", action="store_true", help="print the report as JSON")


def run_cli(args: argparse.Namespace) -> int:
    """Run one fleet command."""
    paths = resolve_paths(os.environ)
    if args.fleet_command == "key":
        return _key(args, paths)
    if args.fleet_command == "status":
        from .fleet_status import print_status

        return print_status(open_fleet(paths), json_out=args.json)
    return _move(args.move, args.profile, paths)


# -- the key -------------------------------------------------------------------------------


def _key(args: argparse.Namespace, paths: Paths) -> int:
    from ..fleet import sealing

    where = paths.config_dir / sealing.FLEET_KEY_FILENAME
    if args.key_command == "create":
        sealing.create_fleet_key(paths.config_dir)
        print(
            f"created the fleet key {where}; carry it to each other host with "
            "`aac-tokend fleet key export | ssh HOST aac-tokend fleet key import`"
        )
        return 0
    if args.key_command == "export":
        if not args.yes_print and not _to_a_pipe():
            raise UsageError(
                "fleet key export: standard output is not a pipe and the key is a secret (a "
                "terminal shows it, a file keeps it); pipe it to `aac-tokend fleet key import` "
                "on the other host, or add --yes-print"
            )
        key = sealing.load_fleet_key(paths.config_dir)
        print(
            "aac-tokend: this is the fleet key, a secret: with it and read access to etcd "
            "anyone can read every fleet token; carry it only to the fleet's hosts",
            file=sys.stderr,
        )
        print(sealing.export_fleet_key(key))
        return 0
    had = where.exists()
    sealing.import_fleet_key(paths.config_dir, _read_key_text())
    print(f"the fleet key was already installed at {where}" if had else f"installed {where}")
    return 0


def _to_a_pipe() -> bool:
    """True if standard output is a pipe or a socket (``ssh HOST ... import``): a terminal
    would show the key and a regular file would keep it, both where it does not belong."""
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (AttributeError, ValueError, OSError):  # closed, or not a real file
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _read_key_text() -> str:
    """The export line from stdin (never argv: it would show in `ps` and shell history)."""
    if sys.stdin is None:
        raise InputError(
            "fleet key import: standard input is closed; pipe the line `fleet key export` "
            "printed into it"
        )
    if sys.stdin.isatty():
        return getpass.getpass("Fleet key (the line `fleet key export` printed; hidden): ")
    raw = sys.stdin.buffer.read(MAX_KEY_TEXT + 1)
    if len(raw) > MAX_KEY_TEXT:
        raise InputError(
            f"fleet key import: over {MAX_KEY_TEXT} bytes on standard input, which is not an "
            "exported fleet key; pipe only the line `fleet key export` printed"
        )
    return raw.decode("utf-8", errors="replace")


# -- etcd and the fleet's objects ------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """One fleet as this host sees it: settings, etcd client, keys and chains."""

    settings: FleetSettings
    client: EtcdClient
    keys: FleetKeys
    chains: FleetChains
    paths: Paths


def fleet_settings(paths: Paths) -> FleetSettings:
    """The ``[fleet]`` table of config.toml (ConfigError if there is none)."""
    from ..host.configfile import load_config

    settings = load_config(paths.config_dir).fleet
    if settings is None:
        raise ConfigError(
            f"{paths.config_file}: no [fleet] table; add one (endpoints, name) to use the "
            "fleet commands"
        )
    return settings


def open_fleet(paths: Paths) -> Fleet:
    """The configured fleet with its key loaded and its chains ready (no etcd call yet)."""
    from ..fleet.chains import FleetChains
    from ..fleet.connect import connect
    from ..fleet.highwater import HighWater
    from ..fleet.keys import FleetKeys
    from ..fleet.sealing import Sealer, load_fleet_key

    settings = fleet_settings(paths)
    sealer = Sealer(load_fleet_key(paths.config_dir), settings.name)
    client = connect(settings, connect_timeout=settings.connect_timeout_seconds)
    keys = FleetKeys(settings.name)
    chains = FleetChains(client, keys, sealer, HighWater(paths.state_dir, settings.name))
    return Fleet(settings, client, keys, chains, paths)


# -- move-in, move-out -----------------------------------------------------------------------


@contextmanager
def daemon_stopped(paths: Paths, command: Move, profile: str) -> Iterator[None]:
    """Hold the single-owner lock: no daemon of this host runs, or starts, meanwhile."""
    from ..store.owner import OwnerLock

    try:
        with OwnerLock(paths.daemon_lock):
            yield
    except AlreadyRunningError as exc:
        refusal = AlreadyRunningError(exc.pid)
        # Its own words name the control socket; a move has no socket op: say what to do.
        refusal.args = (
            f"fleet {command}: the daemon is running (pid {exc.pid or 'unknown'}); stop it "
            f"with `aac-tokend stop`, run `aac-tokend fleet {command} {profile}` again, then "
            "start it",
        )
        raise refusal from exc


def _move(command: Move, profile: str, paths: Paths) -> int:
    from ..core.state import validate_profile_name
    from ..store.opening import open_file_store
    from .fleet_move import move_in, move_out

    validate_profile_name(profile)
    settings = fleet_settings(paths)
    if command is Move.IN and not settings.covers(profile):
        raise InputError(
            f"fleet move-in: profile {profile} is not in [fleet] profiles of "
            f"{paths.config_file}; add it there first"
        )
    with daemon_stopped(paths, command, profile):
        fleet = open_fleet(paths)
        store = open_file_store(paths)
        mover = move_in if command is Move.IN else move_out
        moved = mover(store, fleet.chains, profile, settings.name)
    print(_moved_text(command, moved, settings.name))
    if command is Move.OUT and settings.covers(profile):
        fix = (
            "take it out of fleet.profiles"
            if settings.profiles is not None
            else "set fleet.profiles to the fleet's profiles without it (unset, it means all)"
        )
        print(
            f"aac-tokend: profile {profile} is still a fleet profile in {paths.config_file}: "
            f"{fix}, so that this host's daemon serves the local file",
            file=sys.stderr,
        )
    return 0


def _moved_text(command: Move, moved: Moved, fleet: str) -> str:
    done = "finished the interrupted move" if moved.finished else "moved"
    if command is Move.IN:
        return f"{done}: profile {moved.profile} is in fleet {fleet} (seq {moved.seq})"
    return f"{done}: profile {moved.profile} is out of fleet {fleet}, in a local state file"
