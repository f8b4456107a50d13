"""A workstation's life, compressed: the engine on fake time against the real loopback sandbox.

Each scenario runs the real engine, file store, courier transaction and HTTP client; the
fake clock is shared with the sandbox, so a jump of eight hours is seen on both sides. Time
is driven like the real scheduler drives it: the engine's tick and every due job, at each
wake-up.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from aac_tokend.core.conditions import AlertEvent
from aac_tokend.core.config import Config
from aac_tokend.core.importer import parse_import_text
from aac_tokend.core.outcome import UNREACHED_PREFIX, FailureKind, Transient
from aac_tokend.core.policy import (
    UNREACHED_RETRY_CAP_SECONDS,
    PolicySettings,
    begin_attempt,
)
from aac_tokend.core.state import ProfileState
from aac_tokend.core.tokens import token_hash
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.engine import Engine
from aac_tokend.daemon.scheduling import WAKE_CAP_SECONDS
from aac_tokend.daemon.sinks import CommandSink
from aac_tokend.host.logs import configure_logging
from aac_tokend.refresh.endpoint import TokenEndpoint
from aac_tokend.testing import FakeClock
from tests.scenario_support import (
    DAY,
    HOUR,
    TIMEOUT,
    World,
    api_accepts,
    third_party_refresh,
)

GENERATE_HINT = "User Preferences > OAuth 2.0 API Tokens"
#: Steps of fake time between wake-ups where a scenario needs sub-second resolution.
FINE_STEP = 0.5


@pytest.fixture
def worlds() -> Iterator[Callable[..., World]]:
    """A factory of worlds, each closed (sandbox stopped, files removed) after the test."""
    made: list[World] = []

    def make(**options: object) -> World:
        world = World.build(**options)  # type: ignore[arg-type]
        made.append(world)
        return world

    yield make
    for world in made:
        world.close()


@pytest.fixture(autouse=True)
def default_structlog() -> Iterator[None]:
    """Tests that capture log lines reconfigure structlog; leave the defaults behind."""
    yield
    structlog.reset_defaults()


def rotated(world: World) -> list[dict[str, object]]:
    return [e for e in world.token_requests() if e["outcome"] == "rotated"]


def assert_rejected(world: World, reason: str, error: str) -> dict[str, object]:
    """The status row says rejected for ``reason`` and tells the person what to do."""
    row = world.status()
    assert row["state"] == "rejected"
    rejection = row["rejection"]
    assert isinstance(rejection, dict)
    assert rejection["reason"] == reason
    assert rejection["error"] == error
    assert rejection["at"] is not None and "error_description" in rejection
    alert = row["alert"]
    assert isinstance(alert, str) and "\n" not in alert
    assert GENERATE_HINT in alert and "aac-tokend import --profile work" in alert
    return row


# -- 1. the write-ahead journal -------------------------------------------------------------


class TestJournal:
    """A refresh is journaled durably before it leaves; a lost outcome is remembered."""

    def test_journal_is_on_disk_before_the_request_leaves(
        self, worlds: Callable[..., World]
    ) -> None:
        """While the request is on the wire, the state file names its refresh token's hash."""
        world = worlds()
        proxy = world.proxy()
        pair = world.import_pair(token_endpoint=proxy.token_endpoint)
        seen: list[ProfileState | None] = []
        proxy.before_forward = lambda: seen.append(world.store.load("work"))
        world.engine.refresh("work")
        assert len(seen) == 1
        on_disk = seen[0]
        assert on_disk is not None and on_disk.in_flight is not None
        assert on_disk.in_flight.rt_hash == token_hash(pair["refresh_token"])

    def test_success_replaces_journal_and_tokens_at_once(
        self, worlds: Callable[..., World]
    ) -> None:
        """After a refresh the file holds the rotated refresh token and no journal entry."""
        world = worlds()
        world.import_pair()
        world.engine.refresh("work")
        state = world.store.load("work")
        assert state is not None and state.in_flight is None and state.ambiguous_rt_hash is None
        assert state.refresh_token is not None
        assert token_hash(state.refresh_token) == rotated(world)[-1]["new_rt_hash"]

    def test_a_courier_killed_mid_request_leaves_an_ambiguous_outcome(
        self, worlds: Callable[..., World]
    ) -> None:
        """SIGKILL of a forked courier after the server rotated: the next rejection is ours."""
        world = worlds(fork=True)
        world.import_pair()
        world.sandbox.set_answer_delay(10.0)  # decided and rotated at once, answered late
        done = threading.Thread(target=world.engine.refresh, args=("work",), daemon=True)
        done.start()
        deadline = time.monotonic() + TIMEOUT
        while not rotated(world) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rotated(world), "the courier's request never reached the sandbox"
        couriers = _session_leading_children()
        assert len(couriers) == 1
        os.kill(couriers[0], signal.SIGKILL)
        done.join(TIMEOUT)
        assert not done.is_alive()
        state = world.store.load("work")
        assert state is not None and state.in_flight is None
        assert state.ambiguous_rt_hash == rotated(world)[0]["rt_hash"]
        assert world.status()["state"] == "retrying"

        world.sandbox.set_answer_delay(0.0)
        world.run(WAKE_CAP_SECONDS * 3)
        assert_rejected(world, "after_lost_response", "invalid_grant")
        assert [e["outcome"] for e in world.token_requests()] == ["rotated", "reuse_revoked"]

    def test_a_crash_after_the_request_left_is_recovered_at_start(
        self, worlds: Callable[..., World]
    ) -> None:
        """A journal entry nobody finished makes the restarted engine expect a lost answer."""
        world = worlds()
        world.import_pair()
        store, now = world.store, world.clock.now()
        state = store.load("work")
        assert state is not None and state.refresh_token and state.token_endpoint
        store.save(begin_attempt(state, now))  # what a courier does first...
        TokenEndpoint().refresh(state.token_endpoint, "aac-sandbox-client", state.refresh_token,
                                now=now)  # fmt: skip
        # ...and then the machine lost power before the answer was saved.
        world.restart()
        recovered = world.store.load("work")
        assert recovered is not None and recovered.in_flight is None
        assert recovered.ambiguous_rt_hash == token_hash(state.refresh_token)
        world.run(WAKE_CAP_SECONDS * 3)
        assert_rejected(world, "after_lost_response", "invalid_grant")

    def test_a_read_timeout_after_sending_is_ambiguous(self, worlds: Callable[..., World]) -> None:
        """A slow answer cut off by the read timeout may have rotated: it is remembered."""
        world = worlds(endpoint=TokenEndpoint(read_timeout=0.3))
        world.import_pair()
        world.sandbox.set_answer_delay(2.0)
        world.engine.refresh("work")
        row = world.status()
        assert row["state"] == "retrying" and "ReadTimeout" in str(row["last_error"])
        world.sandbox.set_answer_delay(0.0)
        world.run(WAKE_CAP_SECONDS * 3)
        assert_rejected(world, "after_lost_response", "invalid_grant")

    def test_an_ambiguous_failure_the_server_never_acted_on_heals(
        self, worlds: Callable[..., World]
    ) -> None:
        """A garbled 200 is ambiguous, but when the token was not spent the retry succeeds."""
        world = worlds()
        world.import_pair()
        world.sandbox.fail_next(1, status=200, body="<html>proxy login</html>")
        world.engine.refresh("work")
        assert world.store.load("work").ambiguous_rt_hash is not None  # type: ignore[union-attr]
        world.run(WAKE_CAP_SECONDS * 3)
        row = world.status()
        assert row["state"] == "ok" and row["consecutive_failures"] == 0
        assert world.store.load("work").ambiguous_rt_hash is None  # type: ignore[union-attr]


