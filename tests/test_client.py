"""The stdlib-only clients, against small honest socket servers."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.api import get_token, run_cli
from aac_tokend.client import READ_TIMEOUT_SECONDS, ControlClient, read_token
from aac_tokend.errors import AacTokendError, AlertError, InputError, TransientError
from tests.unix_server import FakeDaemon

#: Generous: only a stalled machine gets near it.
WAIT = 10.0
REPO = Path(__file__).resolve().parent.parent


TCHARS = set(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


@pytest.fixture
def serve(sockdir: Path) -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """Start a FakeDaemon with the given behaviour; return its path."""
    servers: list[FakeDaemon] = []

    def start(behaviour: Callable[[socket.socket], None]) -> str:
        server = FakeDaemon(sockdir / f"s{len(servers)}.sock", behaviour)
        servers.append(server)
        return str(server.path)

    yield start
    for server in servers:
        server.close()


def json_lines(answers: Callable[[dict[str, object]], object]) -> Callable[[socket.socket], None]:
    """A behaviour answering each request line with ``answers(request)`` as JSON."""

    def behaviour(conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        for line in reader:
            conn.sendall(json.dumps(answers(json.loads(line))).encode() + b"\n")

    return behaviour


class TestReadToken:
    def test_reads_the_token_without_its_newline(self, serve: Callable[..., str]) -> None:
        """`<token>\\n` on the socket is returned as the token."""
        path = serve(lambda conn: conn.sendall(b"a.b.c\n"))
        assert read_token(path) == "a.b.c"

    def test_token_sent_in_pieces(self, serve: Callable[..., str]) -> None:
        """A token arriving in several segments is joined."""

        def pieces(conn: socket.socket) -> None:
            conn.sendall(b"a" * 5000)
            conn.sendall(b"b" * 5000 + b"\n")

        assert read_token(serve(pieces)) == "a" * 5000 + "b" * 5000

    def test_close_without_writing_is_empty(self, serve: Callable[..., str]) -> None:
        """A daemon with no valid token closes at once: the reader gets ""."""
        assert read_token(serve(lambda conn: None)) == ""

    def test_truncated_answer_raises(self, serve: Callable[..., str]) -> None:
        """An answer without its newline is not mistaken for a token."""
        with pytest.raises(ConnectionError, match="malformed"):
            read_token(serve(lambda conn: conn.sendall(b"a.b")))

    def test_no_socket_raises_file_not_found(self, sockdir: Path) -> None:
        """No socket file (no daemon, or profile not served): FileNotFoundError."""
        with pytest.raises(FileNotFoundError):
            read_token(str(sockdir / "missing.sock"))

    def test_dead_socket_raises_connection_refused(self, sockdir: Path) -> None:
        """A socket file nobody listens on: ConnectionRefusedError."""
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(sockdir / "dead.sock"))
        dead.close()
        with pytest.raises(ConnectionRefusedError):
            read_token(str(sockdir / "dead.sock"))

    def test_silent_server_times_out(self, sockdir: Path) -> None:
        """A listener that never answers makes the read time out instead of hanging."""
        with socket.socket(socket.AF_UNIX) as stuck:
            stuck.bind(str(sockdir / "stuck.sock"))
            stuck.listen()
            with pytest.raises(TimeoutError):
                read_token(str(sockdir / "stuck.sock"), timeout=0.2)


def full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener with a one-slot queue that nobody accepts from, filled until connects fail."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers: list[socket.socket] = []
    while True:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.setblocking(False)
        fillers.append(filler)
        try:
            filler.connect(str(path))
        except BlockingIOError:
            return listener, fillers
        assert len(fillers) < 100, "the listen queue never filled"


def accept_later(listener: socket.socket, delay: float, answer: bytes) -> threading.Thread:
    """After ``delay``, accept every queued connection and send each ``answer``."""

    def serve() -> None:
        time.sleep(delay)
        listener.settimeout(WAIT)
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


class TestFullListenQueue:
    """A momentarily full listen queue is waited out, as a blocking reader would."""

    def test_read_token_waits_for_room(self, sockdir: Path) -> None:
        """read_token connects once the daemon drains its queue, instead of failing at once."""
        listener, fillers = full_listener(sockdir / "busy.sock")
        try:
            accept_later(listener, 0.3, b"a.b.c\n")
            assert read_token(str(sockdir / "busy.sock"), timeout=WAIT) == "a.b.c"
        finally:
            listener.close()
            for filler in fillers:
                filler.close()

    def test_control_client_waits_for_room(self, sockdir: Path) -> None:
        """ControlClient connects once the daemon drains its queue."""
        listener, fillers = full_listener(sockdir / "busy.sock")
        try:
            accept_later(listener, 0.3, b'{"ok":true}\n')
            with ControlClient(str(sockdir / "busy.sock"), timeout=WAIT) as client:
                assert client.request("status") == {"ok": True}
        finally:
            listener.close()
            for filler in fillers:
                filler.close()

    def test_queue_that_stays_full_times_out(self, sockdir: Path) -> None:
        """A queue that never drains ends in TimeoutError once the timeout has passed."""
        listener, fillers = full_listener(sockdir / "busy.sock")
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                read_token(str(sockdir / "busy.sock"), timeout=0.3)
            assert time.monotonic() - started >= 0.3
        finally:
            listener.close()
            for filler in fillers:
                filler.close()


class TestGetTokenFallback:
    """get_token asks the control socket whenever the token socket fails, however it fails."""

    def test_broken_token_socket_falls_back_to_control(
        self, sockdir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A token socket that cuts its answer short (ConnectionError) is not the last word."""
        run = sockdir / "run"
        run.mkdir(mode=0o700)
        broken = FakeDaemon(run / "default.token.sock", lambda conn: conn.sendall(b"a.b"))
        control = FakeDaemon(
            run / "control.sock",
            json_lines(lambda request: {"ok": True, "profile": "default", "token": "c.d.e"}),
        )
        monkeypatch.setenv("AAC_TOKEND_HOME", str(sockdir))
        monkeypatch.delenv("AAC_TOKEND_PROFILE", raising=False)
        try:
            assert get_token("default") == "c.d.e"
        finally:
            broken.close()
            control.close()


