"""The `aac-tokend` command line as a user meets it: help, status, profiles, remove, errors.

Every command runs as a real process (``python -m aac_tokend ...``) against a real daemon
and the in-process sandbox, with AAC_TOKEND_HOME in a short /tmp directory.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from aac_tokend.client import READ_TIMEOUT_SECONDS
from aac_tokend.commands.prompts import ask_refresh_lifetime
from aac_tokend.errors import InputError
from tests.helpers_e2e import (
    CliResult,
    E2EHome,
    RecordingSandbox,
    assert_one_line_error,
    import_pair,
    wait_until,
)

COMMANDS = [
    "run", "import", "token", "status", "refresh", "remove", "profiles", "reload", "stop",
    "sandbox", "demo", "service", "api", "exec", "completion", "key",
]  # fmt: skip
#: The fields `status --json` documents for every profile (README), and the timestamps.
STATUS_FIELDS = {
    "profile", "kind", "state", "token_valid", "access_expires_at", "next_refresh_at",
    "last_refresh_at", "refresh_expires_at", "refresh_count", "consecutive_failures",
    "last_error", "rejection", "alert", "token_socket",
}  # fmt: skip
TIME_FIELDS = ("access_expires_at", "next_refresh_at", "last_refresh_at", "refresh_expires_at")
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


class TestHelp:
    """Every command explains itself."""

    def test_top_level_help_lists_every_command(self, home: E2EHome) -> None:
        """`--help` exits 0 and names each command and the exit statuses."""
        result = home.cli("--help")
        assert result.returncode == 0, str(result)
        for command in COMMANDS:
            assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command
        assert "exit status" in result.stdout

    @pytest.mark.parametrize("command", COMMANDS)
    def test_command_help(self, home: E2EHome, command: str) -> None:
        """`COMMAND --help` exits 0 with its own usage line and nothing on stderr."""
        result = home.cli(command, "--help")
        assert result.returncode == 0, str(result)
        assert result.stdout.startswith(f"usage: aac-tokend {command}"), str(result)
        assert result.stderr == ""


class TestStatus:
    """`status --json` has the documented fields, with times in ISO 8601 UTC."""

    def check_rows(self, rows: list[dict[str, object]]) -> None:
        for row in rows:
            assert set(row) >= STATUS_FIELDS, sorted(STATUS_FIELDS - set(row))
            for name in TIME_FIELDS:
                value = row[name]
                assert value is None or ISO_UTC.fullmatch(str(value)), f"{name}: {value!r}"

    def test_status_json_with_and_without_the_daemon(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Running: every field set after a refresh. Stopped: the stored facts, no socket."""
        sandbox = sandboxes()
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        assert home.cli("refresh").returncode == 0
        result = home.cli("status", "--json")
        assert result.returncode == 0, str(result)
        answer = json.loads(result.stdout)
        assert answer["daemon_running"] is True
        (row,) = answer["profiles"]
        self.check_rows([row])
        assert row["profile"] == "default" and row["state"] == "ok"
        assert row["refresh_count"] == 1 and row["alert"] is None
        assert row["token_socket"] == str(home.socket())
        assert all(row[name] for name in TIME_FIELDS), row

        daemon.stop()
        offline = json.loads(home.cli("status", "--json").stdout)
        assert offline["daemon_running"] is False
        (row,) = offline["profiles"]
        self.check_rows([row])
        assert row["refresh_count"] == 1 and row["access_expires_at"] and row["last_refresh_at"]

    def test_plain_status_without_profiles(self, home: E2EHome) -> None:
        """No daemon, no profile: status says so and how to import, exit 0."""
        result = home.cli("status")
        assert result.returncode == 0, str(result)
        assert "not running" in result.stdout and "aac-tokend import" in result.stdout