def _session_leading_children() -> list[int]:
    """Our child processes that lead their own session: forked couriers (after setsid)."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            stat = Path(f"/proc/{pid}/stat").read_text()
            session = int(stat[stat.rindex(")") + 2 :].split()[3])
            # a forked courier runs our own command line; a hook or notifier would not
            ours = (
                Path(f"/proc/{pid}/cmdline").read_bytes() == Path("/proc/self/cmdline").read_bytes()
            )
            if session == int(pid) and ours:
                found.append(int(pid))
    return found


# -- 2. why a chain broke -----------------------------------------------------------------


class TestRejectionReasons:
    """Each reason for an OAuth error is told apart, shown in status and alerted once."""

    def test_a_replay_after_our_rotation_is_reuse_suspected(
        self, worlds: Callable[..., World]
    ) -> None:
        """A spent token replayed by someone else, lifetime known: reuse_suspected."""
        world = worlds()
        pair = world.import_pair()  # the sandbox's JSON gives the refresh lifetime
        world.engine.refresh("work")  # our rotation spends the imported token...
        replay = third_party_refresh(world.sandbox, pair["refresh_token"])
        assert replay.status_code == 400  # ...its replay makes the server revoke the family
        world.run(HOUR, step=60)
        row = assert_rejected(world, "reuse_suspected", "invalid_grant")
        assert "compromised" in row["alert"] and "delete it" in row["alert"]  # type: ignore[operator]
        assert world.recorder.events("work") == [AlertEvent.REJECTED]

    def test_a_pair_spent_before_our_first_refresh_is_refused_after_import(
        self, worlds: Callable[..., World]
    ) -> None:
        """The pasted pair was spent elsewhere before we ever refreshed: not called theft."""
        world = worlds()
        pair = world.import_pair()
        assert third_party_refresh(world.sandbox, pair["refresh_token"]).status_code == 200
        world.run(HOUR, step=60)
        row = assert_rejected(world, "refused_after_import", "invalid_grant")
        assert "first refresh after import" in row["alert"]  # type: ignore[operator]
        assert "compromised" not in row["alert"]  # type: ignore[operator]
        assert world.recorder.events("work") == [AlertEvent.REJECTED]

    @pytest.mark.parametrize("loss", ["sandbox_drops_answer", "proxy_drops_answer"])
    def test_a_lost_answer_then_invalid_grant_is_after_lost_response(
        self, worlds: Callable[..., World], loss: str
    ) -> None:
        """The server rotated but the answer never came: not reuse, our own refresh."""
        world = worlds()
        if loss == "sandbox_drops_answer":
            world.import_pair()
            world.sandbox.fail_next(1, drop=True)
        else:
            proxy = world.proxy()
            world.import_pair(token_endpoint=proxy.token_endpoint)
            proxy.drop_answers = 1
        world.run(HOUR, step=30)
        row = assert_rejected(world, "after_lost_response", "invalid_grant")
        assert "lost" in row["alert"] and "compromised" not in row["alert"]  # type: ignore[operator]
        outcomes = [e["outcome"] for e in world.token_requests()]
        assert outcomes[-1] == "reuse_revoked"
        assert outcomes[0] in ("rotated", "dropped_after_rotation")
        assert world.recorder.events("work") == [AlertEvent.REJECTED]

    def test_a_token_past_its_lifetime_is_refresh_token_expired(
        self, worlds: Callable[..., World]
    ) -> None:
        """Server family expired and our estimate passed: refresh_token_expired, not reuse."""
        world = worlds(refresh_ttl=DAY)
        world.import_pair(refresh_lifetime_days=1)
        world.run(DAY + HOUR / 2, step=300)
        row = assert_rejected(world, "refresh_token_expired", "invalid_grant")
        assert "end of its lifetime" in row["alert"]  # type: ignore[operator]
        assert world.token_requests()[-1]["outcome"] == "expired"
        # warned at once (a one-day lifetime is within the last day; reminded a day later),
        # then rejected, once
        events = world.recorder.events("work")
        assert events[0] is AlertEvent.REFRESH_EXPIRES_SOON and events[-1] is AlertEvent.REJECTED
        assert events.count(AlertEvent.REJECTED) == 1

    def test_a_token_imported_hours_after_generation_still_ends_as_expired(
        self, worlds: Callable[..., World]
    ) -> None:
        """Our estimate runs late by the paste delay: the true end is not called a theft."""
        world = worlds(access_ttl=6 * HOUR, refresh_ttl=10 * DAY)
        pair = world.sandbox.generate()
        world.clock.advance(2 * HOUR)  # the person pastes the token two hours later
        world.import_pair(pair=pair, two_lines=True, refresh_lifetime_days=10)
        world.run(10 * DAY, step=900)
        row = assert_rejected(world, "refresh_token_expired", "invalid_grant")
        assert "compromised" not in row["alert"]  # type: ignore[operator]
        assert world.token_requests()[-1]["outcome"] == "expired"

    def test_a_wrong_client_id_is_invalid_client(self, worlds: Callable[..., World]) -> None:
        """``import --client-id wrong``: the first refresh names a configuration problem."""
        world = worlds()
        world.import_pair(client_id="wrong-client")
        world.run(HOUR, step=60)
        row = assert_rejected(world, "invalid_client", "invalid_client")
        assert "client id" in row["alert"]  # type: ignore[operator]
        assert [e["outcome"] for e in world.token_requests()] == ["invalid_client"]

    def test_another_oauth_error_is_named_a_configuration_problem(
        self, worlds: Callable[..., World]
    ) -> None:
        """An OAuth error other than invalid_grant/invalid_client is reported in its words."""
        world = worlds()
        world.import_pair()
        body = json.dumps({"error": "unauthorized_client", "error_description": "not allowed"})
        world.sandbox.fail_next(1, status=400, body=body)
        world.engine.refresh("work")
        row = assert_rejected(world, "oauth_error", "unauthorized_client")
        assert "configuration problem" in row["alert"]  # type: ignore[operator]
        assert row["rejection"]["error_description"] == "not allowed"  # type: ignore[index]

    def test_a_rejection_survives_a_restart_and_sends_nothing(
        self, worlds: Callable[..., World]
    ) -> None:
        """After a restart the chain is still rejected for the same reason; no request leaves."""
        world = worlds()
        world.import_pair(client_id="wrong-client")
        world.engine.refresh("work")
        sent = len(world.token_requests())
        world.restart()
        world.run(DAY, step=600)
        world.engine.refresh("work")
        assert_rejected(world, "invalid_client", "invalid_client")
        assert len(world.token_requests()) == sent

    def test_importing_a_new_token_recovers_and_says_so(self, worlds: Callable[..., World]) -> None:
        """A new import ends the rejection: state ok, one recovered alert, refreshes resume."""
        world = worlds()
        world.import_pair(client_id="wrong-client")
        world.engine.refresh("work")
        world.import_pair()
        assert world.status()["state"] == "ok" and world.status()["rejection"] is None
        assert world.recorder.events("work") == [AlertEvent.REJECTED, AlertEvent.RECOVERED]
        world.run(HOUR, step=60)
        assert rotated(world) and world.status()["state"] == "ok"

    def test_a_lasting_rejection_is_reminded_daily_not_per_tick(
        self, worlds: Callable[..., World]
    ) -> None:
        """Thousands of ticks on a rejected chain: one alert, then one reminder a day."""
        world = worlds()
        world.import_pair(client_id="wrong-client")
        world.engine.refresh("work")
        world.run(DAY - HOUR, step=60)
        assert world.recorder.events("work") == [AlertEvent.REJECTED]
        world.run(2 * HOUR, step=60)
        assert world.recorder.events("work") == [AlertEvent.REJECTED, AlertEvent.REJECTED]


# -- 4. the refresh token's lifetime ---------------------------------------------------------


class TestRefreshLifetime:
    """A known refresh-token lifetime is tracked, shown, warned about and never extended."""

    def test_rotation_does_not_extend_it_and_warnings_come_7_and_1_days_ahead(
        self, worlds: Callable[..., World]
    ) -> None:
        """10-day lifetime: refresh_expires_at fixed through rotations; warned at 7 d and 1 d."""
        world = worlds()
        world.import_pair(refresh_lifetime_days=10)
        expires = world.status()["refresh_expires_at"]
        assert expires == _iso(world.clock.now() + 10 * DAY)
        world.run(3 * DAY - HOUR, step=900)
        row = world.status()
        assert row["refresh_count"] > 50 and row["refresh_expires_at"] == expires
        assert row["alert"] is None and world.recorder.sent == []
        world.run(HOUR, step=900)
        assert "refresh token expires in 7.0 days" in world.status()["alert"]
        world.run(6 * DAY, step=900)
        assert "refresh token expires in 1.0 days" in world.status()["alert"]
        assert world.status()["state"] == "ok"  # a warning, not a failure
        soon = [m for _, e, m in world.recorder.sent if e is AlertEvent.REFRESH_EXPIRES_SOON]
        # the 7-day warning and its daily reminders, then the 1-day warning
        assert [m.split(";")[0].removeprefix("the refresh token expires in ") for m in soon] == [
            "7.0 days", "6.0 days", "5.0 days", "4.0 days", "3.0 days", "2.0 days", "1.0 days",
        ]  # fmt: skip

    def test_the_configured_lifetime_applies_to_an_import_without_one(
        self, worlds: Callable[..., World]
    ) -> None:
        """refresh_lifetime_days in config.toml dates a two-line import that says nothing."""
        world = worlds(config=Config(notifications=False, policy=PolicySettings(
            refresh_lifetime_days=30)))  # fmt: skip
        pair = world.sandbox.generate()
        request = parse_import_text(f"{pair['access_token']}\n{pair['refresh_token']}\n",
                                    profile="work")  # fmt: skip
        world.engine.import_profile(
            dataclasses.replace(request, token_endpoint=world.sandbox.token_endpoint)
        )
        assert world.status()["refresh_expires_at"] == _iso(world.clock.now() + 30 * DAY)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- 3. the alert command -----------------------------------------------------------------


class TestAlertCommand:
    """The user's on_alert command runs once per change of condition, never per failure."""

    def test_hook_runs_once_per_change_through_a_long_outage(
        self, worlds: Callable[..., World], tmp_path: Path
    ) -> None:
        """Days of 503s: one run per change of condition (and a daily reminder), no more."""
        out, env_out = tmp_path / "alerts.txt", tmp_path / "env.txt"
        hook = tmp_path / "hook.sh"
        hook.write_text(
            "#!/bin/sh\n"
            f'printf \'%s|%s|%s\\n\' "$AAC_TOKEND_EVENT" "$AAC_TOKEND_PROFILE" '
            f"\"$AAC_TOKEND_MESSAGE\" >> '{out}'\n"
            f"/usr/bin/env >> '{env_out}'\n"
        )
        hook.chmod(0o755)
        command = CommandSink([str(hook)], timeout=10.0)
        world = worlds(sinks=[command])
        pair = world.import_pair(refresh_lifetime_days=1.5)
        world.sandbox.fail_next(1_000_000, status=503)
        world.run(2 * DAY, step=600)  # ~290 wake-ups, each with a failing refresh or a tick
        failed = [e for e in world.token_requests() if e["outcome"] == "failed_injected"]
        assert len(failed) > 100
        assert world.status()["state"] == "retrying"  # past the estimate: still trying
        new_pair = world.import_pair()
        world.run(HOUR, step=600)
        assert command.wait_idle(TIMEOUT)

        lines = out.read_text().splitlines()
        events = [line.split("|")[0] for line in lines]
        assert events == [e.value for e in world.recorder.events("work")]
        # a change each: 7 days left, 1 day left, the estimate passed (refreshes go on: only
        # the server ends a chain), recovered
        assert events == [
            "refresh_expires_soon", "refresh_expires_soon", "refresh_expires_soon", "recovered",
        ]  # fmt: skip
        assert [line.split("|")[2].split(";")[0] for line in lines[:3]] == [
            "the refresh token expires in 1.5 days",
            "the refresh token expires in 1.0 days",
            "the refresh token's estimated lifetime has passed",
        ]
        assert all(line.split("|")[1] == "work" for line in lines)
        passed = lines[2]
        assert GENERATE_HINT in passed and "aac-tokend import --profile work" in passed
        hook_env = env_out.read_text()
        for token in (pair["access_token"], pair["refresh_token"], new_pair["access_token"],
                      new_pair["refresh_token"]):  # fmt: skip
            assert token not in hook_env


