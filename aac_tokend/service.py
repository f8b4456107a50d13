"""``aac-tokend service install|uninstall|status``: run the daemon under systemd or launchd.

The unit files (``systemd/``) and the LaunchAgent (``launchd/``) ship as package data with
``@NAME@`` placeholders. Rendering them is pure (a Layout in, text out); installing is a
list of steps (make a directory, write a file, run a command) that ``--dry-run`` prints
instead of doing. Commands go through a CommandRunner, so tests record them.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Protocol
from xml.sax.saxutils import escape as xml_escape

from aac_tokend.errors import InputError
from aac_tokend.paths import APP_NAME, HOME_ENV, Paths, resolve_paths
from aac_tokend.unixsock import ensure_private_dir

__all__ = [
    "LABEL",
    "SERVICE_UNIT",
    "SOCKET_UNIT",
    "CommandRunner",
    "Completed",
    "Layout",
    "MakeDir",
    "RemoveFile",
    "Run",
    "Step",
    "SubprocessRunner",
    "WriteFile",
    "add_arguments",
    "apply",
    "check_manager",
    "detect_layout",
    "find_program",
    "host_platform",
    "install",
    "install_steps",
    "render_launchd",
    "render_systemd",
    "run_cli",
    "status",
    "uninstall",
    "uninstall_steps",
]

LABEL = "io.aac-tokend.agent"
SERVICE_UNIT = "aac-tokend.service"
SOCKET_UNIT = "aac-tokend.socket"

# `systemctl --user enable --now` waits for the start job, which ends at the daemon's
# READY=1; 90 s is systemd's own default start timeout, so we never give up before it does.
COMMAND_TIMEOUT = 90.0

# Usable bytes of sockaddr_un.sun_path (its size minus the NUL) on the target platform; the
# host's value is in unixsock, but a dry run for the other platform needs that one's.
_SOCKET_PATH_MAX = {"linux": 107, "macos": 103}

# The only PATH launchd gives an agent.
_LAUNCHD_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

# Where `[tool.setuptools.package-dir]` maps the top-level template directories.
_TEMPLATE_PACKAGES = {
    "systemd": "aac_tokend._units_systemd",
    "launchd": "aac_tokend._units_launchd",
}

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@")
_BLOCK_PLACEHOLDER = re.compile(r"^@([A-Z][A-Z_]*)@\n", re.MULTILINE)


@dataclass(frozen=True)
class Layout:
    """What the rendered files depend on: the platform, the user, the program, the dirs."""

    platform: str  # "linux" or "macos"
    home: Path
    uid: int
    program: tuple[str, ...]  # absolute argv prefix that runs aac-tokend
    paths: Paths
    environment: tuple[tuple[str, str], ...] = ()  # what the daemon needs to agree with us
    runtime_base: Path | None = None  # the user manager's %t ($XDG_RUNTIME_DIR), Linux only
    lingering: bool | None = None  # loginctl enable-linger is on (Linux); None: unknown
    # What PrivateTmp=yes makes private to the service: none of our dirs may be under them
    # (the daemon would not see them, and tmp cleaners would delete the state).
    private_tmp: tuple[Path, ...] = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108

    @property
    def unit_dir(self) -> Path:
        return self.home / ".config" / "systemd" / "user"

    @property
    def plist_path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def log_file(self) -> Path:
        return self.home / "Library" / "Logs" / APP_NAME / f"{APP_NAME}.log"


def host_platform() -> str | None:
    """The platform we run on, "linux" or "macos"; None for anything else."""
    if sys.platform == "darwin":
        return "macos"
    return "linux" if sys.platform.startswith("linux") else None


def find_program(env: Mapping[str, str]) -> tuple[str, ...]:
    """The argv prefix that runs this installation's aac-tokend, with absolute paths.

    The console script next to our interpreter comes first (it belongs to this install even
    when it is not on PATH); symlinks are kept, not resolved, so that a Homebrew or pipx
    upgrade that moves the target does not break the unit.
    """
    beside = Path(sys.executable).parent / APP_NAME
    if beside.is_file() and os.access(beside, os.X_OK):
        return (os.path.abspath(beside),)
    found = shutil.which(APP_NAME, path=env.get("PATH"))
    if found:
        return (os.path.abspath(found),)
    return (os.path.abspath(sys.executable), "-m", "aac_tokend")


def _foreign_paths(platform: str, home: Path, uid: int) -> Paths:
    """platformdirs' defaults on the other platform, for a dry run there.

    Our own environment (XDG_*) says nothing about that machine, so it is not consulted.
    """
    if platform == "macos":
        support = home / "Library" / "Application Support" / APP_NAME
        return Paths(support, support, home / "Library" / "Caches" / "TemporaryItems" / APP_NAME)
    share = home / ".local" / "share" / APP_NAME
    return Paths(home / ".config" / APP_NAME, share, Path(f"/run/user/{uid}") / APP_NAME)


def detect_layout(platform: str, env: Mapping[str, str] = os.environ) -> Layout:
    """The Layout of this user on this machine, rendering for ``platform``."""
    uid = os.getuid()
    user = pwd.getpwuid(uid)
    home = Path(env.get("HOME") or user.pw_dir)
    foreign = platform != host_platform()
    if foreign and not env.get(HOME_ENV):
        paths = _foreign_paths(platform, home, uid)
    else:
        paths = resolve_paths(env)
    environment: list[tuple[str, str]] = []
    if env.get(HOME_ENV):
        environment.append((HOME_ENV, str(paths.config_dir.parent)))
    elif not foreign:
        # platformdirs reads these (absolute values only); the manager's environment may
        # lack them, so the daemon would look elsewhere than this shell.
        names = ["XDG_CONFIG_HOME", "XDG_DATA_HOME"]
        names += ["XDG_RUNTIME_DIR"] if platform == "macos" else []
        environment += [(n, env[n]) for n in names if env.get(n, "").startswith("/")]
    runtime_base = lingering = None
    if platform == "linux":
        xdg = "" if foreign else env.get("XDG_RUNTIME_DIR", "")
        runtime_base = Path(xdg) if xdg.startswith("/") else Path(f"/run/user/{uid}")
        lingering = (Path("/var/lib/systemd/linger") / user.pw_name).exists()
    return Layout(
        platform=platform,
        home=home,
        uid=uid,
        program=find_program(env),
        paths=paths,
        environment=tuple(environment),
        runtime_base=runtime_base,
        lingering=lingering,
    )


def _template(kind: str, name: str) -> str:
    """A template from the package data, or from the source checkout next to the package."""
    try:
        return resources.files(_TEMPLATE_PACKAGES[kind]).joinpath(name).read_text("utf-8")
    except (ModuleNotFoundError, OSError):
        pass  # an editable install does not map the package-dir entries
    try:
        return (Path(__file__).resolve().parent.parent / kind / name).read_text("utf-8")
    except OSError as exc:
        raise InputError(
            f"the template {kind}/{name} is missing from this aac-tokend; reinstall aac-tokend"
        ) from exc


def _fill(template: str, values: Mapping[str, str], blocks: Mapping[str, list[str]]) -> str:
    # A block placeholder stands alone on its line and becomes zero or more lines.
    text = _BLOCK_PLACEHOLDER.sub(lambda m: "".join(f"{line}\n" for line in blocks[m[1]]), template)
    return _PLACEHOLDER.sub(lambda m: values[m[1]], text)


def _unit_word(word: str, *, exec_argument: bool = False) -> str:
    """``word`` as one word of a unit-file setting (systemd.syntax(7) quoting)."""
    if exec_argument:
        word = word.replace("$", "$$")  # Exec lines expand $VAR in arguments, not in the path
    if re.search(r"[\s\"'\\;]", word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _unit_path(path: Path, layout: Layout) -> str:
    """``path`` with the %t or %h specifier where it applies, other % escaped."""
    for base, spec in ((layout.runtime_base, "%t"), (layout.home, "%h")):
        if base is not None and path.is_relative_to(base):
            rest = str(path.relative_to(base)).replace("%", "%%")
            return spec if rest == "." else f"{spec}/{rest}"
    return str(path).replace("%", "%%")


def _check_socket_room(layout: Layout) -> str:
    """Refuse a control socket path over the platform's limit; say what room profiles have."""
    limit = _SOCKET_PATH_MAX[layout.platform]
    control = layout.paths.control_socket
    if len(os.fsencode(control)) > limit:
        raise InputError(
            f"control socket path {control} is {len(os.fsencode(control))} bytes, over the "
            f"{limit}-byte limit of Unix sockets; install with AAC_TOKEND_HOME set to a "
            "shorter directory, e.g. AAC_TOKEND_HOME=~/.aac-tokend"
        )
    room = limit - len(os.fsencode(layout.paths.token_socket("")))
    return f"note: token socket paths leave room for profile names of up to {room} bytes"


