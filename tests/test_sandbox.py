"""The sandbox authorization server, exercised over real loopback HTTP with requests."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aac_tokend.errors import InputError
from aac_tokend.sandbox.server import MAX_BODY_BYTES, SandboxServer

CLIENT = "aac-sandbox-client"
# Generous bound for one loopback HTTP exchange; it only keeps a broken test from hanging.
TIMEOUT = 10.0
WORKSPACE = "/iam/v1/workspaces/current"
INVALID_GRANT = {
    "error": "invalid_grant",
    "error_description": "unknown, invalid, or expired refresh token",
}
INVALID_CLIENT = {
    "error": "invalid_client",
    "error_description": "Invalid client or client credentials",
}
FIRST_LINE = re.compile(
    r"sandbox listening on (http://127\.0\.0\.1:(\d+)) token_endpoint=\1/as/token\n"
)


class FakeClock:
    """A wall clock that moves only when the test moves it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked(clock: FakeClock) -> Iterator[SandboxServer]:
    with SandboxServer(clock=clock, access_ttl=60, refresh_ttl=3600) as server:
        yield server


def refresh(
    server: SandboxServer, refresh_token: str, client_id: str = CLIENT
) -> requests.Response:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    return requests.post(server.token_endpoint, data=form, timeout=TIMEOUT)


def workspace(server: SandboxServer, authorization: str | None) -> requests.Response:
    headers = {} if authorization is None else {"Authorization": authorization}
    return requests.get(server.api_url + WORKSPACE, headers=headers, timeout=TIMEOUT)