# -- 5. suspend and resume -------------------------------------------------------------------


class SleepyScheduler:
    """A scheduler whose waits run on a clock that stops while the machine sleeps.

    That is how APScheduler waits on Linux (CLOCK_MONOTONIC does not count a suspend): a
    job due during a suspend fires only after the rest of its wait, unless the engine's
    capped tick notices the wall clock first.
    """

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self.monotonic = 0.0
        self.jobs: dict[str, tuple[float, Callable[[], object]]] = {}
        self.intervals: dict[str, list[object]] = {}

    def schedule(self, key: str, at: float, fn: Callable[[], object]) -> None:
        self.jobs[key] = (self.monotonic + max(at - self._clock.now(), 0.0), fn)

    def cancel(self, key: str) -> None:
        self.jobs.pop(key, None)

    def every(self, key: str, seconds: float, fn: Callable[[], object]) -> None:
        self.intervals[key] = [seconds, self.monotonic + seconds, fn]

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def suspend(self, seconds: float) -> None:
        """The lid is closed: the wall clock moves, the monotonic clock does not."""
        self._clock.advance(seconds)

    def awake(self, seconds: float, step: float = 0.1) -> None:
        """Both clocks move; jobs and interval ticks fire when their monotonic time comes."""
        end = self.monotonic + seconds
        while self.monotonic < end - 1e-9:
            self.monotonic += step
            self._clock.advance(step)
            for entry in list(self.intervals.values()):
                period, due, fn = entry
                if self.monotonic >= due:  # type: ignore[operator]
                    entry[1] = self.monotonic + period  # type: ignore[operator]
                    fn()  # type: ignore[operator]
            for key, (due, fn) in sorted(self.jobs.items(), key=lambda kv: kv[1][0]):
                if self.monotonic >= due and self.jobs.get(key, (None,))[0] == due:
                    del self.jobs[key]
                    fn()


