"""The control protocol on the wire: one JSON object a line each way.

A request line is parsed and checked here (``parse_request``) before any handler sees it:
strict UTF-8 JSON, an object with an "op" string, nesting at most MAX_DEPTH, no NaN or lone
surrogate, an ``id`` of at most MAX_ID_BYTES of JSON, encoded once to be echoed. An answer
line is built here (``answer``, ``failure``) and never fails to encode. Pure functions of
bytes and values: the server in ``control_server`` does the I/O, ``control_ops`` the work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Protocol

__all__ = [
    "MAX_DEPTH",
    "MAX_ID_BYTES",
    "ControlHandler",
    "answer",
    "encode",
    "failure",
    "parse_request",
]

# An id only pairs an answer with its request: 1 KiB of JSON holds any UUID or counter many
# times over, and keeps an echo from inflating every answer (error answers included).
MAX_ID_BYTES = 1024

# No real request nests deeper than an object holding a list. 32 leaves room and keeps every
# value a handler sees, or an answer echoes, far below the interpreter's recursion limit.
MAX_DEPTH = 32


class ControlHandler(Protocol):
    """Answers control requests; may block (a refresh takes seconds)."""

    def handle(self, request: dict[str, object]) -> dict[str, object]:
        """Return the response object for ``request`` (which has a string "op")."""
        ...


def encode(value: object) -> bytes:
    """Return ``value`` as compact strict JSON."""
    # allow_nan=False: NaN and Infinity are not JSON, and strict clients choke on them
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


# The last resort when an answer cannot be encoded: a constant cannot fail.
_UNENCODABLE = b'{"ok":false,"code":"internal_error","message":"the answer could not be encoded"}'


def answer(response: Mapping[str, object], echo: bytes) -> bytes:
    """Return the wire line for ``response`` with the encoded id ``echo`` spliced in.

    Never raises: an answer that is not a mapping with a boolean "ok", or that cannot be
    encoded, becomes internal_error (keeping the echo, which parse_request has already encoded).
    """
    try:
        body = {key: value for key, value in response.items() if not (echo and key == "id")}
        encoded = encode(body) if isinstance(body.get("ok"), bool) else _UNENCODABLE
    except Exception:  # TypeError, ValueError (NaN), RecursionError, a hostile __iter__
        encoded = _UNENCODABLE
    if echo:
        encoded = encoded[:-1] + b',"id":' + echo + b"}"  # encoded always holds "ok"
    return encoded + b"\n"


def failure(code: str, message: str, echo: bytes = b"") -> bytes:
    """Return the wire line of a refusal with ``code`` and ``message``."""
    return answer({"ok": False, "code": code, "message": message}, echo)


# What _unsafe_value needs of a line that parsed as strict UTF-8 JSON, at C speed: its
# strings (an escaped quote inside one included), the bytes that are not brackets, and
# innermost bracket pairs. The quantifiers are possessive, so no match ever backtracks: on a
# line that parsed, every quote outside a string opens one that closes, and one sub() is one
# linear pass.
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_INNERMOST_PAIR = re.compile(rb"\[\]|\{\}")


def _unsafe_value(line: bytes, obj: object) -> str | None:
    """Why ``obj``, parsed from ``line``, is unfit for a handler or an echo, or None.

    No Python-level walk of the value: a 64 KiB list of 20,000 numbers would cost the I/O
    thread ten times what parsing it did. Depth comes from the brackets outside strings
    (each pass strips the innermost pairs, so it takes one pass per level); NaN, infinities
    and lone surrogates are what a strict encoding refuses.
    """
    brackets = _JSON_STRING.sub(b"", line).translate(None, _NOT_BRACKETS)
    for _ in range(MAX_DEPTH):
        if not brackets:
            break
        brackets = _INNERMOST_PAIR.sub(b"", brackets)
    if brackets:
        return f"the request nests deeper than {MAX_DEPTH} levels; flatten it"
    try:
        json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:
        return "a string holds a lone surrogate (a \\udXXX escape); send valid Unicode"
    except ValueError:
        return "a number is NaN or out of range; send finite numbers"
    return None


def parse_request(line: bytes) -> tuple[dict[str, object] | None, bytes, str | None]:
    """Return (request, encoded id or b"", None), or (what parsed, echo, why it is bad).

    The line is decoded as strict UTF-8 before anything else looks at it: json.loads of bytes
    would also take UTF-16 and UTF-32, where the byte scan of _unsafe_value reads brackets
    and quotes that are not there (and its regex could be made to backtrack).
    """
    # A NUL is valid UTF-8 but never valid JSON; it is what UTF-16 and UTF-32 text is full of.
    bad = line.find(b"\0")
    if bad < 0:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = exc.start
    if bad >= 0:
        return None, b"", f"the request is not UTF-8 JSON (byte {bad} is wrong); send UTF-8"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, b"", f"the request is not valid JSON ({exc.msg} at column {exc.colno})"
    except (ValueError, RecursionError):  # nesting too deep, a 5000-digit number
        return None, b"", "the request could not be parsed as JSON"
    if not isinstance(obj, dict):
        return None, b"", "the request must be a JSON object"
    problem = _unsafe_value(line, obj)
    if problem is not None:
        return obj, b"", problem
    echo = b""
    if "id" in obj:
        try:
            echo = encode(obj["id"])
        except (ValueError, TypeError, RecursionError):  # cannot happen after _unsafe_value
            echo = b"\0" * (MAX_ID_BYTES + 1)
        if len(echo) > MAX_ID_BYTES:
            return obj, b"", f'the "id" is over {MAX_ID_BYTES} bytes of JSON; use a short one'
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        return obj, echo, 'the request needs an "op" string'
    return obj, echo, None
