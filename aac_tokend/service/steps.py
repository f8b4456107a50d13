"""Installing as a list of steps: make a directory, write a file, remove one, run a command.

A step is a value, so ``--dry-run`` prints what ``apply`` would do, and tests compare lists.
Commands go through a ``CommandRunner``; ``SubprocessRunner`` is the real one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from aac_tokend.errors import InputError
from aac_tokend.serve.unixsock import ensure_private_dir

__all__ = [
    "COMMAND_TIMEOUT",
    "CommandRunner",
    "Completed",
    "MakeDir",
    "RemoveFile",
    "Run",
    "Step",
    "SubprocessRunner",
    "WriteFile",
    "apply",
    "describe",
    "first_line",
]

# `systemctl --user enable --now` waits for the start job, which ends at the daemon's
# READY=1; 90 s is systemd's own default start timeout, so we never give up before it does.
COMMAND_TIMEOUT = 90.0


@dataclass(frozen=True)
class MakeDir:
    """Create a private (0700) directory, or check that it is one."""

    path: Path


@dataclass(frozen=True)
class WriteFile:
    """Write ``content`` to ``path`` with ``mode``, replacing it; a dry run prints ``shown``.

    Service files are 0644 unless they hold a proxy password (then 0600, and ``shown`` is
    the content with the password masked).
    """

    path: Path
    content: str
    mode: int = 0o644
    shown: str | None = None


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


def first_line(text: str) -> str:
    """The first non-blank line of a command's output, to quote in an error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def describe(step: Step) -> str:
    """What ``step`` would do, as ``--dry-run`` prints it."""
    match step:
        case MakeDir(path):
            return f"# would create directory {path} (mode 0700)\n"
        case WriteFile(path, content, mode, shown):
            how = "" if mode == 0o644 else f" (mode {mode:04o})"
            return f"# would write {path}{how}:\n{content if shown is None else shown}"
        case RemoveFile(path):
            return f"# would remove {path}\n"
        case Run(argv, check):
            return f"# would run: {shlex.join(argv)}{'' if check else '  (failure ignored)'}\n"


def _write(path: Path, content: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # O_CREAT keeps an old file's wider mode
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(tmp, mode)  # whatever our umask: launchd and systemd must read it
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc


def apply(steps: Sequence[Step], runner: CommandRunner, out: IO[str], *, dry_run: bool) -> None:
    """Carry out ``steps`` in order, or with ``dry_run`` print what each would do."""
    for step in steps:
        if dry_run:
            out.write(describe(step))
            continue
        match step:
            case MakeDir(path):
                ensure_private_dir(path)
            case WriteFile(path, content, mode):
                _write(path, content, mode)
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
                        f"{first_line(done.output)}; see `aac-tokend service status`"
                    )
                out.write(f"ran {shlex.join(argv)}\n")