class TestSuspendResume:
    """After a suspend, a valid token is served within seconds of the network being back."""

    @pytest.mark.parametrize("fork", [False, True], ids=["in_process", "fork_courier"])
    def test_a_valid_token_within_five_seconds_of_an_eight_hour_suspend(
        self, worlds: Callable[..., World], fork: bool
    ) -> None:
        """8 h asleep (token long dead), then at most 5 s of wake-ups: a token the API takes."""
        world = worlds(fork=fork)
        world.import_pair()
        world.run(60)
        world.clock.advance(8 * HOUR)  # nothing runs while suspended
        assert world.token() is None
        took = world.run_until(lambda: world.token() is not None, limit=5.0, step=FINE_STEP)
        assert took is not None and took <= 5.0
        token = world.token()
        assert token is not None and api_accepts(world.sandbox, token)
        assert world.status()["state"] == "ok"

    def test_the_tick_refreshes_when_the_monotonic_schedule_slept_too(
        self, worlds: Callable[..., World]
    ) -> None:
        """With waits on a suspend-blind clock, the capped tick still refreshes within 5 s."""
        world = worlds()
        sleepy = SleepyScheduler(world.clock)
        engine = Engine(
            store=world.store, refresher=world.refresher, scheduler=sleepy,
            clock=world.clock, config=world.config, alerter=Alerter([world.recorder]),
            socket_path=lambda name: world.directory / name,
        )  # fmt: skip
        world.engine = engine
        engine.start()
        world.import_pair()
        sleepy.awake(600)
        due_in = sleepy.jobs["work"][0] - sleepy.monotonic  # the refresh job's remaining wait
        sleepy.suspend(8 * HOUR)
        assert engine.current_token("work") is None
        woke = world.clock.now()
        while engine.current_token("work") is None and world.clock.now() - woke < 5.0:
            sleepy.awake(FINE_STEP)
        assert world.clock.now() - woke <= 5.0 < due_in
        token = engine.current_token("work")
        assert token is not None and api_accepts(world.sandbox, token)

    def test_server_errors_at_resume_delay_the_token_by_seconds(
        self, worlds: Callable[..., World]
    ) -> None:
        """Three 503s at resume: the first success follows the last failure within seconds."""
        world = worlds()
        world.import_pair()
        world.clock.advance(8 * HOUR)
        world.sandbox.fail_next(3, status=503)
        took = world.run_until(lambda: world.token() is not None, limit=60.0, step=FINE_STEP)
        assert took is not None
        log = world.token_requests()
        assert [e["outcome"] for e in log] == ["failed_injected"] * 3 + ["rotated"]
        gap = float(log[3]["at"]) - float(log[2]["at"])  # type: ignore[arg-type]
        assert gap <= 8.0 + FINE_STEP  # the third retry's backoff: at most 2 * 2**2 s
        assert api_accepts(world.sandbox, world.token() or b"")

    def test_no_network_at_resume_serves_within_seconds_of_its_return(
        self, worlds: Callable[..., World]
    ) -> None:
        """A minute without network after resume: the token follows its return within 5 s."""
        world = worlds()
        proxy = world.proxy()
        world.import_pair(token_endpoint=proxy.token_endpoint)
        world.clock.advance(8 * HOUR)
        proxy.down()
        world.run(60.0, step=FINE_STEP)
        row = world.status()
        assert row["state"] == "retrying" and not row["token_valid"]
        assert str(row["last_error"]).startswith("cannot reach the token endpoint")
        proxy.up()
        took = world.run_until(lambda: world.token() is not None, limit=30.0, step=FINE_STEP)
        assert took is not None and took <= UNREACHED_RETRY_CAP_SECONDS + FINE_STEP
        assert api_accepts(world.sandbox, world.token() or b"")


