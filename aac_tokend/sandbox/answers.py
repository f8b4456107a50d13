"""What the sandbox answers over HTTP, decided before it is sent.

The vocabulary shared by the decisions (``server``) and the HTTP side (``http``): an
``Answer`` (status, body, headers, or a dropped connection, and a delay), the JSON and OAuth
error answers, and an injected failure (``Injection``) with the answer it makes.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass

__all__ = ["DROP", "Answer", "Injection", "injected_answer", "json_answer", "oauth_error"]


@dataclass(frozen=True)
class Injection:
    """A failure queued by fail_next: answered instead of (or after) the decision."""

    status: int
    retry_after: float | None
    body: str | None
    drop: bool
    forward: bool = False  # decide as usual (rotate), then answer this failure instead


@dataclass(frozen=True)
class Answer:
    """An HTTP answer decided before it is sent; ``drop`` closes the connection instead."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    delay: float = 0.0


DROP = Answer(0, drop=True)


def json_answer(status: int, obj: object, *headers: tuple[str, str]) -> Answer:
    """Return a JSON answer that no cache may keep."""
    base = (("Content-Type", "application/json"), ("Cache-Control", "no-store"))
    return Answer(status, json.dumps(obj).encode("utf-8"), base + headers)


def injected_answer(injection: Injection) -> Answer:
    """Return the answer an injected failure makes (its body, or its status phrase)."""
    headers: tuple[tuple[str, str], ...] = ()
    if (value := injection.retry_after) is not None:
        # Whole seconds per RFC 9110; a fraction is sent as is, to test a client's tolerance.
        headers = (("Retry-After", str(int(value)) if value.is_integer() else repr(value)),)
    if injection.body is None:
        phrase = http.client.responses.get(injection.status, "injected failure")
        return json_answer(injection.status, {"message": phrase}, *headers)
    try:
        json.loads(injection.body)
        content_type = "application/json"
    except ValueError:
        content_type = "text/plain; charset=utf-8"
    base = (("Content-Type", content_type), ("Cache-Control", "no-store"))
    return Answer(injection.status, injection.body.encode("utf-8"), base + headers)


def oauth_error(status: int, error: str, description: str) -> Answer:
    """Return an OAuth error body (RFC 6749 5.2) as PingFederate sends it."""
    return json_answer(status, {"error": error, "error_description": description})
