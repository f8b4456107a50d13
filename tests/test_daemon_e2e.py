"""End to end: the real daemon process against the real sandbox, driven as a user drives it.

Every test runs ``python -m aac_tokend ...`` processes with AAC_TOKEND_HOME in a short /tmp
directory, talks to them over their real Unix sockets, signals them for real, and reads
the in-process sandbox's request log to see what reached the token endpoint.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from tests.helpers_e2e import (
    Daemon,
    E2EHome,
    RecordingSandbox,
    api_accepts,
    api_status,
    assert_one_line_error,
    import_pair,
    token_like_runs,
    wait_until,
)


def assert_chain_unbroken(sandbox: RecordingSandbox) -> None:
    """Every token request rotated, each presenting the token the previous one issued."""
    log = sandbox.log()
    assert [e["outcome"] for e in log] == ["rotated"] * len(log), log
    hashes = [e["rt_hash"] for e in log]
    assert len(set(hashes)) == len(hashes), "a refresh token was presented twice"
    for before, after in itertools.pairwise(log):
        assert after["rt_hash"] == before["new_rt_hash"], "the chain forked"


def quiet_control(daemon: Daemon, op: str, **fields: object) -> None:
    """A control request whose connection may die with the daemon (a kill mid-request)."""
    with contextlib.suppress(OSError, ValueError):
        daemon.control(op, **fields)


def ask_refresh_until_sent(daemon: Daemon, sandbox: RecordingSandbox) -> None:
    """`refresh` until a request reaches the sandbox (or the daemon dies).

    Right after a restart the daemon may still be waiting for an earlier life's courier;
    a refresh asked then is answered "busy" and sends nothing, so ask again.
    """
    before = len(sandbox.log())
    while daemon.alive and len(sandbox.log()) == before:
        quiet_control(daemon, "refresh")
        time.sleep(0.05)  # "busy" comes back at once while that courier is out


class TestChainStaysAlive:
    """A healthy chain keeps a token the API accepts available at every instant."""

    @pytest.mark.slow
    def test_valid_token_every_read_for_sixty_seconds(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """With 5 s access tokens, 60 s of reads every ~150 ms all get an accepted token."""
        sandbox = sandboxes(access_ttl=5)
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        failures, reads = [], 0
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < 60.0:
            token = daemon.token()
            status = api_status(sandbox, token) if token else None
            if status != 200:
                failures.append((round(elapsed, 2), status))
            reads += 1
            time.sleep(0.15)
        refreshes = sandbox.outcomes().count("rotated")
        print(f"{reads} reads, {refreshes} refreshes")  # shown with -s: the measured values
        assert not failures, f"{len(failures)} of {reads} reads failed: {failures[:10]}"
        assert reads > 250
        # About 24: a 5 s token is refreshed at half its life (the 60 s margin cannot fit it),
        # every ~2.5 s plus the round trip; far more would be a refresh loop.
        assert 14 <= refreshes <= 30, f"{refreshes} refreshes in 60 s of 5 s tokens"
        assert_chain_unbroken(sandbox)


class TestKilledMidRefresh:
    """SIGKILL at any point of a refresh never loses the chain: the courier finishes it."""

    def test_sigkill_campaign_keeps_the_chain(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """15 kills 0-500 ms after a refresh request lands; each restart serves and rotates."""
        sandbox = sandboxes(access_ttl=120)
        import_pair(home, sandbox)
        daemon = home.daemon()
        kills = 15
        for i in range(kills):
            # Every third answer outlasts a restart, so the new daemon must wait for the
            # courier's lock; the others end inside the kill window or before it. (4 s: a
            # restart on a loaded 2-core machine took over 2 s, and the courier was gone.)
            sandbox.set_answer_delay(4.0 if i % 3 == 0 else 0.25)
            offset = (i * 7 % kills) / (kills - 1) * 0.5
            daemon.start(profiles=["default"])
            assert api_accepts(sandbox, daemon.token()), f"kill {i}: restart served a bad token"
            before = len(sandbox.log())
            asker = threading.Thread(target=ask_refresh_until_sent, args=(daemon, sandbox))
            asker.start()
            wait_until(lambda b=before: len(sandbox.log()) > b, 20, f"refresh request {i}")
            time.sleep(offset)
            daemon.kill()
            asker.join(20)
        sandbox.set_answer_delay(0)
        daemon.start(profiles=["default"])
        before = len(sandbox.log())
        ask_refresh_until_sent(daemon, sandbox)
        assert sandbox.outcomes(before) == ["rotated"]
        assert api_accepts(sandbox, daemon.token())
        assert_chain_unbroken(sandbox)
        assert len(sandbox.log()) == kills + 1
        assert "waiting_for_courier" in daemon.output(), "no restart ever met a live courier"


class TestReplayedRefreshToken:
    """A refresh token replayed by someone else ends the chain, and the daemon stops there."""

    def test_replay_is_reuse_suspected_and_nothing_more_is_sent(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """After a replay: rejected/reuse_suspected, no more requests, token served to expiry."""
        sandbox = sandboxes(access_ttl=6)
        original = import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        assert home.cli("refresh").returncode == 0
        served = daemon.token()
        assert api_accepts(sandbox, served)

        body = {"grant_type": "refresh_token", "refresh_token": original["refresh_token"],
                "client_id": sandbox.client_id}  # fmt: skip
        assert post_form(sandbox.token_endpoint, body) == 400
        assert sandbox.outcomes()[-1] == "reuse_revoked"

        first = home.cli("refresh")
        assert first.returncode == 69, str(first)
        row = json.loads(home.cli("status", "--json").stdout)["profiles"][0]
        assert row["state"] == "rejected"
        assert row["rejection"]["reason"] == "reuse_suspected"
        assert row["alert"] and "compromised" in row["alert"]
        sent = len(sandbox.log())

        again = home.cli("refresh")
        assert again.returncode == 69 and len(sandbox.log()) == sent
        assert daemon.token() == served, "the still-valid token must be served until it expires"

        # Served up to the 1 s serve margin before expiry, and not a moment after.
        expires = datetime.fromisoformat(row["access_expires_at"].replace("Z", "+00:00"))
        exp = expires.timestamp()  # whole seconds: the true expiry is in [exp, exp + 1)
        gone = wait_until(lambda: not daemon.token() and time.time(), 10, "the token's expiry")
        assert exp - 1.1 <= gone <= exp + 0.5, f"stopped serving {gone - exp:+.2f} s from exp"
        token = home.cli("token")
        assert token.stdout == ""
        message = assert_one_line_error(token, 69)
        assert "rejected" in message
        assert len(sandbox.log()) == sent, "a rejected chain must never be spent again"

        daemon.stop()
        daemon.start()
        time.sleep(4.5)  # two scheduler ticks: a restarted daemon must not try again either
        assert daemon.profile_status()["state"] == "rejected"
        assert len(sandbox.log()) == sent


def post_form(url: str, form: dict[str, str]) -> int:
    """POST a form to the sandbox as a third party would; the HTTP status."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(
            "POST", parts.path, urllib.parse.urlencode(form),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


