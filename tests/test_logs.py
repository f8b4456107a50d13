"""Logging: key/value events as JSON lines, with every token replaced by <token:hash>."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.core.tokens import token_hash
from aac_tokend.host.logs import StdlibToStructlog, configure_logging, journal_stream_id
from aac_tokend.host.redact import forget_secret, redact, register_secret
from aac_tokend.sandbox.jwt_sign import sign_hs256

JWT = sign_hs256({"exp": 1_800_000_000, "sub": "user"}, b"k" * 32)
OPAQUE = "opaque-refresh-SECRET-9f8e7d6c"


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """Logging configured to JSON lines in a buffer; config and secrets reset afterwards."""
    buffer = io.StringIO()
    configure_logging("json", "debug", stream=buffer)
    register_secret(OPAQUE)
    yield buffer
    forget_secret(OPAQUE)
    structlog.reset_defaults()


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def assert_redacted(text: str) -> None:
    assert JWT not in text
    assert OPAQUE not in text
    for segment in JWT.split("."):
        assert segment not in text


class TestEvents:
    """Events are JSON lines with level, timestamp and the given keys."""

    def test_json_line(self, out: io.StringIO) -> None:
        """One event is one JSON object with event, level, timestamp and its key/values."""
        structlog.get_logger().info("refresh_succeeded", profile="work", refresh_count=3)
        (line,) = lines(out)
        assert line["event"] == "refresh_succeeded"
        assert line["level"] == "info"
        assert line["profile"] == "work" and line["refresh_count"] == 3
        assert line["timestamp"].endswith("Z")

    def test_level_filter(self) -> None:
        """Events below the configured level are dropped."""
        buffer = io.StringIO()
        configure_logging("json", "warning", stream=buffer)
        try:
            log = structlog.get_logger()
            log.info("quiet")
            log.warning("loud")
        finally:
            structlog.reset_defaults()
        assert [line["event"] for line in lines(buffer)] == ["loud"]

    def test_console_format(self) -> None:
        """fmt='console' renders a readable line, still redacted."""
        buffer = io.StringIO()
        configure_logging("console", stream=buffer)
        try:
            structlog.get_logger().info("served", token=JWT)
        finally:
            structlog.reset_defaults()
        assert "served" in buffer.getvalue()
        assert JWT not in buffer.getvalue()
        assert f"<token:{token_hash(JWT)}>" in buffer.getvalue()

    def test_capture_logs_sees_events(self) -> None:
        """structlog's capture_logs can assert on events by key (used by other tests)."""
        with structlog.testing.capture_logs() as captured:
            structlog.get_logger().warning("state_not_saved", profile="p")
        assert captured == [{"event": "state_not_saved", "profile": "p", "log_level": "warning"}]


