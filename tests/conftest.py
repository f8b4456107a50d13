"""Fixtures shared by the end-to-end tests: a throw-away AAC_TOKEND_HOME and sandboxes."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

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