class TestWorkstationWeek:
    """Days of use, nights of sleep and bursts of trouble: the chain never breaks."""

    def test_a_week_of_days_and_nights_keeps_one_chain_alive(
        self, worlds: Callable[..., World]
    ) -> None:
        """5 days awake 8 h / asleep 16 h with 503 bursts: served within 5 s of each resume,
        every refresh token spent once, never rejected."""
        world = worlds()
        world.import_pair()
        rng = random.Random(7)
        for _ in range(5):
            world.clock.advance(16 * HOUR)  # the night
            took = world.run_until(lambda: world.token() is not None, limit=5.0, step=FINE_STEP)
            assert took is not None and took <= 5.0
            for _ in range(16):  # the day, in half hours
                if rng.random() < 0.3:
                    world.sandbox.fail_next(rng.randint(1, 4), status=rng.choice([502, 503, 429]))
                world.run(HOUR / 2, step=WAKE_CAP_SECONDS)
                assert world.token() is not None
        log = world.token_requests()
        spent = [e["rt_hash"] for e in log if e["outcome"] == "rotated"]
        assert len(spent) == len(set(spent)) > 40
        assert {e["outcome"] for e in log} <= {"rotated", "failed_injected"}
        assert world.status()["state"] in ("ok", "retrying")
        assert world.recorder.sent == []


