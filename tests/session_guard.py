"""The end-of-run check (tests/conftest.py): no process of the run left over, no stray file.

A test run marks itself with ``RUN_MARKER_ENV`` in its environment; every process it starts
inherits it unless the test builds an environment from scratch. At the end:

- every direct child of the pytest process, running or a zombie (nobody reaped it), and
  every other process still carrying the marker, counts as left over;
- every file that appeared in the real user's aac-tokend directories, service-unit
  directories or in the checkout (untracked and not a cache) counts as a stray file: tests
  must use AAC_TOKEND_HOME and temporary directories.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aac_tokend.host.paths import HOME_ENV, resolve_paths

__all__ = [
    "RUN_MARKER_ENV",
    "Leftover",
    "leftover_processes",
    "stray_files",
    "watched_files",
]

#: Not AAC_...: the end-to-end helpers drop those from the environments they build.
RUN_MARKER_ENV = "ATK_TEST_RUN"
#: A courier or daemon being stopped by a fixture's finaliser may take a moment to exit.
GRACE_SECONDS = 5.0
REPO = Path(__file__).resolve().parent.parent
#: Untracked files in the checkout that are not strays: the venv and the tools' caches.
CHECKOUT_IGNORED = (".venv/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".hypothesis/")


@dataclass(frozen=True)
class Leftover:
    """One process left over by the run."""

    pid: int
    state: str  # as in /proc/PID/stat: R, S, D, Z (zombie) ...
    command: str

    def __str__(self) -> str:
        what = "zombie" if self.state == "Z" else "alive"
        return f"pid {self.pid} ({what}): {self.command}"


def _stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _command(pid: str) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200] or "?"


def _carries(pid: str, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _scan(parent: int, marker: bytes) -> list[Leftover]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == parent:
            continue
        info = _stat(pid)
        if info is None:
            continue
        state, ppid = info
        # A zombie that is not ours is its new parent's to reap, not a leak of the run.
        if ppid == parent or (state != "Z" and _carries(pid, marker)):
            found.append(Leftover(int(pid), state, _command(pid)))
    return found


def leftover_processes(
    run_id: str, parent: int | None = None, grace: float = GRACE_SECONDS
) -> list[Leftover]:
    """Processes of this run still there after ``grace`` seconds (none on Linux-less hosts)."""
    if not os.path.isdir("/proc"):
        return []
    parent = os.getpid() if parent is None else parent
    marker = f"{RUN_MARKER_ENV}={run_id}\0".encode()
    deadline = time.monotonic() + grace
    while True:
        found = _scan(parent, marker)
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def _real_places() -> list[Path]:
    """The real user's aac-tokend and service directories (never a test's AAC_TOKEND_HOME)."""
    env = {k: v for k, v in os.environ.items() if k != HOME_ENV}
    paths = resolve_paths(env)
    home = Path.home()
    return [
        paths.config_dir,
        paths.state_dir,
        paths.runtime_dir,
        home / ".config" / "systemd" / "user",
        home / "Library" / "LaunchAgents",
    ]


def _under(places: Iterable[Path]) -> set[str]:
    found = set()
    for place in places:
        if not place.is_dir():
            if place.exists():
                found.add(str(place))
            continue
        for dirpath, dirnames, filenames in os.walk(place):
            found.update(os.path.join(dirpath, name) for name in dirnames + filenames)
    return found


def _checkout_untracked(repo: Path) -> set[str]:
    if not (repo / ".git").exists():
        return set()
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "-uall", "--ignored=matching", "-z"],
            cwd=repo, capture_output=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return set()
    names = set()
    for entry in out.decode(errors="replace").split("\0"):
        if entry[:3] in ("?? ", "!! "):
            name = entry[3:]
            if not name.startswith(CHECKOUT_IGNORED) and "__pycache__/" not in name:
                names.add(str(repo / name))
    return names


def watched_files(places: Iterable[Path] | None = None, repo: Path | None = REPO) -> set[str]:
    """Every file under the watched places, and the checkout's untracked non-cache files."""
    found = _under(_real_places() if places is None else places)
    if repo is not None:
        found |= _checkout_untracked(repo)
    return found


def stray_files(before: set[str], after: set[str]) -> list[str]:
    """The files that appeared during the run."""
    return sorted(after - before)