def render_systemd(layout: Layout) -> dict[str, str]:
    """The socket and service unit for ``layout``, by file name."""
    dirs = (layout.paths.config_dir, layout.paths.state_dir, layout.paths.runtime_dir)
    for path in dirs:
        for tmp in layout.private_tmp:
            if path.is_relative_to(tmp):
                raise InputError(
                    f"{path} is under {tmp}, which the service replaces with a private one "
                    "(PrivateTmp=yes); set AAC_TOKEND_HOME to a directory elsewhere"
                )
    values = {
        "PROGRAM": " ".join(
            _unit_word(w.replace("%", "%%"), exec_argument=i > 0)
            for i, w in enumerate(layout.program)
        ),
        "CONTROL_SOCKET": _unit_path(layout.paths.control_socket, layout),
        "READ_WRITE_PATHS": " ".join(_unit_word("-" + _unit_path(p, layout)) for p in dirs),
    }
    environment = [
        "Environment=" + _unit_word(f"{name}={value}".replace("%", "%%"))
        for name, value in layout.environment
    ]
    return {
        name: _fill(_template("systemd", name), values, {"ENVIRONMENT": environment})
        for name in (SOCKET_UNIT, SERVICE_UNIT)
    }


def render_launchd(layout: Layout) -> str:
    """The LaunchAgent plist for ``layout``."""
    indent = " " * 8
    program_dir = os.path.dirname(layout.program[0])
    environment = [("PATH", f"{program_dir}:{_LAUNCHD_PATH}"), *layout.environment]
    blocks = {
        "PROGRAM_ARGUMENTS": [f"{indent}<string>{xml_escape(w)}</string>" for w in layout.program],
        "ENVIRONMENT": [
            f"{indent}<key>{xml_escape(k)}</key>\n{indent}<string>{xml_escape(v)}</string>"
            for k, v in environment
        ],
    }
    text = _fill(
        _template("launchd", f"{LABEL}.plist"),
        {"LOG_FILE": xml_escape(str(layout.log_file))},
        blocks,
    )
    plistlib.loads(text.encode("utf-8"))  # a template that renders to a broken plist is a bug
    return text


