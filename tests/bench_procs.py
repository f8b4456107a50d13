"""Benchmark helpers: a sandbox and a real daemon in subprocesses, /proc readings, a table row.

Not collected by pytest (no ``test_`` prefix); ``python -m tests.bench`` uses it. Every
process started here is ended by the context manager that started it, even on failure.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aac_tokend.client import ControlClient
from aac_tokend.core.importer import ImportRequest

__all__ = [
    "Daemon",
    "Sandbox",
    "cpu_seconds",
    "import_request",
    "memory_kib",
    "row",
    "run_daemon",
    "run_sandbox",
    "short_dir",
]

PY = sys.executable
#: A daemon that has not answered `status` after this long is broken, not slow: it starts
#: in well under a second with one profile and in a few seconds with a thousand.
START_TIMEOUT = 60.0
#: SIGTERM must end the daemon within 2 s (daemon.py); beyond this it is killed.
STOP_TIMEOUT = 10.0
#: The soft descriptor limit of a login shell and of systemd services: a thousand profiles'
#: token sockets come close to it, so the daemon is run under it (this machine may allow more).
USUAL_NOFILE = 1024

Row = dict[str, Any]


def row(
    name: str,
    value: float,
    unit: str,
    baseline: float | None,
    baseline_name: str,
    *,
    target: str = "",
    met: bool | None = None,
    ratio: float | None = None,
) -> Row:
    """One line of the table: a figure, the baseline measured beside it, and the target."""
    if ratio is None and baseline:
        ratio = value / baseline
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": ratio,
        "target": target,
        "met": met,
    }


def short_dir(prefix: str = "atkb") -> Path:
    """A fresh private directory short enough for Unix socket paths (107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of ``pid`` in KiB (VmRSS, or VmHWM for the peak)."""
    return int(_proc_status(pid)[field].split()[0])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds ``pid`` has used (all threads; reaped children excluded)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _http_json(url: str, body: object = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@dataclass
class Sandbox:
    """A ``python -m aac_tokend.sandbox`` subprocess on loopback."""

    proc: subprocess.Popen[str]
    url: str

    @property
    def token_endpoint(self) -> str:
        return self.url + "/as/token"

    def generate(self) -> dict[str, Any]:
        """A new token family: the token-endpoint JSON (holds tokens: never print it)."""
        answer: dict[str, Any] = _http_json(self.url + "/sandbox/generate", {})
        return answer

    def log(self) -> list[dict[str, Any]]:
        """The sandbox's token-request log (hashes only)."""
        answer: list[dict[str, Any]] = _http_json(self.url + "/sandbox/log")
        return answer


@contextmanager
def run_sandbox(access_ttl: float) -> Iterator[Sandbox]:
    """A sandbox whose access tokens live ``access_ttl`` seconds."""
    args = [PY, "-m", "aac_tokend.sandbox", "--port", "0", "--access-ttl", str(access_ttl)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # "sandbox listening on URL token_endpoint=..."
        if not first.startswith("sandbox listening on "):
            raise SystemExit(f"the sandbox did not start: {first!r}")
        yield Sandbox(proc, first.split()[3])
    finally:
        _stop(proc)


def import_request(sandbox: Sandbox, profile: str, pair: dict[str, Any]) -> ImportRequest:
    """What ``aac-tokend import --token-endpoint <sandbox>`` sends for ``pair``."""
    return ImportRequest(
        profile=profile,
        access_token=pair["access_token"],
        refresh_token=pair["refresh_token"],
        expires_in=pair.get("expires_in"),
        refresh_expires_in=pair.get("refresh_token_expires_in"),
        token_endpoint=sandbox.token_endpoint,
    )


@dataclass
class Daemon:
    """A running ``python -m aac_tokend run`` with AAC_TOKEND_HOME=home."""

    proc: subprocess.Popen[bytes]
    home: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "AAC_TOKEND_HOME": str(self.home)}

    @property
    def control_socket(self) -> str:
        return str(self.home / "run" / "control.sock")

    def token_socket(self, profile: str) -> str:
        return str(self.home / "run" / f"{profile}.token.sock")

    def control(self, op: str, **fields: object) -> dict[str, Any]:
        """One control request; a failed answer ends the benchmark."""
        with ControlClient(self.control_socket, timeout=120.0) as client:
            answer = client.request(op, **fields)
        if answer.get("ok") is not True:
            raise SystemExit(f"daemon answered {op} with {answer.get('code')}: "
                             f"{answer.get('message')}")  # fmt: skip
        return answer

    def import_profile(self, request: ImportRequest) -> None:
        """Import through the control socket, as `aac-tokend import` does."""
        self.control("import", **request.to_wire())

    def wait_serving(self, profiles: int) -> None:
        """Wait until ``profiles`` profiles are loaded (adoption runs after start-up)."""
        deadline = time.monotonic() + START_TIMEOUT
        while len(self.control("profiles")["profiles"]) < profiles:
            if time.monotonic() > deadline:
                raise SystemExit(f"the daemon did not load {profiles} profiles in time")
            time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        text = (self.home / "daemon.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _usual_nofile_limit() -> None:
    """In the child: the soft descriptor limit most sessions and services start with."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(USUAL_NOFILE, hard), hard))


@contextmanager
def run_daemon(home: Path | None = None) -> Iterator[Daemon]:
    """The real daemon in ``home`` (a fresh short dir by default), stopped and removed after.

    It starts with the usual soft limit of 1024 descriptors, whatever this machine's is.
    """
    home = home or short_dir()
    log = (home / "daemon.log").open("ab")
    env = {**os.environ, "AAC_TOKEND_HOME": str(home)}
    proc = subprocess.Popen(
        [PY, "-m", "aac_tokend", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        preexec_fn=_usual_nofile_limit,  # safe: no thread of ours is busy while this starts
    )
    log.close()
    daemon = Daemon(proc, home)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}:\n{daemon.log_tail()}")
            try:
                daemon.control("status")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the daemon did not answer in time") from None
                time.sleep(0.05)
        yield daemon
    finally:
        _stop(proc)
        shutil.rmtree(home, ignore_errors=True)
