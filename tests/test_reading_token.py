"""Reading the token as users do: shell one-liners, Python helpers, the `token` command.

Each test runs the real daemon (``python -m aac_tokend run``) against the in-process
sandbox and reads its token socket with the exact commands the README documents.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

import aac_tokend
from tests.helpers_e2e import (
    WORKSPACE_PATH,
    CliResult,
    E2EHome,
    RecordingSandbox,
    api_accepts,
    assert_one_line_error,
    import_pair,
    wait_until,
)

#: The commands the README documents for reading the token from a shell, verbatim, plus
#: bare `nc -U "$sock"`: netcat-openbsd exits by itself when the daemon closes the
#: connection, even with stdin left open (a terminal), so `</dev/null` is optional. socat
#: waits its default 0.5 s half-close timeout, then exits.
README_READERS = {
    "nc": 'nc -U "$sock" </dev/null',
    "nc, stdin open": 'nc -U "$sock"',
    "socat": 'socat - "UNIX-CONNECT:$sock"',
    "python": (
        "python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); "
        's.connect(sys.argv[1]); print(s.recv(65536).decode().strip())\' "$sock"'
    ),
}
#: A stdlib client run as another uid: prints whether it connected and what it read.
OTHER_UID_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused", type(e).__name__)
    sys.exit(1)
try:
    if sys.argv[2] == "control":
        s.sendall(b'{"op":"token"}\\n')
    data = s.recv(65536)
except OSError:  # the daemon closed first: a reset is nothing read, too
    data = b""
print("connected", repr(data))
"""
NOBODY = 65534
#: Heavy modules the `token` fast path must not import (about 230 ms together).
HEAVY_MODULES = {"requests", "cryptography", "apscheduler", "structlog"}


def read_with(command: str, sock: Path) -> str:
    """Run a documented shell reader with stdin left open, as in a terminal; its stdout."""
    proc = subprocess.Popen(
        ["sh", "-c", command],
        stdin=subprocess.PIPE,  # never closed: the reader must end on the daemon's close
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, sock=str(sock)),
    )
    try:
        out, err = proc.communicate(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        assert proc.stdin is not None
        proc.stdin.close()
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}, {err!r}"
    return out.decode().strip()


def read_all(sock: Path) -> dict[str, str]:
    return {name: read_with(command, sock) for name, command in README_READERS.items()}


def one_line_error(result: CliResult) -> str:
    lines = result.stderr_lines()
    assert result.returncode != 0 and len(lines) == 1, str(result)
    assert lines[0].startswith("aac-tokend: error: "), str(result)
    return lines[0]


class TestShellReaders:
    """nc, socat and a stdlib one-liner read the same token, and nothing once it expired."""

    @pytest.mark.skipif(
        not (shutil.which("nc") and shutil.which("socat")), reason="needs nc and socat"
    )
    def test_readers_agree_then_read_empty_after_expiry(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """All read one accepted token; with the endpoint gone, all read "" after expiry."""
        sandbox = sandboxes(access_ttl=3)
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        sock = home.socket()
        for _ in range(10):  # 3 s tokens rotate every ~2 s: a rotation may fall between reads
            reads = read_all(sock)
            if len(set(reads.values())) == 1 and all(reads.values()):
                break
            time.sleep(0.2)
        assert len(set(reads.values())) == 1 and all(reads.values()), reads
        assert api_accepts(sandbox, reads["nc"])

        sandbox.stop()  # every refresh now fails, so the last token runs out
        wait_until(lambda: not daemon.token(), 10, "the last token to expire")
        assert read_all(sock) == dict.fromkeys(README_READERS, "")
        assert daemon.alive


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another uid needs root")
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
class TestOtherUsers:
    """Only the daemon's own uid gets a token: modes keep others out, peer checks too."""

    @pytest.fixture
    def served(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> tuple[E2EHome, str]:
        sandbox = sandboxes()
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        return home, daemon.token()

    def as_nobody(self, path: Path, kind: str = "token") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "/usr/bin/python3", "-I", "-c", OTHER_UID_CLIENT, str(path), kind],
            capture_output=True, text=True, timeout=20, cwd="/",
        )  # fmt: skip

    def test_modes_are_private(self, served: tuple[E2EHome, str]) -> None:
        """The runtime dir is 0700, the token and control sockets 0600."""
        home, _ = served
        run = home.paths.runtime_dir
        assert stat.S_IMODE(run.stat().st_mode) == 0o700
        assert stat.S_IMODE(home.socket().stat().st_mode) == 0o600
        assert stat.S_IMODE(home.paths.control_socket.stat().st_mode) == 0o600

    def test_other_uid_cannot_reach_the_socket(self, served: tuple[E2EHome, str]) -> None:
        """As uid 65534, connecting fails: the 0700 runtime dir is not searchable."""
        home, _ = served
        result = self.as_nobody(home.socket())
        assert result.returncode == 1 and "refused PermissionError" in result.stdout, result

    @pytest.mark.parametrize("kind", ["token", "control"])
    def test_peer_uid_check_refuses_alone(self, served: tuple[E2EHome, str], kind: str) -> None:
        """With dirs 0711 and the socket 0666 another uid connects, yet reads nothing at all.

        The dir and socket modes normally stop a foreign uid before connect(); opening them
        up here (the runtime dir and every private dir above it) leaves the daemon's own
        check of the peer's credentials (SO_PEERCRED) as the only barrier, and shows that it
        alone refuses. On the control socket the foreign client also sends a request first.
        """
        home, token = served
        sock = home.socket() if kind == "token" else home.paths.control_socket
        dirs = [home.root, home.home, home.paths.runtime_dir]  # every 0700 dir on the way
        modes = [stat.S_IMODE(d.stat().st_mode) for d in dirs]
        try:
            for path in dirs:
                path.chmod(0o711)
            sock.chmod(0o666)
            result = self.as_nobody(sock, kind)
            assert read_token_as_owner(sock, kind), "the owner must still be answered"
        finally:
            sock.chmod(0o600)
            for path, mode in zip(dirs, modes, strict=True):
                path.chmod(mode)
        assert result.returncode == 0 and result.stdout.strip() == "connected b''", result
        assert token