# -- 6. a failing token endpoint ------------------------------------------------------------


class TestFailingEndpoint:
    """Retries back off to a cap, keep serving the valid token, and stay quiet and cheap."""

    def test_ten_minutes_of_503_stay_within_bounds_and_recover_on_first_success(
        self, worlds: Callable[..., World], record_property: Callable[[str, object], None]
    ) -> None:
        """Capped backoff, a few log lines a minute, then the first success clears it all."""
        buf = io.StringIO()
        configure_logging("json", "info", stream=buf)
        world = worlds()
        world.import_pair()
        first_due = world.scheduler.next_at("work")
        assert first_due is not None
        world.clock.set(first_due - 1.0)
        lines_at_minute = [buf.getvalue().count("\n")]
        queued = 0
        cpu0 = time.process_time()
        for wake in range(1, int(600 / FINE_STEP) + 1):
            world.clock.advance(FINE_STEP)
            now = world.clock.now()
            world.scheduler.run_intervals()
            due = world.scheduler.next_at("work")
            if due is not None and due <= now:  # an attempt is about to leave: make it fail
                world.sandbox.fail_next(1, status=503)
                queued += 1
            world.scheduler.run_due(now)
            if wake % int(60 / FINE_STEP) == 0:
                lines_at_minute.append(buf.getvalue().count("\n"))
        cpu = time.process_time() - cpu0
        attempts = [float(e["at"]) for e in world.token_requests()]  # type: ignore[arg-type]
        assert len(attempts) == queued
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        per_minute = [b - a for a, b in itertools.pairwise(lines_at_minute)]
        record_property("requests_in_10_min", len(attempts))
        record_property("log_lines_per_minute", per_minute)
        record_property("cpu_seconds", round(cpu, 3))
        print(f"\n10 min of 503: {len(attempts)} requests, gaps {[round(g) for g in gaps]}, "
              f"log lines per minute {per_minute}, process CPU {cpu:.3f} s")  # fmt: skip

        assert gaps[0] <= 2.0 + FINE_STEP  # the first retry within 2 s
        assert max(gaps) <= 300.0 + FINE_STEP  # never more than the cap apart
        assert all(b >= a / 2 for a, b in itertools.pairwise(gaps))  # backing off
        assert 9 <= len(attempts) <= 11  # what 2 s doubling to a 300 s cap allows in 600 s
        assert max(per_minute[1:]) <= 10 and per_minute[0] <= 15
        row = world.status()
        assert row["state"] == "retrying" and row["token_valid"]
        assert row["last_error"] == "token endpoint answered HTTP 503"
        assert world.token() is not None  # the still-valid token is served throughout

        took = world.run_until(lambda: world.status()["consecutive_failures"] == 0, limit=310)
        assert took is not None
        row = world.status()
        assert row["state"] == "ok" and row["last_error"] is None
        assert [e["outcome"] for e in world.token_requests()][-1] == "rotated"
        assert len(world.token_requests()) == queued + 1  # recovered on the first success
        spent = [e["rt_hash"] for e in world.token_requests() if e["outcome"] == "rotated"]
        assert spent == [world.token_requests()[0]["rt_hash"]]  # the unspent token, once

    def test_retry_after_is_respected(self, worlds: Callable[..., World]) -> None:
        """A 429 with Retry-After: 120 delays the next attempt by at least 120 s."""
        world = worlds()
        world.import_pair()
        world.sandbox.fail_next(1, status=429, retry_after=120)
        world.engine.refresh("work")
        assert world.status()["last_error"] == "token endpoint answered HTTP 429"
        world.run(119, step=1)
        assert len(world.token_requests()) == 1
        world.run(2, step=1)
        assert [e["outcome"] for e in world.token_requests()] == ["failed_injected", "rotated"]

    @pytest.mark.parametrize(
        ("status", "body", "error"),
        [
            (503, None, "token endpoint answered HTTP 503"),
            (502, "<html>bad gateway</html>", "token endpoint answered HTTP 502"),
            (407, "proxy auth", "token endpoint answered HTTP 407 without an OAuth error"),
            (200, "not json", "token endpoint answered 200 without a usable access_token"),
            (200, '{"token_type": "Bearer"}', "answered 200 without a usable access_token"),
        ],
    )
    def test_each_kind_of_trouble_shows_retrying_then_heals(
        self, worlds: Callable[..., World], status: int, body: str | None, error: str
    ) -> None:
        """Server errors and garbled answers: retrying with the error, the old token served."""
        world = worlds()
        world.import_pair()
        world.sandbox.fail_next(2, status=status, body=body)
        world.engine.refresh("work")
        row = world.status()
        assert row["state"] == "retrying" and error in str(row["last_error"])
        assert row["token_valid"] and world.token() is not None
        world.run(30, step=FINE_STEP)
        assert world.status()["state"] == "ok"
        assert world.recorder.sent == []  # transient trouble is not an alert

    def test_a_tls_failure_is_retried_and_shown(self, worlds: Callable[..., World]) -> None:
        """https to a server that does not speak TLS: retrying, the error named, nothing lost."""
        world = worlds()
        world.import_pair(token_endpoint=world.sandbox.token_endpoint.replace("http:", "https:"))
        world.engine.refresh("work")
        row = world.status()
        assert row["state"] == "retrying" and row["last_error"].startswith(
            "cannot reach the token endpoint: TLS failure: no secure connection"
        )
        state = world.store.load("work")
        assert state is not None and state.ambiguous_rt_hash is None  # surely not spent

    def test_a_slow_server_within_the_read_timeout_is_fine(
        self, worlds: Callable[..., World]
    ) -> None:
        """An answer that takes a while (under the read timeout) is an ordinary success."""
        world = worlds(endpoint=TokenEndpoint(read_timeout=5.0))
        world.import_pair()
        world.sandbox.set_answer_delay(0.5)
        world.engine.refresh("work")
        assert world.status()["state"] == "ok" and len(rotated(world)) == 1


