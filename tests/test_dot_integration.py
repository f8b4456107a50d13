"""aac-tokend against Django OAuth Toolkit: an independent OAuth 2.0 server, on loopback.

DOT runs as a real process (tests/dot_server) with rotation, refresh-token reuse protection
and no grace period, like AAC. Its access tokens are opaque, so import takes the
token-endpoint JSON plus --token-endpoint and --client-id. The daemon, the CLI and the token
socket are the real ones. Tokens never appear in assertions: they are compared by hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from aac_tokend.client import read_token
from aac_tokend.core.tokens import token_hash
from aac_tokend.host.paths import resolve_paths
from aac_tokend.store.files import FileStore, load_or_create_key
from tests.dot_server import CLIENT_ID, PASSWORD, PROTECTED_PATH, TOKEN_PATH, USERNAME

REPO = Path(__file__).resolve().parents[1]

#: DOT's access-token lifetime: the daemon refreshes about every 3.5 s, so a few refreshes
#: fit in seconds, yet each served token stays usable well beyond an HTTP round trip.
ACCESS_TTL_SECONDS = 5
#: Migrating a fresh SQLite file takes about 2 s here; a loaded CI machine may take far longer.
SERVER_START_TIMEOUT = 90.0
#: Every CLI call starts a Python interpreter; generous, so only a hang fails the test.
CLI_TIMEOUT = 60.0
#: Two refreshes need about 8 s at a 5 s lifetime; waiting longer only matters on failure.
REFRESH_WAIT_SECONDS = 60.0
#: A daemon binds its sockets within a second; allow for a slow start on a busy machine.
DAEMON_START_TIMEOUT = 30.0
#: How long a stopped process may take to exit before it is killed.
EXIT_TIMEOUT = 15.0
#: HTTP calls to the loopback server answer in milliseconds; this only bounds a hang.
HTTP_TIMEOUT = 10.0
#: How often the waiting loops look again: fine enough to see every token the daemon serves.
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class DotServer:
    """The running DOT server, and the few requests a third party can make to it."""

    url: str
    db_path: Path

    @property
    def token_endpoint(self) -> str:
        return self.url + TOKEN_PATH

    def password_grant(self) -> dict[str, Any]:
        """A fresh token pair, as the token endpoint's JSON (a new family each time).

        The password grant is the simplest honest route to a pair DOT issued itself: one real
        POST, no browser. DOT 3.x still allows it for a public client (it logs an RFC 9700
        deprecation warning; COMPLIANT_BCP_RFC9700_PASSWORD_GRANT is False until DOT 4).
        """
        form = {
            "grant_type": "password",
            "username": USERNAME,
            "password": PASSWORD,
            "client_id": CLIENT_ID,
            "scope": "read",
        }
        answer = requests.post(self.token_endpoint, data=form, timeout=HTTP_TIMEOUT)
        assert answer.status_code == 200, f"password grant answered HTTP {answer.status_code}"
        body: dict[str, Any] = answer.json()
        return body

    def refresh(self, refresh_token: str) -> tuple[int, dict[str, Any]]:
        """Present a refresh token as a public client; the HTTP status and the JSON body."""
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": CLIENT_ID,
        }
        answer = requests.post(self.token_endpoint, data=form, timeout=HTTP_TIMEOUT)
        return answer.status_code, answer.json()

    def whoami(self, access_token: str) -> int:
        """The HTTP status of the protected view for this bearer token (200 only if valid)."""
        headers = {"Authorization": f"Bearer {access_token}"}
        answer = requests.get(self.url + PROTECTED_PATH, headers=headers, timeout=HTTP_TIMEOUT)
        return answer.status_code

    def family_of(self, refresh_token: str) -> tuple[int, int]:
        """DOT's own records of a refresh token's family: (members, members not revoked)."""
        checksum = hashlib.sha256(refresh_token.encode()).hexdigest()
        with sqlite3.connect(self.db_path, timeout=HTTP_TIMEOUT) as db:
            row = db.execute(
                "SELECT token_family FROM oauth2_provider_refreshtoken WHERE token_checksum = ?",
                (checksum,),
            ).fetchone()
            assert row is not None and row[0], "DOT has no family for that refresh token"
            members, live = db.execute(
                "SELECT COUNT(*), COUNT(*) - COUNT(revoked) FROM oauth2_provider_refreshtoken "
                "WHERE token_family = ?",
                (row[0],),
            ).fetchone()
        return int(members), int(live)


# -- processes ---------------------------------------------------------------------------
def _stop(proc: subprocess.Popen[Any]) -> None:
    """End a process this module started: TERM, then KILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(EXIT_TIMEOUT)


