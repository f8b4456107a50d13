"""Alerts: once per change, a daily reminder, recovery; real hook and notifier processes."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from aac_tokend.core.conditions import AlertEvent, Condition
from aac_tokend.core.config import Config
from aac_tokend.daemon.alerts import Alerter
from aac_tokend.daemon.sinks import (
    DESKTOP_INHERITED,
    CommandSink,
    DesktopSink,
    LogSink,
    build_sinks,
)

DAY = 86400.0
#: Generous: a hook is a tiny shell script, but CI machines stall.
WAIT = 30.0

EXPIRED = Condition(AlertEvent.EXPIRED, "expired", "the token chain has expired; re-import")
REJECTED = Condition(
    AlertEvent.REJECTED, "rejected:reuse_suspected", "refresh token rejected; re-import"
)
SOON_7D = Condition(AlertEvent.REFRESH_EXPIRES_SOON, "expires_soon:7d", "expires in 6.5 days")
SOON_1D = Condition(AlertEvent.REFRESH_EXPIRES_SOON, "expires_soon:1d", "expires in 0.5 days")

#: Variables a POSIX shell sets for itself on start; not inherited from the sink.
SHELL_SET = {"PWD", "SHLVL", "_", "OLDPWD"}
HOOK_KEYS = {"AAC_TOKEND_PROFILE", "AAC_TOKEND_EVENT", "AAC_TOKEND_MESSAGE"}


@pytest.fixture(autouse=True)
def default_structlog() -> None:
    """capture_logs replaces processors only: undo any level filter another test configured."""
    structlog.reset_defaults()


class RecordingSink:
    """An honest fake sink: remembers every alert it was given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, AlertEvent, str]] = []

    def send(self, profile: str, event: AlertEvent, message: str) -> None:
        self.sent.append((profile, event, message))


class BrokenSink:
    """A sink that always fails."""

    def send(self, profile: str, event: AlertEvent, message: str) -> None:
        raise RuntimeError("sink is broken")


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def env_recorder(directory: Path) -> tuple[Path, Path]:
    """A hook that appends its whole environment, as one block per run, to a file."""
    out = directory / "runs.txt"
    hook = script(directory / "hook.sh", f"{{ echo ---; /usr/bin/env; }} >> '{out}'\n")
    return hook, out


def runs(out: Path) -> list[dict[str, str]]:
    """The environments of the recorded runs, in order."""
    if not out.exists():
        return []
    blocks = out.read_text().split("---\n")[1:]
    return [dict(line.split("=", 1) for line in block.splitlines()) for block in blocks]


def gone_or_zombie(pid: int, within: float = 5.0) -> bool:
    """True once ``pid`` has died (a SIGKILL takes effect asynchronously: allow ``within``)."""
    deadline = time.monotonic() + within
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


