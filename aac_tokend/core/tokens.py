"""Token facts: reading an access JWT (unverified), naming and masking tokens.

Pure functions of their inputs. Nothing here verifies a signature: the daemon is not a
resource server, it only needs to know when a token expires and who issued it (where to
refresh it is vetted in ``origin``). Error messages name the part that is wrong and never
echo the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import TokenFormatError

__all__ = [
    "JWT_SHAPE",
    "TokenClaims",
    "json_number",
    "mask_tokens",
    "parse_jwt",
    "token_hash",
]

#: A JWT larger than this is not an access token but an attack or an accident.
MAX_JWT_BYTES = 16 * 1024
#: 9999-12-31T23:59:59Z: a time claim past this cannot be shown as a date (``status``
#: would fail on it), so it is not a time but garbage.
MAX_TIMESTAMP = 253_402_300_799.0


@dataclass(frozen=True)
class TokenClaims:
    """The claims of an access JWT that the daemon uses."""

    exp: float
    iat: float | None
    iss: str | None
    client_id: str | None
    sub: str | None


def token_hash(token: str) -> str:
    """A short, stable, non-reversible name for a token, safe for logs and state."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


#: A JWT: three dot-joined base64url segments (the last may be empty), plus any further
#: non-empty ones, so JWT-like text glued to a JWT is one match and cannot leave that JWT's
#: payload and signature. "=" padding is admitted: some issuers write it. Or a JWT cut short
#: (a field truncated somewhere): "eyJ" and 8 more characters, and any dotted rest.
JWT_SHAPE = re.compile(
    r"eyJ[A-Za-z0-9_=-]{4,}\.[A-Za-z0-9_=-]{4,}\.[A-Za-z0-9_=-]*(?:\.[A-Za-z0-9_=-]+)*"
    r"|eyJ[A-Za-z0-9_=-]{8,}(?:\.[A-Za-z0-9_=-]+)*"
)
#: Token-shaped text in a server's words: a JWT, or a long base64url run.
_TOKEN_SHAPE = re.compile(rf"{JWT_SHAPE.pattern}|[A-Za-z0-9_-]{{32,}}=*")
#: A run this long of mixed letters or digits is a random secret, not a word: AAC's opaque
#: refresh tokens are 43 characters; words, hyphenated phrases and error codes are one case.
_MIN_RUN = 32
#: Secrets shorter than this are not looked for (they would mask ordinary words).
_MIN_SECRET = 8


def _masked(match: re.Match[str]) -> str:
    text = match.group(0)
    mixed = sum((any(c.isupper() for c in text), any(c.islower() for c in text),
                 any(c.isdigit() for c in text)))  # fmt: skip
    if text.startswith("eyJ") or (len(text) >= _MIN_RUN and mixed >= 2):
        return f"<token:{token_hash(text)}>"
    return text


def mask_tokens(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` (from a server) with ``secrets`` and anything token-shaped as ``<token:hash>``.

    Applied before any cut, so a cut cannot leave a partial token behind for the log
    redactor, which knows only whole tokens, to miss.
    """
    for secret in secrets:
        if len(secret) >= _MIN_SECRET and secret in text:
            text = text.replace(secret, f"<token:{token_hash(secret)}>")
    return _TOKEN_SHAPE.sub(_masked, text)


def _b64url_decode(part: str, which: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenFormatError(
            f"access token: the {which} is not valid base64url; paste the whole token again"
        ) from exc


def _json_part(raw: bytes, which: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # also 4300+ digit ints and deep nesting
        raise TokenFormatError(
            f"access token: the {which} is not JSON; paste the whole token again"
        ) from exc
    if not isinstance(value, dict):
        raise TokenFormatError(f"access token: the {which} is not a JSON object")
    return value


def json_number(value: object) -> float | None:
    """``value`` as a float if JSON calls it a number (a bool is not), else None.

    An integer beyond any float is infinite, so one finiteness check refuses it too.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float
        return math.inf


def _number(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    number = json_number(value)
    if number is None:
        raise TokenFormatError(f"access token: claim '{name}' is not a number")
    if not math.isfinite(number):
        raise TokenFormatError(f"access token: claim '{name}' is not a finite number")
    if abs(number) > MAX_TIMESTAMP:
        raise TokenFormatError(f"access token: claim '{name}' is out of range for a time")
    return number


def _text(payload: dict[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenFormatError(f"access token: claim '{name}' is not a string")
    return value


def parse_jwt(token: str) -> TokenClaims:
    """Read the claims of a JWT without verifying it; raise TokenFormatError naming the flaw."""
    token = token.strip()
    if not token:
        raise TokenFormatError("access token: it is empty; paste the access token")
    if len(token) > MAX_JWT_BYTES:
        raise TokenFormatError(f"access token: longer than {MAX_JWT_BYTES} bytes; not a JWT")
    if not token.isascii() or any(c.isspace() for c in token):
        raise TokenFormatError("access token: it contains spaces or non-ASCII characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenFormatError(
            f"access token: a JWT has 3 dot-separated parts, this has {len(parts)}"
        )
    _json_part(_b64url_decode(parts[0], "header"), "header")
    payload = _json_part(_b64url_decode(parts[1], "payload"), "payload")
    exp = _number(payload, "exp")
    if exp is None:
        raise TokenFormatError("access token: the payload has no 'exp' claim")
    return TokenClaims(
        exp=exp,
        iat=_number(payload, "iat"),
        iss=_text(payload, "iss"),
        client_id=_text(payload, "client_id"),
        sub=_text(payload, "sub"),
    )
