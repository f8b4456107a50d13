"""The control socket: JSON lines, limits, and isolation between clients."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend import errors
from aac_tokend.client import ControlClient, read_token
from aac_tokend.serve import control_server, wire
from aac_tokend.serve.control_server import (
    MAX_CONNECTIONS,
    MAX_DEPTH,
    MAX_REQUEST_BYTES,
    ControlServer,
)
from aac_tokend.serve.token_server import TokenServer

NOBODY = 65534
#: Generous: only a stalled machine gets near it.
WAIT = 10.0
SECRET = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.c2ln"


class FakeHandler:
    """Answers by op; records requests; slow and failing ops on demand."""

    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        self.finished: list[dict[str, object]] = []  # slow requests that ran to their end
        self.on_shutdown: Callable[[], None] = lambda: None

    def handle(self, request: dict[str, object]) -> dict[str, object]:
        self.requests.append(request)
        op = request["op"]
        if op == "status":
            return {"ok": True, "profiles": ["default"]}
        if op == "echo":
            return {"ok": True, "got": request}
        if op == "slow":
            time.sleep(float(str(request.get("seconds", 2.0))))
            self.finished.append(request)
            return {"ok": True, "slept": True}
        if op == "unknown_profile":
            raise errors.ProfileError("unknown profile nope; see `aac-tokend status`")
        if op == "busy":
            raise errors.BusyError("a refresh of default is in flight; try again shortly")
        if op == "crash":
            raise RuntimeError(f"response had refresh_token={SECRET}")
        if op == "shutdown":  # like the daemon: the stop races with this answer
            threading.Thread(target=self.on_shutdown).start()
            time.sleep(0.1)
            return {"ok": True, "stopping": True}
        if op == "unserializable":
            return {"ok": True, "when": object()}
        if op == "nan":
            return {"ok": True, "ratio": float("nan")}
        if op == "no_ok":
            return {"profiles": []}
        return {"ok": False, "code": "unknown_op", "message": f"no op {op}"}


class TokenSource:
    def current_token(self, profile: str) -> bytes | None:
        return b"tok.en.value"


@pytest.fixture
def handler() -> FakeHandler:
    return FakeHandler()


@pytest.fixture
def make_server(sockdir: Path, handler: FakeHandler) -> Iterator[Callable[..., ControlServer]]:
    """Build and start ControlServers on sockdir/control.sock; all are stopped afterwards."""
    started: list[ControlServer] = []

    def make(**options: object) -> ControlServer:
        srv = ControlServer(sockdir / "control.sock", handler, **options)  # type: ignore[arg-type]
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def server(make_server: Callable[..., ControlServer]) -> ControlServer:
    return make_server()


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.connect(str(path))
    return sock


def read_lines(sock: socket.socket, count: int) -> list[dict[str, object]]:
    """Read ``count`` response lines (or fewer if the server hangs up)."""
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()[:count]]


def strict_loads(line: bytes) -> object:
    """Parse ``line`` as strict JSON: NaN and Infinity are not JSON."""

    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def at_eof(sock: socket.socket) -> bool:
    """Return True once the server has closed ``sock`` (reading and dropping anything left)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def send_quietly(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send ``data`` from a thread, ignoring the server hanging up midway."""

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


class TestProtocol:
    def test_several_requests_on_one_connection(self, server: ControlServer) -> None:
        """One connection carries many requests, each answered by one line."""
        with ControlClient(str(server.path)) as client:
            assert client.request("status") == {"ok": True, "profiles": ["default"]}
            assert client.request("echo", profile="x")["got"] == {"op": "echo", "profile": "x"}
            assert client.request("status")["ok"] is True

    def test_pipelined_requests_are_answered_in_order(self, server: ControlServer) -> None:
        """Requests sent back to back are answered in the order they were sent."""
        with connect(server.path) as sock:
            ops = ["slow", "status", "echo", "status"]
            lines = [
                json.dumps({"op": op, "id": i, "seconds": 0.2}).encode() + b"\n"
                for i, op in enumerate(ops)
            ]
            sock.sendall(b"".join(lines))
            answers = read_lines(sock, 4)
        assert [a["id"] for a in answers] == [0, 1, 2, 3]
        assert answers[0]["slept"] is True

    def test_malformed_line_then_good_one(self, server: ControlServer) -> None:
        """A line that is not JSON gets bad_request, and the connection stays usable."""
        with connect(server.path) as sock:
            sock.sendall(b'this is not json\n{"op":"status"}\n')
            bad, good = read_lines(sock, 2)
        assert bad["ok"] is False
        assert bad["code"] == "bad_request"
        assert "not valid JSON" in str(bad["message"])
        assert good == {"ok": True, "profiles": ["default"]}

    @pytest.mark.parametrize(
        "line",
        [b"[1, 2]", b'"status"', b"{}", b'{"op": 3}', b'{"op": ""}', b"", b"\xff\xfe", b"[" * 5000],
    )
    def test_bad_requests_are_answered(self, server: ControlServer, line: bytes) -> None:
        """Non-objects, a missing or non-string op, bad bytes, deep nesting: bad_request."""
        with connect(server.path) as sock:
            sock.sendall(line + b"\n" + b'{"op":"status"}\n')
            bad, good = read_lines(sock, 2)
        assert bad["code"] == "bad_request"
        assert good["ok"] is True

    def test_utf16_request_cannot_smuggle_nesting(
        self, server: ControlServer, handler: FakeHandler
    ) -> None:
        """A UTF-16 request nested 300 deep is refused as not UTF-8, never run or echoed."""
        nested = "[" * 300 + "]" * 300
        line = ('{"a":"\u5c00","id":' + nested + ',"op":"status"}').encode("utf-16-le")
        with connect(server.path) as sock:
            sock.sendall(line + b"\n")
            (answer,) = read_lines(sock, 1)
        assert answer["code"] == "bad_request"
        assert "not UTF-8" in str(answer["message"])
        assert "id" not in answer
        assert handler.requests == []

    def test_id_is_echoed(self, server: ControlServer, handler: FakeHandler) -> None:
        """The request's id comes back in the answer, also on errors."""
        with connect(server.path) as sock:
            sock.sendall(b'{"op":"status","id":"abc"}\n{"id":7}\n{"op":"busy","id":[1]}\n')
            answers = read_lines(sock, 3)
        assert [a["id"] for a in answers] == ["abc", 7, [1]]
        assert answers[1]["code"] == "bad_request"
        assert len(handler.requests) == 2

    def test_tokend_errors_keep_their_message(self, server: ControlServer) -> None:
        """Errors from our own tree answer with their code and one-line message."""
        with ControlClient(str(server.path)) as client:
            answer = client.request("unknown_profile")
            assert answer == {
                "ok": False,
                "code": "unknown_profile",
                "message": "unknown profile nope; see `aac-tokend status`",
            }
            assert client.request("busy")["code"] == "busy"

    def test_foreign_exceptions_hide_their_message(self, server: ControlServer) -> None:
        """Any other exception answers internal_error with its class name only."""
        with ControlClient(str(server.path)) as client:
            answer = client.request("crash", id=1)
            assert answer == {
                "ok": False,
                "code": "internal_error",
                "message": "RuntimeError",
                "id": 1,
            }
            assert SECRET not in json.dumps(answer)
            assert client.request("status")["ok"] is True

    def test_unserializable_answer_is_an_internal_error(self, server: ControlServer) -> None:
        """A handler answer that is not JSON-serialisable becomes internal_error."""
        with ControlClient(str(server.path)) as client:
            assert client.request("unserializable")["code"] == "internal_error"

    def test_answers_are_strict_json_with_a_boolean_ok(self, server: ControlServer) -> None:
        """A handler answer holding NaN, or lacking a boolean ok, becomes internal_error."""
        with connect(server.path) as sock:
            sock.sendall(b'{"op":"nan","id":1}\n{"op":"no_ok","id":2}\n')
            data = b""
            while data.count(b"\n") < 2:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        answers = [strict_loads(line) for line in data.splitlines()]
        assert answers == [
            {
                "ok": False,
                "code": "internal_error",
                "message": "the answer could not be encoded",
                "id": i,
            }
            for i in (1, 2)
        ]

    @pytest.mark.parametrize(
        ("field", "why"),
        [
            (b"[" * 40 + b"]" * 40, "nests deeper"),
            (b"[" * 988 + b"]" * 988, "nests deeper"),  # parsed, but 0.1.0 could not echo it
            (b"NaN", "NaN"),
            (b"-Infinity", "NaN"),
            (b"1e999", "NaN"),
            (b'"\\ud800"', "lone surrogate"),
            (b'["ok", "\\udfff"]', "lone surrogate"),
            (b'"' + b"x" * 2000 + b'"', "over 1024 bytes"),
        ],
    )
    def test_unechoable_id_gets_a_short_error_without_it(
        self, server: ControlServer, handler: FakeHandler, field: bytes, why: str
    ) -> None:
        """An id that nests too deep, is not finite, is not Unicode or is too long is refused
        with a bounded bad_request that does not echo it, and the request is not run."""
        with connect(server.path) as sock:
            sock.sendall(b'{"op":"status","id":' + field + b'}\n{"op":"status","id":2}\n')
            data = b""
            while data.count(b"\n") < 2:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        bad_line, good_line = data.splitlines()
        bad, good = strict_loads(bad_line), strict_loads(good_line)
        assert isinstance(bad, dict)
        assert bad["code"] == "bad_request"
        assert why in str(bad["message"])
        assert "id" not in bad
        assert len(bad_line) < 200
        assert good == {"ok": True, "profiles": ["default"], "id": 2}
        assert len(handler.requests) == 1

    def test_same_values_elsewhere_in_a_request_are_refused(
        self, server: ControlServer, handler: FakeHandler
    ) -> None:
        """NaN, lone surrogates and deep nesting never reach the handler in any field."""
        lines = [
            b'{"op":"echo","wait":NaN}',
            b'{"op":"echo","profile":"\\ud83d"}',
            b'{"op":"echo","x":' + b"[" * 40 + b"]" * 40 + b"}",
            b'{"op":"echo","\\udc00":1}',
        ]
        with connect(server.path) as sock:
            sock.sendall(b"".join(line + b"\n" for line in lines))
            answers = read_lines(sock, len(lines))
        assert [a["code"] for a in answers] == ["bad_request"] * len(lines)
        assert handler.requests == []

    def test_nc_and_socat_can_talk_to_it(self, server: ControlServer) -> None:
        """Shell tools work, including a last line without its newline."""
        request = b'{"op":"status"}\n{"op":"echo","id":2}'
        for argv in (
            ["nc", "-N", "-U", str(server.path)],
            ["socat", "-", f"UNIX-CONNECT:{server.path}"],
        ):
            out = subprocess.run(argv, input=request, capture_output=True, timeout=WAIT).stdout
            answers = [json.loads(line) for line in out.splitlines()]
            assert [a.get("id") for a in answers] == [None, 2]


def _depth(value: object) -> int:
    """Nesting depth of a JSON value: a scalar is 0, ``[]`` is 1."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


# strings full of what the depth count must skip: brackets, quotes and backslashes
_tricky_text = st.text(alphabet='[]{}"\\ab', max_size=8)
_scalars = (
    st.none() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _tricky_text
)


@st.composite
def _nested(draw: st.DrawFn) -> object:
    """A value nested to a drawn depth around MAX_DEPTH, in lists and objects alike."""
    value: object = draw(st.lists(_scalars, max_size=3))
    for _ in range(draw(st.integers(min_value=0, max_value=MAX_DEPTH + 3))):
        siblings = draw(st.lists(_scalars, max_size=2))
        if draw(st.booleans()):
            value = [*siblings, value]
        else:
            value = {draw(_tricky_text): value, **{f"s{i}": v for i, v in enumerate(siblings)}}
    return value


class TestRequestCheck:
    """_parse refuses exactly the requests no handler should see and no answer could echo."""

    @settings(max_examples=400, deadline=None)
    @given(value=_nested(), ascii_only=st.booleans())
    def test_depth_is_counted_outside_strings(self, value: object, ascii_only: bool) -> None:
        """A request is refused for nesting exactly when it is deeper than MAX_DEPTH."""
        request = {"op": "status", "x": value}
        line = json.dumps(request, ensure_ascii=ascii_only).encode()
        _, _, problem = wire.parse_request(line)
        too_deep = _depth(request) > MAX_DEPTH
        assert (problem is not None and "nests deeper" in problem) == too_deep, problem

    @settings(max_examples=300, deadline=None)
    @given(text=st.text(st.characters(exclude_categories=[]), max_size=20))
    def test_lone_surrogates_and_only_they_are_refused(self, text: str) -> None:
        """Any Unicode string passes; one holding a lone surrogate is refused."""
        line = json.dumps({"op": "status", "s": text}).encode()
        _, _, problem = wire.parse_request(line)
        try:
            text.encode()
            valid = True
        except UnicodeEncodeError:
            valid = False
        assert (problem is None) == valid, problem

    @settings(max_examples=200, deadline=None)
    @given(
        value=_nested(),
        encoding=st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"]),
    )
    def test_only_utf8_is_read(self, value: object, encoding: str) -> None:
        """A request in UTF-16 or UTF-32 (which json.loads of bytes would take) is refused."""
        line = json.dumps({"op": "status", "x": value}, ensure_ascii=False).encode(encoding)
        request, echo, problem = wire.parse_request(line)
        assert problem is not None and "not UTF-8" in problem
        assert (request, echo) == (None, b"")

    def test_hostile_lines_parse_in_linear_time(self) -> None:
        """64 KiB lines built to make the string scan backtrack parse about as fast as a plain
        64 KiB string (a quadratic scan took seconds for 16 KiB)."""

        def parse_time(line: bytes) -> float:
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                wire.parse_request(line)
                best = min(best, time.perf_counter() - started)
            return best

        size = MAX_REQUEST_BYTES - 64
        baseline = parse_time(b'{"op":"status","x":"' + b"a" * size + b'"}')
        hostile = [
            # '"\\"\\...' as bytes: a quote and a backslash in every UTF-16 character
            ('{"op":"status","x":"' + "\u5c22" * (size // 2) + '"}').encode("utf-16-le"),
            ('{"op":"status","x":"' + "\u5c22" * (size // 3) + '"}').encode(),
            b'{"op":"status","x":"' + b'\\"' * (size // 4) + b'"}',
            b'{"op":"status","x":["' + b'\\",[' * (size // 5) + b'"]}',
        ]
        for line in hostile:
            assert parse_time(line) < max(50 * baseline, 0.05), line[:40]


class TestErrorCodes:
    def test_codes_follow_the_error_tree(self) -> None:
        """Each family of the error tree has its code; classes with their own keep it."""
        assert errors.EndpointUnavailableError("x").code == "endpoint_unavailable"
        assert errors.TransientError("x").code == "transient"
        assert errors.AlertError("x").code == "alert"
        assert errors.TokenFormatError("x").code == "bad_request"
        assert errors.ProfileError("x").code == "unknown_profile"
        assert errors.AacTokendError("x").code == "error"

    def test_nearest_class_wins(self) -> None:
        """A subclass without a code of its own takes its nearest ancestor's."""

        class OddInput(errors.ConfigError):
            pass

        assert OddInput("x").code == "config_error"
        assert errors.StorageError("disk full").code == "storage_error"
        assert errors.AlreadyRunningError(12).code == "bad_request"


class TestLimits:
    def test_ten_megabytes_without_newline(self, server: ControlServer) -> None:
        """A huge line is answered request_too_large and the connection is closed."""
        with connect(server.path) as sock:
            sender = send_quietly(sock, b"x" * (10 * 1024 * 1024))
            (answer,) = read_lines(sock, 1)
            assert answer["code"] == "request_too_large"
            assert at_eof(sock)
            sender.join(WAIT)

    def test_long_line_with_newline(self, server: ControlServer) -> None:
        """A line just over the limit is refused even when its newline arrives at once."""
        with connect(server.path) as sock:
            send_quietly(sock, b"y" * (MAX_REQUEST_BYTES + 1) + b"\n")
            (answer,) = read_lines(sock, 1)
            assert answer["code"] == "request_too_large"
            assert at_eof(sock)

    def test_line_at_the_limit_is_accepted(self, server: ControlServer) -> None:
        """A request of exactly MAX_REQUEST_BYTES is served."""
        head = b'{"op":"status","pad":"'
        line = head + b"p" * (MAX_REQUEST_BYTES - len(head) - 2) + b'"}'
        assert len(line) == MAX_REQUEST_BYTES
        with connect(server.path) as sock:
            sock.sendall(line + b"\n")
            (answer,) = read_lines(sock, 1)
        assert answer["ok"] is True

    def test_rate_limit(self, server: ControlServer, handler: FakeHandler) -> None:
        """A burst beyond 50 requests gets rate_limited answers, in order, handler not called."""
        with connect(server.path) as sock:
            started = time.monotonic()
            sock.sendall(b"".join(b'{"op":"status","id":%d}\n' % i for i in range(150)))
            answers = read_lines(sock, 150)
            elapsed = time.monotonic() - started
        limited = [a for a in answers if a.get("code") == "rate_limited"]
        served = [a for a in answers if a.get("ok")]
        assert len(limited) + len(served) == 150
        assert limited
        assert len(served) <= 50 + elapsed * 50 + 1
        assert len(handler.requests) == len(served)
        ids = [int(str(a["id"])) for a in served]
        assert ids == sorted(ids)

    def test_rate_limited_answers_echo_the_id(self, server: ControlServer) -> None:
        """A rate_limited answer carries its request's id, so a pipelining client can pair it."""
        with connect(server.path) as sock:
            sock.sendall(b"".join(b'{"op":"status","id":%d}\n' % i for i in range(150)))
            answers = read_lines(sock, 150)
        assert [a["id"] for a in answers] == list(range(150))
        assert any(a.get("code") == "rate_limited" for a in answers)

    def test_idle_connection_is_closed(self, make_server: Callable[..., ControlServer]) -> None:
        """A connection without a complete request for idle_timeout is closed."""
        srv = make_server(idle_timeout=0.5)
        with connect(srv.path) as sock:
            started = time.monotonic()
            sock.sendall(b'{"op":')  # never completed
            assert at_eof(sock)
            assert time.monotonic() - started >= 0.4
        assert wait_for(lambda: srv.connections == 0)

    def test_requests_keep_a_connection_alive(
        self, make_server: Callable[..., ControlServer]
    ) -> None:
        """Each complete request restarts the idle timer."""
        srv = make_server(idle_timeout=0.5)
        with ControlClient(str(srv.path)) as client:
            for _ in range(5):
                time.sleep(0.3)
                assert client.request("status")["ok"] is True

    def test_slow_request_outlasts_the_idle_timeout(
        self, make_server: Callable[..., ControlServer]
    ) -> None:
        """A request in flight longer than the idle timeout still gets its answer."""
        srv = make_server(idle_timeout=0.3)
        with ControlClient(str(srv.path)) as client:
            assert client.request("slow", seconds=1.0) == {"ok": True, "slept": True}

    def test_connection_limit_evicts_the_longest_idle(self, server: ControlServer) -> None:
        """With MAX_CONNECTIONS idle clients, a new one is served in place of the longest idle."""
        clients = [ControlClient(str(server.path)) for _ in range(MAX_CONNECTIONS)]
        try:
            for client in clients[1:]:
                assert client.request("status")["ok"] is True  # clients[0] idles longest
            time.sleep(control_server._EVICT_GRACE)  # clients[0], silent, is now evictable
            started = time.monotonic()
            with ControlClient(str(server.path)) as extra:
                assert extra.request("status")["ok"] is True
            assert time.monotonic() - started < 1.0
            assert server.evicted == 1
            assert server.rejected == 0
            with pytest.raises(ConnectionError):
                clients[0].request("status")
            assert clients[1].request("status")["ok"] is True
        finally:
            for client in clients:
                client.close()

    def test_newcomer_waits_while_slots_are_not_yet_read(self, server: ControlServer) -> None:
        """With every slot taken by connections not yet read, a newcomer waits in the listen
        queue (served once one is read, closed or past the grace) instead of being refused."""
        silent = [connect(server.path) for _ in range(MAX_CONNECTIONS)]
        try:
            with connect(server.path) as newcomer:
                newcomer.sendall(b'{"op":"status","id":1}\n')
                assert read_lines(newcomer, 1) == [{"ok": True, "profiles": ["default"], "id": 1}]
            assert server.rejected == 0
            assert server.evicted == 1
        finally:
            for sock in silent:
                sock.close()

    def test_connection_limit_with_every_slot_at_work(
        self, make_server: Callable[..., ControlServer]
    ) -> None:
        """When every connection has a request in flight, a new one is closed unanswered."""
        srv = make_server(workers=MAX_CONNECTIONS)
        busy = [connect(srv.path) for _ in range(MAX_CONNECTIONS)]
        try:
            for sock in busy:
                sock.sendall(b'{"op":"slow","seconds":1.5}\n')
            assert wait_for(lambda: srv.connections == MAX_CONNECTIONS)
            time.sleep(0.2)  # every request handed to the handler
            with connect(srv.path) as extra:
                assert extra.recv(100) == b""
            assert srv.rejected == 1
            assert srv.evicted == 0
            assert all(read_lines(sock, 1) == [{"ok": True, "slept": True}] for sock in busy)
        finally:
            for sock in busy:
                sock.close()

    def test_connect_flood_does_not_evict_a_client_not_yet_read(self, sockdir: Path) -> None:
        """Real clients inside a burst of connect-and-hang-up clients (more than the free
        slots) are neither evicted before their request is read nor refused: newcomers wait
        in the listen queue while unread connections hold the slots."""
        path = sockdir / "control.sock"
        code = (
            "import sys, time\n"
            "from pathlib import Path\n"
            "from aac_tokend.serve.control_server import ControlServer\n"
            "class H:\n"
            "    def handle(self, request):\n"
            "        return {'ok': True}\n"
            "ControlServer(Path(sys.argv[1]), H()).start()\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
        idle: list[ControlClient] = []
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            idle = [ControlClient(str(path)) for _ in range(MAX_CONNECTIONS - 1)]
            for client in idle:
                assert client.request("status")["ok"] is True
            proc.send_signal(signal.SIGSTOP)  # what follows reaches it as one accept burst
            for _ in range(2 * MAX_CONNECTIONS):
                connect(path).close()
            with connect(path) as real, connect(path) as late:
                real.sendall(b'{"op":"status","id":"real"}\n')
                late.sendall(b'{"op":"status","id":"late"}\n')
                for _ in range(2 * MAX_CONNECTIONS):
                    connect(path).close()
                proc.send_signal(signal.SIGCONT)
                assert read_lines(real, 1) == [{"ok": True, "id": "real"}]
                assert read_lines(late, 1) == [{"ok": True, "id": "late"}]
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(WAIT)
            for client in idle:
                client.close()

    def test_client_that_hangs_up_mid_request_is_dropped_at_once(
        self, server: ControlServer
    ) -> None:
        """Closing the socket while the handler works frees the connection before it answers."""
        with connect(server.path) as sock:
            sock.sendall(b'{"op":"slow","seconds":3}\n')
            assert wait_for(lambda: server.connections == 1)
            time.sleep(0.1)  # the request is with the handler
        started = time.monotonic()
        assert wait_for(lambda: server.connections == 0, timeout=2.0)
        assert time.monotonic() - started < 1.0

    def test_requests_of_clients_that_hung_up_are_not_run(
        self, make_server: Callable[..., ControlServer], handler: FakeHandler
    ) -> None:
        """Requests queued for a worker whose clients hung up are dropped, so a status
        waits only for the handler call already running, not for the abandoned ones."""
        srv = make_server(workers=1)
        with ControlClient(str(srv.path)) as first:
            runner = threading.Thread(target=first.request, args=("slow",), kwargs={"seconds": 1.0})
            runner.start()
            assert wait_for(lambda: len(handler.requests) == 1)
            for _ in range(5):
                with connect(srv.path) as quitter:
                    quitter.sendall(b'{"op":"slow","seconds":1.0}\n')
                    assert wait_for(lambda: srv.connections >= 2)
            started = time.monotonic()
            with ControlClient(str(srv.path)) as client:
                assert client.request("status")["ok"] is True
            assert time.monotonic() - started < 2.0
            runner.join(WAIT)
        assert [r["op"] for r in handler.requests] == ["slow", "status"]

    def test_half_closed_client_still_gets_its_answer(self, server: ControlServer) -> None:
        """Shutting down only the writing side (nc -N, socat) is not a hang-up."""
        with connect(server.path) as sock:
            sock.sendall(b'{"op":"slow","seconds":0.3}\n')
            sock.shutdown(socket.SHUT_WR)
            assert read_lines(sock, 1) == [{"ok": True, "slept": True}]

    def test_client_that_does_not_read_is_dropped(self, server: ControlServer) -> None:
        """A client flooding requests without reading answers is closed once they stall."""
        with connect(server.path) as sock:
            sender = send_quietly(sock, b"{}\n" * 600_000)
            assert wait_for(lambda: server.connections == 0)
            sender.join(WAIT)

    def test_non_readers_cannot_hold_every_slot(self, server: ControlServer) -> None:
        """MAX_CONNECTIONS clients that pipeline requests and never read their answers give
        way to a new client, and are closed once their output has stalled."""
        hostile = [connect(server.path) for _ in range(MAX_CONNECTIONS)]
        try:
            for sock in hostile:
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.send(b"{}\n" * 3000)
            assert wait_for(lambda: server.connections == MAX_CONNECTIONS)
            time.sleep(control_server._STALL_EVICTABLE + 0.2)

            def newcomer_served() -> bool:
                try:
                    with ControlClient(str(server.path), timeout=WAIT) as client:
                        return client.request("status")["ok"] is True
                except ConnectionError:
                    return False  # refused while every slot was still working; try again

            # Served within the stall bound (on a loaded machine the server may still be
            # answering the flood when the first newcomer knocks).
            assert wait_for(newcomer_served, timeout=control_server.OUTPUT_STALL_TIMEOUT)
            assert server.evicted >= 1
            assert wait_for(
                lambda: server.connections == 0, timeout=control_server.OUTPUT_STALL_TIMEOUT + 2
            )
        finally:
            for sock in hostile:
                sock.close()

    def test_a_slow_reader_gets_every_answer(
        self, make_server: Callable[..., ControlServer]
    ) -> None:
        """Pipelined answers past the output bound wait for the reader: none is lost."""
        server = make_server(rate_limit=1e9)  # the rate limit is not under test
        count = 2000  # ~150 KiB of answers, over MAX_OUTPUT_BYTES
        with connect(server.path) as sock:
            lines = b"".join(b'{"op":"echo","id":%d,"pad":"xxxxxxxxx"}\n' % i for i in range(count))
            sender = send_quietly(sock, lines)
            time.sleep(0.5)  # the server fills its output bound and stops reading
            ids = []
            data = b""
            while len(ids) < count:
                chunk = sock.recv(65536)
                assert chunk
                data += chunk
                *done, data = data.split(b"\n")
                ids += [json.loads(line)["id"] for line in done]
            sender.join(WAIT)
        assert ids == list(range(count))

    @pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid (setpriv)")
    @pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv from util-linux")
    def test_other_uid_is_closed_at_once(self, server: ControlServer, sockdir: Path) -> None:
        """A peer of another uid is disconnected unanswered even if file modes let it in."""
        sockdir.chmod(0o755)
        server.path.chmod(0o666)
        nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        out = subprocess.run(
            [*nobody, "nc", "-U", str(server.path)],
            input=b'{"op":"status"}\n',
            capture_output=True,
            timeout=WAIT,
        ).stdout
        assert out == b""
        assert server.rejected == 1


class TestIsolation:
    def test_stalled_and_flooding_clients_delay_nobody(
        self, sockdir: Path, server: ControlServer
    ) -> None:
        """A silent control client and a 10 MB flooder delay neither token reads nor status."""
        tokens = TokenServer(sockdir, TokenSource())
        token_path = str(tokens.add_profile("default"))
        tokens.start()
        silent = connect(server.path)
        flooder = connect(server.path)
        try:
            sender = send_quietly(flooder, b"z" * (10 * 1024 * 1024))
            started = time.monotonic()
            assert read_token(token_path) == "tok.en.value"
            assert time.monotonic() - started < 1.0
            started = time.monotonic()
            with ControlClient(str(server.path)) as client:
                assert client.request("status")["ok"] is True
            assert time.monotonic() - started < 1.0
            sender.join(WAIT)
        finally:
            silent.close()
            flooder.close()
            tokens.stop()

    def test_waiting_ops_never_hold_the_workers(
        self, make_server: Callable[..., ControlServer], handler: FakeHandler
    ) -> None:
        """More waiting requests than workers (a refresh each) all run at once, and a status
        is answered at once meanwhile, also after their clients hung up."""
        srv = make_server(workers=2, waiting_ops={"slow"})
        waiting = [connect(srv.path) for _ in range(6)]
        try:
            for sock in waiting:
                sock.sendall(b'{"op":"slow","seconds":3}\n')
            wait_for(lambda: len(handler.requests) == 6, timeout=1.0)
            for hang_up in (False, True):
                if hang_up:
                    for sock in waiting[:3]:
                        sock.close()
                    assert wait_for(lambda: srv.connections == 3, timeout=1.0)
                started = time.monotonic()
                with ControlClient(str(srv.path)) as client:
                    assert client.request("status")["ok"] is True
                    assert client.request("profiles")["ok"] is False  # unknown_op, answered
                assert time.monotonic() - started < 1.0
            assert len(handler.requests) == 6 + 4
            assert all(read_lines(sock, 1) == [{"ok": True, "slept": True}] for sock in waiting[3:])
            # the ones whose clients hung up still ran to their end (a refresh must)
            assert wait_for(lambda: len(handler.finished) == 6, timeout=2.0)
        finally:
            for sock in waiting:
                sock.close()

    def test_slow_handler_does_not_block_other_clients(self, server: ControlServer) -> None:
        """While one client's request sleeps 2 s, another client's status is answered."""
        with ControlClient(str(server.path)) as slow, ControlClient(str(server.path)) as fast:
            answers: list[dict[str, object]] = []
            waiter = threading.Thread(target=lambda: answers.append(slow.request("slow")))
            waiter.start()
            time.sleep(0.1)  # let the slow request reach the handler
            started = time.monotonic()
            assert fast.request("status")["ok"] is True
            assert time.monotonic() - started < 1.0
            assert answers == []  # the slow one is still running
            waiter.join(WAIT)
            assert answers == [{"ok": True, "slept": True}]


class TestLifecycle:
    def test_socket_is_0600_and_unlinked_on_stop(self, sockdir: Path, handler: FakeHandler) -> None:
        """The control socket is 0600 while serving and gone after stop()."""
        srv = ControlServer(sockdir / "control.sock", handler)
        srv.start()
        assert (srv.path.stat().st_mode & 0o777) == 0o600
        srv.stop()
        assert not srv.path.exists()

    def test_stop_does_not_wait_for_a_slow_handler(
        self, sockdir: Path, handler: FakeHandler
    ) -> None:
        """stop() closes connections at once even while a handler is still running."""
        srv = ControlServer(sockdir / "control.sock", handler)
        srv.start()
        with connect(srv.path) as sock:
            sock.sendall(b'{"op":"slow","seconds":2}\n')
            assert wait_for(lambda: len(handler.requests) == 1)
            started = time.monotonic()
            srv.stop()
            assert time.monotonic() - started < 1.0
            assert at_eof(sock)

    def test_answer_racing_with_stop_is_delivered(
        self, sockdir: Path, handler: FakeHandler
    ) -> None:
        """The answer to a request that stops the server still reaches its client."""
        srv = ControlServer(sockdir / "control.sock", handler)
        handler.on_shutdown = srv.stop
        srv.start()
        with ControlClient(str(srv.path)) as client:
            assert client.request("shutdown") == {"ok": True, "stopping": True}
        assert wait_for(lambda: not srv.path.exists())

    def test_inherited_listener_is_served_but_not_unlinked(
        self, sockdir: Path, handler: FakeHandler
    ) -> None:
        """A listener passed in (socket activation) is served; its file stays on stop."""
        path = sockdir / "control.sock"
        given = socket.socket(socket.AF_UNIX)
        given.bind(str(path))
        given.listen()
        srv = ControlServer(path, handler, listener=given)
        srv.start()
        try:
            with ControlClient(str(path)) as client:
                assert client.request("status")["ok"] is True
        finally:
            srv.stop()
        assert path.exists()

    def test_live_control_socket_is_not_stolen(
        self, server: ControlServer, handler: FakeHandler
    ) -> None:
        """A second server on the same path fails with AlreadyRunningError."""
        other = ControlServer(server.path, handler)
        with pytest.raises(errors.AlreadyRunningError):
            other.start()
        other.stop()
        with ControlClient(str(server.path)) as client:
            assert client.request("status")["ok"] is True