class TestRedaction:
    """The configured processor chain replaces tokens wherever they appear."""

    def test_jwt_value(self, out: io.StringIO) -> None:
        """A JWT in a value becomes <token:hash>."""
        structlog.get_logger().info("x", token=JWT)
        (line,) = lines(out)
        assert line["token"] == f"<token:{token_hash(JWT)}>"

    def test_registered_secret_value(self, out: io.StringIO) -> None:
        """A registered opaque secret becomes <token:hash>."""
        structlog.get_logger().info("x", refresh=OPAQUE)
        (line,) = lines(out)
        assert line["refresh"] == f"<token:{token_hash(OPAQUE)}>"

    def test_embedded_in_text(self, out: io.StringIO) -> None:
        """Tokens inside longer text (and the event name) are replaced in place."""
        structlog.get_logger().info(f"got {JWT}", detail=f"Bearer {JWT} and rt={OPAQUE}; done")
        (line,) = lines(out)
        assert line["detail"] == (
            f"Bearer <token:{token_hash(JWT)}> and rt=<token:{token_hash(OPAQUE)}>; done"
        )
        assert_redacted(json.dumps(line))

    def test_nested_structures(self, out: io.StringIO) -> None:
        """Tokens in nested dicts, lists and tuples, however deep, are replaced."""
        deep: Any = {"token": JWT}
        for _ in range(10):
            deep = {"inner": [deep, (OPAQUE,)]}
        structlog.get_logger().info("x", payload={"a": [{"b": JWT}], "c": (OPAQUE, 1)}, deep=deep)
        text = out.getvalue()
        assert_redacted(text)
        assert f"<token:{token_hash(JWT)}>" in text

    def test_exception_value(self, out: io.StringIO) -> None:
        """An exception passed as a value is rendered without the token it carries."""
        structlog.get_logger().error("x", error=RuntimeError(f"bad token {JWT} / {OPAQUE}"))
        assert_redacted(out.getvalue())
        assert "RuntimeError" in out.getvalue()

    def test_exception_traceback(self, out: io.StringIO) -> None:
        """log.exception's traceback text is redacted too."""
        try:
            raise ValueError(f"refresh with {OPAQUE} for {JWT} failed")
        except ValueError:
            structlog.get_logger().exception("refresh_crashed")
        (line,) = lines(out)
        assert "ValueError" in line["exception"]
        assert_redacted(json.dumps(line))

    def test_exc_info_instance_outside_except(self, out: io.StringIO) -> None:
        """exc_info=<exception> keeps its traceback (redacted) even outside an except block."""
        try:
            raise KeyError(JWT)
        except KeyError as exc:
            caught = exc
        structlog.get_logger().error("failed", exc_info=caught)
        (line,) = lines(out)
        assert "KeyError" in line.get("exception", "")
        assert_redacted(json.dumps(line))

    def test_bytes_and_objects(self, out: io.StringIO) -> None:
        """Non-text values rendered by repr are redacted in the final line."""

        class Leaky:
            def __repr__(self) -> str:
                return f"Leaky({OPAQUE})"

        structlog.get_logger().info("x", raw=JWT.encode(), obj=Leaky(), key_is_token={JWT: 1})
        assert_redacted(out.getvalue())

    def test_bound_context(self, out: io.StringIO) -> None:
        """Values bound to the logger or to contextvars are redacted as well."""
        structlog.contextvars.bind_contextvars(ctx_token=JWT)
        try:
            structlog.get_logger().bind(bound=OPAQUE).info("x")
        finally:
            structlog.contextvars.clear_contextvars()
        assert_redacted(out.getvalue())

    def test_forgotten_secret_no_longer_scanned(self, out: io.StringIO) -> None:
        """forget_secret stops redacting an opaque token (a JWT stays redacted by shape)."""
        other = "another-opaque-token-123456"
        register_secret(other)
        forget_secret(other)
        forget_secret(JWT)
        structlog.get_logger().info("x", a=other, b=JWT)
        (line,) = lines(out)
        assert line["a"] == other
        assert line["b"] == f"<token:{token_hash(JWT)}>"

    def test_owned_secrets_keep_the_latest_per_owner(self, out: io.StringIO) -> None:
        """A profile's latest tokens stay redacted; its long-rotated ones are let go."""
        tokens = [f"opaque-rotated-token-{i:04d}-xyz" for i in range(10)]
        for token in tokens:
            register_secret(token, owner="rotating")
        try:
            structlog.get_logger().info("x", old=tokens[0], new=tokens[-1])
            (line,) = lines(out)
            assert line["new"] == f"<token:{token_hash(tokens[-1])}>"
            assert line["old"] == tokens[0]
        finally:
            for token in tokens:
                forget_secret(token)

    def test_short_strings_not_registered(self, out: io.StringIO) -> None:
        """Strings shorter than 12 characters are not secrets (they would redact words)."""
        register_secret("profile")
        structlog.get_logger().info("x", word="profile")
        (line,) = lines(out)
        assert line["word"] == "profile"


surroundings = st.text(alphabet="eyJab.-_ =", max_size=30) | st.text(max_size=30)


