"""Logging: key/value events as JSON lines, with every token replaced by <token:hash>."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.jwt_sign import sign_hs256
from aac_tokend.logs import configure_logging, forget_secret, redact, register_secret
from aac_tokend.tokens import token_hash

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

    def test_plain_text_untouched(self) -> None:
        """Ordinary text is left as is."""
        text = "refresh_succeeded profile=work eyJ short.no"
        assert redact(text) == text
