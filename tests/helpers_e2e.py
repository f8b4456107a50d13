"""Shared helpers for end-to-end tests: the real daemon, the real CLI, a recording sandbox.

Import them with ``from tests.helpers_e2e import ...`` (tests/ is a package). There is no
conftest: each module declares its own small fixtures around the context managers below.
The names listed in ``__all__`` are stable: other engineers' end-to-end tests build on them.

    @pytest.fixture
    def home() -> Iterator[E2EHome]:
        with e2e_home() as instance:
            yield instance

    def test_something(home: E2EHome) -> None:
        with running_sandbox(access_ttl=5) as sandbox:
            import_pair(home, sandbox)
            daemon = home.daemon().start(profiles=["default"])
            assert api_accepts(sandbox, daemon.token())

- ``e2e_home()``: a context manager yielding an ``E2EHome``: a short /tmp directory used
  as AAC_TOKEND_HOME (Unix socket paths must stay under 107 bytes), with a log directory
  beside it. On exit it stops every daemon started through it, kills any courier left
  behind (found by its AAC_TOKEND_HOME in /proc/<pid>/environ, so only processes this
  test started) and removes the directory.
- ``E2EHome.cli(*args, input=...)``: runs ``python -m aac_tokend ARGS`` (or the console
  script) as a user would, and returns a ``CliResult``; its output is kept in
  ``E2EHome.outputs`` for the token-leak checks.
- ``E2EHome.daemon()``: a ``Daemon``, the ``aac-tokend run`` process: ``start``,
  ``wait_ready``, ``status``, ``control``, ``token``, ``send_signal``, ``kill``, ``stop``,
  ``wait``, ``output``.
- ``running_sandbox(**kwargs)``: a context manager yielding a started ``RecordingSandbox``
  (``aac_tokend.sandbox.server.SandboxServer`` in this process, so a test can read its log, delay
  its answers and inject failures) that also remembers every token it issued.
- ``import_pair(home, sandbox, profile=...)``: generates a token family at the sandbox and
  imports it with ``aac-tokend import``; returns the generated token JSON.
- ``api_status(sandbox, token)`` / ``api_accepts(sandbox, token)``: the HTTP status of the
  sandbox API call made with the access token / whether it is 200.
- ``wait_until(predicate, timeout, what)``: polls until the predicate gives a truthy value.
- ``token_like_runs(text)``: 40+ character base64url runs (what a leaked token looks like).
- ``kill_strays(home)``: SIGKILL the processes still carrying that AAC_TOKEND_HOME.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aac_tokend.client import ControlClient, read_token
from aac_tokend.host.paths import Paths, resolve_paths
from aac_tokend.sandbox.server import SandboxServer

__all__ = [
    "CONSOLE_SCRIPT",
    "READY_TIMEOUT",
    "WORKSPACE_PATH",
    "CliResult",
    "Daemon",
    "E2EHome",
    "RecordingSandbox",
    "api_accepts",
    "api_status",
    "e2e_home",
    "import_pair",
    "kill_strays",
    "running_sandbox",
    "token_like_runs",
    "wait_until",
]

T = TypeVar("T")

#: The daemon imports requests, cryptography, apscheduler and structlog before it listens:
#: about a second on the 2-core CI machine, several when other suites load it too.
READY_TIMEOUT = 20.0
#: A CLI command that has not finished by then is hung, not slow.
CLI_TIMEOUT = 60.0
#: SIGKILL is immediate; reaping the process takes microseconds. Only a bug waits longer.
KILL_TIMEOUT = 10.0
#: The API call the sandbox answers, used to check that a token is one the server accepts.
WORKSPACE_PATH = "/iam/v1/workspaces/current"
#: The console script installed next to the interpreter running the tests.
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "aac-tokend")
#: A leaked token: a long run of base64url characters (hashes in logs are 16 hex chars).
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_-]{40,}")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def token_like_runs(text: str) -> list[str]:
    """Every run of 40 or more base64url characters in ``text``."""
    return _TOKEN_LIKE.findall(text)


# -- the sandbox -------------------------------------------------------------------------


class RecordingSandbox(SandboxServer):
    """The real sandbox, also remembering every token it minted (``issued``) for leak checks.

    The sandbox itself keeps refresh tokens only as hashes; a test that must prove no token
    leaked needs the raw strings, so this subclass records each pair as it is minted.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.issued: list[str] = []

    def _mint(self, family: Any, refresh_token: str, now: float) -> dict[str, object]:
        answer = super()._mint(family, refresh_token, now)
        self.issued += [str(answer["access_token"]), refresh_token]
        return answer

    def token_requests(self, since: int = 0) -> list[dict[str, object]]:
        """The token-request log from entry ``since`` (0-based) on."""
        return self.log()[since:]

    def outcomes(self, since: int = 0) -> list[str]:
        """The outcomes of the token requests from entry ``since`` on."""
        return [str(entry["outcome"]) for entry in self.token_requests(since)]


