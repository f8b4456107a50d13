"""The command line's contract at its edges: bad names, bad answers, slow or vanishing daemons.

Each class answers one finding of an outside review. The daemons here are small honest
classes listening on real Unix sockets, and the commands run as real processes. Over 300
lines: one class per finding, all sharing FakeDaemon and its behaviours; split by finding
if it grows further.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aac_tokend import cli as cli_module
from aac_tokend.api import get_token, run_cli
from aac_tokend.cli import EXIT_BROKEN_PIPE
from aac_tokend.client import READ_TIMEOUT_SECONDS, ask_daemon, read_token
from aac_tokend.core.report import StatusRow, check_rows, report_row
from aac_tokend.core.state import Rejection, RejectionReason, TokenKind, validate_profile_name
from aac_tokend.errors import (
    AacTokendError,
    EndpointUnavailableError,
    InputError,
    ProfileError,
    RateLimitedError,
    RequestTooLargeError,
    TransientError,
    from_wire,
)
from aac_tokend.host.paths import resolve_paths
from aac_tokend.rundir import is_profile_name, token_socket_name
from aac_tokend.store.opening import open_file_store
from aac_tokend.testing import oauth_state
from tests.helpers_e2e import E2EHome, assert_one_line_error, e2e_home
from tests.unix_server import FakeDaemon

#: Generous: only a stalled machine gets near it.
WAIT = 10.0

FOREIGN = b"FOREIGN-TOKEN-NOT-FROM-THE-DAEMON"


@pytest.fixture
def home() -> Iterator[E2EHome]:
    with e2e_home() as instance:
        yield instance


@pytest.fixture
def fakes() -> Iterator[Callable[[Path, Callable[[socket.socket], None]], FakeDaemon]]:
    """A factory of FakeDaemons, all closed afterwards."""
    started: list[FakeDaemon] = []

    def start(path: Path, behaviour: Callable[[socket.socket], None]) -> FakeDaemon:
        started.append(FakeDaemon(path, behaviour))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


def plant_foreign_socket(home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
    """A socket at <home>/evil.token.sock, outside the runtime dir: where '../evil' leads."""
    (home.home / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
    fakes(home.home / "evil.token.sock", lambda conn: conn.sendall(FOREIGN + b"\n"))


class TestProfileNameIsNotAPath:
    """A name no profile can have is refused (65) everywhere, never followed as a path."""

    @given(st.text(alphabet="ab.-_/ (\u00e9Z9", max_size=70))
    def test_fast_rule_is_the_state_rule(self, name: str) -> None:
        """rundir's re-free check accepts exactly the names validate_profile_name accepts."""
        try:
            validate_profile_name(name)
            valid = True
        except ProfileError:
            valid = False
        assert is_profile_name(name) == valid

    @pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x.lock", "a" * 65])
    def test_token_socket_path_refuses_non_names(self, name: str) -> None:
        """The one place a token socket path is built refuses a name no profile can have."""
        with pytest.raises(ProfileError):
            token_socket_name(name)
        with pytest.raises(ProfileError):
            resolve_paths({"AAC_TOKEND_HOME": "/tmp/x"}).token_socket(name)

    def test_exec_refuses_a_path_as_profile(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """`exec -p ../evil` exits 65 and runs nothing with a planted socket's token."""
        plant_foreign_socket(home, fakes)
        result = home.cli("exec", "-p", "../evil", "--", "sh", "-c", 'echo "$AAC_ACCESS_TOKEN"')
        assert_one_line_error(result, 65)
        assert FOREIGN.decode() not in result.stdout

    def test_api_refuses_a_path_as_profile(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """`api --base-url URL -p ../evil` exits 65 before any token is read."""
        plant_foreign_socket(home, fakes)
        result = home.cli("api", "GET", "/x", "--base-url", "http://127.0.0.1:9", "-p", "../evil")
        assert_one_line_error(result, 65)

    def test_get_token_refuses_env_path(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """get_token() with AAC_TOKEND_PROFILE=../evil raises ProfileError naming the variable."""
        plant_foreign_socket(home, fakes)
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        monkeypatch.setenv("AAC_TOKEND_PROFILE", "../evil")
        with pytest.raises(ProfileError, match="AAC_TOKEND_PROFILE") as info:
            get_token()
        assert info.value.exit_code == 65

    def test_get_token_refuses_argument_path(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """get_token("../evil") raises ProfileError rather than read the planted socket."""
        plant_foreign_socket(home, fakes)
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        with pytest.raises(ProfileError):
            get_token("../evil")

    def test_token_env_path_is_named(self, home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
        """`token` with AAC_TOKEND_PROFILE=../evil exits 65 naming the variable."""
        plant_foreign_socket(home, fakes)
        result = home.cli("token", env=dict(home.env, AAC_TOKEND_PROFILE="../evil"))
        assert "AAC_TOKEND_PROFILE" in assert_one_line_error(result, 65)


def answer_with(reply: bytes) -> Callable[[socket.socket], None]:
    """A behaviour reading one request line and answering ``reply``."""

    def behaviour(conn: socket.socket) -> None:
        conn.makefile("rb").readline()
        conn.sendall(reply)

    return behaviour


def trickle(conn: socket.socket) -> None:
    """A swamped or hostile peer: one byte every 0.2 s, never a whole line."""
    for _ in range(200):
        conn.sendall(b" ")
        time.sleep(0.2)


def hold(conn: socket.socket) -> None:
    """A hung daemon: takes the connection, never answers, until the client gives up."""
    while conn.recv(1024):
        pass


def hang_up(conn: socket.socket) -> None:
    """A daemon stopping: reads the request and closes without an answer."""
    conn.recv(1024)


class TestWrongShapedAnswers:
    """Valid JSON of the wrong shape is one line and exit 1, never a traceback."""

    @pytest.mark.parametrize(
        "command",
        [("token",), ("status", "--check"), ("profiles",), ("refresh",), ("exec", "--", "true")],
    )
    def test_ok_alone_is_one_line(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], command: tuple[str, ...]
    ) -> None:
        """An answer of {"ok": true} alone names what it lacks and says to restart the daemon."""
        fakes(home.home / "run" / "control.sock", answer_with(b'{"ok":true}\n'))
        line = assert_one_line_error(home.cli(*command), 1)
        assert "lacks" in line and "restart it" in line

    def test_remove_unconfirmed_is_not_removed(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """`remove` does not say "removed" when the answer does not say so."""
        fakes(home.home / "run" / "control.sock", answer_with(b'{"ok":true}\n'))
        result = home.cli("remove", "--yes", "never-existed")
        assert_one_line_error(result, 1)
        assert result.stdout == ""

    def test_token_of_wrong_type(self, home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
        """A token that is a number is one line, not a TypeError."""
        fakes(home.home / "run" / "control.sock", answer_with(b'{"ok":true,"token":123}\n'))
        assert_one_line_error(home.cli("token"), 1)

    def test_deep_nesting(self, home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
        """An answer nested 100,000 deep is one line, not a RecursionError."""
        fakes(home.home / "run" / "control.sock", answer_with(b"[" * 100_000 + b"\n"))
        assert_one_line_error(home.cli("status", "--check"), 1)

    def test_get_token_raises_the_house_error(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """get_token() against {"ok": true} raises AacTokendError, not KeyError."""
        fakes(home.home / "run" / "control.sock", answer_with(b'{"ok":true}\n'))
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        monkeypatch.delenv("AAC_TOKEND_PROFILE", raising=False)
        with pytest.raises(AacTokendError, match="lacks 'token'") as info:
            get_token()
        assert info.value.exit_code == 1


class TestOneDeadline:
    """A request has one deadline for connect, send and every read: a trickle cannot stretch it."""

    def test_trickling_control_socket(
        self, sockdir: Path, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """ask_daemon against a peer sending a byte at a time ends at its deadline (75)."""
        fake = fakes(sockdir / "control.sock", trickle)
        started = time.monotonic()
        with pytest.raises(TransientError, match="did not answer"):
            ask_daemon(str(fake.path), "status", deadline=time.monotonic() + 1.0)
        assert time.monotonic() - started < 3.0

    def test_trickling_token_socket(self, sockdir: Path, fakes: Callable[..., FakeDaemon]) -> None:
        """read_token against a peer sending a byte at a time ends at its timeout."""
        fake = fakes(sockdir / "default.token.sock", trickle)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            read_token(str(fake.path), timeout=1.0)
        assert time.monotonic() - started < 3.0

    def test_status_check_against_a_trickle(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """`status --check` against a trickling daemon exits 75 within the read timeout."""
        fakes(home.home / "run" / "control.sock", trickle)
        started = time.monotonic()
        assert_one_line_error(home.cli("status", "--check"), 75)
        assert time.monotonic() - started < READ_TIMEOUT_SECONDS + 3

    def test_get_token_one_budget(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """get_token() against a hung daemon (both sockets) spends one budget, not 2 s + 5 s."""
        fakes(home.home / "run" / "default.token.sock", hold)
        fakes(home.home / "run" / "control.sock", hold)
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        monkeypatch.delenv("AAC_TOKEND_PROFILE", raising=False)
        started = time.monotonic()
        with pytest.raises(TransientError):
            get_token()
        assert time.monotonic() - started < READ_TIMEOUT_SECONDS + 1

    @pytest.mark.parametrize("command", ["token", "reload", "stop"])
    def test_hung_daemon_is_short(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], command: str
    ) -> None:
        """`token` (both sockets hung), `reload` and `stop` give up after the read timeout (75)."""
        fakes(home.home / "run" / "default.token.sock", hold)
        fakes(home.home / "run" / "control.sock", hold)
        started = time.monotonic()
        assert_one_line_error(home.cli(command), 75)
        assert time.monotonic() - started < READ_TIMEOUT_SECONDS + 2


class TestHangUp:
    """A daemon hanging up before it answers (stopping, restarting) is 75: try again."""

    def test_ask_daemon(self, sockdir: Path, fakes: Callable[..., FakeDaemon]) -> None:
        """ask_daemon raises TransientError saying the daemon hung up."""
        fake = fakes(sockdir / "control.sock", hang_up)
        with pytest.raises(TransientError, match="hung up") as info:
            ask_daemon(str(fake.path), "status")
        assert info.value.exit_code == 75

    @pytest.mark.parametrize("command", [("token",), ("status", "--check"), ("profiles",)])
    def test_commands(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], command: tuple[str, ...]
    ) -> None:
        """The commands exit 75 with one line."""
        fakes(home.home / "run" / "control.sock", hang_up)
        assert "hung up" in assert_one_line_error(home.cli(*command), 75)


def shell(home: E2EHome, line: str) -> subprocess.CompletedProcess[str]:
    """Run ``line`` in sh with AAC as the `python -m aac_tokend` command."""
    env = dict(home.env, AAC=f"{sys.executable} -m aac_tokend")
    return subprocess.run(
        ["sh", "-c", line], env=env, capture_output=True, text=True, timeout=60, cwd=home.root
    )


class TestOutputGuard:
    """A stdout that cannot take the output is one line and exit 1; a closed pipe is quiet."""

    @pytest.mark.parametrize(
        ("line", "words"),
        [("$AAC token >&-", "closed"), ("$AAC token --header >/dev/full", "No space")],
    )
    def test_fast_path(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], line: str, words: str
    ) -> None:
        """The token fast path with stdout closed or full: one line, exit 1."""
        fakes(home.home / "run" / "default.token.sock", lambda conn: conn.sendall(b"a.b.c\n"))
        result = shell(home, line)
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1 and words in result.stderr, result

    def test_status_json_to_full(self, home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
        """`status --json >/dev/full` is one line, exit 1."""
        fakes(home.home / "run" / "control.sock", answer_with(b'{"ok":true,"profiles":[]}\n'))
        result = shell(home, "$AAC status --json >/dev/full")
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result

    def test_closed_pipe_is_quiet(self, home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
        """A pipe whose reader is gone: nothing on stderr, the status of a SIGPIPE death."""
        fakes(home.home / "run" / "default.token.sock", lambda conn: conn.sendall(b"a.b.c\n"))
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run(
                home.command("token"), stdout=write_end, stderr=subprocess.PIPE,
                env=home.env, timeout=60, text=True,
            )  # fmt: skip
        finally:
            os.close(write_end)
        assert (proc.returncode, proc.stderr) == (EXIT_BROKEN_PIPE, "")


class TestCtrlC:
    """Ctrl-C is a quiet 130 wherever `token` is waiting."""

    def test_in_the_fast_path(self, home: E2EHome, fakes: Callable[..., FakeDaemon]) -> None:
        """SIGINT while the fast path waits on a hung token socket: 130, nothing on stderr."""
        fakes(home.home / "run" / "default.token.sock", hold)
        fakes(home.home / "run" / "control.sock", hold)
        proc = subprocess.Popen(
            home.command("token"), env=home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)
        assert (proc.returncode, err) == (130, b"")


class TestForeignTokenSocket:
    """A token socket answering a non-ASCII line is not the daemon's: the control socket decides."""

    def test_read_token_refuses_it(self, sockdir: Path, fakes: Callable[..., FakeDaemon]) -> None:
        """read_token raises ConnectionError (an OSError), not UnicodeDecodeError."""
        fake = fakes(sockdir / "default.token.sock", lambda conn: conn.sendall(b"\xc3\xa9t\xff\n"))
        with pytest.raises(ConnectionError, match="malformed"):
            read_token(str(fake.path))

    def test_token_and_get_token_go_the_long_way(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`token` and get_token() take the control socket's token instead."""
        bad = b"\xc3\xa9t\xff\n"
        fakes(home.home / "run" / "default.token.sock", lambda conn: conn.sendall(bad))
        answer = b'{"ok":true,"profile":"default","token":"c.d.e"}\n'
        fakes(home.home / "run" / "control.sock", answer_with(answer))
        result = home.cli("token")
        assert (result.returncode, result.stdout, result.stderr) == (0, "c.d.e\n", "")
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        monkeypatch.delenv("AAC_TOKEND_PROFILE", raising=False)
        assert get_token() == "c.d.e"


class TestHomeVariable:
    """A bad AAC_TOKEND_HOME is one line naming the variable (65), for every reader."""

    def test_unknown_user_in_tilde(self, home: E2EHome, monkeypatch: pytest.MonkeyPatch) -> None:
        """~nosuchuser/x: `status`, `token` and get_token() name the variable; no RuntimeError."""
        env = dict(home.env, AAC_TOKEND_HOME="~nosuchuser-atk/x")
        for command in ("status", "token"):
            line = assert_one_line_error(home.cli(command, env=env), 65)
            assert "AAC_TOKEND_HOME" in line
        monkeypatch.setenv("AAC_TOKEND_HOME", "~nosuchuser-atk/x")
        with pytest.raises(InputError, match="AAC_TOKEND_HOME"):
            get_token()

    def test_control_socket_too_long(self, home: E2EHome) -> None:
        """A control socket path over the Unix limit: `run`'s words and status (65), not 1."""
        long_home = home.root / ("h" * 110)
        env = dict(home.env, AAC_TOKEND_HOME=str(long_home))
        for command in ("status", "token", "profiles"):
            line = assert_one_line_error(home.cli(command, env=env), 65)
            assert "set AAC_TOKEND_HOME to a shorter directory" in line


def _row(name: str, state: str = "ok", **fields: Any) -> StatusRow:
    return report_row(**{"profile": name, "state": state, "token_valid": True, **fields})


class TestCheckSaysEverything:
    """`status --check` names every profile that is not fine; the worst group sets the status."""

    def test_wait_and_person_and_no_daemon(self) -> None:
        """A 69 does not hide the 75 profiles nor the "daemon not running" line."""
        rows = [
            _row("a", "rejected", alert="generate a new token"),
            _row("b", "retrying", token_valid=False),
            _row("c"),
        ]
        status, lines = check_rows(rows, daemon_running=False)
        assert status == 69
        assert [line.split(":")[0] for line in lines] == [
            "a",
            "the daemon is not running; nothing is refreshing",
            "b",
        ]

    def test_wait_and_no_daemon(self) -> None:
        """No daemon (4) still lists the profiles without a valid token."""
        status, lines = check_rows([_row("b", "retrying", token_valid=False)], daemon_running=False)
        assert status == 4 and len(lines) == 2 and lines[1].startswith("b: ")


class TestOfflineToken:
    """`token` without a daemon follows the daemon's rule: a person (69) or the daemon (4)."""

    def test_expired_access_of_a_healthy_chain(self, home: E2EHome) -> None:
        """A sound chain whose access token expired only needs the daemon: 4, saying to start it."""
        plant_state(home, rejected=False)
        line = assert_one_line_error(home.cli("token"), 4)
        assert "aac-tokend run" in line

    def test_rejected_chain_needs_a_person(self, home: E2EHome) -> None:
        """A rejected chain is an alert (69), not advice to start the daemon."""
        plant_state(home, rejected=True)
        line = assert_one_line_error(home.cli("token"), 69)
        assert "aac-tokend run" not in line and "rejected" in line


def plant_state(home: E2EHome, *, rejected: bool) -> None:
    """Store profile 'default' (no daemon) whose access token expired an hour ago."""
    now = time.time()
    state = oauth_state(
        profile="default", access_obtained_at=now - 7200, access_expires_at=now - 3600,
        imported_at=now - 7200, pair_issued_at=now - 7200,
    )  # fmt: skip
    if rejected:
        why = Rejection(RejectionReason.REUSE_SUSPECTED, "invalid_grant", None, now - 60)
        state = dataclasses.replace(state, rejection=why)
    open_file_store(resolve_paths(home.env)).save(state)


class TestWireCodes:
    """The control server's own refusals come back as classes with their exit statuses."""

    @pytest.mark.parametrize(
        ("code", "cls", "status"),
        [("rate_limited", RateLimitedError, 75), ("request_too_large", RequestTooLargeError, 65)],
    )
    def test_from_wire(self, code: str, cls: type[AacTokendError], status: int) -> None:
        """rate_limited is a retry (75), request_too_large bad input (65), not a plain 1."""
        error = from_wire(code, "why")
        assert type(error) is cls and error.exit_code == status and str(error) == "why"


class _NotFound(http.server.BaseHTTPRequestHandler):
    """Answers 404 with an empty JSON object to every GET."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class TestApiPathQuoted:
    """`api`'s failure lines quote PATH, so a newline in it cannot split them."""

    def test_http_failure(
        self,
        home: E2EHome,
        fakes: Callable[..., FakeDaemon],
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A 404 for PATH "/x<newline>y" is one line on stderr."""
        fakes(home.home / "run" / "default.token.sock", lambda conn: conn.sendall(b"a.b.c\n"))
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            args = argparse.Namespace(
                method="GET", path="/x%0Ay\ny", data=None, profile="default",
                base_url=f"http://127.0.0.1:{server.server_address[1]}",
            )  # fmt: skip
            status = run_cli(args)  # requests sends the newline percent-encoded
        finally:
            server.shutdown()
            server.server_close()
            thread.join(WAIT)
        err = capsys.readouterr().err
        assert status == 1 and err.count("\n") == 1 and "'/x%0Ay\\ny'" in err

    def test_network_failure(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A failed connection for PATH "/x<newline>y" is a one-line error."""
        fakes(home.home / "run" / "default.token.sock", lambda conn: conn.sendall(b"a.b.c\n"))
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        args = argparse.Namespace(
            method="GET", path="/x\ny", data=None, profile="default", base_url="http://127.0.0.1:9"
        )
        with pytest.raises(EndpointUnavailableError) as info:
            run_cli(args)
        assert "\n" not in str(info.value) and "'/x\\ny'" in str(info.value)


class TestOneBudgetConstant:
    """cli's own copy of the read timeout (argparse's commands do not import client)."""

    def test_cli_budget_is_the_clients(self) -> None:
        """cli's `token` budget is client.READ_TIMEOUT_SECONDS."""
        assert cli_module._READ_TIMEOUT_SECONDS == READ_TIMEOUT_SECONDS


class TestMinorEdges:
    """exec's statuses are a shell's; refresh of a legacy token; remove of a misnamed file."""

    def test_exec_without_command_is_usage(self, home: E2EHome) -> None:
        """`exec` with no command is a usage error (2)."""
        assert_one_line_error(home.cli("exec", "--"), 2)

    def test_exec_of_a_missing_command_is_127(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """`exec -- /nonexistent` exits 127, as a shell does, with one line."""
        fakes(home.home / "run" / "default.token.sock", lambda conn: conn.sendall(b"a.b.c\n"))
        assert_one_line_error(home.cli("exec", "--", "/nonexistent/cmd"), 127)

    def test_refresh_of_a_token_without_expiry(
        self, home: E2EHome, fakes: Callable[..., FakeDaemon]
    ) -> None:
        """A valid token with no known expiry is not "valid until None"."""
        row = report_row(profile="default", state="ok", kind=TokenKind.LEGACY, token_valid=True)
        answer = json.dumps({"ok": True, "profile": row.to_wire()}).encode() + b"\n"
        fakes(home.home / "run" / "control.sock", answer_with(answer))
        result = home.cli("refresh")
        assert result.returncode == 0, result
        assert "None" not in result.stdout and "no expiry known" in result.stdout

    def test_remove_of_a_misnamed_file(self, home: E2EHome) -> None:
        """`remove 'work (copy)'` of a sync tool's copy: move it aside (69); nothing deleted."""
        paths = resolve_paths(home.env)
        open_file_store(paths).save(oauth_state(profile="work"))
        copy = paths.state_dir / "work (copy).state"
        copy.write_bytes((paths.state_dir / "work.state").read_bytes())
        line = assert_one_line_error(home.cli("remove", "--yes", "work (copy)"), 69)
        assert "move one aside" in line and copy.exists()
