"""``aac-tokend service install|uninstall|status``: run the daemon under systemd or launchd.

Rendering the unit files and the LaunchAgent is in ``render`` and ``layout`` (re-exported
here); installing is a list of steps (make a directory, write a file, run a command: see
``steps``) that ``--dry-run`` prints instead of doing. Commands go through a CommandRunner,
so tests record them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from typing import IO

from aac_tokend.errors import InputError
from aac_tokend.service.layout import (
    LABEL,
    SERVICE_UNIT,
    SOCKET_UNIT,
    Layout,
    detect_layout,
    find_program,
    host_platform,
    mask_credentials,
)
from aac_tokend.service.render import (
    check_socket_room,
    render_env_file,
    render_launchd,
    render_systemd,
)
from aac_tokend.service.steps import (
    CommandRunner,
    MakeDir,
    RemoveFile,
    Run,
    Step,
    SubprocessRunner,
    WriteFile,
    apply,
    describe,
    first_line,
)

__all__ = [
    "LABEL",
    "SERVICE_UNIT",
    "SOCKET_UNIT",
    "Layout",
    "add_arguments",
    "check_manager",
    "detect_layout",
    "find_program",
    "host_platform",
    "install",
    "install_steps",
    "mask_credentials",
    "render_env_file",
    "render_launchd",
    "render_systemd",
    "run_cli",
    "show_service",
    "uninstall",
    "uninstall_steps",
]


def _systemctl(*args: str) -> tuple[str, ...]:
    return ("systemctl", "--user", *args)


def _gui(layout: Layout, label: bool = True) -> str:
    return f"gui/{layout.uid}/{LABEL}" if label else f"gui/{layout.uid}"


def check_manager(layout: Layout, runner: CommandRunner) -> None:
    """Raise InputError unless the user's service manager is there and answers."""
    if layout.platform == "linux":
        if runner.which("systemctl") is None:
            raise InputError(
                "systemctl not found: this machine does not run systemd; "
                "run `aac-tokend run` under the supervisor it has instead"
            )
        probe = runner.run(_systemctl("show", "--property=Version"))
        if probe.returncode != 0:
            raise InputError(
                f"the systemd user manager is unreachable ({first_line(probe.output)}); "
                "run this in your own login session, not under su or sudo"
            )
        return
    if runner.which("launchctl") is None:
        raise InputError("launchctl not found: launchd LaunchAgents need macOS")
    probe = runner.run(("launchctl", "print", _gui(layout, label=False)))
    if probe.returncode != 0:
        raise InputError(
            f"launchd has no GUI session for uid {layout.uid} ({first_line(probe.output)}); "
            "log in to the Mac's desktop as this user and run this again"
        )


def _network_notes(layout: Layout) -> list[str]:
    """What the service records of this shell's proxy and CA variables, and how to change it."""
    if not layout.network:
        return []
    names = ", ".join(name for name, _ in layout.network)
    notes = [
        f"note: the service gets {names} as set here; to change them later, run "
        "`aac-tokend service install` again with them set (see README, Run it as a service)"
    ]
    if layout.secret_network:
        where = layout.env_file if layout.platform == "linux" else layout.plist_path
        secret = ", ".join(name for name, _ in layout.secret_network)
        notes.append(
            f"note: {secret} holds credentials, so it goes into {where} with mode 0600 "
            "(readable by you only); a dry run prints it masked"
        )
    return notes


def install_steps(layout: Layout) -> tuple[list[Step], list[str]]:
    """The steps that install and start the service, and notes for the person."""
    notes = [check_socket_room(layout), *_network_notes(layout)]
    paths = layout.paths
    dirs = dict.fromkeys([paths.config_dir, paths.state_dir, paths.runtime_dir])
    if layout.platform == "linux":
        units = render_systemd(layout)
        steps: list[Step] = [MakeDir(d) for d in dirs]
        if layout.secret_network:
            # A unit file stays 0644 (systemd warns about unreadable ones), `systemctl show`
            # prints its Environment= lines and a dry run prints the file; an EnvironmentFile
            # keeps a proxy password in one 0600 file in the private config directory.
            steps.append(
                WriteFile(
                    layout.env_file,
                    render_env_file(layout),
                    mode=0o600,
                    shown=render_env_file(layout.masked()),
                )
            )
        elif layout.env_file.exists():
            # Left from an install with a proxy password: the new unit no longer loads it,
            # and a password nobody uses should not stay on disk.
            steps.append(RemoveFile(layout.env_file))
        steps += [WriteFile(layout.unit_dir / name, text) for name, text in units.items()]
        steps += [
            Run(_systemctl("daemon-reload")),
            Run(_systemctl("enable", "--now", SOCKET_UNIT, SERVICE_UNIT)),
        ]
        notes.append(
            "note: if it was running already, `systemctl --user restart aac-tokend` "
            "makes it use the new files"
        )
        if layout.lingering is False:
            notes.append(
                "note: the daemon stops when you log out; to keep it refreshing "
                "tokens, run `loginctl enable-linger` once"
            )
        return steps, notes
    steps = [MakeDir(d) for d in [*dirs, layout.log_file.parent]]
    # launchd has no environment file: a plist that holds a proxy password is 0600 instead.
    secret = bool(layout.secret_network)
    steps += [
        WriteFile(
            layout.plist_path,
            render_launchd(layout),
            mode=0o600 if secret else 0o644,
            shown=render_launchd(layout.masked()) if secret else None,
        ),
        # Replacing a loaded agent: bootstrap refuses a label that is still loaded. Failing
        # here only means it was not loaded.
        Run(("launchctl", "bootout", _gui(layout)), check=False),
        # Clears a `launchctl disable` left from before, which would make bootstrap fail.
        Run(("launchctl", "enable", _gui(layout))),
        Run(("launchctl", "bootstrap", _gui(layout, label=False), str(layout.plist_path))),
    ]
    return steps, notes