@dataclass(frozen=True)
class MakeDir:
    """Create a private (0700) directory, or check that it is one."""

    path: Path


@dataclass(frozen=True)
class WriteFile:
    """Write ``content`` to ``path`` (0644: unit files hold no secrets), replacing it."""

    path: Path
    content: str


@dataclass(frozen=True)
class RemoveFile:
    """Remove ``path`` if it exists."""

    path: Path


@dataclass(frozen=True)
class Run:
    """Run a command; unless ``check`` is False, a failure stops the steps."""

    argv: tuple[str, ...]
    check: bool = True


Step = MakeDir | WriteFile | RemoveFile | Run


@dataclass(frozen=True)
class Completed:
    """How a command ended; ``output`` is its stdout and stderr when captured."""

    returncode: int
    output: str = ""


class CommandRunner(Protocol):
    """Finds and runs the service manager's commands."""

    def which(self, name: str) -> str | None: ...

    def run(self, argv: Sequence[str], *, capture: bool = True) -> Completed: ...


class SubprocessRunner:
    """The real CommandRunner: PATH lookup and subprocess."""

    def which(self, name: str) -> str | None:
        return shutil.which(name)

    def run(self, argv: Sequence[str], *, capture: bool = True) -> Completed:
        try:
            proc = subprocess.run(
                list(argv),
                capture_output=capture,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise InputError(
                f"`{shlex.join(argv)}` did not finish within {COMMAND_TIMEOUT:.0f} s; "
                "see `aac-tokend service status`"
            ) from exc
        except OSError as exc:
            raise InputError(f"cannot run {argv[0]}: {exc.strerror}") from exc
        return Completed(proc.returncode, (proc.stdout or "") + (proc.stderr or ""))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no output"


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
                f"the systemd user manager is unreachable ({_first_line(probe.output)}); "
                "run this in your own login session, not under su or sudo"
            )
        return
    if runner.which("launchctl") is None:
        raise InputError("launchctl not found: launchd LaunchAgents need macOS")
    probe = runner.run(("launchctl", "print", _gui(layout, label=False)))
    if probe.returncode != 0:
        raise InputError(
            f"launchd has no GUI session for uid {layout.uid} ({_first_line(probe.output)}); "
            "log in to the Mac's desktop as this user and run this again"
        )


