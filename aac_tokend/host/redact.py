"""Keeping tokens out of logs: a registry of secrets, and processors that mask them.

``redact`` replaces anything JWT-shaped, and every secret the daemon has registered
(opaque refresh tokens are not JWT-shaped), wherever it appears, by ``<token:hash>``.
``logs`` runs ``redact_processor`` on every event and ``redact_rendered`` on its line.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import MutableMapping
from typing import Any

from ..core.tokens import JWT_SHAPE, token_hash

__all__ = [
    "forget_secret",
    "redact",
    "redact_processor",
    "redact_rendered",
    "register_secret",
]

#: Secrets registered without an owner: keep the most recent only.
MAX_SECRETS = 8192
#: A profile's chain has two live tokens; a few more cover the instant of a rotation. Older
#: ones are dead (refresh) or expiring (access, and JWT-shaped: redacted by shape anyway).
SECRETS_PER_OWNER = 4
#: Shorter strings are not secrets worth scanning for (and would redact ordinary words).
MIN_SECRET_LEN = 12

_loose: deque[str] = deque(maxlen=MAX_SECRETS)
_owned: dict[str, deque[str]] = {}
_secrets_lock = threading.Lock()
#: What redact() scans for: each secret with its first MIN_SECRET_LEN characters (what is
#: looked for, so a copy cut short is found too), and the shortest text worth scanning.
#: Rebuilt on each change, read without a lock. Scanning is the hot part of logging, so it
#: must not grow with every refresh.
_snapshot: tuple[tuple[tuple[str, str], ...], int] = ((), 0)


def _rebuild() -> None:
    global _snapshot
    known = set(_loose)
    for bucket in _owned.values():
        known.update(bucket)
    _snapshot = (tuple((s, s[:MIN_SECRET_LEN]) for s in known), MIN_SECRET_LEN if known else 0)


def register_secret(secret: str | None, owner: str | None = None) -> None:
    """Make ``secret`` unloggable; with ``owner`` only its latest few are kept."""
    if secret and len(secret) >= MIN_SECRET_LEN:
        with _secrets_lock:
            if owner is None:
                bucket = _loose
            else:
                bucket = _owned.setdefault(owner, deque(maxlen=SECRETS_PER_OWNER))
            if secret not in bucket:
                bucket.append(secret)
                _rebuild()


def forget_secret(secret: str | None) -> None:
    """Stop scanning for a secret (it stays redacted if it is JWT-shaped)."""
    with _secrets_lock:
        for bucket in (_loose, *_owned.values()):
            if secret is not None and secret in bucket:
                bucket.remove(secret)
        _rebuild()


def redact(text: str) -> str:
    """``text`` with every token replaced by ``<token:hash>``."""
    text = JWT_SHAPE.sub(lambda m: f"<token:{token_hash(m.group(0))}>", text)
    secrets, shortest = _snapshot
    if secrets and len(text) >= shortest:
        for secret, head in [pair for pair in secrets if pair[1] in text]:
            text = _mask_secret(text, secret, head)
    return text


def _mask_secret(text: str, secret: str, head: str) -> str:
    """Every copy of ``secret`` in ``text`` as ``<token:hash>``, also a copy cut short (a
    field truncated somewhere): its first MIN_SECRET_LEN characters or more, ending where the
    text or a token-like run ends (so a sibling token sharing a prefix is not taken for it)."""
    mask = f"<token:{token_hash(secret)}>"
    text = text.replace(secret, mask)
    start = text.find(head)
    while start != -1:
        end = start + len(head)
        while end < len(text) and end - start < len(secret) and text[end] == secret[end - start]:
            end += 1
        if end == len(text) or not (text[end].isalnum() or text[end] in "-_"):
            text = text[:start] + mask + text[end:]
            end = start + len(mask)
        start = text.find(head, end)
    return text


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    if isinstance(value, BaseException):
        return redact(repr(value))
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redact every value of the event."""
    for key, value in list(event_dict.items()):
        # exc_info must stay an exception for format_exc_info; its text is scrubbed at the end.
        if key != "exc_info":
            event_dict[key] = _scrub(value)
    return event_dict


def redact_rendered(_logger: Any, _method: str, rendered: Any) -> Any:
    """structlog processor, the last: redact the rendered line (exceptions included)."""
    # Exceptions are rendered into text by an earlier processor: scrub the final line too.
    return redact(rendered) if isinstance(rendered, str) else rendered