def test_the_unreached_prefix_matches_what_the_endpoint_reports() -> None:
    """An unreachable server is typed unreached (the policy's fast retry keys on it) and
    worded as old state files were, which are read by those words."""
    outcome = TokenEndpoint(connect_timeout=2.0).refresh(
        "http://127.0.0.1:9/as/token", "c", "r" * 20, now=0.0
    )
    assert isinstance(outcome, Transient) and outcome.failure is FailureKind.UNREACHED
    assert outcome.reason.startswith(UNREACHED_PREFIX)


def test_config_default_policy_matches_the_issue() -> None:
    """The backoff the scenarios assume: first retry within 2 s, cap 300 s."""
    policy = Config().policy
    assert policy.backoff_first_seconds == 2.0 and policy.backoff_cap_seconds == 300.0


class TestUnreadableStateDuringRefresh:
    """A state file damaged under a running engine is reported, not spun on."""

    def test_corrupt_file_backs_off_and_keeps_serving(self, worlds: Callable[..., World]) -> None:
        """Refreshing a profile whose file became unreadable counts a failure and backs off."""
        world = worlds()
        world.import_pair()
        served = world.token()
        path = world.store.path("work")
        damaged = bytearray(path.read_bytes())
        damaged[-1] ^= 0xFF
        path.write_bytes(bytes(damaged))
        state = world.engine.refresh("work")
        assert state.consecutive_failures == 1
        assert state.last_error is not None and "cannot be decrypted" in state.last_error
        assert world.status()["state"] == "retrying"
        assert world.token() == served
        assert path.read_bytes() == bytes(damaged)
        assert world.token_requests() == []