class TestRedactFunction:
    """redact() on plain text."""

    @given(surroundings, surroundings)
    @settings(max_examples=300)
    def test_any_surrounding_text(self, before: str, after: str) -> None:
        """No part of a JWT survives redaction, whatever text surrounds it."""
        assert_redacted(redact(before + JWT + after))

    def test_jwt_after_jwt_shaped_text(self) -> None:
        """A JWT glued to an earlier JWT-shaped run does not leak its payload and signature."""
        assert_redacted(redact(f"eyJabcd.efgh.{JWT}"))
        assert_redacted(redact(f"{JWT}.{JWT}"))

    def test_hash_names_the_token(self) -> None:
        """The placeholder carries token_hash, so a person can match log lines to a token."""
        assert redact(JWT) == f"<token:{token_hash(JWT)}>"

    def test_trailing_dot_not_part_of_token(self) -> None:
        """A sentence ending right after a JWT keeps the JWT's own hash and the full stop."""
        assert redact(f"got {JWT}.") == f"got <token:{token_hash(JWT)}>."

    def test_padded_jwt(self) -> None:
        """A JWT written with base64 "=" padding is redacted whole, padding and all."""
        header, payload, signature = JWT.split(".")
        padded = f"{header}==.{payload}=.{signature}="
        text = redact(f"got {padded} ok")
        assert payload not in text and signature not in text and "=" not in text
        assert text.startswith("got <token:") and text.endswith("> ok")

    @pytest.mark.parametrize("cut", [20, 45, 60, -5])
    def test_cut_jwt(self, cut: int) -> None:
        """A JWT cut short (a field truncated somewhere) leaves none of its payload."""
        text = redact(f"detail: {JWT[:cut]}")
        assert text.startswith("detail: <token:")
        assert JWT[12:cut] not in text

    def test_cut_registered_secret(self, out: io.StringIO) -> None:
        """A registered secret cut short at the end of a value leaves nothing of itself."""
        structlog.get_logger().info("x", detail=f"server said: rt={OPAQUE[:20]}")
        (line,) = lines(out)
        assert OPAQUE[:12] not in json.dumps(line)
        assert line["detail"] == f"server said: rt=<token:{token_hash(OPAQUE)}>"

    def test_plain_text_untouched(self) -> None:
        """Ordinary text is left as is."""
        text = "refresh_succeeded profile=work eyJ short.no"
        assert redact(text) == text


#: A child that logs one event at each level and one alert, the way the daemon does.
_CHILD = """
import structlog
from aac_tokend.daemon.sinks import LogSink
from aac_tokend.core.conditions import AlertEvent
from aac_tokend.host.logs import configure_logging
configure_logging("auto", "debug")
log = structlog.get_logger()
log.debug("tick", n=1)
log.info("refresh_succeeded", profile="work")
log.warning("refresh_failed", profile="work")
LogSink().send("work", AlertEvent.REJECTED, "generate a new token")
"""


def run_child(stderr_path: Path, journal_stream: str | None) -> bytes:
    """Run _CHILD with stderr on ``stderr_path`` and JOURNAL_STREAM as given; its bytes."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with stderr_path.open("wb") as err:
        if journal_stream == "match":
            st = os.fstat(err.fileno())
            journal_stream = f"{st.st_dev}:{st.st_ino}"
        if journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        subprocess.run([sys.executable, "-c", _CHILD], stderr=err, env=env, check=True, timeout=60)
    return stderr_path.read_bytes()


def journald_answers() -> bool:
    """A journald listens on its stream socket (not only a stale socket file)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect("/run/systemd/journal/stdout")
        except OSError:
            return False
    return True


