"""The real daemon process: config errors at start and on reload, restarts, a failing endpoint.

Every test runs ``aac-tokend run`` as a child process in its own ``AAC_TOKEND_HOME`` and
talks to it only as a person would: the CLI, signals, and the sandbox's request log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from aac_tokend.sandbox.server import SandboxServer
from tests.scenario_support import (
    DaemonProcess,
    api_accepts,
    cli,
    import_via_cli,
    running_daemon,
    short_dir,
    third_party_refresh,
    write_config,
)

#: Generous: the daemon starts in well under a second, but CI machines stall.
WAIT = 20.0
#: How long the real-time failing-endpoint run lasts, and the share of one core it may use.
FAILING_SECONDS = 20.0
MAX_CORE_SHARE = 0.05


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer() as server:
        yield server


def status(home: Path) -> dict[str, Any]:
    answer = cli(home, "status", "--json")
    assert answer.returncode == 0, answer.stderr
    result: dict[str, Any] = json.loads(answer.stdout)
    return result


def row(home: Path, profile: str = "work") -> dict[str, Any]:
    return next(r for r in status(home)["profiles"] if r["profile"] == profile)


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def refresh_lead(home: Path) -> float:
    """How long before the access token's expiry the next refresh is planned."""
    r = row(home)
    return seconds(r["access_expires_at"]) - seconds(r["next_refresh_at"])


def fraction_band(fraction: float, lifetime: float = 3600.0) -> tuple[float, float]:
    """The lead a refresh_fraction gives (jitter moves it up to 5 % earlier; ISO rounding)."""
    lead = lifetime * (1 - fraction)
    return lead - 2, lead + lifetime * 0.05 + 2