class TestAlerterSemantics:
    def test_first_condition_alerts_every_sink_once(self) -> None:
        """A new condition goes to every sink exactly once."""
        a, b = RecordingSink(), RecordingSink()
        alerter = Alerter([a, b])
        for step in range(10):
            alerter.observe("work", EXPIRED, now=1000.0 + step)
        assert a.sent == b.sent == [("work", AlertEvent.EXPIRED, EXPIRED.message)]

    def test_changed_key_alerts_again(self) -> None:
        """Each change of condition key is said once, even within the reminder interval."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        for condition in (SOON_7D, SOON_7D, SOON_1D, SOON_1D, EXPIRED, EXPIRED):
            alerter.observe("work", condition, now=0.0)
        assert [m for _, _, m in sink.sent] == [c.message for c in (SOON_7D, SOON_1D, EXPIRED)]

    def test_reminder_after_interval(self) -> None:
        """A condition that persists is repeated once per reminder interval, not before."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        alerter.observe("work", REJECTED, now=0.0)
        alerter.observe("work", REJECTED, now=DAY - 1)
        assert len(sink.sent) == 1
        alerter.observe("work", REJECTED, now=DAY)
        alerter.observe("work", REJECTED, now=DAY + 60)
        assert sink.sent == [("work", AlertEvent.REJECTED, REJECTED.message)] * 2
        alerter.observe("work", REJECTED, now=2 * DAY)
        assert len(sink.sent) == 3

    def test_custom_reminder_interval(self) -> None:
        """The reminder interval is a parameter."""
        sink = RecordingSink()
        alerter = Alerter([sink], reminder_interval=10.0)
        for now in (0.0, 5.0, 10.0, 15.0, 20.0):
            alerter.observe("work", EXPIRED, now=now)
        assert len(sink.sent) == 3

    def test_clock_going_back_delays_reminder_only(self) -> None:
        """A clock that jumps back restarts the reminder interval instead of stalling it."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        alerter.observe("work", EXPIRED, now=10 * DAY)
        alerter.observe("work", EXPIRED, now=1.0)
        alerter.observe("work", EXPIRED, now=1.0 + DAY)
        assert len(sink.sent) == 2

    def test_recovery_alerts_once_and_forgets(self) -> None:
        """None after a condition sends one RECOVERED alert; further Nones send nothing."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        alerter.observe("work", EXPIRED, now=0.0)
        alerter.observe("work", None, now=1.0)
        alerter.observe("work", None, now=2.0)
        assert len(sink.sent) == 2
        profile, event, message = sink.sent[1]
        assert (profile, event) == ("work", AlertEvent.RECOVERED)
        assert "work" in message and "recovered" in message
        alerter.observe("work", EXPIRED, now=3.0)
        assert len(sink.sent) == 3, "after recovery the same condition is news again"

    def test_recovery_from_warning_says_so(self) -> None:
        """Recovery from an expiry warning does not claim serving had stopped."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        alerter.observe("work", SOON_1D, now=0.0)
        alerter.observe("work", None, now=1.0)
        assert "no longer expires soon" in sink.sent[1][2]

    def test_all_well_from_the_start_sends_nothing(self) -> None:
        """None with nothing remembered sends nothing."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        for now in range(5):
            alerter.observe("work", None, now=float(now))
        assert sink.sent == []

    def test_profiles_are_independent(self) -> None:
        """One profile's condition neither triggers nor suppresses another's."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        alerter.observe("a", EXPIRED, now=0.0)
        alerter.observe("b", EXPIRED, now=0.0)
        alerter.observe("a", None, now=1.0)
        alerter.observe("b", EXPIRED, now=2.0)
        assert [(p, e) for p, e, _ in sink.sent] == [
            ("a", AlertEvent.EXPIRED),
            ("b", AlertEvent.EXPIRED),
            ("a", AlertEvent.RECOVERED),
        ]

    def test_forget_sends_nothing(self) -> None:
        """A forgotten (removed) profile gets no recovery alert."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        alerter.observe("work", EXPIRED, now=0.0)
        alerter.forget("work")
        alerter.observe("work", None, now=1.0)
        assert len(sink.sent) == 1

    def test_set_sinks_replaces_sinks(self) -> None:
        """After set_sinks, alerts go to the new sinks only; memory is kept."""
        old, new = RecordingSink(), RecordingSink()
        alerter = Alerter([old])
        alerter.observe("work", EXPIRED, now=0.0)
        alerter.set_sinks([new])
        alerter.observe("work", EXPIRED, now=1.0)
        alerter.observe("work", None, now=2.0)
        assert len(old.sent) == 1
        assert [e for _, e, _ in new.sent] == [AlertEvent.RECOVERED]

    def test_broken_sink_does_not_silence_others(self) -> None:
        """A sink that raises is logged and the sinks after it still receive the alert."""
        sink = RecordingSink()
        alerter = Alerter([BrokenSink(), sink])
        with capture_logs() as logs:
            alerter.observe("work", EXPIRED, now=0.0)
        assert len(sink.sent) == 1
        (failure,) = [e for e in logs if e["event"] == "alert_sink_failed"]
        assert failure["sink"] == "BrokenSink"
        assert failure["log_level"] == "warning"

    def test_concurrent_observers_alert_once(self) -> None:
        """Many threads reporting the same condition at once produce one alert."""
        sink = RecordingSink()
        alerter = Alerter([sink])
        barrier = threading.Barrier(8)

        def observe() -> None:
            barrier.wait()
            for _ in range(200):
                alerter.observe("work", EXPIRED, now=0.0)

        threads = [threading.Thread(target=observe) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert len(sink.sent) == 1


class TestLogSink:
    def test_alert_is_an_error_event(self) -> None:
        """LogSink logs an 'alert' error event with profile, alert event and message."""
        with capture_logs() as logs:
            LogSink().send("work", AlertEvent.REJECTED, "do this")
        assert logs == [
            {
                "event": "alert",
                "log_level": "error",
                "profile": "work",
                "alert_event": "rejected",
                "message": "do this",
            }
        ]

    def test_recovery_is_an_info_event(self) -> None:
        """A recovery needs no one: it is logged at info, so error filters show only alerts."""
        with capture_logs() as logs:
            LogSink().send("work", AlertEvent.RECOVERED, "profile work recovered")
        assert [(e["log_level"], e["alert_event"]) for e in logs] == [("info", "recovered")]


class TestCommandSink:
    def test_hook_runs_once_per_change_reminder_and_recovery(self, tmp_path: Path) -> None:
        """Driven through repeated failures, the hook runs once per change, reminder, recovery."""
        hook, out = env_recorder(tmp_path)
        sink = CommandSink([str(hook)], timeout=WAIT)
        alerter = Alerter([sink])
        now = 1_000_000.0
        timeline = [
            *[(now + 60 * i, SOON_1D) for i in range(5)],
            *[(now + 3600 + 60 * i, EXPIRED) for i in range(20)],  # retried failures
            (now + 3600 + DAY, EXPIRED),  # the daily reminder
            (now + 3600 + DAY + 60, EXPIRED),
            (now + 3600 + DAY + 120, None),  # a new token was imported
            (now + 3600 + DAY + 180, None),
        ]
        for at, condition in timeline:
            alerter.observe("work", condition, now=at)
            assert sink.wait_idle(WAIT)  # one at a time, so the order is known
        recorded = runs(out)
        assert [(r["AAC_TOKEND_EVENT"], r["AAC_TOKEND_MESSAGE"]) for r in recorded] == [
            ("refresh_expires_soon", SOON_1D.message),
            ("expired", EXPIRED.message),
            ("expired", EXPIRED.message),
            ("recovered", "profile work recovered: a valid token is being served again"),
        ]
        assert {r["AAC_TOKEND_PROFILE"] for r in recorded} == {"work"}

    def test_hook_environment_is_built_from_scratch(self, tmp_path: Path) -> None:
        """The hook sees PATH, HOME, LANG, USER and the alert, and nothing else of ours."""
        hook, out = env_recorder(tmp_path)
        ours = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/home/someone",
            "LANG": "C.UTF-8",
            "USER": "someone",
            "AWS_SECRET_ACCESS_KEY": "must-not-leak",
            "HTTPS_PROXY": "http://user:pw@proxy:3128",
            "AAC_TOKEND_HOME": "/elsewhere",
        }
        sink = CommandSink([str(hook)], timeout=WAIT, environ=ours)
        sink.send("work", AlertEvent.EXPIRED, 'it\'s "expired"; $(rm -rf /)')
        assert sink.wait_idle(WAIT)
        (env,) = runs(out)
        assert set(env) - SHELL_SET == {"PATH", "HOME", "LANG", "USER", *HOOK_KEYS}
        assert env["HOME"] == "/home/someone" and env["USER"] == "someone"
        assert env["AAC_TOKEND_MESSAGE"] == 'it\'s "expired"; $(rm -rf /)'

    def test_process_environment_is_filtered_by_default(self, tmp_path: Path) -> None:
        """Without an explicit environ, only the allowed variables of os.environ pass."""
        hook, out = env_recorder(tmp_path)
        sink = CommandSink([str(hook)], timeout=WAIT)
        sink.send("work", AlertEvent.EXPIRED, "m")
        assert sink.wait_idle(WAIT)
        (env,) = runs(out)
        allowed = {k for k in ("PATH", "HOME", "LANG", "USER") if k in os.environ}
        assert set(env) - SHELL_SET == allowed | HOOK_KEYS
        assert len(os.environ) > len(allowed), "the filter was exercised"

    def test_arguments_are_not_shell_parsed(self, tmp_path: Path) -> None:
        """Arguments reach the hook literally: no shell expands or splits them."""
        out = tmp_path / "args.txt"
        hook = script(tmp_path / "args.sh", f"printf '%s\\n' \"$@\" > '{out}'\n")
        argv = [str(hook), "$HOME", "a b", "; touch x", "*"]
        sink = CommandSink(argv, timeout=WAIT)
        sink.send("work", AlertEvent.EXPIRED, "m")
        assert sink.wait_idle(WAIT)
        assert out.read_text().splitlines() == argv[1:]

    def test_hanging_hook_is_killed_with_its_group(self, tmp_path: Path) -> None:
        """A hook that hangs is killed, children included, after the timeout; send returns."""
        pids = tmp_path / "pids"
        hook = script(tmp_path / "hang.sh", f"sleep 30 & echo $$ $! > '{pids}'\nwait\n")
        sink = CommandSink([str(hook)], timeout=0.5)
        alerter = Alerter([sink])
        started = time.monotonic()
        with capture_logs() as logs:
            alerter.observe("work", EXPIRED, now=0.0)
            assert not sink.wait_idle(0), "observe returned while the hook was still running"
            assert sink.wait_idle(WAIT)
        assert time.monotonic() - started < 25, "killed long before sleep 30 ended"
        shell, sleeper = map(int, pids.read_text().split())
        assert gone_or_zombie(shell) and gone_or_zombie(sleeper)
        (event,) = [e for e in logs if e["event"] == "alert_command_timed_out"]
        assert event["log_level"] == "warning" and event["timeout_seconds"] == 0.5

    def test_hook_that_cannot_start_is_logged(self, tmp_path: Path) -> None:
        """A hook that does not exist is a warning in the log, never an exception."""
        sink = CommandSink([str(tmp_path / "missing-hook")], timeout=WAIT)
        with capture_logs() as logs:
            Alerter([sink]).observe("work", EXPIRED, now=0.0)
            assert sink.wait_idle(WAIT)
        (event,) = [e for e in logs if e["event"] == "alert_command_not_started"]
        assert event["log_level"] == "warning"
        assert event["command"] == str(tmp_path / "missing-hook")

    def test_failing_hook_is_logged(self, tmp_path: Path) -> None:
        """A hook exiting non-zero is a warning with its status."""
        hook = script(tmp_path / "fail.sh", "exit 3\n")
        sink = CommandSink([str(hook)], timeout=WAIT)
        with capture_logs() as logs:
            sink.send("work", AlertEvent.EXPIRED, "m")
            assert sink.wait_idle(WAIT)
        (event,) = [e for e in logs if e["event"] == "alert_command_failed"]
        assert event["status"] == 3