def _first_line(proc: subprocess.Popen[str], timeout: float, errlog: Path) -> str:
    """The first stdout line of a starting server, or a failure that shows its stderr."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("http://127.0.0.1:"):
        _stop(proc)
        pytest.fail(f"DOT server did not start: {errlog.read_text()[-2000:]}")
    return line


@pytest.fixture(scope="session")
def dot_server() -> Iterator[DotServer]:
    """DOT on loopback with a fresh SQLite database, for the whole session."""
    workdir = Path(tempfile.mkdtemp(prefix="atkdot", dir="/tmp"))
    db_path = workdir / "dot.sqlite3"
    errlog = workdir / "server.err"
    with errlog.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.dot_server.run", "--port", "0", "--db", str(db_path),
             "--access-ttl", str(ACCESS_TTL_SECONDS)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
        )  # fmt: skip
    try:
        yield DotServer(_first_line(proc, SERVER_START_TIMEOUT, errlog), db_path)
    finally:
        _stop(proc)
        assert proc.stdout is not None
        proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _make_home() -> Path:
    """A short AAC_TOKEND_HOME (socket paths are limited) with desktop alerts off."""
    home = Path(tempfile.mkdtemp(prefix="atk", dir="/tmp"))
    (home / "config").mkdir(mode=0o700)
    (home / "config" / "config.toml").write_text('notifications = false\nlog_format = "json"\n')
    return home


@pytest.fixture
def home() -> Iterator[Path]:
    """A throw-away AAC_TOKEND_HOME for one test."""
    path = _make_home()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "AAC_TOKEND_HOME": str(home)}


def _tokend(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m aac_tokend``) against ``home``."""
    return subprocess.run(
        [sys.executable, "-m", "aac_tokend", *args], input=stdin, capture_output=True,
        text=True, env=_env(home), timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip


def _status(home: Path) -> tuple[bool, dict[str, Any]]:
    """(daemon running, the default profile's status row) from ``status --json``."""
    done = _tokend(home, "status", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    rows = [row for row in answer["profiles"] if row["profile"] == "default"]
    assert rows, "status lists no profile 'default'"
    return answer["daemon_running"], rows[0]


def _import(
    dot: DotServer, home: Path, pair: dict[str, Any], *extra: str
) -> subprocess.CompletedProcess[str]:
    return _tokend(
        home, "import", "--token-endpoint", dot.token_endpoint, "--client-id", CLIENT_ID,
        *extra, stdin=json.dumps(pair),
    )  # fmt: skip


def _no_token_in(text: str, *tokens: str) -> bool:
    return not any(token in text for token in tokens)


# -- import ------------------------------------------------------------------------------
class TestImportOfOpaquePair:
    """DOT's opaque tokens import from its token-endpoint JSON and explicit options."""

    def test_token_endpoint_json_imports(self, dot_server: DotServer, home: Path) -> None:
        """The JSON DOT returns imports as an OAuth profile bound to DOT's token endpoint."""
        pair = dot_server.password_grant()
        done = _import(dot_server, home, pair)
        assert done.returncode == 0, done.stderr
        running, row = _status(home)
        assert not running
        assert (row["kind"], row["state"], row["token_valid"]) == ("oauth", "ok", True)
        assert row["client_id"] == CLIENT_ID

    def test_trailing_slash_is_kept(self, dot_server: DotServer, home: Path) -> None:
        """The token endpoint is stored exactly as given, trailing slash included."""
        done = _import(dot_server, home, dot_server.password_grant())
        assert done.returncode == 0, done.stderr
        assert _status(home)[1]["token_endpoint"] == dot_server.token_endpoint
        assert dot_server.token_endpoint.endswith("/o/token/")

    def test_opaque_token_needs_client_id(self, dot_server: DotServer, home: Path) -> None:
        """Without --client-id an opaque pair is refused, naming the option, echoing no token."""
        pair = dot_server.password_grant()
        done = _tokend(
            home, "import", "--token-endpoint", dot_server.token_endpoint, stdin=json.dumps(pair)
        )
        assert done.returncode == 65
        assert "--client-id" in done.stderr
        assert _no_token_in(done.stdout + done.stderr, pair["access_token"], pair["refresh_token"])

    def test_opaque_lines_need_expiry(self, dot_server: DotServer, home: Path) -> None:
        """Two bare lines of opaque tokens are refused: nothing says when the access expires."""
        pair = dot_server.password_grant()
        lines = f"{pair['access_token']}\n{pair['refresh_token']}\n"
        done = _tokend(
            home, "import", "--token-endpoint", dot_server.token_endpoint,
            "--client-id", CLIENT_ID, stdin=lines,
        )  # fmt: skip
        assert done.returncode == 65
        assert "expires_in" in done.stderr
        assert _no_token_in(done.stdout + done.stderr, pair["access_token"], pair["refresh_token"])


# -- a chain's life under the daemon -------------------------------------------------------
@dataclass
class ChainRun:
    """What one chain's life against DOT showed, phase by phase (tokens only as hashes)."""

    refreshed: dict[str, Any] = field(default_factory=dict)  # status after two refreshes
    served: dict[str, int] = field(default_factory=dict)  # served token hash -> whoami status
    original_access_status: int = 0  # whoami with the imported access token, after rotation
    replay_status: int = 0  # DOT's answer to the original refresh token, replayed
    replay_body: dict[str, Any] = field(default_factory=dict)
    refresh_cli: subprocess.CompletedProcess[str] | None = None  # `aac-tokend refresh` after it
    rejected: dict[str, Any] = field(default_factory=dict)  # status after that refresh
    last_served_status: int = 0  # whoami with the last served token, after the replay
    current_rotated: bool = False  # the daemon's refresh token differs from the original
    current_status: int = 0  # DOT's answer to the daemon's own refresh token, afterwards
    current_body: dict[str, Any] = field(default_factory=dict)
    family: tuple[int, int] = (0, 0)  # DOT's records of the family: (members, live)


def _daemon_log(home: Path) -> str:
    """The end of the daemon's log (tokens in it are redacted), to explain a failure."""
    return (home / "daemon.log").read_text(errors="replace")[-2000:]


def _wait_for_daemon(home: Path, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            pytest.fail(f"the daemon exited with status {daemon.returncode}: {_daemon_log(home)}")
        if resolve_paths(_env(home)).control_socket.exists() and _status(home)[0]:
            return
        time.sleep(POLL_SECONDS)
    pytest.fail(f"the daemon did not open its control socket: {_daemon_log(home)}")


def _watch_refreshes(dot: DotServer, home: Path, run: ChainRun) -> str:
    """Read the token socket until two refreshes happened; check each new token at DOT.

    Returns the token served after the second refresh. Tokens never come back, so the one
    on the socket is always the newest seen.
    """
    sock = str(resolve_paths(_env(home)).token_socket("default"))
    deadline = time.monotonic() + REFRESH_WAIT_SECONDS
    while True:
        run.refreshed = _status(home)[1]  # read before the token: the token is at least as new
        token = read_token(sock)
        if token and token_hash(token) not in run.served:
            run.served[token_hash(token)] = dot.whoami(token)
        if token and run.refreshed["refresh_count"] >= 2:
            return token
        if time.monotonic() > deadline:
            pytest.fail(
                f"under two refreshes in {REFRESH_WAIT_SECONDS:.0f} s: {run.refreshed}; "
                f"daemon log: {_daemon_log(home)}"
            )
        time.sleep(POLL_SECONDS)


@pytest.fixture(scope="class")
def chain_run(dot_server: DotServer) -> Iterator[ChainRun]:
    """Import a DOT pair, let the daemon rotate it, replay the original refresh token."""
    home, run = _make_home(), ChainRun()
    pair = dot_server.password_grant()
    # DOT's answer has no refresh lifetime, and its tokens are opaque (no iat): the lifetime
    # counts from the import, so a replay cannot be told from the token's natural end
    # (expired_or_reused) even with a lifetime given. DOT's default is far longer than a day.
    done = _import(dot_server, home, pair, "--refresh-lifetime-days", "1")
    assert done.returncode == 0, done.stderr
    with (home / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "aac_tokend", "run"], env=_env(home), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        _wait_for_daemon(home, daemon)
        newest = _watch_refreshes(dot_server, home, run)
        run.original_access_status = dot_server.whoami(pair["access_token"])
        # A third party replays the refresh token the daemon already spent.
        run.replay_status, run.replay_body = dot_server.refresh(pair["refresh_token"])
        run.refresh_cli = _tokend(home, "refresh")
        if run.refresh_cli.returncode == 0:
            # It joined a scheduled refresh that reached DOT before the replay (DOT serves one
            # request at a time); the refresh after the replay is the next one.
            run.refresh_cli = _tokend(home, "refresh")
        run.rejected = _status(home)[1]
        run.last_served_status = dot_server.whoami(newest)
        stopped = _tokend(home, "stop")
        assert stopped.returncode == 0, stopped.stderr
        daemon.wait(EXIT_TIMEOUT)
        paths = resolve_paths(_env(home))
        state = FileStore(paths.state_dir, load_or_create_key(paths.config_dir)).load("default")
        assert state is not None and state.refresh_token is not None
        run.current_rotated = token_hash(state.refresh_token) != token_hash(pair["refresh_token"])
        run.current_status, run.current_body = dot_server.refresh(state.refresh_token)
        run.family = dot_server.family_of(pair["refresh_token"])
        yield run
    finally:
        _stop(daemon)
        shutil.rmtree(home, ignore_errors=True)


class TestRotationAgainstDot:
    """The daemon keeps a DOT chain alive, and notices when a third party reuses a token."""

    def test_daemon_refreshes(self, chain_run: ChainRun) -> None:
        """The daemon refreshes the chain on its own, more than once, without errors."""
        assert chain_run.refreshed["refresh_count"] >= 2
        assert chain_run.refreshed["state"] == "ok"
        assert chain_run.refreshed["last_error"] is None

    def test_served_tokens_are_valid_at_dot(self, chain_run: ChainRun) -> None:
        """Every distinct token read from the token socket is accepted by DOT's protected view."""
        assert len(chain_run.served) >= 2  # at least one before and one after a refresh
        assert set(chain_run.served.values()) == {200}

    def test_rotation_revokes_the_imported_access_token(self, chain_run: ChainRun) -> None:
        """After the daemon's refreshes DOT no longer accepts the access token first imported."""
        assert chain_run.original_access_status == 403

    def test_replay_is_refused_with_invalid_grant(self, chain_run: ChainRun) -> None:
        """DOT answers a replayed, already rotated refresh token with 400 invalid_grant."""
        assert chain_run.replay_status == 400
        assert chain_run.replay_body.get("error") == "invalid_grant"

    def test_next_refresh_reports_expired_or_reused(self, chain_run: ChainRun) -> None:
        """The next refresh is rejected; without an iat it cannot be called theft for sure."""
        assert chain_run.refresh_cli is not None
        assert chain_run.refresh_cli.returncode == 69
        assert chain_run.refresh_cli.stdout.startswith("default: rejected")
        assert chain_run.rejected["state"] == "rejected"
        rejection = chain_run.rejected["rejection"]
        assert (rejection["reason"], rejection["error"]) == ("expired_or_reused", "invalid_grant")

    def test_reuse_revokes_the_whole_family(self, chain_run: ChainRun) -> None:
        """DOT revoked every token of the chain: the daemon's own refresh and access tokens too."""
        assert chain_run.current_rotated
        assert (chain_run.current_status, chain_run.current_body.get("error")) == (
            400,
            "invalid_grant",
        )
        assert chain_run.last_served_status == 403
        members, live = chain_run.family
        assert (members, live) == (chain_run.rejected["refresh_count"] + 1, 0)
