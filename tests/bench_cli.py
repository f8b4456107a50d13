"""Benchmark of `aac-tokend token` start-up, from a regular (non-editable) install.

STYLE.md: setuptools' editable finder costs ~11 ms per start, so the CLI is timed from a
``pip install`` of a copy of the sources into /tmp/aac-tokend-bench-venv (built once, and
the package reinstalled whenever its sources change). pip is upgraded there first: pip
25+ writes console scripts without ``import re`` (~6 ms), as uv and pipx-with-uv do.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench_procs import Daemon, Row, row

__all__ = ["VENV", "cli_rows", "regular_install"]

REPO = Path(__file__).resolve().parent.parent
VENV = Path("/tmp/aac-tokend-bench-venv")
_STAMP = VENV / ".source-hash"
#: pip's own chatter ("Location ... is ignored", build-backend warnings) is not ours to show.
_QUIET = ["-q", "--disable-pip-version-check"]
#: The ratio's target (the brief): `token` may cost at most this much of a bare start.
TARGET_RATIO = 1.6


#: What a build of the package does not need (and .venv alone is hundreds of MB).
_NOT_SOURCES = shutil.ignore_patterns(
    ".*", "__pycache__", "build", "dist", "*.egg-info", "tests", "node_modules"
)


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _pip(*args: str) -> None:
    subprocess.run([str(VENV / "bin" / "pip"), *_QUIET, *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def regular_install() -> Path:
    """The console script of a regular install of the current sources (built when stale)."""
    script = VENV / "bin" / "aac-tokend"
    with tempfile.TemporaryDirectory(prefix="atkb-src") as tmp:
        # A copy of the working tree: pip builds a local directory in place, which would
        # leave build/ in the repo; the copy's hash says whether the install is current.
        source = Path(tmp) / "src"
        shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
        wanted = _tree_hash(source)
        if _STAMP.exists() and _STAMP.read_text() == wanted and script.exists():
            return script
        fresh = not (VENV / "bin" / "python").exists()
        print(f"building a regular install in {VENV} (once per source change; ~20 s)...",
              flush=True)  # fmt: skip
        if fresh:
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            _pip("install", "-U", "pip")
        _pip("install", *([] if fresh else ["--no-deps", "--force-reinstall"]), str(source))
    _STAMP.write_text(wanted)
    return script


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def cli_rows(daemon: Daemon, profile: str, runs: int) -> list[Row]:
    """`token` wall time (median of ``runs``) against a bare `python -S -c "import socket"`."""
    script = regular_install()
    env = daemon.env
    token = subprocess.run([str(script), "token", "-p", profile], env=env, check=True,
                           capture_output=True).stdout  # fmt: skip
    if not token.startswith(b"ey") or not token.endswith(b"\n"):
        raise SystemExit("`aac-tokend token` did not print a token")
    venv_python = str(VENV / "bin" / "python")
    commands = {
        "bare": [venv_python, "-S", "-c", "import socket"],
        "token": [str(script), "token", "-p", profile],
        "editable": [str(REPO / ".venv" / "bin" / "aac-tokend"), "token", "-p", profile],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for argv in commands.values():  # warm the page cache and the .pyc files
        for _ in range(3):
            _time(argv, env)
    for _ in range(runs):  # interleaved, so a noisy second hits all three alike
        for name, argv in commands.items():
            times[name].append(_time(argv, env))
    bare, fast, editable = (statistics.median(times[n]) * 1000 for n in commands)
    ratio = fast / bare
    return [
        row("`aac-tokend token` wall time (regular install), median", fast, "ms", bare,
            'python -S -c "import socket"', target=f"<= {TARGET_RATIO}x",
            met=ratio <= TARGET_RATIO),
        row("`aac-tokend token`, editable install (.venv), median", editable, "ms", bare,
            'python -S -c "import socket"', target="info"),
    ]  # fmt: skip
