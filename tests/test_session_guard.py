"""The end-of-run check finds left-over processes and stray files (tests/session_guard.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.session_guard import RUN_MARKER_ENV, leftover_processes, stray_files, watched_files

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")


def _marked_env(run_id: str) -> dict[str, str]:
    return dict(os.environ, **{RUN_MARKER_ENV: run_id})


def _parent(pid: int) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2 :].split()[1])


class TestLeftoverProcesses:
    """Children alive or unreaped, and any process with the run's marker, are reported."""

    def test_running_child_is_reported_until_reaped(self) -> None:
        """A child still running is left over; once killed and reaped it is not."""
        run_id = uuid.uuid4().hex
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            found = {p.pid: p for p in leftover_processes(run_id, grace=0)}
            assert child.pid in found and found[child.pid].state != "Z"
        finally:
            child.kill()
            child.wait()
        assert child.pid not in {p.pid for p in leftover_processes(run_id, grace=0)}

    def test_unreaped_child_is_a_zombie(self) -> None:
        """A child that exited but was never waited for is reported as a zombie."""
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        try:
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, still unreaped
            found = {p.pid: p for p in leftover_processes(uuid.uuid4().hex, grace=0)}
            assert found[child.pid].state == "Z" and "zombie" in str(found[child.pid])
        finally:
            child.wait()

    def test_orphan_with_the_marker_is_reported(self) -> None:
        """A grandchild whose parent exited is found by the run marker in its environment."""
        run_id = uuid.uuid4().hex
        shell = subprocess.run(
            ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], env=_marked_env(run_id),
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        orphan = int(shell.stdout.strip())
        try:
            assert orphan in {p.pid for p in leftover_processes(run_id, grace=0)}
            if _parent(orphan) != os.getpid():  # not adopted by us as a subreaper
                other_run = {p.pid for p in leftover_processes(uuid.uuid4().hex, grace=0)}
                assert orphan not in other_run, "another run's marker must not match"
        finally:
            os.kill(orphan, signal.SIGKILL)
            if _parent(orphan) == os.getpid():
                os.waitpid(orphan, 0)

    def test_grace_waits_for_an_exiting_child(self) -> None:
        """A child that ends within the grace period is not reported."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
        try:
            import threading

            threading.Timer(0.8, child.wait).start()  # its owner reaps it a moment later
            assert child.pid not in {p.pid for p in leftover_processes("x", grace=5.0)}
        finally:
            child.wait()


class TestStrayFiles:
    """Files appearing in watched places or in the checkout are strays; caches are not."""

    def test_new_file_in_a_watched_place(self, tmp_path: Path) -> None:
        """A file created under a watched directory (at any depth) is reported."""
        place = tmp_path / "config" / "aac-tokend"
        place.mkdir(parents=True)
        before = watched_files([place], repo=None)
        (place / "sub").mkdir()
        (place / "sub" / "state.key").write_bytes(b"k")
        assert stray_files(before, watched_files([place], repo=None)) == [
            str(place / "sub"), str(place / "sub" / "state.key"),
        ]  # fmt: skip

    def test_checkout_untracked_and_ignored_but_not_caches(self, tmp_path: Path) -> None:
        """build/ and new files in a checkout are strays; .venv/ and __pycache__ are not."""
        if shutil.which("git") is None:
            pytest.skip("git is not installed")
        repo = tmp_path / "repo"
        repo.mkdir()
        subprocess.run(["git", "init", "-q", str(repo)], check=True, timeout=30)
        (repo / ".gitignore").write_text("build/\n.venv/\n__pycache__/\n")
        before = watched_files([], repo=repo)
        (repo / "build").mkdir()
        (repo / "build" / "lib.txt").write_text("x")
        (repo / "left.txt").write_text("x")
        (repo / ".venv").mkdir()
        (repo / ".venv" / "x").write_text("x")
        (repo / "__pycache__").mkdir()
        (repo / "__pycache__" / "m.pyc").write_text("x")
        strays = stray_files(before, watched_files([], repo=repo))
        assert strays == [str(repo / "build/"), str(repo / "left.txt")]