class TestSingleOwner:
    """One daemon per home, and one refresh per profile at a time."""

    def test_second_run_is_refused_with_the_owner_pid(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """A second `run` exits 3 at once, naming the running daemon's pid."""
        sandbox = sandboxes()
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        second = home.cli("run", timeout=30)
        message = assert_one_line_error(second, 3)
        assert f"already running (pid {daemon.pid})" in message
        assert daemon.alive and api_accepts(sandbox, daemon.token())

    def test_parallel_refresh_commands_never_overlap(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Twelve concurrent `refresh` processes: each token request presents a new token."""
        sandbox = sandboxes(answer_delay=0.2)
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        procs = [
            subprocess.Popen(
                home.command("refresh"),
                env=home.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            for _ in range(12)
        ]
        results = [(*p.communicate(timeout=60), p.returncode) for p in procs]
        assert all(code == 0 for _, _, code in results), results
        assert sandbox.log(), "no refresh reached the sandbox"
        assert_chain_unbroken(sandbox)
        assert api_accepts(sandbox, daemon.token())


class TestNoTokenLeaks:
    """No token reaches a file, a log, an error message, argv or the environment."""

    def test_no_token_anywhere_but_the_socket(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """Refreshes, failures, a rejection and errors later, no issued token is in plaintext."""
        sandbox = sandboxes(access_ttl=3)
        original = import_pair(home, sandbox)
        import_pair(home, sandbox, profile="second")
        daemon = home.daemon().start(profiles=["default", "second"])
        served = {daemon.token(), daemon.token("second")}
        for args in (("status",), ("status", "--json"), ("profiles",), ("refresh",),
                     ("api", "GET", "/iam/v1/workspaces/current"),
                     ("exec", "--", "sh", "-c", 'test -n "$AAC_ACCESS_TOKEN" && echo ok'),
                     ("refresh", "-p", "nope"), ("import", "-p", "bad name")):  # fmt: skip
            home.cli(*args, input="garbage\n")
        home.cli("import", input=json.dumps({"access_token": original["access_token"]}))
        for stdin, extra in bad_imports(sandbox).values():  # errors about pasted tokens
            home.cli("import", *extra, input=stdin)
        sent = len(sandbox.log())
        sandbox.fail_next(1, status=503)
        wait_until(lambda: "failed_injected" in sandbox.outcomes(sent), 15, "a failed refresh")
        wait_until(lambda: "refresh_failed" in daemon.output(), 15, "the failure logged")
        wait_until(lambda: sandbox.outcomes()[-1] == "rotated", 15, "a recovery")
        replay = {"grant_type": "refresh_token", "client_id": sandbox.client_id,
                  "refresh_token": str(original["refresh_token"])}  # fmt: skip
        assert post_form(sandbox.token_endpoint, replay) == 400
        wait_until(lambda: "refresh_rejected" in daemon.output(), 15, "the rejection")
        for _ in range(4):
            served.add(daemon.token("second"))
            time.sleep(0.5)
        home.cli("status")
        home.cli("token")  # its stdout is the token by design; only its stderr is checked
        # The positive control of the search. 3 s tokens leave a short gap each cycle (their
        # refresh falls after the 1 s serve margin), so ask again if it lands in one.
        control = wait_until(
            lambda: (r := home.cli("token", "-p", "second")).returncode == 0 and r, 10, "a token"
        )

        proc_files = {
            name: Path(f"/proc/{daemon.pid}/{name}").read_bytes() for name in ("cmdline", "environ")
        }
        secrets = {t for t in set(sandbox.issued) | served if t}
        assert len(secrets) > 10
        leaks = files_containing(home.root, secrets)  # while running: lock files, run dir
        daemon.stop()
        leaks += files_containing(home.root, secrets)
        for name, content in proc_files.items():
            leaks += [f"/proc/pid/{name}" for s in secrets if s.encode() in content]
        assert any(secret in control.stdout for secret in secrets), "the search finds nothing"
        for label, text in home.captured_output():
            if label in ("('token',) stdout", "('token', '-p', 'second') stdout"):
                continue
            leaks += [label for s in secrets if s in text]
            leaks += [f"{label}: token-like {run[:12]}..." for run in token_like_runs(text)]
        assert not leaks, leaks
        assert "refresh_rejected" in daemon.output() and "refresh_succeeded" in daemon.output()


def files_containing(root: Path, secrets: set[str]) -> list[str]:
    """Every regular file under ``root`` whose bytes contain one of ``secrets``."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        content = path.read_bytes()
        found += [str(path) for secret in secrets if secret.encode() in content]
    return found


def _jwt_without_exp(issuer: str) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return (
        part({"alg": "HS256", "typ": "JWT"})
        + "."
        + part({"iss": issuer, "client_id": "aac-sandbox-client", "sub": "x"})
        + ".c2lnbmF0dXJl"
    )


def bad_imports(sandbox: RecordingSandbox) -> dict[str, tuple[str, list[str]]]:
    """Each bad input to `import`: (stdin, extra arguments)."""
    pair = sandbox.generate()
    access, refresh = str(pair["access_token"]), str(pair["refresh_token"])
    endpoint = ["--token-endpoint", sandbox.token_endpoint]
    return {
        "garbage": ("this is not a token, just text\n", endpoint),
        "one line": (access + "\n", endpoint),
        "three lines": (f"{access}\n{refresh}\nmore\n", endpoint),
        "bad json": ('{"access_token": "' + access + '", ', endpoint),
        "http to a non-loopback host": (
            json.dumps(pair),
            ["--token-endpoint", "http://example.com/as/token"],
        ),
        "jwt without exp": (f"{_jwt_without_exp(sandbox.issuer)}\n{refresh}\n", endpoint),
    }


class TestBadInput:
    """Bad input gives one clear line and exit 65, and leaves every existing state intact."""

    @pytest.mark.parametrize("running", [False, True], ids=["stopped", "running"])
    def test_bad_imports_change_nothing(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox], running: bool
    ) -> None:
        """Garbage, wrong line counts, bad JSON, plain http, no exp: 65, one line, no change."""
        sandbox = sandboxes()
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"]) if running else None
        served = daemon.token() if daemon else None
        before = home.state_file().read_bytes()
        problems = []
        for case, (stdin, extra) in bad_imports(sandbox).items():
            result = home.cli("import", *extra, input=stdin)
            lines = result.stderr_lines()
            if not (
                result.returncode == 65
                and len(lines) == 1
                and lines[0].startswith("aac-tokend: error: ")
            ):
                problems.append(f"{case}: {result}")
            if home.state_file().read_bytes() != before:
                problems.append(f"{case}: the state file changed")
            if daemon is not None and daemon.token() != served:
                problems.append(f"{case}: the daemon stopped serving its token")
        assert not problems, "\n".join(problems)
        if daemon is not None:
            assert daemon.alive and api_accepts(sandbox, daemon.token())

    def test_corrupt_state_is_reported_and_never_touched(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """A flipped byte: one-line errors, the file stays byte-identical, others are served."""
        sandbox = sandboxes()
        import_pair(home, sandbox, profile="good")
        import_pair(home, sandbox, profile="bad")
        path = home.state_file("bad")
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 2] ^= 0x01
        path.write_bytes(bytes(damaged))
        pair = json.dumps(sandbox.generate())
        endpoint = ("--token-endpoint", sandbox.token_endpoint)

        def check_commands(where: str) -> None:
            status = home.cli("status")
            assert status.returncode == 0, str(status)
            lines = [ln for ln in status.stdout.splitlines() if "cannot be decrypted" in ln]
            assert len(lines) == 1 and "bad" in status.stdout, f"{where}: {status}"
            message = assert_one_line_error(home.cli("token", "-p", "bad"), 69)
            assert "cannot be decrypted" in message, f"{where}: {message}"
            attempt = home.cli("import", "-p", "bad", *endpoint, input=pair)
            message = assert_one_line_error(attempt, 69)
            assert "move the file aside" in message, f"{where}: {message}"
            assert path.read_bytes() == bytes(damaged), f"{where}: the corrupt file was touched"

        check_commands("no daemon")
        daemon = home.daemon().start(profiles=["good"])
        check_commands("daemon running")
        message = assert_one_line_error(home.cli("refresh", "-p", "bad"), 69)
        assert "cannot be decrypted" in message
        row = next(r for r in daemon.status()["profiles"] if r["profile"] == "bad")
        assert row["state"] == "corrupt"
        assert daemon.alive and api_accepts(sandbox, daemon.token("good"))
        assert path.read_bytes() == bytes(damaged)


class TestStopSignals:
    """SIGTERM and SIGINT stop the daemon promptly with its state saved."""

    @pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
    def test_signal_stops_within_two_seconds_and_restart_serves(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox], sig: int
    ) -> None:
        """The daemon exits 0 within 2 s, removes its sockets; the state loads and serves."""
        sandbox = sandboxes()
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        assert daemon.control("refresh")["ok"]
        token = daemon.token()
        started = time.monotonic()
        daemon.send_signal(sig)
        code = daemon.wait(timeout=10)
        took = time.monotonic() - started
        assert code == 0 and took < 2.0, f"exit {code} after {took:.2f} s"
        assert not list(home.paths.runtime_dir.glob("*.sock")), "sockets left behind"
        offline = json.loads(home.cli("status", "--json").stdout)
        assert offline["daemon_running"] is False
        assert offline["profiles"][0]["refresh_count"] == 1
        assert offline["profiles"][0]["state"] == "ok"
        daemon.start(profiles=["default"])
        assert daemon.token() == token and api_accepts(sandbox, token)
        assert sandbox.outcomes() == ["rotated"]

    def test_signal_during_a_slow_refresh_leaves_it_to_the_courier(
        self, home: E2EHome, sandboxes: Callable[..., RecordingSandbox]
    ) -> None:
        """SIGTERM mid-refresh exits within 2 s; the restart waits for the courier's tokens."""
        sandbox = sandboxes(answer_delay=6.0)
        import_pair(home, sandbox)
        daemon = home.daemon().start(profiles=["default"])
        old = daemon.token()
        asker = threading.Thread(target=quiet_control, args=(daemon, "refresh"))
        asker.start()
        wait_until(lambda: sandbox.log(), 10, "the refresh request")
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=15)
        took = time.monotonic() - started
        asker.join(15)
        assert code == 0 and took < 2.0, f"exit {code} after {took:.2f} s"

        # The courier still waits for its answer (6 s): the restarted daemon waits for the
        # profile's lock, and says so (not "no profile") to anyone asking meanwhile.
        daemon.start(wait=False)
        daemon.wait_ready()
        early = home.cli("token")
        assert early.returncode == 75, str(early)
        assert "try again in a few seconds" in assert_one_line_error(early, 75)
        new = wait_until(lambda: daemon.token(), 15, "the courier's token")
        assert new != old
        row = daemon.profile_status()
        assert row["refresh_count"] == 1 and row["state"] == "ok", row
        assert api_accepts(sandbox, new)
        assert_chain_unbroken(sandbox)
