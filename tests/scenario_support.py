"""Harness of the scenario tests: an engine on fake time against the real loopback sandbox,
a TCP proxy that can lose answers or vanish, and a real daemon process.

Nothing here patches anything. The engine is the real one with its real file store and real
HTTP; only the clock, the scheduler and the alert sinks are the fakes of ``aac_tokend.testing``.
The fake clock is shared with the sandbox, so a jump of hours is seen by both.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests

from aac_tokend.core.config import Config
from aac_tokend.core.importer import ImportRequest, parse_import_text
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.daemon.sinks import AlertSink
from aac_tokend.refresh.courier import ForkCourier, InProcessRefresher, Refresher
from aac_tokend.refresh.endpoint import TokenEndpoint
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore, FileStoreSpec
from aac_tokend.testing import FakeClock, FakeScheduler, RecordingSink

__all__ = [
    "CLIENT",
    "DAY",
    "HOUR",
    "TIMEOUT",
    "DaemonProcess",
    "LossyProxy",
    "World",
    "api_accepts",
    "cli",
    "cli_env",
    "import_via_cli",
    "running_daemon",
    "short_dir",
    "third_party_refresh",
    "write_config",
]

HOUR = 3600.0
DAY = 86400.0
CLIENT = "aac-sandbox-client"
WORKSPACE = "/iam/v1/workspaces/current"
#: Generous bound of one loopback exchange or CLI call; it only keeps a broken test from hanging.
TIMEOUT = 30.0


def short_dir(prefix: str = "atk") -> Path:
    """A fresh private directory short enough for Unix socket paths (107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def third_party_refresh(sandbox: SandboxServer, refresh_token: str) -> requests.Response:
    """Someone else spends a refresh token at the sandbox (a thief, or a replay)."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": CLIENT}
    return requests.post(sandbox.token_endpoint, data=form, timeout=TIMEOUT)


def api_accepts(sandbox: SandboxServer, token: bytes | str) -> bool:
    """True if the sandbox's AAC API stub accepts ``token`` right now (by its clock)."""
    text = token.decode() if isinstance(token, bytes) else token
    answer = requests.get(
        sandbox.api_url + WORKSPACE, headers={"Authorization": f"Bearer {text}"}, timeout=TIMEOUT
    )
    return answer.status_code == 200


# -- a proxy that loses answers ------------------------------------------------------------


def _read_request(conn: socket.socket) -> bytes:
    """One HTTP/1.1 request with a Content-Length body, read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class LossyProxy:
    """A loopback TCP proxy in front of the sandbox's token endpoint.

    ``drop_answers = n``: the next n requests are forwarded and answered by the sandbox (so
    it rotates), then the client's connection is closed without the answer: a lost response
    the way a flaky network loses it. ``down()`` closes the listening socket (connections are
    refused: no network); ``up()`` listens again on the same port.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self._upstream = (host, int(port))
        self.port = 0
        self.drop_answers = 0
        self.forwarded = 0
        self.dropped = 0
        #: called with nothing once a request is read, before it goes upstream
        self.before_forward: Callable[[], None] | None = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.up()

    @property
    def token_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/as/token"

    def up(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)  # the accept loop notices down() this fast
        self.port = listener.getsockname()[1]
        self._listener = listener
        stop = self._stop = threading.Event()
        threading.Thread(target=self._accept, args=(listener, stop), daemon=True).start()

    def down(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    close = down

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # a client or upstream that went away (a test tearing down) ends this exchange only
        with conn, contextlib.suppress(OSError):
            conn.settimeout(TIMEOUT)
            request = _read_request(conn)
            if self.before_forward is not None:
                self.before_forward()
            with socket.create_connection(self._upstream, timeout=TIMEOUT) as up:
                up.sendall(request)
                answer = b""
                while chunk := up.recv(65536):  # the sandbox closes after each answer
                    answer += chunk
            self.forwarded += 1
            if self.drop_answers > 0:
                self.drop_answers -= 1
                self.dropped += 1
                return  # closed without a word: the answer is lost
            conn.sendall(answer)


# -- an engine on fake time ------------------------------------------------------------------


@dataclass
class World:
    """One engine, its store and fakes, and a sandbox on the same fake clock."""

    clock: FakeClock
    sandbox: SandboxServer
    directory: Path
    key: bytes
    refresher: Refresher
    config: Config
    sinks: Sequence[AlertSink]
    recorder: RecordingSink
    scheduler: FakeScheduler = field(default_factory=FakeScheduler)
    engine: Engine = field(init=False)
    proxies: list[LossyProxy] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        *,
        access_ttl: float = HOUR,
        refresh_ttl: float = 30 * DAY,
        fork: bool = False,
        endpoint: TokenEndpoint | None = None,
        config: Config | None = None,
        sinks: Sequence[AlertSink] = (),
        refresher: Refresher | None = None,
        server_on_true_time: bool = False,
    ) -> World:
        clock = FakeClock()
        # The server's clock does not step with ours: it follows the time that passed.
        server_clock = clock.true_now if server_on_true_time else clock
        sandbox = SandboxServer(clock=server_clock, access_ttl=access_ttl, refresh_ttl=refresh_ttl)
        sandbox.start()
        directory, key = short_dir(), secrets.token_bytes(32)
        if refresher is None:
            spec = FileStoreSpec(str(directory / "state"), key)
            refresher = (
                ForkCourier(spec, clock=clock.now)
                if fork
                else InProcessRefresher(spec.open(), endpoint or TokenEndpoint(), clock.now)
            )
        recorder = RecordingSink()
        world = cls(
            clock=clock,
            sandbox=sandbox,
            directory=directory,
            key=key,
            refresher=refresher,
            config=config or Config(notifications=False),
            sinks=(recorder, *sinks),
            recorder=recorder,
        )
        world.engine = world.new_engine()
        world.engine.start()
        return world

    @property
    def store(self) -> FileStore:
        return FileStore(self.directory / "state", self.key)

    def new_engine(self) -> Engine:
        """A fresh engine on the same store: what a restarted daemon builds."""
        self.scheduler = FakeScheduler()
        return Engine(
            store=self.store,
            refresher=self.refresher,
            scheduler=self.scheduler,
            clock=self.clock,
            config=self.config,
            alerter=Alerter(self.sinks),
            socket_path=lambda name: self.directory / f"{name}.token.sock",
        )

    def restart(self) -> None:
        """The daemon dies and starts again: new engine, scheduler and alerter; same files."""
        self.engine = self.new_engine()
        self.engine.start()

    def proxy(self) -> LossyProxy:
        proxy = LossyProxy(self.sandbox.url)
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        self.sandbox.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- tokens in ---------------------------------------------------------------------
    def import_pair(
        self,
        profile: str = "work",
        *,
        token_endpoint: str | None = None,
        client_id: str | None = None,
        refresh_lifetime_days: float | None = None,
        pair: dict[str, Any] | None = None,
        two_lines: bool = False,
    ) -> dict[str, Any]:
        """Import ``pair`` (default: a new family) as ``aac-tokend import`` would.

        ``two_lines`` pastes the tokens alone, as two lines, instead of the token JSON.
        """
        pair = pair or self.sandbox.generate()
        text = (
            f"{pair['access_token']}\n{pair['refresh_token']}\n" if two_lines else json.dumps(pair)
        )
        request = parse_import_text(text, profile=profile)
        request = replace(
            request,
            token_endpoint=token_endpoint or self.sandbox.token_endpoint,
            client_id=client_id,
            refresh_lifetime_days=refresh_lifetime_days,
        )
        self.engine.import_profile(request)
        return pair

    def import_request(self, request: ImportRequest) -> None:
        self.engine.import_profile(request)

    # -- time ----------------------------------------------------------------------------
    def step(self) -> None:
        """What the real scheduler does at a wake-up: the tick, then every due job."""
        self.scheduler.run_intervals()
        self.scheduler.run_due(self.clock.now())

    def run(self, seconds: float, step: float = 1.0) -> None:
        """Let ``seconds`` of awake time pass, waking every ``step`` seconds."""
        end = self.clock.now() + seconds
        while (left := end - self.clock.now()) > 1e-9:
            self.clock.advance(min(step, left))
            self.step()

    def run_until(self, done: Callable[[], bool], limit: float, step: float = 0.5) -> float | None:
        """Run until ``done()``; the fake seconds it took, or None if not within ``limit``."""
        start = self.clock.now()
        while not done():
            if self.clock.now() - start >= limit:
                return None
            self.clock.advance(step)
            self.step()
        return self.clock.now() - start

    # -- what a person sees ---------------------------------------------------------------
    def status(self, profile: str = "work") -> dict[str, Any]:
        return next(row.to_wire() for row in self.engine.status() if row.profile == profile)

    def token(self, profile: str = "work") -> bytes | None:
        return self.engine.current_token(profile)

    def token_requests(self) -> list[dict[str, object]]:
        return [e for e in self.sandbox.log() if e["outcome"] != "invalid_request"]


# -- a real daemon process -----------------------------------------------------------------


def _aac_command() -> list[str]:
    script = Path(sys.executable).with_name("aac-tokend")
    return [str(script)] if script.exists() else [sys.executable, "-m", "aac_tokend"]


def cli_env(home: Path) -> dict[str, str]:
    """A clean environment for one isolated instance."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "HOME", "USER")}
    env["AAC_TOKEND_HOME"] = str(home)
    return env


def cli(
    home: Path, *args: str, stdin: str | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run one ``aac-tokend`` command against the instance under ``home``."""
    return subprocess.run(
        [*_aac_command(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(home),
        timeout=timeout,
        check=False,
    )


class DaemonProcess:
    """``aac-tokend run`` as a child process, its stderr (JSON log lines) in a file."""

    def __init__(self, home: Path, extra_env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.log_path = home / f"daemon-{secrets.token_hex(3)}.log"
        self._log = self.log_path.open("wb")
        env = {**cli_env(home), **(extra_env or {})}
        self.proc = subprocess.Popen(
            [*_aac_command(), "run"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = TIMEOUT) -> None:
        """Until the control socket answers ``status``; fails if the daemon died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log_text()}")
            answer = cli(self.home, "status", "--json")
            if answer.returncode == 0 and json.loads(answer.stdout)["daemon_running"]:
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout} s: {self.log_text()}")

    def log_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if line.strip()]

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cpu_seconds(self) -> tuple[float, float]:
        """(own utime+stime, reaped children's cutime+cstime) from /proc/<pid>/stat."""
        raw = Path(f"/proc/{self.pid}/stat").read_text()
        fields = raw[raw.rindex(")") + 2 :].split()
        tick = os.sysconf("SC_CLK_TCK")
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        return (utime + stime) / tick, (cutime + cstime) / tick

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it lingers; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_daemon(
    home: Path, extra_env: Mapping[str, str] | None = None
) -> Iterator[DaemonProcess]:
    """A ready daemon, stopped on the way out even when the test fails."""
    daemon = DaemonProcess(home, extra_env)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


def write_config(home: Path, text: str) -> Path:
    """Write ``config.toml`` of the instance under ``home`` (notifications off unless said)."""
    config_dir = home / "config"
    config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = config_dir / "config.toml"
    path.write_text(text)
    return path


def import_via_cli(
    home: Path, pair: Mapping[str, object], *args: str
) -> subprocess.CompletedProcess[str]:
    """``aac-tokend import ARGS`` with the token JSON on stdin."""
    return cli(home, "import", *args, stdin=json.dumps(pair))