def install_steps(layout: Layout) -> tuple[list[Step], list[str]]:
    """The steps that install and start the service, and notes for the person."""
    notes = [_check_socket_room(layout)]
    paths = layout.paths
    dirs = dict.fromkeys([paths.config_dir, paths.state_dir, paths.runtime_dir])
    if layout.platform == "linux":
        units = render_systemd(layout)
        steps: list[Step] = [MakeDir(d) for d in dirs]
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
    steps += [
        WriteFile(layout.plist_path, render_launchd(layout)),
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
        return [
            Run(_systemctl("disable", "--now", SOCKET_UNIT, SERVICE_UNIT)),
            *(RemoveFile(f) for f in files),
            Run(_systemctl("daemon-reload")),
        ]
    if not layout.plist_path.exists():
        return []
    return [Run(("launchctl", "bootout", _gui(layout)), check=False), RemoveFile(layout.plist_path)]


def _describe(step: Step) -> str:
    match step:
        case MakeDir(path):
            return f"# would create directory {path} (mode 0700)\n"
        case WriteFile(path, content):
            return f"# would write {path}:\n{content}"
        case RemoveFile(path):
            return f"# would remove {path}\n"
        case Run(argv, check):
            return f"# would run: {shlex.join(argv)}{'' if check else '  (failure ignored)'}\n"


def _write(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(tmp, 0o644)  # whatever our umask: launchd and systemd must read it
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc


def apply(steps: Sequence[Step], runner: CommandRunner, out: IO[str], *, dry_run: bool) -> None:
    """Carry out ``steps`` in order, or with ``dry_run`` print what each would do."""
    for step in steps:
        if dry_run:
            out.write(_describe(step))
            continue
        match step:
            case MakeDir(path):
                ensure_private_dir(path)
            case WriteFile(path, content):
                _write(path, content)
                out.write(f"wrote {path}\n")
            case RemoveFile(path):
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise InputError(f"cannot remove {path}: {exc.strerror}") from exc
                out.write(f"removed {path}\n")
            case Run(argv, check):
                done = runner.run(argv)
                if check and done.returncode != 0:
                    raise InputError(
                        f"`{shlex.join(argv)}` failed (exit {done.returncode}): "
                        f"{_first_line(done.output)}; see `aac-tokend service status`"
                    )
                out.write(f"ran {shlex.join(argv)}\n")


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


def status(layout: Layout, runner: CommandRunner, out: IO[str], *, dry_run: bool = False) -> int:
    """Show the service manager's view of the service; its exit status is ours."""
    if layout.platform == "linux":
        argv = _systemctl("status", SERVICE_UNIT, SOCKET_UNIT)
    else:
        argv = ("launchctl", "print", _gui(layout))
    if dry_run:
        out.write(_describe(Run(argv)))
        return 0
    check_manager(layout, runner)
    out.flush()
    return runner.run(argv, capture=False).returncode


_ACTIONS: dict[str, Callable[..., int]] = {
    "install": install,
    "uninstall": uninstall,
    "status": status,
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
