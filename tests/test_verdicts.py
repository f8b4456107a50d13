"""The verdict on a broken chain names a theft only when it can be one.

Every test runs the real refresh transaction (``courier.carry``) with the real token endpoint
client against the loopback sandbox, over a real encrypted store; only the clock is the test's
(shared with the sandbox, or offset from it to model skew). The referee is the sandbox's
request log: what the server did, never the daemon's own account.
"""

from __future__ import annotations

import errno
import http.server
import json
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from aac_tokend.core.importer import ImportRequest, build_state
from aac_tokend.core.policy import PolicySettings, next_refresh_at
from aac_tokend.core.state import ProfileState, RejectionReason
from aac_tokend.core.tokens import parse_jwt
from aac_tokend.refresh.endpoint import TokenEndpoint
from aac_tokend.refresh.result import CourierKind, CourierResult
from aac_tokend.refresh.spawn import read_spawn_message, spawn_message
from aac_tokend.refresh.transaction import CourierJob, carry
from aac_tokend.sandbox.jwt_sign import sign_hs256
from aac_tokend.sandbox.server import SandboxServer
from aac_tokend.store.files import FileStore, FileStoreSpec
from aac_tokend.testing import FailingFileLayer, FakeClock
from tests.scenario_support import cli, import_via_cli, running_daemon, short_dir, write_config

DAY = 86400.0
HOUR = 3600.0
TIMEOUT = 30.0


class Chain:
    """One profile's chain: a sandbox, a store, and the courier's transaction on a clock."""

    def __init__(
        self,
        tmp: Path,
        *,
        refresh_ttl: float = 30 * DAY,
        skew: float = 0.0,
    ) -> None:
        self.server_clock = FakeClock()
        self.skew = skew  # how far our clock is behind the server's
        self.sandbox = SandboxServer(
            clock=self.server_clock, refresh_ttl=refresh_ttl, access_ttl=HOUR
        )
        self.sandbox.start()
        self.dir = tmp
        self.key = secrets.token_bytes(32)
        self.store = FileStore(tmp, self.key)
        self.endpoint_url = self.sandbox.token_endpoint

    def now(self) -> float:
        return self.server_clock.now() - self.skew

    def advance(self, seconds: float) -> None:
        self.server_clock.advance(seconds)

    def import_pair(self, pair: dict[str, Any], **request: Any) -> ProfileState:
        fields = {
            "profile": "p",
            "access_token": pair["access_token"],
            "refresh_token": pair["refresh_token"],
            "token_endpoint": self.endpoint_url,
            "client_id": self.sandbox.client_id,
            **request,
        }
        state = build_state(ImportRequest(**fields), self.now())
        with self.store.locked("p", 5):
            self.store.save(state)
        return state

    def state(self) -> ProfileState:
        state = self.store.load("p")
        assert state is not None
        return state

    def refresh(
        self, *, store: FileStore | None = None, lifetime_days: float | None = None
    ) -> tuple[CourierResult, ProfileState]:
        state = self.state()
        assert state.refresh_token is not None
        job = CourierJob("p", state.refresh_token, lifetime_days=lifetime_days)
        result = carry(job, store or self.store, TokenEndpoint(), self.now)
        return result, self.state()

    def thief(self, refresh_token: str | None) -> int:
        """Another party spends a refresh token at the server."""
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self.sandbox.client_id,
        }
        return requests.post(self.sandbox.token_endpoint, data=form, timeout=TIMEOUT).status_code

    def outcomes(self) -> list[object]:
        return [entry["outcome"] for entry in self.sandbox.log()]

    def close(self) -> None:
        self.sandbox.stop()


@pytest.fixture
def chain_of(tmp_path: Path) -> Iterator[Callable[..., Chain]]:
    made: list[Chain] = []

    def make(**kwargs: Any) -> Chain:
        made.append(Chain(tmp_path / str(len(made)), **kwargs))
        return made[-1]

    try:
        yield make
    finally:
        for chain in made:
            chain.close()


def verdict(state: ProfileState) -> RejectionReason:
    assert state.rejection is not None, state.last_error
    return state.rejection.reason