def read_token_as_owner(sock: Path, kind: str) -> str:
    from aac_tokend.client import ControlClient, read_token

    if kind == "token":
        return read_token(str(sock))
    with ControlClient(str(sock), timeout=10) as client:
        return str(client.request("token")["token"])


class TestImportWhileRunning:
    """An import reaches the running daemon at once, without a restart."""

    def test_new_pair_is_served_within_a_second(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """A re-import and a new profile are both served < 1 s after `import` returns."""
        sandbox = sandboxes()
        first = import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        assert daemon.token() == first["access_token"]
        pid = daemon.pid

        second = import_pair(home, sandbox)
        wait_until(lambda: daemon.token() == second["access_token"], 1.0, "the re-import")
        other = import_pair(home, sandbox, profile="other")
        wait_until(lambda: daemon.token("other") == other["access_token"], 1.0, "a new profile")
        assert daemon.alive and daemon.pid == pid
        assert daemon.output().count("daemon_started") == 1
        assert api_accepts(sandbox, daemon.token()) and api_accepts(sandbox, daemon.token("other"))


class TestPythonAndShellHelpers:
    """get_token, TokendAuth, `api` and `exec` use the daemon's token and recover from 401."""

    @pytest.fixture
    def setup(
        self,
        home: E2EHome,
        sandboxes: Callable[..., RecordingSandbox],
        monkeypatch: pytest.MonkeyPatch,
    ) -> tuple[E2EHome, RecordingSandbox]:
        sandbox = sandboxes()
        import_pair(home, sandbox)
        home.daemon().start(profiles=["default"])
        monkeypatch.setenv("AAC_TOKEND_HOME", str(home.home))
        return home, sandbox

    def test_get_token_matches_the_socket(self, setup: tuple[E2EHome, RecordingSandbox]) -> None:
        """aac_tokend.get_token() returns the token the socket serves."""
        home, _ = setup
        assert aac_tokend.get_token() == home.daemons[0].token() != ""

    def test_tokend_auth_recovers_from_one_401(
        self, setup: tuple[E2EHome, RecordingSandbox]
    ) -> None:
        """A revoked token: TokendAuth asks one refresh, retries once, and succeeds."""
        home, sandbox = setup
        sandbox.revoke_access_token(home.daemons[0].token())
        before = len(sandbox.log())
        response = requests.get(
            sandbox.api_url + WORKSPACE_PATH, auth=aac_tokend.TokendAuth(), timeout=30
        )
        assert response.status_code == 200, response.text
        assert [r.status_code for r in response.history] == [401]
        assert sandbox.outcomes(before) == ["rotated"]
        assert response.json()["id"] == 1

    def test_api_command_prints_the_body_and_recovers(
        self, setup: tuple[E2EHome, RecordingSandbox]
    ) -> None:
        """`api GET` prints the JSON body; with a revoked token, one refresh and one retry."""
        home, sandbox = setup
        plain = home.cli("api", "GET", WORKSPACE_PATH, "--base-url", sandbox.api_url)
        assert plain.returncode == 0 and json.loads(plain.stdout)["id"] == 1, str(plain)
        assert sandbox.log() == []
        default_base = home.cli("api", "GET", WORKSPACE_PATH)  # the profile's --base-url
        assert default_base.returncode == 0 and json.loads(default_base.stdout)["id"] == 1

        sandbox.revoke_access_token(home.daemons[0].token())
        revoked = home.cli("api", "GET", WORKSPACE_PATH, "--base-url", sandbox.api_url)
        assert revoked.returncode == 0 and json.loads(revoked.stdout)["id"] == 1, str(revoked)
        assert sandbox.outcomes() == ["rotated"]

    @pytest.mark.parametrize(
        ("proxy", "said"),
        [
            ("http://alice:S3cr3tPw@proxy.example:70000", "cannot be parsed"),  # a typo
            ("http://alice:S3cr3tPw@127.0.0.1:1", "proxy"),  # a proxy that is down
            ("", "could not connect"),  # no proxy, and nothing listens at the API
        ],
    )
    def test_api_network_failure_is_one_line_without_the_proxy_password(
        self, setup: tuple[E2EHome, RecordingSandbox], proxy: str, said: str
    ) -> None:
        """A failed `api` call ends in one line and exit 75; no traceback, no proxy URL."""
        home, sandbox = setup
        env = {k: v for k, v in home.env.items() if not k.lower().endswith("_proxy")}
        # https: a plain-http (loopback) URL never goes through a proxy (see the README).
        base = sandbox.api_url.replace("http:", "https:", 1)
        if proxy:
            env.update(http_proxy=proxy, https_proxy=proxy)
        else:
            base = "http://127.0.0.1:1"
        result = home.cli("api", "GET", WORKSPACE_PATH, "--base-url", base, env=env)
        line = assert_one_line_error(result, 75)
        assert said in line and "S3cr3tPw" not in result.stderr and "alice" not in line, line

    def test_exec_sets_the_token_in_the_environment(
        self, setup: tuple[E2EHome, RecordingSandbox]
    ) -> None:
        """`exec -- CMD` runs CMD with AAC_ACCESS_TOKEN set to the served token."""
        home, _ = setup
        ok = home.cli("exec", "--", "sh", "-c", 'test -n "$AAC_ACCESS_TOKEN" && echo ok')
        assert ok.returncode == 0 and ok.stdout == "ok\n", str(ok)
        same = home.cli("exec", "--", "sh", "-c", 'test "$AAC_ACCESS_TOKEN" = "$(nc -U "$S")"',
                        env=dict(home.env, S=str(home.socket())))  # fmt: skip
        assert same.returncode == 0, str(same)


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level names of every module in `python -X importtime` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    names.discard("imported package")
    return names


class TestTokenCommand:
    """`aac-tokend token`: a socket read while the daemon runs, the encrypted state without."""

    def test_fast_path_then_offline_fallback(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Running: no heavy import. Stopped: the stored token while valid, then one error."""
        sandbox = sandboxes(access_ttl=6)
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        token = daemon.token()
        for console_script in (False, True):
            fast = home.cli("token", python_flags=["-X", "importtime"],
                            console_script=console_script)  # fmt: skip
            assert fast.returncode == 0 and fast.stdout == token + "\n", str(fast)
            loaded = imported_modules(fast.stderr)
            assert "aac_tokend" in loaded, "importtime output was not parsed"
            assert not loaded & HEAVY_MODULES, sorted(loaded & HEAVY_MODULES)

        daemon.stop()
        sent = len(sandbox.log())
        offline = home.cli("token")
        assert offline.returncode == 0 and offline.stdout == token + "\n", str(offline)
        status = json.loads(home.cli("status", "--json").stdout)
        expires = status["profiles"][0]["access_expires_at"]
        assert status["daemon_running"] is False and expires

        wait_until(lambda: home.cli("token").returncode != 0, 10, "the stored token to expire")
        expired = home.cli("token")
        message = one_line_error(expired)
        # a sound chain only needs the daemon: 4, as status --check says (test_cli_contract)
        assert expired.returncode == 4 and expired.stdout == ""
        assert "expired" in message and "aac-tokend run" in message
        assert len(sandbox.log()) == sent, "the offline `token` must never refresh"