def wait_for_event(daemon: DaemonProcess, event: str, count: int = 1) -> dict[str, Any]:
    """The ``count``-th log event named ``event``, waiting for it to be written."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = [e for e in daemon.log_events() if e.get("event") == event]
        if len(found) >= count:
            return found[count - 1]
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} #{count} in the daemon log: {daemon.log_text()}")


def import_pair(home: Path, sandbox: SandboxServer, *args: str) -> dict[str, object]:
    pair = sandbox.generate()
    done = import_via_cli(home, pair, "--profile", "work",
                          "--token-endpoint", sandbox.token_endpoint, *args)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return pair


# -- config errors at start --------------------------------------------------------------


class TestConfigAtStart:
    """A bad config.toml stops ``run`` at once with one line naming the key and the file."""

    @pytest.mark.parametrize(
        ("text", "key"),
        [
            ("refresh_fracton = 0.5\n", "refresh_fracton"),
            ("backoff_cap_seconds = 0\n", "backoff_cap_seconds"),
            ("notifications = 'yes'\n", "notifications"),
            ("on_alert = []\n", "on_alert"),
            ("[profiles.work]\nrefresh_fraction = 2\n", "profiles.work.refresh_fraction"),
        ],
    )
    def test_a_bad_key_or_value_exits_78_with_one_line(
        self, home: Path, text: str, key: str
    ) -> None:
        """Unknown keys and bad values: exit 78, one stderr line with key and file, no daemon."""
        path = write_config(home, text)
        done = cli(home, "run")
        assert done.returncode == 78
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert f"key '{key}'" in lines[0] and str(path) in lines[0]
        assert not (home / "run" / "control.sock").exists()

    def test_invalid_toml_names_the_file_and_the_line(self, home: Path) -> None:
        """A syntax error is reported with its line, in one line, exit 78."""
        path = write_config(home, "notifications = false\nrefresh_fraction = \n")
        done = cli(home, "run")
        assert done.returncode == 78
        assert done.stderr.count("\n") == 1
        assert str(path) in done.stderr and "line 2" in done.stderr


# -- config errors on reload ---------------------------------------------------------------


@pytest.fixture
def served(home: Path, sandbox: SandboxServer) -> Iterator[DaemonProcess]:
    """A daemon serving profile ``work`` with refresh_fraction 0.5."""
    write_config(home, "notifications = false\nrefresh_fraction = 0.5\n")
    import_pair(home, sandbox)
    with running_daemon(home) as daemon:
        yield daemon


def assert_still_serving(home: Path, sandbox: SandboxServer, daemon: DaemonProcess) -> None:
    assert daemon.proc.poll() is None
    token = cli(home, "token", "-p", "work")
    assert token.returncode == 0 and api_accepts(sandbox, token.stdout.strip())


def assert_lead_within(home: Path, fraction: float) -> None:
    low, high = fraction_band(fraction)
    assert low <= refresh_lead(home) <= high


class TestReload:
    """A bad reload leaves the daemon running with its old config; a good one applies."""

    BAD = "notifications = false\nrefresh_fraction = 0.9\nrefresh_fracton = 0.9\n"
    GOOD = "notifications = false\nrefresh_fraction = 0.9\n"

    def test_sighup_with_a_bad_file_keeps_the_running_config(
        self, home: Path, sandbox: SandboxServer, served: DaemonProcess
    ) -> None:
        """SIGHUP + typo: reload_failed names key and file; old schedule, token still served."""
        assert_lead_within(home, 0.5)
        path = write_config(home, self.BAD)
        os.kill(served.pid, signal.SIGHUP)
        failed = wait_for_event(served, "reload_failed")
        assert failed["level"] == "error"
        assert "'refresh_fracton'" in failed["error"] and str(path) in failed["error"]
        assert_still_serving(home, sandbox, served)
        assert_lead_within(home, 0.5)  # refresh_fraction = 0.9 in the bad file was not applied

        write_config(home, self.GOOD)
        os.kill(served.pid, signal.SIGHUP)
        wait_for_event(served, "config_reloaded")
        assert_lead_within(home, 0.9)

    def test_sighup_with_an_unparsable_number_keeps_the_daemon_running(
        self, home: Path, sandbox: SandboxServer, served: DaemonProcess
    ) -> None:
        """SIGHUP + a 5000-digit integer (tomllib's plain ValueError): logged, daemon serves on."""
        write_config(home, "refresh_fraction = " + "1" * 5000 + "\n")
        os.kill(served.pid, signal.SIGHUP)
        failed = wait_for_event(served, "reload_failed")
        assert "not valid TOML" in failed["error"]
        assert_still_serving(home, sandbox, served)
        done = cli(home, "reload")
        assert done.returncode == 78 and len(done.stderr.splitlines()) == 1, done.stderr
        assert_still_serving(home, sandbox, served)
        assert_lead_within(home, 0.5)

    def test_reload_command_with_a_bad_file_fails_and_keeps_running(
        self, home: Path, sandbox: SandboxServer, served: DaemonProcess
    ) -> None:
        """``aac-tokend reload`` + typo: exit 78 with the message; the daemon runs as before."""
        path = write_config(home, self.BAD)
        done = cli(home, "reload")
        assert done.returncode == 78
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and "'refresh_fracton'" in lines[0] and str(path) in lines[0]
        assert_still_serving(home, sandbox, served)
        assert_lead_within(home, 0.5)

        write_config(home, self.GOOD)
        assert cli(home, "reload").returncode == 0
        assert_lead_within(home, 0.9)
        assert_still_serving(home, sandbox, served)


# -- restarts ------------------------------------------------------------------------------


class TestRestart:
    """What a daemon learnt about a broken chain outlives the daemon."""

    def test_a_rejected_profile_stays_rejected_across_restarts_without_requests(
        self, home: Path, sandbox: SandboxServer
    ) -> None:
        """Rejected (its pair spent elsewhere), restarted twice: still rejected, nothing sent."""
        write_config(home, "notifications = false\n")
        pair = import_pair(home, sandbox)
        assert third_party_refresh(sandbox, str(pair["refresh_token"])).status_code == 200
        with running_daemon(home) as daemon:
            assert cli(home, "refresh", "-p", "work").returncode == 69
            wait_for_event(daemon, "alert")
        sent = len(sandbox.log())
        assert [e["outcome"] for e in sandbox.log()] == ["rotated", "reuse_revoked"]

        offline = row(home)  # no daemon: read from the encrypted state file
        assert offline["state"] == "rejected"
        assert offline["rejection"]["reason"] == "refused_after_import"  # spent before us
        with running_daemon(home) as daemon:
            r = row(home)
            assert r["state"] == "rejected" and r["rejection"]["reason"] == "refused_after_import"
            assert "already used elsewhere" in r["alert"] and "aac-tokend import" in r["alert"]
            assert r["next_refresh_at"] is None
            time.sleep(5.0)  # a few scheduler ticks
            assert cli(home, "refresh", "-p", "work").returncode == 69
        assert len(sandbox.log()) == sent


# -- a failing token endpoint in real time ---------------------------------------------------


@pytest.mark.slow
class TestFailingEndpointRealTime:
    """A token endpoint answering 503 for a while costs the daemon next to nothing."""

    def test_twenty_seconds_of_503_use_under_five_percent_of_a_core(
        self, home: Path, record_property: Any
    ) -> None:
        """Real daemon, real scheduler, sandbox always 503: CPU, log lines, requests bounded."""
        write_config(home, "notifications = false\n")
        with SandboxServer(access_ttl=4) as sandbox:
            import_pair(home, sandbox)
            sandbox.fail_next(1_000_000, status=503)
            with running_daemon(home) as daemon:
                deadline = time.monotonic() + WAIT
                while not sandbox.log() and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert sandbox.log(), "the daemon never tried to refresh"
                own0, kids0 = daemon.cpu_seconds()
                lines0, requests0 = len(daemon.log_lines()), len(sandbox.log())
                started = time.monotonic()
                time.sleep(FAILING_SECONDS)
                own1, kids1 = daemon.cpu_seconds()
                elapsed = time.monotonic() - started
                lines = daemon.log_lines()[lines0:]
                requests = len(sandbox.log()) - requests0
                r = row(home)
        cpu = (own1 - own0) + (kids1 - kids0)
        share = cpu / elapsed
        record_property("cpu_seconds", round(cpu, 3))
        record_property("core_share", round(share, 4))
        record_property("log_lines", len(lines))
        record_property("requests", requests)
        print(f"\n{elapsed:.1f} s of 503: daemon CPU {own1 - own0:.2f} s + couriers "
              f"{kids1 - kids0:.2f} s = {share:.2%} of a core; {requests} requests; "
              f"{len(lines)} log lines: {[json.loads(x)['event'] for x in lines]}")  # fmt: skip
        assert share < MAX_CORE_SHARE
        assert len(lines) <= 10 * elapsed / 60 + 3  # a few lines a minute
        assert 1 <= requests <= 6  # 2 s doubling: attempts at about +2, +6, +14 s
        assert r["state"] == "retrying" and r["last_error"] == "token endpoint answered HTTP 503"
        assert not r["token_valid"]