class _Rewriter(http.server.BaseHTTPRequestHandler):
    """A gateway that forwards to the sandbox and rewrites the answer's JSON."""

    upstream = ""
    rewrite: Callable[[dict[str, Any]], dict[str, Any]] = staticmethod(lambda body: body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        answer = requests.post(
            self.upstream,
            data=self.rfile.read(length),
            headers={"Content-Type": self.headers.get("Content-Type", "")},
            timeout=TIMEOUT,
        )
        body = json.dumps(type(self).rewrite(answer.json())).encode()
        self.send_response(answer.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def rewriting_gateway() -> Iterator[Callable[[str, Callable[..., Any]], str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(upstream: str, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
        handler = type("Handler", (_Rewriter,), {"upstream": upstream, "rewrite": rewrite})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/as/token"

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


class TestSuccessWithoutRefreshToken:
    """A 200 that carries no usable new refresh token leaves the token sent in doubt."""

    @pytest.mark.parametrize("extra", [{}, {"refresh_token": None}, {"refresh_token": ""}])
    def test_later_refusal_is_our_lost_rotation(
        self, chain_of: Callable[..., Chain], extra: dict[str, Any]
    ) -> None:
        """The server rotated but the answer lost the new token: after_lost_response."""
        chain = chain_of()
        chain.import_pair(chain.sandbox.generate(), refresh_lifetime_days=30)
        assert chain.refresh()[0].kind is CourierKind.REFRESHED
        body = {"access_token": chain.sandbox.generate()["access_token"], "expires_in": 3600}
        chain.sandbox.fail_next(1, status=200, body=json.dumps({**body, **extra}), forward=True)
        result, state = chain.refresh()
        assert result.kind is CourierKind.REFRESHED and state.ambiguous_rt_hash is not None
        result, state = chain.refresh()
        # Nobody else: the server rotated once behind the rewritten answer, then revoked.
        assert chain.outcomes() == ["rotated", "failed_after_rotation", "reuse_revoked"]
        assert verdict(state) is RejectionReason.AFTER_LOST_RESPONSE

    def test_new_refresh_token_without_access_token_is_kept(
        self,
        chain_of: Callable[..., Chain],
        rewriting_gateway: Callable[[str, Callable[..., Any]], str],
    ) -> None:
        """A rotation answered without a usable access token keeps the new refresh token."""
        chain = chain_of()
        drop_access = iter([True])

        def rewrite(body: dict[str, Any]) -> dict[str, Any]:
            if next(drop_access, False):
                return {**body, "access_token": ""}
            return body

        chain.endpoint_url = rewriting_gateway(chain.sandbox.token_endpoint, rewrite)
        chain.import_pair(chain.sandbox.generate(), refresh_lifetime_days=30)
        result, state = chain.refresh()
        assert result.kind is CourierKind.TRANSIENT and state.consecutive_failures == 1
        assert state.ambiguous_rt_hash is None
        result, state = chain.refresh()
        assert result.kind is CourierKind.REFRESHED and state.rejection is None
        assert chain.outcomes() == ["rotated", "rotated"]  # the spent token never went again


class TestLifetimeOrigin:
    """Theft needs a lifetime counted from the pair's generation (iat), not the import."""

    @staticmethod
    def opaque(chain: Chain, pair: dict[str, Any]) -> dict[str, Any]:
        return {**pair, "access_token": "opaque-" + "a" * 40}

    @staticmethod
    def without_iat(chain: Chain, pair: dict[str, Any]) -> dict[str, Any]:
        claims = {"iss": chain.sandbox.issuer, "client_id": chain.sandbox.client_id}
        access = sign_hs256({**claims, "exp": int(chain.now()) + 3600}, b"k" * 32)
        return {**pair, "access_token": access}

    @pytest.mark.parametrize("shape", ["opaque", "without_iat"])
    def test_natural_end_after_late_paste_is_not_theft(
        self, chain_of: Callable[..., Chain], shape: str
    ) -> None:
        """Pasted 4 days late without iat, the chain's natural end is expired_or_reused."""
        chain = chain_of()
        pair = chain.sandbox.generate()
        chain.advance(4 * DAY)
        pasted = getattr(self, shape)(chain, pair)
        state = chain.import_pair(pasted, expires_in=3600.0, refresh_expires_in=30 * DAY)
        assert state.pair_issued_at is None
        chain.advance(HOUR)
        assert chain.refresh()[0].kind is CourierKind.REFRESHED
        chain.advance(30 * DAY - 4 * DAY - HOUR + 600)  # 10 minutes past the server's end
        _, state = chain.refresh()
        assert chain.outcomes()[-1] == "expired"
        assert verdict(state) is RejectionReason.EXPIRED_OR_REUSED

    def test_late_paste_with_iat_is_exact(self, chain_of: Callable[..., Chain]) -> None:
        """With the pair's iat the same late paste ends as refresh_token_expired."""
        chain = chain_of()
        pair = chain.sandbox.generate()
        chain.advance(4 * DAY)
        state = chain.import_pair(pair, refresh_lifetime_days=30)
        assert state.pair_issued_at is not None and state.pair_issued_at < state.imported_at
        chain.advance(HOUR)
        chain.refresh()
        chain.advance(26 * DAY - HOUR + 600)
        _, state = chain.refresh()
        assert chain.outcomes()[-1] == "expired"
        assert verdict(state) is RejectionReason.REFRESH_TOKEN_EXPIRED

    @pytest.mark.parametrize(("shape", "expected"), [
        ("opaque", RejectionReason.EXPIRED_OR_REUSED),
        (None, RejectionReason.REUSE_SUSPECTED),
    ])  # fmt: skip
    def test_theft_mid_chain(
        self, chain_of: Callable[..., Chain], shape: str | None, expected: RejectionReason
    ) -> None:
        """A real theft is reuse_suspected with an iat origin, expired_or_reused without."""
        chain = chain_of()
        pair = chain.sandbox.generate()
        pasted = getattr(self, shape)(chain, pair) if shape else pair
        chain.import_pair(pasted, expires_in=3600.0, refresh_expires_in=30 * DAY)
        chain.refresh()
        chain.advance(10 * DAY)
        assert chain.thief(chain.state().refresh_token) == 200
        _, state = chain.refresh()
        assert chain.outcomes()[-1] == "reuse_revoked"
        assert verdict(state) is expected


class TestConfiguredLifetime:
    """config.toml's refresh_lifetime_days counts for a profile imported without a lifetime."""

    @pytest.mark.parametrize(("days", "expected"), [
        (30.0, RejectionReason.REFRESH_TOKEN_EXPIRED),
        (None, RejectionReason.EXPIRED_OR_REUSED),
    ])  # fmt: skip
    def test_end_judged_by_configured_days(
        self, chain_of: Callable[..., Chain], days: float | None, expected: RejectionReason
    ) -> None:
        """An invalid_grant at the configured end is refresh_token_expired."""
        chain = chain_of()
        state = chain.import_pair(chain.sandbox.generate())
        assert state.refresh_expires_at is None
        chain.refresh(lifetime_days=days)
        chain.advance(30 * DAY + 60)
        _, state = chain.refresh(lifetime_days=days)
        assert chain.outcomes()[-1] == "expired"
        assert verdict(state) is expected

    def test_job_carries_the_days_to_a_spawned_courier(self) -> None:
        """The days survive the job's trip through a pipe (the spawned courier's stdin)."""
        spec = FileStoreSpec("/tmp/x", b"k" * 32, pending_dir="/tmp/y")
        job = CourierJob("p", "rt", lifetime_days=30.0, generation=7)
        assert read_spawn_message(spawn_message(spec, job, 123.5)) == (spec, job, 123.5)
        bare = CourierJob("p", "rt")
        assert read_spawn_message(spawn_message(spec, bare))[1].lifetime_days is None


class _FailInTurn(FailingFileLayer):
    """The real file layer; each operation named in ``script`` fails once, in that order."""

    def __init__(self, script: list[str]) -> None:
        super().__init__()
        self.script = script

    def _maybe_fail(self, op: str, path: Path) -> None:
        if self.script and self.script[0] == op:
            self.script.pop(0)
            raise OSError(errno.EIO, f"injected EIO on {op}", str(path))


class TestConfiguredLifetimeInStatus:
    """The real daemon and the offline status take the configured lifetime after a reload."""

    def test_status_shows_the_configured_end(self) -> None:
        """Imported without a lifetime, then refresh_lifetime_days = 30: iat + 30 days."""
        home = short_dir()
        try:
            with SandboxServer() as sandbox:
                pair = sandbox.generate()
                del pair["refresh_token_expires_in"]  # no lifetime at import
                done = import_via_cli(home, pair, "--token-endpoint", sandbox.token_endpoint)
                assert done.returncode == 0, done.stderr
                iat = parse_jwt(str(pair["access_token"])).iat
                assert iat is not None
                write_config(home, "notifications = false\n")
                with running_daemon(home):
                    assert end_in_status(home) is None
                    write_config(home, "notifications = false\nrefresh_lifetime_days = 30\n")
                    assert cli(home, "reload").returncode == 0
                    assert end_in_status(home) == iat + 30 * DAY
                assert end_in_status(home) == iat + 30 * DAY  # offline, from the state file
        finally:
            shutil.rmtree(home, ignore_errors=True)

    @pytest.mark.parametrize("daemon_at_import", [True, False])
    def test_config_in_force_at_import_is_not_frozen(self, daemon_at_import: bool) -> None:
        """Imported while config says 30 days, then corrected to 90: iat + 90 days."""
        home = short_dir()
        try:
            with SandboxServer() as sandbox:
                pair = sandbox.generate()
                del pair["refresh_token_expires_in"]  # no lifetime given at import
                iat = parse_jwt(str(pair["access_token"])).iat
                assert iat is not None
                write_config(home, "notifications = false\nrefresh_lifetime_days = 30\n")
                args = ("--token-endpoint", sandbox.token_endpoint)
                if daemon_at_import:
                    with running_daemon(home):
                        done = import_via_cli(home, pair, *args)
                        assert done.returncode == 0, done.stderr
                        assert end_in_status(home) == iat + 30 * DAY
                        write_config(home, "notifications = false\nrefresh_lifetime_days = 90\n")
                        assert cli(home, "reload").returncode == 0
                        assert end_in_status(home) == iat + 90 * DAY
                else:
                    done = import_via_cli(home, pair, *args)
                    assert done.returncode == 0, done.stderr
                    assert end_in_status(home) == iat + 30 * DAY
                    write_config(home, "notifications = false\nrefresh_lifetime_days = 90\n")
                    assert end_in_status(home) == iat + 90 * DAY  # offline, from the state file
        finally:
            shutil.rmtree(home, ignore_errors=True)


def end_in_status(home: Path) -> float | None:
    answer = cli(home, "status", "--json")
    assert answer.returncode == 0, answer.stderr
    (row,) = json.loads(answer.stdout)["profiles"]
    end = row["refresh_expires_at"]
    return None if end is None else datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp()


class TestJournalSaveFails:
    """A journal whose save failed is taken back: nothing was sent, nothing is in doubt."""

    def test_theft_after_failed_journal_is_still_theft(
        self, chain_of: Callable[..., Chain]
    ) -> None:
        """The directory fsync fails after the journal's rename: a later theft is theft."""
        chain = chain_of()
        chain.import_pair(chain.sandbox.generate(), refresh_lifetime_days=30)
        chain.refresh()
        failing = FailingFileLayer(failures={"fsync_dir": errno.EIO}, remaining=1)
        result, state = chain.refresh(store=FileStore(chain.dir, chain.key, failing))
        assert result.kind is CourierKind.STORAGE_FAILED and failing.raised == 1
        assert chain.outcomes() == ["rotated"]  # nothing was sent
        assert state.in_flight is None
        assert chain.thief(state.refresh_token) == 200
        _, state = chain.refresh()
        assert chain.outcomes() == ["rotated", "rotated", "reuse_revoked"]
        assert verdict(state) is RejectionReason.REUSE_SUSPECTED

    def test_journal_stays_when_taking_it_back_fails(self, chain_of: Callable[..., Chain]) -> None:
        """If the undo fails as well, the disk's state is unknown: the journal may stay."""
        chain = chain_of()
        chain.import_pair(chain.sandbox.generate(), refresh_lifetime_days=30)
        chain.refresh()
        failing = _FailInTurn(["fsync_dir", "rename"])  # the journal lands, the undo does not
        result, state = chain.refresh(store=FileStore(chain.dir, chain.key, failing))
        assert result.kind is CourierKind.STORAGE_FAILED and failing.script == []
        assert chain.outcomes() == ["rotated"]
        assert state.in_flight is not None


class TestClockSkew:
    """With an iat origin the end's slack is the clocks' skew, whatever the paste delay."""

    @pytest.mark.parametrize("lag", [0.1 * HOUR, 23 * HOUR])
    def test_natural_end_under_skew(self, chain_of: Callable[..., Chain], lag: float) -> None:
        """Our clock 10 minutes slow: a 1-day chain's end is expired, pasted early or late."""
        chain = chain_of(refresh_ttl=DAY, skew=600.0)
        pair = chain.sandbox.generate()
        chain.advance(lag)
        chain.import_pair(pair, refresh_lifetime_days=1)
        chain.advance(600)
        assert chain.refresh()[0].kind is CourierKind.REFRESHED
        chain.advance(DAY - lag - 600 + 60)  # a minute past the server's end
        _, state = chain.refresh()
        assert chain.outcomes()[-1] == "expired"
        assert verdict(state) is RejectionReason.REFRESH_TOKEN_EXPIRED

    def test_theft_before_the_slack_is_theft(self, chain_of: Callable[..., Chain]) -> None:
        """A theft two hours before a 1-day chain's end, pasted 23 h late, is reuse."""
        chain = chain_of(refresh_ttl=DAY)
        pair = chain.sandbox.generate()
        chain.advance(20 * HOUR)
        chain.import_pair(pair, refresh_lifetime_days=1)
        chain.refresh()
        chain.advance(2 * HOUR)
        assert chain.thief(chain.state().refresh_token) == 200
        _, state = chain.refresh()
        assert chain.outcomes()[-1] == "reuse_revoked"
        assert verdict(state) is RejectionReason.REUSE_SUSPECTED


class TestEstimateDoesNotEndTheChain:
    """A lifetime guessed too short never stops refreshes: the server decides."""

    def test_refreshes_go_on_past_a_short_guess(self, chain_of: Callable[..., Chain]) -> None:
        """Guessed 30 days for a 90-day token: on day 40 a refresh is due and succeeds."""
        chain = chain_of(refresh_ttl=90 * DAY)
        chain.import_pair(chain.sandbox.generate(), refresh_lifetime_days=30)
        chain.advance(40 * DAY)
        at = next_refresh_at(chain.state(), chain.now(), PolicySettings())
        assert at is not None and at <= chain.now()
        result, state = chain.refresh()
        assert result.kind is CourierKind.REFRESHED and state.rejection is None
        assert chain.outcomes() == ["rotated"]


class TestServerOAuthErrors:
    """The authorization server's own retryable error did not rotate: no doubt is left."""

    @pytest.mark.parametrize(("status", "expected"), [
        (400, RejectionReason.REUSE_SUSPECTED),
        (401, RejectionReason.REUSE_SUSPECTED),
        (503, RejectionReason.AFTER_LOST_RESPONSE),  # a gateway may write a 5xx after forwarding
    ])  # fmt: skip
    def test_theft_after_a_retryable_error(
        self, chain_of: Callable[..., Chain], status: int, expected: RejectionReason
    ) -> None:
        """After a 400/401 temporarily_unavailable, a theft is reuse; after a 503, in doubt."""
        chain = chain_of()
        chain.import_pair(chain.sandbox.generate(), refresh_lifetime_days=30)
        chain.refresh()
        body = json.dumps({"error": "temporarily_unavailable"})
        chain.sandbox.fail_next(1, status=status, body=body)
        result, state = chain.refresh()
        assert result.kind is CourierKind.TRANSIENT
        assert chain.thief(state.refresh_token) == 200
        _, state = chain.refresh()
        assert chain.outcomes() == ["rotated", "failed_injected", "rotated", "reuse_revoked"]
        assert verdict(state) is expected