def short_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def jwt_part(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def rt(tokens: dict[str, Any]) -> str:
    value = tokens["refresh_token"]
    assert isinstance(value, str)
    return value


def at(tokens: dict[str, Any]) -> str:
    value = tokens["access_token"]
    assert isinstance(value, str)
    return value


def outcomes(server: SandboxServer) -> list[object]:
    return [entry["outcome"] for entry in server.log()]


class TestRotation:
    def test_a_refresh_returns_a_new_pair(self, sandbox: SandboxServer) -> None:
        """A current refresh token yields a new access token and a new refresh token."""
        first = sandbox.generate()
        answer = refresh(sandbox, rt(first))
        assert answer.status_code == 200
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.headers["Cache-Control"] == "no-store"
        second = answer.json()
        assert set(second) == {"access_token", "refresh_token", "token_type", "expires_in"}
        assert second["token_type"] == "Bearer"
        assert second["expires_in"] == 3600
        assert rt(second) != rt(first)
        assert at(second) != at(first)

    def test_the_log_names_tokens_by_hash_only(self, sandbox: SandboxServer) -> None:
        """A rotation is logged with the sha256 prefixes of old and new token, never a token."""
        first = sandbox.generate()
        second = refresh(sandbox, rt(first)).json()
        (entry,) = sandbox.log()
        assert entry["outcome"] == "rotated"
        assert entry["rt_hash"] == short_hash(rt(first))
        assert entry["new_rt_hash"] == short_hash(rt(second))
        assert entry["client_id"] == CLIENT
        assert entry["seq"] == 1
        assert isinstance(entry["family"], str) and entry["family"]
        text = json.dumps(sandbox.log())
        for token in (rt(first), rt(second), at(first), at(second)):
            assert token not in text

    def test_a_chain_keeps_rotating(self, sandbox: SandboxServer) -> None:
        """Each new refresh token rotates in turn, all in the same family."""
        tokens = sandbox.generate()
        for _ in range(5):
            answer = refresh(sandbox, rt(tokens))
            assert answer.status_code == 200
            tokens = answer.json()
        assert outcomes(sandbox) == ["rotated"] * 5
        assert len({entry["family"] for entry in sandbox.log()}) == 1

    def test_reuse_revokes_the_whole_family(self, sandbox: SandboxServer) -> None:
        """A used refresh token is refused and kills its family, the current token included."""
        first = sandbox.generate()
        second = refresh(sandbox, rt(first)).json()
        reuse = refresh(sandbox, rt(first))
        assert reuse.status_code == 400
        assert reuse.json() == INVALID_GRANT
        after = refresh(sandbox, rt(second))
        assert after.status_code == 400
        assert after.json() == INVALID_GRANT
        assert outcomes(sandbox) == ["rotated", "reuse_revoked", "revoked"]

    def test_concurrent_refreshes_of_one_token_rotate_once(self, sandbox: SandboxServer) -> None:
        """Of several simultaneous refreshes with one token, one rotates and the rest are reuse."""
        tokens = sandbox.generate()
        threads = [_refresh_in_thread(sandbox, rt(tokens)) for _ in range(8)]
        for thread, _ in threads:
            thread.join(TIMEOUT)
        codes = sorted(r.status_code for _, (r,) in threads if isinstance(r, requests.Response))
        assert codes == [200] + [400] * 7
        expected = ["reuse_revoked", "revoked", "revoked", "revoked", "revoked", "revoked"]
        assert sorted(map(str, outcomes(sandbox))) == [*expected, "revoked", "rotated"]

    def test_reuse_leaves_other_families_alone(self, sandbox: SandboxServer) -> None:
        """Revoking one family does not touch another one."""
        mine, other = sandbox.generate(), sandbox.generate()
        refresh(sandbox, rt(mine))
        refresh(sandbox, rt(mine))
        assert refresh(sandbox, rt(other)).status_code == 200

    def test_the_access_token_is_an_hs256_jwt(
        self, clocked: SandboxServer, clock: FakeClock
    ) -> None:
        """The access JWT has iss, sub, client_id, scope, jti, and iat/exp from the given clock."""
        tokens = clocked.generate(sub="alice")
        assert jwt_part(at(tokens), 0) == {"alg": "HS256", "typ": "JWT"}
        claims = jwt_part(at(tokens), 1)
        assert claims["iss"] == clocked.issuer == clocked.url + "/as"
        assert (claims["sub"], claims["client_id"], claims["scope"]) == ("alice", CLIENT, "aac")
        assert claims["iat"] == int(clock.now)
        assert claims["exp"] == int(clock.now) + 60
        assert isinstance(claims["jti"], str) and claims["jti"]
        assert "=" not in at(tokens)


class TestRejections:
    def test_an_unknown_token_is_invalid_grant(self, sandbox: SandboxServer) -> None:
        """A refresh token the server never issued gets 400 invalid_grant."""
        answer = refresh(sandbox, "never-issued")
        assert answer.status_code == 400
        assert answer.json() == INVALID_GRANT
        (entry,) = sandbox.log()
        assert entry["outcome"] == "unknown"
        assert entry["family"] == ""
        assert entry["rt_hash"] == short_hash("never-issued")

    def test_a_wrong_client_is_invalid_client(self, sandbox: SandboxServer) -> None:
        """A client_id other than the family's gets 401 invalid_client and revokes nothing."""
        tokens = sandbox.generate()
        answer = refresh(sandbox, rt(tokens), client_id="someone-else")
        assert answer.status_code == 401
        assert answer.json() == INVALID_CLIENT
        assert refresh(sandbox, rt(tokens)).status_code == 200
        assert outcomes(sandbox) == ["invalid_client", "rotated"]

    def test_another_known_client_is_still_invalid_client(self, sandbox: SandboxServer) -> None:
        """A client that exists but does not own the family gets 401 invalid_client."""
        sandbox.generate(client_id="other-client")
        tokens = sandbox.generate()
        answer = refresh(sandbox, rt(tokens), client_id="other-client")
        assert answer.status_code == 401
        assert answer.json() == INVALID_CLIENT

    def test_a_missing_client_is_invalid_client(self, sandbox: SandboxServer) -> None:
        """A request without client_id gets 401 invalid_client."""
        tokens = sandbox.generate()
        form = {"grant_type": "refresh_token", "refresh_token": rt(tokens)}
        answer = requests.post(sandbox.token_endpoint, data=form, timeout=TIMEOUT)
        assert answer.status_code == 401
        assert answer.json() == INVALID_CLIENT

    def test_another_grant_type_is_unsupported(self, sandbox: SandboxServer) -> None:
        """grant_type other than refresh_token gets 400 unsupported_grant_type."""
        form = {"grant_type": "password", "username": "u", "password": "p", "client_id": CLIENT}
        answer = requests.post(sandbox.token_endpoint, data=form, timeout=TIMEOUT)
        assert answer.status_code == 400
        assert answer.json()["error"] == "unsupported_grant_type"
        assert outcomes(sandbox) == ["invalid_request"]

    def test_a_missing_refresh_token_is_invalid_request(self, sandbox: SandboxServer) -> None:
        """A refresh grant without refresh_token gets 400 invalid_request."""
        form = {"grant_type": "refresh_token", "client_id": CLIENT}
        answer = requests.post(sandbox.token_endpoint, data=form, timeout=TIMEOUT)
        assert answer.status_code == 400
        assert answer.json()["error"] == "invalid_request"
        assert outcomes(sandbox) == ["invalid_request"]

    def test_a_repeated_parameter_is_invalid_request(self, sandbox: SandboxServer) -> None:
        """A parameter sent twice gets 400 invalid_request and rotates nothing."""
        tokens = sandbox.generate()
        body = urlencode(
            [
                ("grant_type", "refresh_token"),
                ("refresh_token", rt(tokens)),
                ("refresh_token", rt(tokens)),
                ("client_id", CLIENT),
            ]
        )
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        answer = requests.post(sandbox.token_endpoint, data=body, headers=headers, timeout=TIMEOUT)
        assert answer.status_code == 400
        assert answer.json()["error"] == "invalid_request"
        assert refresh(sandbox, rt(tokens)).status_code == 200


class TestRefreshExpiry:
    def test_rotation_does_not_extend_the_family(
        self, clocked: SandboxServer, clock: FakeClock
    ) -> None:
        """A family dies refresh_ttl after Generate however often it rotated."""
        tokens = clocked.generate()
        assert tokens["refresh_token_expires_in"] == 3600
        clock.now += 3000
        tokens = refresh(clocked, rt(tokens)).json()
        clock.now += 599
        tokens = refresh(clocked, rt(tokens)).json()
        clock.now += 1
        answer = refresh(clocked, rt(tokens))
        assert answer.status_code == 400
        assert answer.json() == INVALID_GRANT
        assert outcomes(clocked) == ["rotated", "rotated", "expired"]


class TestAccessTokenOnApi:
    def test_a_valid_token_reads_the_workspace(self, sandbox: SandboxServer) -> None:
        """A fresh access token gets the workspace, naming the token's subject."""
        tokens = sandbox.generate(sub="bob")
        answer = workspace(sandbox, "Bearer " + at(tokens))
        assert answer.status_code == 200
        body = answer.json()
        assert isinstance(body["id"], int)
        assert (body["name"], body["user"]) == ("Sandbox workspace", "bob")

    def test_a_token_dies_at_exp(self, clocked: SandboxServer, clock: FakeClock) -> None:
        """The API accepts the token until its exp on the injected clock, then answers 401."""
        tokens = clocked.generate()
        exp = jwt_part(at(tokens), 1)["exp"]
        clock.now = exp - 0.5
        assert workspace(clocked, "Bearer " + at(tokens)).status_code == 200
        clock.now = exp
        answer = workspace(clocked, "Bearer " + at(tokens))
        assert answer.status_code == 401
        assert answer.json() == {"error": "invalid_token"}
        assert answer.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'

    def test_short_ttls_give_whole_second_claims(self, clock: FakeClock) -> None:
        """access_ttl=2 gives exp = iat + 2 and expires_in 2."""
        with SandboxServer(clock=clock, access_ttl=2) as server:
            tokens = server.generate()
            claims = jwt_part(at(tokens), 1)
            assert claims["exp"] - claims["iat"] == 2 == tokens["expires_in"]
            assert workspace(server, "Bearer " + at(tokens)).status_code == 200
            clock.now += 2
            assert workspace(server, "Bearer " + at(tokens)).status_code == 401

    def test_a_revoked_token_is_refused(self, sandbox: SandboxServer) -> None:
        """revoke_access_token makes the API refuse that token and no other."""
        first = sandbox.generate()
        second = refresh(sandbox, rt(first)).json()
        sandbox.revoke_access_token(at(first))
        assert workspace(sandbox, "Bearer " + at(first)).status_code == 401
        assert workspace(sandbox, "Bearer " + at(second)).status_code == 200

    @pytest.mark.parametrize(
        "authorization",
        [None, "", "Bearer", "Bearer not-a-jwt", "Basic dXNlcjpwYXNz", "Bearer a.b.c"],
    )
    def test_no_usable_token_is_refused(
        self, sandbox: SandboxServer, authorization: str | None
    ) -> None:
        """A missing, garbled or non-Bearer credential gets 401 invalid_token."""
        answer = workspace(sandbox, authorization)
        assert answer.status_code == 401
        assert answer.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'

    def test_another_servers_token_is_refused(self, sandbox: SandboxServer) -> None:
        """Each server signs with its own key, so a token from another sandbox is refused."""
        with SandboxServer() as other:
            foreign = at(other.generate())
        assert workspace(sandbox, "Bearer " + foreign).status_code == 401

    def test_a_tampered_token_is_refused(self, sandbox: SandboxServer) -> None:
        """Changing the payload breaks the signature."""
        header, _, signature = at(sandbox.generate()).split(".")
        claims = {"iss": sandbox.issuer, "sub": "mallory", "exp": 9_999_999_999}
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        answer = workspace(sandbox, f"Bearer {header}.{payload}.{signature}")
        assert answer.status_code == 401


class TestFailureInjection:
    def test_injected_failures_carry_status_and_retry_after(self, sandbox: SandboxServer) -> None:
        """fail_next answers the next requests with the status and Retry-After, rotating nothing."""
        tokens = sandbox.generate()
        sandbox.fail_next(2, status=503, retry_after=7)
        for _ in range(2):
            answer = refresh(sandbox, rt(tokens))
            assert answer.status_code == 503
            assert answer.headers["Retry-After"] == "7"
            assert "error" not in answer.json()
        assert refresh(sandbox, rt(tokens)).status_code == 200
        assert outcomes(sandbox) == ["failed_injected", "failed_injected", "rotated"]
        assert sandbox.log()[0]["rt_hash"] == short_hash(rt(tokens))

    def test_an_injected_body_is_sent_verbatim(self, sandbox: SandboxServer) -> None:
        """A given body is sent as is, as text when it is not JSON."""
        sandbox.fail_next(1, status=502, body="<html>bad gateway</html>")
        answer = refresh(sandbox, rt(sandbox.generate()))
        assert answer.status_code == 502
        assert answer.text == "<html>bad gateway</html>"
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert "Retry-After" not in answer.headers

    def test_failures_can_be_injected_over_http(self, sandbox: SandboxServer) -> None:
        """POST /sandbox/fail queues the same failures as fail_next."""
        control = {"count": 1, "status": 429, "retry_after": 2}
        requests.post(sandbox.url + "/sandbox/fail", json=control, timeout=TIMEOUT)
        answer = refresh(sandbox, rt(sandbox.generate()))
        assert answer.status_code == 429
        assert answer.headers["Retry-After"] == "2"

    def test_injections_queue_up_in_order(self, sandbox: SandboxServer) -> None:
        """A second fail_next queues behind the first instead of replacing it."""
        tokens = sandbox.generate()
        sandbox.fail_next(1, status=500)
        sandbox.fail_next(1, drop=True)
        assert refresh(sandbox, rt(tokens)).status_code == 500
        with pytest.raises(requests.ConnectionError):
            refresh(sandbox, rt(tokens))
        assert outcomes(sandbox) == ["failed_injected", "dropped_after_rotation"]

    def test_a_huge_count_costs_no_memory(self, sandbox: SandboxServer) -> None:
        """A count of 10**12 over HTTP is accepted and simply fails every request."""
        control = {"count": 10**12, "status": 503}
        answer = requests.post(sandbox.url + "/sandbox/fail", json=control, timeout=TIMEOUT)
        assert answer.status_code == 200
        assert refresh(sandbox, "x").status_code == 503

    @pytest.mark.parametrize(
        "kwargs",
        [{"count": -1}, {"count": 1, "status": 99}, {"count": 1, "retry_after": -1.0}],
    )
    def test_nonsense_injections_are_refused(
        self, sandbox: SandboxServer, kwargs: dict[str, Any]
    ) -> None:
        """A negative count, a status outside 200..599 or a negative Retry-After: InputError."""
        with pytest.raises(InputError):
            sandbox.fail_next(**kwargs)


class TestLostResponse:
    def test_drop_rotates_then_hangs_up(self, sandbox: SandboxServer) -> None:
        """With drop the token rotates, the client gets no answer, and a retry is a reuse."""
        tokens = sandbox.generate()
        sandbox.fail_next(1, drop=True)
        with pytest.raises(requests.ConnectionError):
            refresh(sandbox, rt(tokens))
        (entry,) = sandbox.log()
        assert entry["outcome"] == "dropped_after_rotation"
        assert entry["rt_hash"] == short_hash(rt(tokens))
        assert isinstance(entry["new_rt_hash"], str) and len(entry["new_rt_hash"]) == 16
        retry = refresh(sandbox, rt(tokens))
        assert retry.status_code == 400
        assert retry.json() == INVALID_GRANT
        assert outcomes(sandbox) == ["dropped_after_rotation", "reuse_revoked"]


def _refresh_in_thread(
    server: SandboxServer, refresh_token: str
) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        try:
            result.append(refresh(server, refresh_token, CLIENT))
        except requests.RequestException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _wait_for_log(server: SandboxServer, entries: int) -> None:
    done = threading.Event()
    for _ in range(1000):
        if len(server.log()) >= entries:
            return
        done.wait(0.01)
    raise AssertionError("the sandbox never logged the request")


class TestAnswerDelay:
    def test_the_rotation_is_logged_before_the_answer(self, sandbox: SandboxServer) -> None:
        """With an answer delay the log shows the rotation while the client still waits."""
        tokens = sandbox.generate()
        sandbox.set_answer_delay(3.0)
        thread, result = _refresh_in_thread(sandbox, rt(tokens))
        _wait_for_log(sandbox, 1)
        assert outcomes(sandbox) == ["rotated"]
        assert result == []
        thread.join(TIMEOUT)
        (answer,) = result
        assert isinstance(answer, requests.Response) and answer.status_code == 200
        assert short_hash(rt(answer.json())) == sandbox.log()[0]["new_rt_hash"]

    def test_stop_does_not_wait_for_a_delayed_answer(self) -> None:
        """stop() returns while a request sits in a long answer delay; that answer is lost."""
        server = SandboxServer(answer_delay=600.0)
        server.start()
        thread, result = _refresh_in_thread(server, rt(server.generate()))
        _wait_for_log(server, 1)
        stopper = threading.Thread(target=server.stop, daemon=True)
        stopper.start()
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        thread.join(TIMEOUT)
        (outcome,) = result
        assert isinstance(outcome, requests.ConnectionError)


class TestHttpControl:
    def test_generate_over_http(self, sandbox: SandboxServer) -> None:
        """POST /sandbox/generate starts a family for the given client and subject."""
        control = {"client_id": "demo-client", "sub": "carol"}
        answer = requests.post(sandbox.url + "/sandbox/generate", json=control, timeout=TIMEOUT)
        assert answer.status_code == 200
        tokens = answer.json()
        assert tokens["token_type"] == "Bearer"
        assert tokens["refresh_token_expires_in"] == 30 * 86400
        assert workspace(sandbox, "Bearer " + at(tokens)).json()["user"] == "carol"
        assert refresh(sandbox, rt(tokens), client_id="demo-client").status_code == 200

    def test_generate_without_a_body_uses_the_defaults(self, sandbox: SandboxServer) -> None:
        """An empty POST /sandbox/generate uses the server's client_id."""
        answer = requests.post(sandbox.url + "/sandbox/generate", timeout=TIMEOUT)
        assert refresh(sandbox, rt(answer.json())).status_code == 200

    def test_a_bad_control_body_is_400(self, sandbox: SandboxServer) -> None:
        """A control body that is not a JSON object, or has a wrongly typed field, gets 400."""
        for body in (b"[1]", b"{not json", b'{"client_id": 5}'):
            answer = requests.post(sandbox.url + "/sandbox/generate", data=body, timeout=TIMEOUT)
            assert answer.status_code == 400
        bad = {"count": True}
        assert requests.post(sandbox.url + "/sandbox/fail", json=bad, timeout=TIMEOUT).ok is False

    def test_the_log_over_http(self, sandbox: SandboxServer) -> None:
        """GET /sandbox/log returns the same list as log()."""
        refresh(sandbox, rt(sandbox.generate()))
        answer = requests.get(sandbox.url + "/sandbox/log", timeout=TIMEOUT)
        assert answer.json() == sandbox.log()

    def test_revoke_over_http(self, sandbox: SandboxServer) -> None:
        """POST /sandbox/revoke-access revokes an access token."""
        token = at(sandbox.generate())
        control = {"access_token": token}
        requests.post(sandbox.url + "/sandbox/revoke-access", json=control, timeout=TIMEOUT)
        assert workspace(sandbox, "Bearer " + token).status_code == 401

    def test_answer_delay_over_http(self, sandbox: SandboxServer) -> None:
        """POST /sandbox/answer-delay sets the answer delay."""
        control = {"seconds": 0.25}
        answer = requests.post(sandbox.url + "/sandbox/answer-delay", json=control, timeout=TIMEOUT)
        assert answer.json() == {"answer_delay": 0.25}

    def test_unknown_paths_are_404_json(self, sandbox: SandboxServer) -> None:
        """Anything not served is a JSON 404."""
        answer = requests.get(sandbox.url + "/as/authorization.oauth2", timeout=TIMEOUT)
        assert answer.status_code == 404
        assert answer.json() == {"error": "not_found"}

    def test_a_wrong_method_is_405(self, sandbox: SandboxServer) -> None:
        """GET on the token endpoint is refused with 405 and Allow: POST."""
        answer = requests.get(sandbox.token_endpoint, timeout=TIMEOUT)
        assert answer.status_code == 405
        assert answer.headers["Allow"] == "POST"

    def test_an_oversized_body_is_413(self, sandbox: SandboxServer) -> None:
        """A body over 64 KiB is refused unread with 413, and logged as invalid_request."""
        body = b"a" * (MAX_BODY_BYTES + 1)
        answer = requests.post(sandbox.token_endpoint, data=body, timeout=TIMEOUT)
        assert answer.status_code == 413
        assert outcomes(sandbox) == ["invalid_request"]

    @pytest.mark.parametrize(
        ("header", "status"),
        [
            ("Content-Length: abc", 400),
            ("Content-Length: -1", 400),
            ("Content-Length: \xb2", 400),
            ("Transfer-Encoding: chunked", 411),
        ],
    )
    def test_a_bad_framing_is_4xx(self, sandbox: SandboxServer, header: str, status: int) -> None:
        """A body without a usable Content-Length is refused with a 4xx, not a crash."""
        request = f"POST /as/token HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode("latin-1")
        host, port = sandbox.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
            conn.sendall(request)
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        assert reply.startswith(f"HTTP/1.0 {status} ".encode())

    def test_nothing_is_printed_per_request(
        self, sandbox: SandboxServer, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """Requests leave stdout and stderr empty, so no token can leak there."""
        tokens = sandbox.generate()
        refresh(sandbox, rt(tokens))
        refresh(sandbox, rt(tokens))
        workspace(sandbox, "Bearer " + at(tokens))
        requests.get(sandbox.url + "/nowhere", timeout=TIMEOUT)
        assert capfd.readouterr() == ("", "")


class TestLifecycle:
    def test_stop_is_idempotent_and_closes_the_port(self) -> None:
        """stop() twice is fine, and afterwards nothing listens on the port."""
        server = SandboxServer()
        server.start()
        server.stop()
        server.stop()
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/sandbox/log", timeout=TIMEOUT)

    def test_stop_without_start_does_not_hang(self) -> None:
        """A server that never served can still be stopped."""
        SandboxServer().stop()

    def test_urls(self) -> None:
        """url, issuer, token_endpoint and api_url follow the bound port."""
        with SandboxServer() as server:
            port = int(server.url.rsplit(":", 1)[1])
            assert server.url == f"http://127.0.0.1:{port}" == server.api_url
            assert server.issuer == server.url + "/as"
            assert server.token_endpoint == server.url + "/as/token"

    @pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "localhost", "::", "example.com"])
    def test_a_non_loopback_host_is_refused(self, host: str) -> None:
        """Only loopback IP literals may be bound."""
        with pytest.raises(InputError, match="loopback"):
            SandboxServer(host=host)

    def test_ipv6_loopback_works(self) -> None:
        """::1 is served, with a bracketed URL."""
        if not socket.has_ipv6:
            pytest.skip("no IPv6 on this machine")
        try:
            server = SandboxServer(host="::1")
        except InputError:
            pytest.skip("::1 cannot be bound here")
        with server:
            assert server.url.startswith("http://[::1]:")
            assert refresh(server, rt(server.generate())).status_code == 200