class TestProfilesAndRemove:
    """`profiles` lists names; `remove` deletes one, with or without the daemon."""

    def test_profiles_and_remove_without_daemon(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Offline: names sorted; remove deletes the state file; unknown names exit 65."""
        sandbox = sandboxes()
        for name in ("work", "default"):
            import_pair(home, sandbox, profile=name)
        assert home.cli("profiles").stdout == "default\nwork\n"
        result = home.cli("remove", "--yes", "work")
        assert result.returncode == 0, str(result)
        assert not home.state_file("work").exists() and home.state_file("default").exists()
        assert home.cli("profiles").stdout == "default\n"
        assert_one_line_error(home.cli("remove", "--yes", "work"), 65)

    def test_profiles_and_remove_with_daemon(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Running: remove stops serving at once and deletes the state; others stay served."""
        sandbox = sandboxes()
        for name in ("work", "default"):
            import_pair(home, sandbox, profile=name)
        daemon = home.daemon().start(profiles=["default", "work"])
        assert home.cli("profiles").stdout == "default\nwork\n"
        result = home.cli("remove", "--yes", "work")
        assert result.returncode == 0, str(result)
        assert not home.socket("work").exists()
        assert not home.state_file("work").exists()
        assert home.cli("profiles").stdout == "default\n"
        assert [r["profile"] for r in daemon.status()["profiles"]] == ["default"]
        assert daemon.token() and daemon.token("work") == ""
        assert_one_line_error(home.cli("remove", "--yes", "work"), 65)
        assert_one_line_error(home.cli("token", "-p", "work"), 65)


class TestNeedsDaemon:
    """Commands that need the daemon say so in one line and exit 4."""

    @pytest.mark.parametrize("command", [["refresh"], ["reload"], ["stop"]])
    def test_without_daemon(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox], command: list[str]
    ) -> None:
        """Without a daemon: exit 4, one line naming `aac-tokend run`, nothing sent."""
        sandbox = sandboxes()
        import_pair(home, sandbox)
        message = assert_one_line_error(home.cli(*command), 4)
        assert "aac-tokend run" in message
        assert sandbox.log() == []

    def test_stop_returns_once_the_daemon_is_gone(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """`stop` returns after the daemon exited, even mid-refresh: `stop && run` works."""
        sandbox = sandboxes(answer_delay=3.0)
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        first = daemon.pid
        asker = threading.Thread(target=lambda: home.cli("refresh"), daemon=True)
        asker.start()  # a refresh in flight: its courier outlives the daemon
        wait_until(lambda: sandbox.log(), 10, "the refresh request")
        assert home.cli("stop").returncode == 0
        assert daemon.proc is not None and daemon.proc.poll() == 0, "stop returned too early"
        assert not home.paths.control_socket.exists()
        assert_one_line_error(home.cli("refresh"), 4)
        daemon.start(profiles=["default"])  # a script's `aac-tokend stop && aac-tokend run`
        assert daemon.pid != first and daemon.profile_status()["refresh_count"] == 1


def _import_at_a_terminal(home: E2EHome, endpoint: str, pair: dict[str, object], days: str) -> str:
    """Run `import` on a pseudo-terminal, answering its prompts; its whole output."""
    return _at_a_terminal(
        home,
        ["import", "--profile", "work", "--token-endpoint", endpoint],
        [
            ("Access token", str(pair["access_token"])),
            ("Refresh token", str(pair["refresh_token"])),
            ("lifetime in days", days),
        ],
    )


class TestHungDaemon:
    """A control socket that takes connections but never answers (a hung daemon)."""

    @pytest.mark.parametrize("args", [("status", "--check"), ("profiles",), ("token",)])
    def test_read_only_commands_give_up_soon(self, home: E2EHome, args: tuple[str, ...]) -> None:
        """`status --check`, `profiles` and `token` exit 75 within seconds, with one line."""
        path = home.paths.control_socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
            hung.bind(str(path))
            hung.listen(8)  # connections queue in the backlog; nobody accepts or answers
            started = time.monotonic()
            result = home.cli(*args, timeout=60.0)
            took = time.monotonic() - started
        line = assert_one_line_error(result, 75)
        assert "did not answer" in line and took < READ_TIMEOUT_SECONDS + 10, (took, line)

    @pytest.mark.parametrize("args", [("exec", "--", "true"), ("api", "GET", "/x")])
    def test_exec_and_api_exit_as_token_does(self, home: E2EHome, args: tuple[str, ...]) -> None:
        """`exec` and `api` ask through the same client as `token`: 75 and one line, not a
        traceback."""
        path = home.paths.control_socket
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
            hung.bind(str(path))
            hung.listen(8)
            result = home.cli(*args, timeout=60.0)
        line = assert_one_line_error(result, 75)
        assert "did not answer" in line, line


class TestImportAsksForTheLifetime:
    """At a terminal, import asks for the refresh lifetime when it is not given."""

    def test_asks_and_counts_from_the_pairs_birth(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Two pasted lines and '30' at the prompt: the refresh end is iat + 30 days."""
        sandbox = sandboxes()
        pair = sandbox.generate()
        output = _import_at_a_terminal(home, sandbox.token_endpoint, pair, "30")
        assert "imported profile work" in output
        row = json.loads(home.cli("status", "--json").stdout)["profiles"][0]
        iat = json.loads(base64.urlsafe_b64decode(str(pair["access_token"]).split(".")[1] + "=="))[
            "iat"
        ]
        assert row["refresh_expires_at"] == datetime.fromtimestamp(iat + 30 * 86400, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )

    def test_enter_means_unknown(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Enter at the prompt imports with the lifetime unknown."""
        sandbox = sandboxes()
        output = _import_at_a_terminal(home, sandbox.token_endpoint, sandbox.generate(), "")
        assert "imported profile work" in output
        row = json.loads(home.cli("status", "--json").stdout)["profiles"][0]
        assert row["refresh_expires_at"] is None


class TestAskRefreshLifetime:
    """The lifetime prompt's answer: a number of days, or nothing for unknown."""

    @pytest.mark.parametrize(("answer", "days"), [("30", 30.0), (" 1.5 ", 1.5), ("", None)])
    def test_answers(self, answer: str, days: float | None) -> None:
        """A number is days; Enter (empty) is unknown."""
        assert ask_refresh_lifetime(lambda _prompt: answer) == days

    @pytest.mark.parametrize("answer", ["thirty", "-7", "0", "nan", "inf", "eyJhbGciOiJI.x.y"])
    def test_bad_answer_is_one_line_without_echo(self, answer: str) -> None:
        """Anything else is a one-line error that says what to do and does not echo it."""
        with pytest.raises(InputError) as caught:
            ask_refresh_lifetime(lambda _prompt: answer)
        message = str(caught.value)
        assert "\n" not in message and "press Enter" in message
        assert answer not in message


def _raw_import(home: E2EHome, stdin: bytes | None, *args: str) -> CliResult:
    """``import ARGS`` with raw bytes on stdin, or with stdin closed when ``stdin`` is None."""
    argv = home.command("import", *args)
    closed = stdin is None
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, timeout=60, env=home.env, cwd=home.root,
        # a closed stdin, as `aac-tokend import <&-` leaves it: the child's fd 0 is shut
        preexec_fn=(lambda: os.close(0)) if closed else None,
        stdin=subprocess.DEVNULL if closed else None,
    )  # fmt: skip
    return CliResult(("import", *args), proc.returncode, proc.stdout.decode(),
                     proc.stderr.decode(errors="replace"))  # fmt: skip


class TestBadInputGetsOneLine:
    """Bad input to the command line: one line saying what was wrong, the documented exit."""

    def test_stdin_closed(self, home: E2EHome) -> None:
        """`import <&-`: exit 65 and a line saying stdin is closed, not a traceback."""
        message = assert_one_line_error(_raw_import(home, None), 65)
        assert "standard input is closed" in message

    def test_a_non_utf8_byte_under_a_utf8_locale(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """A stray Latin-1 byte in the refresh token: exit 65 naming the token's problem."""
        access = str(sandboxes().generate()["access_token"]).encode()
        home.env["PYTHONIOENCODING"] = "utf-8"  # strict decoding, as under LANG=en_US.UTF-8
        result = _raw_import(home, access + b"\nr\xe9fresh\n", "--refresh-lifetime-days", "30")
        message = assert_one_line_error(result, 65)
        assert "refresh token" in message and "non-ASCII" in message

    def test_expires_without_legacy_is_a_usage_error(self, home: E2EHome) -> None:
        """--expires only means something with --legacy: exit 2 saying so, nothing read."""
        message = assert_one_line_error(home.cli("import", "--expires", "2030-01-01"), 2)
        assert "--legacy" in message
        assert not home.paths.state_dir.exists() or not any(home.paths.state_dir.iterdir())

    def test_explicit_profile_is_checked_as_itself(self, home: E2EHome) -> None:
        """--profile given: a bad AAC_TOKEND_PROFILE is not blamed (nor even read)."""
        env = dict(home.env, AAC_TOKEND_PROFILE="a b")
        message = assert_one_line_error(home.cli("token", env=env), 65)
        assert "AAC_TOKEND_PROFILE" in message  # used: named
        message = assert_one_line_error(home.cli("token", "--profile", "a b", env=env), 65)
        assert "AAC_TOKEND_PROFILE" not in message and "'a b'" in message

    def test_home_naming_a_regular_file(self, home: E2EHome) -> None:
        """AAC_TOKEND_HOME pointing at a file: exit 65, one line naming the variable."""
        path = home.root / "not-a-dir"
        path.write_text("")
        env = dict(home.env, AAC_TOKEND_HOME=str(path))
        for command in (["status"], ["profiles"]):
            message = assert_one_line_error(home.cli(*command, env=env), 65)
            assert "AAC_TOKEND_HOME" in message and "not a directory" in message

    def test_state_key_missing_beside_state_files(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Key moved away, state kept: exit 69 saying to restore the key; no new key made."""
        import_pair(home, sandboxes())
        key = home.paths.key_file
        key.rename(home.root / "state.key.moved")
        for command in (["token"], ["profiles"]):
            message = assert_one_line_error(home.cli(*command), 69)
            assert "state key" in message and "restore state.key" in message
        check = home.cli("status", "--check")  # a script's check: a problem line, not a crash
        assert check.returncode == 69, str(check)
        assert check.stderr.startswith("aac-tokend: check: ") and check.stderr.count("\n") == 1
        assert "restore state.key" in check.stderr
        assert not key.exists()


def _at_a_terminal(home: E2EHome, args: list[str], exchange: list[tuple[str, str]]) -> str:
    """Run a command on a pseudo-terminal, answering each (prompt, answer); its whole output."""
    argv = home.command(*args)
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes the command
        os.execve(argv[0], argv, home.env)  # noqa: S606 - argv from the test, no shell
    seen = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if exchange and exchange[0][0].encode() in seen:
            os.write(fd, exchange.pop(0)[1].encode() + b"\n")
        if not select.select([fd], [], [], 0.5)[0]:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(fd)
    os.waitpid(pid, 0)
    return seen.decode(errors="replace")


class TestLegacyOverAChainAtATerminal:
    """At a terminal, a --legacy import over a live chain asks before deleting the chain."""

    @pytest.mark.parametrize(("answer", "kind"), [("y", "legacy"), ("n", "oauth")])
    def test_asks_and_obeys(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox], answer: str, kind: str
    ) -> None:
        """'y' replaces the chain with the static token; anything else keeps the chain."""
        import_pair(home, sandboxes(), profile="work")
        output = _at_a_terminal(
            home, ["import", "--legacy", "-p", "work"],
            [("Access token", "dc-legacy-static-token-0123456789"), ("[y/N]", answer)],
        )  # fmt: skip
        assert "live OAuth chain" in output
        assert ("imported profile work" in output) is (answer == "y"), output
        row = json.loads(home.cli("status", "--json").stdout)["profiles"][0]
        assert row["kind"] == kind