class TestJournalStream:
    """On systemd's journal stream each line carries its syslog priority and no timestamp."""

    def test_exact_bytes_on_the_journal_stream(self, tmp_path: Path) -> None:
        """A real child whose stderr matches JOURNAL_STREAM writes <N>-prefixed, unstamped lines."""
        written = run_child(tmp_path / "stderr", "match")
        assert written == (
            b'<7>{"n": 1, "event": "tick", "level": "debug"}\n'
            b'<6>{"profile": "work", "event": "refresh_succeeded", "level": "info"}\n'
            b'<4>{"profile": "work", "event": "refresh_failed", "level": "warning"}\n'
            b'<3>{"profile": "work", "alert_event": "rejected", '
            b'"message": "generate a new token", "event": "alert", "level": "error"}\n'
        )

    def test_alert_is_at_warning_or_above(self, tmp_path: Path) -> None:
        """The alert event's priority is 4 (warning) or more urgent."""
        for line in run_child(tmp_path / "stderr", "match").splitlines():
            if b'"event": "alert"' in line:
                assert int(line[1 : line.index(b">")]) <= 4
                break
        else:
            pytest.fail("no alert line")

    @pytest.mark.parametrize("value", [None, "1:2", "garbage", ""])
    def test_other_streams_keep_timestamps(self, tmp_path: Path, value: str | None) -> None:
        """Without a JOURNAL_STREAM naming stderr itself, lines are plain JSON with a timestamp."""
        written = run_child(tmp_path / "stderr", value)
        for line in written.decode().splitlines():
            assert json.loads(line)["timestamp"].endswith("Z")

    def test_traceback_lines_keep_the_priority(self, tmp_path: Path) -> None:
        """Every line of a multi-line (console) event starts with the event's priority."""
        path = tmp_path / "out"
        with path.open("w") as stream:
            st = os.fstat(stream.fileno())
            environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            configure_logging("console", stream=stream, environ=environ)
            try:
                try:
                    raise ValueError("boom")
                except ValueError:
                    structlog.get_logger().exception("crashed")
            finally:
                structlog.reset_defaults()
        text = path.read_text()
        assert text.count("\n") > 2 and "Traceback" in text
        assert all(line.startswith("<3>") for line in text.splitlines())
        assert not re.search(r"\d{4}-\d\d-\d\dT", text)

    def test_stdlib_logging_gets_a_priority(self, tmp_path: Path) -> None:
        """A library's stdlib warning (APScheduler's missed run) is a <4> JSON line, not bare."""
        path = tmp_path / "out"
        root = logging.getLogger()
        with path.open("w") as stream:
            st = os.fstat(stream.fileno())
            environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
            configure_logging("json", stream=stream, environ=environ)
            configure_logging("json", stream=stream, environ=environ)  # a reload: one handler
            try:
                missed = logging.getLogger("apscheduler.executors.default")
                missed.warning("Run time of job %r was missed by %s", "tick", "0:00:03")
                missed.info("Job ran")  # below warning: not written
            finally:
                for handler in [h for h in root.handlers if isinstance(h, StdlibToStructlog)]:
                    root.removeHandler(handler)
                structlog.reset_defaults()
        lines = path.read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith("<4>{"), lines
        event = json.loads(lines[0][3:])
        assert event["level"] == "warning"
        assert event["logger_name"] == "apscheduler.executors.default"
        assert event["event"] == "Run time of job 'tick' was missed by 0:00:03"

    @pytest.mark.skipif(
        not (shutil.which("systemd-cat") and journald_answers()),
        reason="needs systemd-cat and a running journald (/run/systemd/journal/stdout)",
    )
    def test_real_journal_files_the_priority(self, tmp_path: Path) -> None:
        """Through systemd-cat, journald files the alert at priority 3 and the info at 6."""
        tag = f"aac-tokend-test-{os.getpid()}"
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        # systemd-cat connects stderr to the journal but, unlike the service manager, does
        # not set JOURNAL_STREAM: the child sets it as systemd would (its stderr's dev:ino).
        prelude = (
            "import os; st = os.fstat(2); "
            "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        )
        subprocess.run(
            ["systemd-cat", "-t", tag, sys.executable, "-c", prelude + _CHILD],
            env=env,
            check=True,
            timeout=60,
        )

        def filed() -> dict[str, dict[str, str]]:
            out = subprocess.run(
                ["journalctl", "-t", tag, "-o", "json", "--no-pager"],
                capture_output=True, text=True, check=True, timeout=60,
            ).stdout  # fmt: skip
            entries = [json.loads(line) for line in out.splitlines()]
            return {json.loads(e["MESSAGE"])["event"]: e for e in entries}

        deadline = time.monotonic() + 20  # journald files a stream's lines asynchronously
        while len(seen := filed()) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert seen["alert"]["PRIORITY"] == "3"
        assert seen["refresh_failed"]["PRIORITY"] == "4"
        assert seen["refresh_succeeded"]["PRIORITY"] == "6"
        assert "timestamp" not in seen["alert"]["MESSAGE"]


class TestJournalStreamValue:
    """JOURNAL_STREAM is untrusted text: only "DEV:INO" in decimal is understood."""

    @given(st.text(max_size=40))
    def test_any_text_is_parsed_or_refused(self, value: str) -> None:
        """Any value gives a pair of non-negative ints or None, never an exception."""
        got = journal_stream_id(value)
        assert got is None or (got[0] >= 0 and got[1] >= 0)

    @given(st.integers(0, 2**64), st.integers(0, 2**64))
    def test_round_trip(self, dev: int, ino: int) -> None:
        """What systemd writes (decimal device and inode) reads back as the same pair."""
        assert journal_stream_id(f"{dev}:{ino}") == (dev, ino)

    @pytest.mark.parametrize("value", ["", "1", "1:", ":2", "1:2:3", "-1:2", "0x1:2", "\u0661:2"])
    def test_malformed_refused(self, value: str) -> None:
        """Anything but two decimal numbers around one colon is not a journal stream."""
        assert journal_stream_id(value) is None


#: A child that writes 200 numbered events of about 100 bytes with a 4 KiB log bound.
_FILLER = """
import structlog
from aac_tokend.host.logs import configure_logging
configure_logging("json", "info", max_file_bytes=4096)
for n in range(200):
    structlog.get_logger().info("tick", n=n, pad="x" * 40)
"""


def run_filler(path: Path, mode: str) -> None:
    """Run _FILLER with stderr on ``path`` opened with ``mode`` ("ab": O_APPEND, or "wb")."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with path.open(mode) as err:
        subprocess.run([sys.executable, "-c", _FILLER], stderr=err, env=env, check=True, timeout=60)


def numbers(path: Path) -> list[int]:
    return [json.loads(line)["n"] for line in path.read_text().splitlines()]


class TestAppendedLogFile:
    """A log file opened for appending (launchd's StandardErrorPath) stays bounded."""

    def test_file_stays_under_the_bound(self, tmp_path: Path) -> None:
        """Past the bound the file moves to .1 and starts again; both hold whole lines."""
        log = tmp_path / "aac-tokend.log"
        run_filler(log, "ab")
        older = tmp_path / "aac-tokend.log.1"
        line = max(len(x) + 1 for x in log.read_text().splitlines())
        assert log.stat().st_size <= 4096 + line
        assert older.stat().st_size <= 4096 + line
        both = numbers(older) + numbers(log)
        assert both == list(range(both[0], 200))  # the newest, in order, none lost between
        assert len(both) > 4096 // line

    def test_existing_content_counts(self, tmp_path: Path) -> None:
        """A file already over the bound (from an earlier run) is moved aside at once."""
        log = tmp_path / "aac-tokend.log"
        log.write_text('{"n": -1}\n' * 1000)
        run_filler(log, "ab")
        assert log.stat().st_size < 8192
        assert numbers(log)[-1] == 199

    def test_file_not_appended_is_left_alone(self, tmp_path: Path) -> None:
        """A file opened without O_APPEND (truncating) is never moved or emptied by us."""
        log = tmp_path / "out.log"
        run_filler(log, "wb")
        assert numbers(log) == list(range(200))
        assert not (tmp_path / "out.log.1").exists()
