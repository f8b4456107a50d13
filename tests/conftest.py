"""Fixtures shared by the end-to-end tests (a throw-away AAC_TOKEND_HOME and sandboxes), and
the end-of-run check that fails the run when a process or a stray file is left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import session_guard
from tests.helpers_e2e import E2EHome, RecordingSandbox, e2e_home, running_sandbox


@pytest.fixture
def home() -> Iterator[E2EHome]:
    """A short private AAC_TOKEND_HOME; every daemon and courier started in it is killed after."""
    with e2e_home() as instance:
        yield instance


@pytest.fixture
def sandboxes() -> Iterator[Callable[..., RecordingSandbox]]:
    """A factory of started sandboxes (keyword arguments as SandboxServer's), all stopped after."""
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(running_sandbox(**kwargs))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory under /tmp (socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="atk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- the end-of-run check: no left-over process, no stray file (see tests/session_guard.py) --
_RUN: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Mark every process this run starts, and note which watched files exist already."""
    run_id = uuid.uuid4().hex
    os.environ[session_guard.RUN_MARKER_ENV] = run_id
    _RUN.update(run_id=run_id, files=session_guard.watched_files())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a process of it is still there, or a file appeared outside temp dirs."""
    if "run_id" not in _RUN:
        return
    leftovers = session_guard.leftover_processes(str(_RUN["run_id"]))
    before = _RUN["files"]
    assert isinstance(before, set)
    strays = session_guard.stray_files(before, session_guard.watched_files())
    if not leftovers and not strays:
        return
    lines = ["", "the test run left things behind (tests/session_guard.py):"]
    lines += [f"  left-over process {p}" for p in leftovers]
    lines += [f"  stray file {name}" for name in strays]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    for proc in leftovers:  # ours (our child or carrying our run's marker): end and reap them
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, 0)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