def fake_notifier(directory: Path, name: str) -> Path:
    """A stand-in notifier that records its arguments and its environment."""
    directory.mkdir(exist_ok=True)
    out = directory / f"{name}.out"
    script(directory / name, f"{{ printf '%s\\n' \"$@\"; echo ---; /usr/bin/env; }} > '{out}'\n")
    return out


class TestDesktopSink:
    def test_notify_send_receives_title_and_message(self, tmp_path: Path) -> None:
        """On Linux the first notify-send on PATH gets the title and the message."""
        out = fake_notifier(tmp_path / "bin", "notify-send")
        environ = {
            "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
            "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus",
            "AWS_SECRET_ACCESS_KEY": "must-not-leak",
        }
        sink = DesktopSink(platform="linux", environ=environ)
        assert sink.available
        Alerter([sink]).observe("work", EXPIRED, now=0.0)
        assert sink.wait_idle(WAIT)
        args, env_text = out.read_text().split("---\n")
        assert args.splitlines() == ["--", "aac-tokend: work", EXPIRED.message]
        env = set(dict(line.split("=", 1) for line in env_text.splitlines()))
        assert env - SHELL_SET == {"PATH", "DBUS_SESSION_BUS_ADDRESS"}
        assert env <= set(DESKTOP_INHERITED) | SHELL_SET

    def test_osascript_gets_text_as_arguments(self, tmp_path: Path) -> None:
        """On macOS title and message are osascript arguments, never script source."""
        out = fake_notifier(tmp_path / "bin", "osascript")
        sink = DesktopSink(platform="darwin", environ={"PATH": str(tmp_path / "bin")})
        message = 'say "hi" \\ and \'bye\'" & do shell script "x'
        sink.send("work", AlertEvent.EXPIRED, message)
        assert sink.wait_idle(WAIT)
        args = out.read_text().split("---\n")[0].splitlines()
        assert args[-2:] == ["aac-tokend: work", message]
        script_source = args[:-2]
        assert script_source == [
            "-e",
            "on run argv",
            "-e",
            "display notification (item 2 of argv) with title (item 1 of argv)",
            "-e",
            "end run",
        ]

    def test_disabled_runs_nothing(self, tmp_path: Path) -> None:
        """With notifications off, no notifier runs even when one is installed."""
        out = fake_notifier(tmp_path / "bin", "notify-send")
        sink = DesktopSink(enabled=False, platform="linux", environ={"PATH": str(tmp_path / "bin")})
        assert not sink.available
        sink.send("work", AlertEvent.EXPIRED, "m")
        assert sink.wait_idle(WAIT)
        assert not out.exists()

    @pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
    def test_missing_notifier_is_silent(self, tmp_path: Path, platform: str) -> None:
        """Without a notifier on PATH (or on other systems) send does nothing and logs nothing."""
        sink = DesktopSink(platform=platform, environ={"PATH": str(tmp_path)})
        assert not sink.available
        with capture_logs() as logs:
            sink.send("work", AlertEvent.EXPIRED, "m")
            assert sink.wait_idle(WAIT)
        assert logs == []


class TestBuildSinks:
    def test_defaults_log_only_without_notifier(self, tmp_path: Path) -> None:
        """Default config on a machine without a notifier alerts only through the log."""
        sinks = build_sinks(Config(), environ={"PATH": str(tmp_path)})
        assert [type(s) for s in sinks] == [LogSink]

    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="notify-send is Linux's")
    def test_all_sinks(self, tmp_path: Path) -> None:
        """A hook and an installed notifier add a CommandSink and a DesktopSink."""
        fake_notifier(tmp_path, "notify-send")
        config = Config(on_alert=("/bin/true",), alert_timeout_seconds=5.0)
        sinks = build_sinks(config, environ={"PATH": str(tmp_path)})
        assert [type(s) for s in sinks] == [LogSink, DesktopSink, CommandSink]

    def test_notifications_off(self, tmp_path: Path) -> None:
        """notifications = false leaves the desktop out even when a notifier exists."""
        fake_notifier(tmp_path, "notify-send")
        sinks = build_sinks(Config(notifications=False), environ={"PATH": str(tmp_path)})
        assert [type(s) for s in sinks] == [LogSink]