@contextlib.contextmanager
def running_sandbox(**kwargs: Any) -> Iterator[RecordingSandbox]:
    """A started ``RecordingSandbox`` (keyword arguments as for SandboxServer), stopped after."""
    server = RecordingSandbox(**kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def api_status(sandbox: SandboxServer, token: str) -> int:
    """The HTTP status of the sandbox API call made with ``token``."""
    url = urllib.parse.urlsplit(sandbox.api_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)
    try:
        conn.request("GET", WORKSPACE_PATH, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def api_accepts(sandbox: SandboxServer, token: str) -> bool:
    """True if the sandbox API answers 200 to a call made with ``token``."""
    return bool(token) and api_status(sandbox, token) == 200


# -- the command line ----------------------------------------------------------------------


@dataclass(frozen=True)
class CliResult:
    """One finished ``aac-tokend`` command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def __str__(self) -> str:
        return (
            f"aac-tokend {' '.join(self.args)} -> {self.returncode}\n"
            f"stdout: {self.stdout!r}\nstderr: {self.stderr!r}"
        )


def assert_one_line_error(result: CliResult, exit_code: int) -> str:
    """The command failed with ``exit_code`` and said why in one 'aac-tokend: error:' line."""
    lines = result.stderr_lines()
    assert result.returncode == exit_code, str(result)
    assert len(lines) == 1 and lines[0].startswith("aac-tokend: error: "), str(result)
    return str(lines[0])


@dataclass
class E2EHome:
    """One isolated aac-tokend instance: AAC_TOKEND_HOME plus a place for captured output."""

    root: Path  # the short /tmp directory holding both below
    home: Path  # AAC_TOKEND_HOME
    logs: Path  # daemon stdout/stderr files (outside the home tree)
    env: dict[str, str]
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (label, text) of every run
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def paths(self) -> Paths:
        return resolve_paths(self.env)

    def socket(self, profile: str = "default") -> Path:
        """The token socket of ``profile``."""
        return self.paths.token_socket(profile)

    def state_file(self, profile: str = "default") -> Path:
        """The encrypted state file of ``profile``."""
        return self.paths.state_dir / f"{profile}.state"

    def command(
        self, *args: str, console_script: bool = False, python_flags: Sequence[str] = ()
    ) -> list[str]:
        """The argv of ``aac-tokend ARGS``: ``python [FLAGS] -m aac_tokend`` or the script."""
        if console_script and not python_flags:
            return [CONSOLE_SCRIPT, *args]
        entry = [CONSOLE_SCRIPT] if console_script else ["-m", "aac_tokend"]
        return [sys.executable, *python_flags, *entry, *args]

    def cli(
        self,
        *args: str,
        input: str | None = None,
        timeout: float = CLI_TIMEOUT,
        console_script: bool = False,
        python_flags: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> CliResult:
        """Run one command to completion (stdin empty unless ``input``); output is recorded."""
        argv = self.command(*args, console_script=console_script, python_flags=python_flags)
        proc = subprocess.run(
            argv,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env,
            cwd=self.root,
        )
        result = CliResult(tuple(args), proc.returncode, proc.stdout, proc.stderr)
        self.outputs += [(f"{args} stdout", proc.stdout), (f"{args} stderr", proc.stderr)]
        return result

    def daemon(self) -> Daemon:
        """A new (not yet started) daemon of this home, stopped when the home is closed."""
        daemon = Daemon(self, number=len(self.daemons))
        self.daemons.append(daemon)
        return daemon

    def captured_output(self) -> list[tuple[str, str]]:
        """Every stdout/stderr captured so far: CLI runs and every daemon's log files."""
        files = [(p.name, p.read_text(errors="replace")) for p in sorted(self.logs.iterdir())]
        return self.outputs + files

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.close()
        kill_strays(self.home)
        shutil.rmtree(self.root, ignore_errors=True)


def kill_strays(home: Path) -> list[int]:
    """SIGKILL every process whose environment has AAC_TOKEND_HOME=home (couriers left over).

    Only this test's processes carry its unique home path, so nothing else is touched.
    """
    marker = f"AAC_TOKEND_HOME={home}\0".encode()
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
    return killed


@contextlib.contextmanager
def e2e_home() -> Iterator[E2EHome]:
    """A fresh, short AAC_TOKEND_HOME; everything started in it is stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="atk", dir="/tmp"))
    home, logs = root / "h", root / "logs"
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AAC_", "XDG_RUNTIME"))}
    env["AAC_TOKEND_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    instance = E2EHome(root, home, logs, env)
    try:
        yield instance
    finally:
        instance.close()


def import_pair(
    home: E2EHome,
    sandbox: SandboxServer,
    *,
    profile: str = "default",
    pair: dict[str, object] | None = None,
    extra_args: Sequence[str] = (),
) -> dict[str, object]:
    """Generate a family at ``sandbox`` (unless ``pair``) and ``aac-tokend import`` it.

    The import names the sandbox's token endpoint and API base URL explicitly (derived
    endpoints must be under alteryxcloud.com). Returns the token JSON that was imported.
    """
    pair = pair if pair is not None else sandbox.generate()
    result = home.cli(
        "import", "--profile", profile, "--token-endpoint", sandbox.token_endpoint,
        "--base-url", sandbox.api_url, *extra_args, input=json.dumps(pair),
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"import failed: {result}")
    return pair


# -- the daemon ----------------------------------------------------------------------------


class Daemon:
    """One ``aac-tokend run`` process of an ``E2EHome`` (start it as often as needed)."""

    def __init__(self, home: E2EHome, *, number: int = 0) -> None:
        self.home = home
        self.number = number
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._log_files: list[Path] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon was never started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(
        self, *, wait: bool = True, profiles: Sequence[str] = (), console_script: bool = False
    ) -> Daemon:
        """Start ``aac-tokend run``; with ``wait``, return once it answers (see wait_ready)."""
        if self.alive:
            raise AssertionError("this daemon is already running")
        stem = f"daemon{self.number}-{self._starts}"
        self._starts += 1
        out, err = self.home.logs / f"{stem}.out", self.home.logs / f"{stem}.err"
        self._log_files += [out, err]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            self.proc = subprocess.Popen(
                self.home.command("run", console_script=console_script),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=self.home.env,
                cwd=self.home.root,
            )
        if wait:
            self.wait_ready(profiles=profiles)
        return self

    def wait_ready(self, *, profiles: Sequence[str] = (), timeout: float = READY_TIMEOUT) -> None:
        """Wait until the control socket answers and each of ``profiles`` serves a token."""

        def answering() -> bool:
            if not self.alive:
                raise AssertionError(f"the daemon exited early:\n{self.output()}")
            try:
                return bool(self.status().get("ok"))
            except (OSError, ValueError):
                return False

        wait_until(answering, timeout, "the daemon's control socket")
        for profile in profiles:
            wait_until(functools.partial(self.token, profile), timeout, f"a token for {profile}")

    def control(self, op: str, timeout: float = 60.0, **fields: object) -> dict[str, Any]:
        """One request on the control socket; the answer object."""
        with ControlClient(str(self.home.paths.control_socket), timeout=timeout) as client:
            return client.request(op, **fields)

    def status(self) -> dict[str, Any]:
        """The control socket's ``status`` answer."""
        return self.control("status", timeout=10.0)

    def profile_status(self, profile: str = "default") -> dict[str, Any]:
        """The status row of one profile (AssertionError if it is not listed)."""
        rows = [r for r in self.status()["profiles"] if r["profile"] == profile]
        assert rows, f"profile {profile} is not in the daemon's status"
        row: dict[str, Any] = rows[0]
        return row

    def token(self, profile: str = "default") -> str:
        """The token the profile's socket serves now ("" when none, or no socket)."""
        try:
            return read_token(str(self.home.socket(profile)))
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for the process to end; its exit status (negative: killed by that signal)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the daemon (its couriers, in their own sessions, live on) and reap it."""
        if self.alive:
            self.send_signal(signal.SIGKILL)
            self.wait(KILL_TIMEOUT)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = KILL_TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit status."""
        self.send_signal(sig)
        return self.wait(timeout)

    def output(self) -> str:
        """Everything this daemon wrote to stdout and stderr, over all its starts."""
        return "".join(p.read_text(errors="replace") for p in self._log_files if p.exists())

    def close(self) -> None:
        """Kill the process if it still runs (fixture finaliser)."""
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            self.kill()