class TestGetTokenRefusals:
    """get_token raises what the daemon's refusal code means, with `token`'s exit status."""

    @pytest.mark.parametrize(
        ("code", "status"), [("no_token_yet", 75), ("unknown_profile", 65), ("no_token", 69)]
    )
    def test_refusal_code_decides_the_error(
        self, sockdir: Path, monkeypatch: pytest.MonkeyPatch, code: str, status: int
    ) -> None:
        """A refusal is retry (75), bad input (65) or alert (69) as its code says, not always 69."""
        run = sockdir / "run"
        run.mkdir(mode=0o700)
        control = FakeDaemon(
            run / "control.sock",
            json_lines(lambda request: {"ok": False, "code": code, "message": "why it failed"}),
        )
        monkeypatch.setenv("AAC_TOKEND_HOME", str(sockdir))
        try:
            with pytest.raises(AacTokendError, match="why it failed") as info:
                get_token("default")
            assert info.value.exit_code == status
        finally:
            control.close()


class TestGetTokenHungDaemon:
    """get_token ends a daemon that does not answer as `token` does."""

    def test_no_answer_is_transient(self, sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A control socket that never answers: TransientError (75) within the read timeout."""
        run = sockdir / "run"
        run.mkdir(mode=0o700)
        monkeypatch.setenv("AAC_TOKEND_HOME", str(sockdir))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
            hung.bind(str(run / "control.sock"))
            hung.listen(8)
            started = time.monotonic()
            with pytest.raises(TransientError, match="did not answer") as info:
                get_token("default")
        assert info.value.exit_code == 75
        assert time.monotonic() - started < READ_TIMEOUT_SECONDS + 5


class TestApiCliInput:
    """`api` answers bad input and unusable profiles with one line and an exit status."""

    @staticmethod
    def _args(method: str = "GET", base_url: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(
            method=method, path="/x", data=None, base_url=base_url, profile="default"
        )

    @settings(max_examples=200, deadline=None)
    @given(method=st.text(max_size=12).filter(lambda m: not m or not set(m) <= TCHARS))
    def test_bad_method_is_input_error(self, method: str) -> None:
        """A method outside RFC 7230 token characters is a one-line InputError (65)."""
        with pytest.raises(InputError, match="is not an HTTP method name") as info:
            run_cli(self._args(method))
        assert info.value.exit_code == 65 and "\n" not in str(info.value)

    def test_unusable_row_raises_its_alert(
        self, sockdir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A profile whose row has no API base URL (corrupt) is its alert (69), no traceback."""
        run = sockdir / "run"
        run.mkdir(mode=0o700)
        row = {"profile": "default", "state": "corrupt", "api_base_url": None, "alert": "bad file"}
        control = FakeDaemon(
            run / "control.sock", json_lines(lambda request: {"ok": True, "profiles": [row]})
        )
        monkeypatch.setenv("AAC_TOKEND_HOME", str(sockdir))
        try:
            with pytest.raises(AlertError, match="profile default: bad file") as info:
                run_cli(self._args())
            assert info.value.exit_code == 69
        finally:
            control.close()

    def test_base_url_error_names_base_url(self) -> None:
        """A refused --base-url is worded as import words it, not as a token endpoint."""
        with pytest.raises(InputError) as info:
            run_cli(self._args(base_url="ftp://127.0.0.1/"))
        assert "--base-url" in str(info.value) and "token" not in str(info.value)


class TestControlClient:
    def test_request_sends_op_and_fields(self, serve: Callable[..., str]) -> None:
        """request() sends {"op", **fields} as one line and returns the answer object."""
        path = serve(json_lines(lambda request: {"ok": True, "seen": request}))
        with ControlClient(path) as client:
            answer = client.request("refresh", profile="default", id=3)
            assert answer == {"ok": True, "seen": {"op": "refresh", "profile": "default", "id": 3}}
            assert client.request("status")["seen"] == {"op": "status"}

    def test_answers_sent_together_are_split_by_line(self, serve: Callable[..., str]) -> None:
        """Two answers arriving in one segment are returned one per request."""

        def eager(conn: socket.socket) -> None:
            conn.recv(100)
            conn.sendall(b'{"n":1}\n{"n":2}\n')
            conn.recv(100)

        with ControlClient(serve(eager)) as client:
            assert client.request("a") == {"n": 1}
            assert client.request("b") == {"n": 2}

    def test_hang_up_before_answer_raises(self, serve: Callable[..., str]) -> None:
        """A daemon that closes without answering gives ConnectionError, not an empty dict."""
        client = ControlClient(serve(lambda conn: conn.recv(100)))
        with client, pytest.raises(ConnectionError):
            client.request("status")

    def test_non_object_answer_raises_value_error(self, serve: Callable[..., str]) -> None:
        """An answer that is JSON but not an object is a ValueError."""
        client = ControlClient(serve(json_lines(lambda request: [1, 2])))
        with client, pytest.raises(ValueError, match="not a JSON object"):
            client.request("status")

    def test_no_daemon_raises_file_not_found(self, sockdir: Path) -> None:
        """Connecting with no control socket raises FileNotFoundError from the constructor."""
        with pytest.raises(FileNotFoundError):
            ControlClient(str(sockdir / "control.sock"))

    def test_close_is_idempotent(self, serve: Callable[..., str]) -> None:
        """close() may be called again after the context manager closed the socket."""
        client = ControlClient(serve(json_lines(lambda request: {"ok": True})))
        with client:
            pass
        client.close()


class TestImportCost:
    def test_client_imports_only_the_socket_core(self) -> None:
        """The client module loads only _socket: not socket.py, json, re, typing, pathlib."""
        # The package __init__ is stubbed out: this pins client.py's own imports.
        code = (
            "import sys, types\n"
            "pkg = types.ModuleType('aac_tokend')\n"
            f"pkg.__path__ = [{str(REPO / 'aac_tokend')!r}]\n"
            "sys.modules['aac_tokend'] = pkg\n"
            "before = set(sys.modules)\n"
            "import {module}\n"
            "print(' '.join(sorted(set(sys.modules) - before)))"
        )

        def loaded(module: str) -> set[str]:
            out = subprocess.run(
                [sys.executable, "-S", "-c", code.replace("{module}", module)],
                capture_output=True,
                text=True,
                timeout=WAIT,
            )
            assert out.returncode == 0, out.stderr
            return set(out.stdout.split())

        extra = loaded("aac_tokend.client") - loaded("_socket")
        assert extra <= {"aac_tokend.client", "__future__"}