def uninstall_steps(layout: Layout) -> list[Step]:
    """The steps that stop the service and remove its files (config and state stay)."""
    if layout.platform == "linux":
        files = [layout.unit_dir / name for name in (SOCKET_UNIT, SERVICE_UNIT)]
        if not any(f.exists() for f in files):
            return []
        extra = [layout.env_file] if layout.env_file.exists() else []
        return [
            Run(_systemctl("disable", "--now", SOCKET_UNIT, SERVICE_UNIT)),
            *(RemoveFile(f) for f in [*files, *extra]),
            Run(_systemctl("daemon-reload")),
        ]
    if not layout.plist_path.exists():
        return []
    return [Run(("launchctl", "bootout", _gui(layout)), check=False), RemoveFile(layout.plist_path)]


def install(layout: Layout, runner: CommandRunner, out: IO[str], *, dry_run: bool = False) -> int:
    """Write the unit files or the LaunchAgent for ``layout``, then enable and start it."""
    if not dry_run:
        check_manager(layout, runner)  # first: its error says more than any that follows
    steps, notes = install_steps(layout)
    apply(steps, runner, out, dry_run=dry_run)
    out.writelines(f"{note}\n" for note in notes)
    return 0


def uninstall(layout: Layout, runner: CommandRunner, out: IO[str], *, dry_run: bool = False) -> int:
    """Stop and disable the service and remove its files; config and state are kept."""
    steps = uninstall_steps(layout)
    if not steps:
        out.write("aac-tokend is not installed as a service; nothing to remove\n")
        return 0
    if not dry_run:
        check_manager(layout, runner)
    apply(steps, runner, out, dry_run=dry_run)
    out.write(
        f"config and state are kept in {layout.paths.config_dir} and {layout.paths.state_dir}\n"
    )
    return 0


def show_service(
    layout: Layout, runner: CommandRunner, out: IO[str], *, dry_run: bool = False
) -> int:
    """``service status``: show the service manager's view of the service; its exit code is ours."""
    if layout.platform == "linux":
        argv = _systemctl("status", SERVICE_UNIT, SOCKET_UNIT)
    else:
        argv = ("launchctl", "print", _gui(layout))
    if dry_run:
        out.write(describe(Run(argv)))
        return 0
    check_manager(layout, runner)
    out.flush()
    return runner.run(argv, capture=False).returncode


_ACTIONS: dict[str, Callable[..., int]] = {
    "install": install,
    "uninstall": uninstall,
    "status": show_service,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``install``, ``uninstall`` and ``status`` to the ``service`` subcommand."""
    actions = parser.add_subparsers(dest="service_action", required=True, metavar="ACTION")
    helps = {
        "install": "write the systemd units or the LaunchAgent, then enable and start it",
        "uninstall": "stop and disable the service and remove its files (keeps config and state)",
        "status": "show what systemd or launchd says about the service",
    }
    for name, text in helps.items():
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--dry-run", action="store_true", help="print the files and commands; change nothing"
        )
        sub.add_argument(
            "--platform",
            choices=("auto", "linux", "macos"),
            default="auto",
            help="render for this platform instead of this machine's (with --dry-run only)",
        )


def run_cli(
    args: argparse.Namespace,
    *,
    env: Mapping[str, str] | None = None,
    runner: CommandRunner | None = None,
    out: IO[str] | None = None,
) -> int:
    """Carry out ``aac-tokend service ACTION``; the keywords are for tests."""
    env = os.environ if env is None else env
    host = host_platform()
    target = host if args.platform == "auto" else args.platform
    if target is None:
        raise InputError(
            f"aac-tokend service supports Linux (systemd) and macOS (launchd), not {sys.platform}"
        )
    if target != host and not args.dry_run:
        raise InputError(f"--platform {target} does not match this machine; add --dry-run")
    layout = detect_layout(target, env)
    action = _ACTIONS[args.service_action]
    return action(layout, runner or SubprocessRunner(), out or sys.stdout, dry_run=args.dry_run)
