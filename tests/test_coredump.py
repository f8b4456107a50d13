"""No core file carries a token off: the commands that hold one forbid core dumps, and
``exec`` gives its command the user's own limit back."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.serve.control_server import ControlServer

#: Generous bound for a CLI child to start on a loaded machine and reach the point tested.
STARTUP_SECONDS = 60.0
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="core files and prctl are checked on Linux"
)


def _cores_allowed() -> None:
    """In the child, before exec: what `ulimit -c unlimited` (or as much as allowed) gives."""
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def _cores(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith("core")]


@pytest.fixture(scope="module")
def cores_land_in_cwd(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless a process killed by SIGQUIT here leaves a core file in its cwd."""
    pattern = CORE_PATTERN.read_text().strip() if CORE_PATTERN.exists() else ""
    if not pattern or pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write core files into the cwd")
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("the hard RLIMIT_CORE is 0 here: no process can write a core file")
    work = tmp_path_factory.mktemp("control-core")
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('ready', flush=True); time.sleep(60)"],
        cwd=work, preexec_fn=_cores_allowed, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    child.send_signal(signal.SIGQUIT)
    child.wait(STARTUP_SECONDS)
    if not _cores(work):
        pytest.skip("a plain process killed by SIGQUIT left no core file in its cwd here")


def _quit_and_collect(child: subprocess.Popen[bytes], work: Path) -> bytes:
    """SIGQUIT ``child`` (Ctrl-\\, or any crash), wait, and return every core file's bytes,
    after checking that the child's soft core limit was 0."""
    limits = Path(f"/proc/{child.pid}/limits").read_text()
    child.send_signal(signal.SIGQUIT)
    child.wait(STARTUP_SECONDS)
    assert child.returncode == -signal.SIGQUIT
    cores = b"".join(p.read_bytes() for p in _cores(work))
    assert not cores, f"{len(cores)} bytes of core files in {work}"
    assert "Max core file size        0 " in limits, limits
    return cores


class _HoldingDaemon:
    """The daemon's side of the control socket: answers ``token`` with the access token,
    and holds an ``import`` unanswered until released (the client waits, tokens in hand)."""

    def __init__(self, access_token: str) -> None:
        self.access_token = access_token
        self.got_import = threading.Event()
        self.release = threading.Event()

    def handle(self, request: dict[str, object]) -> dict[str, object]:
        if request["op"] == "import":
            self.got_import.set()
            self.release.wait(STARTUP_SECONDS)
            return {"ok": False, "code": "busy", "message": "released"}
        if request["op"] == "token":
            return {"ok": True, "profile": "default", "token": self.access_token}
        return {"ok": False, "code": "unknown_op", "message": "no such op"}


@pytest.fixture
def pair() -> dict[str, Any]:
    with SandboxServer() as sandbox:
        return sandbox.generate()


@contextlib.contextmanager
def holding_daemon(home: Path, access_token: str) -> Iterator[_HoldingDaemon]:
    run = home / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    fake = _HoldingDaemon(access_token)
    server = ControlServer(run / "control.sock", fake)
    server.start()
    try:
        yield fake
    finally:
        fake.release.set()
        server.stop()


def cli(home: Path, work: Path, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
    """``aac-tokend ARGS`` as a real process in ``work``, allowed to dump core."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["AAC_TOKEND_HOME"] = str(home)
    options: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    options.update(kwargs)
    return subprocess.Popen(
        [sys.executable, "-m", "aac_tokend", *args], cwd=work, env=env,
        preexec_fn=_cores_allowed, **options,
    )  # fmt: skip


@pytest.mark.usefixtures("cores_land_in_cwd")
class TestCommandsLeaveNoCore:
    """A command killed while it holds a token leaves no core file behind."""

    def test_import(self, sockdir: Path, tmp_path: Path, pair: dict[str, Any]) -> None:
        """`import`, waiting on the daemon with the pair read, dies without a core."""
        with holding_daemon(sockdir, str(pair["access_token"])) as fake:
            child = cli(
                sockdir, tmp_path, "import", "--token-endpoint", "http://127.0.0.1:9/as/token",
                "--refresh-lifetime-days", "30", stdin=subprocess.PIPE,
            )  # fmt: skip
            assert child.stdin is not None
            child.stdin.write(json.dumps(pair).encode())
            child.stdin.close()
            assert fake.got_import.wait(STARTUP_SECONDS)
            cores = _quit_and_collect(child, tmp_path)
        assert str(pair["refresh_token"]).encode() not in cores
        assert _cores(tmp_path) == []

    def test_api(self, sockdir: Path, tmp_path: Path, pair: dict[str, Any]) -> None:
        """`api`, waiting on the API with the bearer token sent, dies without a core."""
        arrived, release = threading.Event(), threading.Event()

        class Slow(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                arrived.set()
                release.wait(STARTUP_SECONDS)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
        threading.Thread(target=api.serve_forever, daemon=True).start()
        try:
            with holding_daemon(sockdir, str(pair["access_token"])):
                base = f"http://127.0.0.1:{api.server_address[1]}"
                child = cli(sockdir, tmp_path, "api", "GET", "/x", "--base-url", base)
                assert arrived.wait(STARTUP_SECONDS)
                _quit_and_collect(child, tmp_path)
        finally:
            release.set()
            api.shutdown()
            api.server_close()
        assert _cores(tmp_path) == []

    def test_token_fast_path(self, sockdir: Path, tmp_path: Path) -> None:
        """`token` on its fast path, half-way through reading the token, dies without a core."""
        run = sockdir / "run"
        run.mkdir(mode=0o700)
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(run / "default.token.sock"))
            listener.listen(1)
            child = cli(sockdir, tmp_path, "token")
            listener.settimeout(STARTUP_SECONDS)
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"eyJ-half-a-token")  # no newline: the client waits for the rest
                _quit_and_collect(child, tmp_path)
        assert _cores(tmp_path) == []


_REPORT = (
    "import ctypes, resource; "
    "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE)[0])"
)


class TestDumpable:
    """On Linux the token commands are not dumpable; exec's command is, with the user's limit."""

    def test_forbid_makes_the_process_undumpable(self) -> None:
        """After forbid_core_dumps, PR_GET_DUMPABLE says 0 and the soft core limit is 0."""
        code = (
            "from aac_tokend.host.coredump import forbid_core_dumps; forbid_core_dumps(); "
            f"{_REPORT}"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], preexec_fn=_cores_allowed, capture_output=True,
            text=True, timeout=STARTUP_SECONDS, check=True,
        )  # fmt: skip
        assert out.stdout.split() == ["0", "0"]

    def test_exec_gives_the_command_the_users_limit(self, sockdir: Path, tmp_path: Path) -> None:
        """`exec`'s command is dumpable again and has the core limit `exec` was started with."""
        run = sockdir / "run"
        run.mkdir(mode=0o700)
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        if hard == 0:
            pytest.skip("the hard RLIMIT_CORE is 0 here: no limit to give back")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(run / "default.token.sock"))
            listener.listen(1)
            child = cli(
                sockdir, tmp_path, "exec", "--", sys.executable, "-c", _REPORT,
                stdout=subprocess.PIPE,
            )  # fmt: skip
            listener.settimeout(STARTUP_SECONDS)
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"a-token\n")
            out, _ = child.communicate(timeout=STARTUP_SECONDS)
        assert child.returncode == 0
        expected = -1 if hard == resource.RLIM_INFINITY else hard
        assert out.decode().split() == ["1", str(expected)]