# Fields a token request may carry; hypothesis mixes them with arbitrary text, and
# LIVE stands for a refresh token the server really issued.
LIVE = "\x00live\x00"
_NAMES = st.sampled_from(["grant_type", "refresh_token", "client_id"]) | st.text(max_size=12)
_VALUES = st.sampled_from(["refresh_token", CLIENT, "", LIVE]) | st.text(max_size=40)
_FORMS = st.lists(st.tuples(_NAMES, _VALUES), max_size=6)


@pytest.fixture(scope="module")
def shared() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


class TestUntrustedInput:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=st.binary(max_size=512) | _FORMS)
    def test_no_token_body_gets_a_5xx(
        self, shared: SandboxServer, body: bytes | list[tuple[str, str]]
    ) -> None:
        """Whatever the form body, /as/token answers below 500 and keeps serving."""
        if isinstance(body, list):
            live = rt(shared.generate())
            body = urlencode([(k, live if v == LIVE else v) for k, v in body]).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        answer = requests.post(shared.token_endpoint, data=body, headers=headers, timeout=TIMEOUT)
        assert answer.status_code < 500
        assert answer.headers["Content-Type"] == "application/json"
        assert requests.get(shared.url + "/sandbox/log", timeout=TIMEOUT).status_code == 200


def _start_cli(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "aac_tokend.sandbox", *args]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
    assert ready, "the sandbox printed nothing"
    return proc.stdout.readline()


class TestCli:
    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
    def test_prints_one_line_serves_and_stops_on_a_signal(self, sig: signal.Signals) -> None:
        """The CLI prints its URL line first, serves, and exits 0 within 2 s of SIGTERM/SIGINT."""
        proc = _start_cli("--port", "0", "--access-ttl", "5")
        try:
            line = _first_line(proc)
            match = FIRST_LINE.fullmatch(line)
            assert match, line
            url = match.group(1)
            tokens = requests.post(url + "/sandbox/generate", timeout=TIMEOUT).json()
            assert tokens["expires_in"] == 5
            form = {"grant_type": "refresh_token", "refresh_token": rt(tokens), "client_id": CLIENT}
            assert requests.post(url + "/as/token", data=form, timeout=TIMEOUT).status_code == 200
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=2)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0
        assert (out, err) == ("", "")

    def test_answer_delay_is_in_milliseconds(self) -> None:
        """--answer-delay 20 waits 20 ms, not 20 s: the refresh answers within TIMEOUT."""
        proc = _start_cli("--answer-delay", "20")
        try:
            url = FIRST_LINE.fullmatch(_first_line(proc)).group(1)  # type: ignore[union-attr]
            tokens = requests.post(url + "/sandbox/generate", timeout=TIMEOUT).json()
            form = {"grant_type": "refresh_token", "refresh_token": rt(tokens), "client_id": CLIENT}
            assert requests.post(url + "/as/token", data=form, timeout=TIMEOUT).status_code == 200
        finally:
            proc.terminate()
            proc.communicate(timeout=TIMEOUT)

    @pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "localhost"])
    def test_a_non_loopback_host_is_refused(self, host: str) -> None:
        """--host off loopback exits with InputError's status and a one-line message."""
        proc = _start_cli("--host", host)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == InputError.exit_code
        assert out == ""
        assert len(err.splitlines()) == 1
        assert "loopback" in err and host in err
