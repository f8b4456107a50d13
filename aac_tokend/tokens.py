"""Token facts: reading an access JWT (unverified), deriving and vetting the token endpoint.

Pure functions of their inputs. Nothing here verifies a signature: the daemon is not a
resource server, it only needs to know when a token expires and where to refresh it.
Error messages name the part that is wrong and never echo the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import EndpointNotAllowedError, TokenFormatError

__all__ = [
    "AAC_DOMAIN",
    "TokenClaims",
    "check_endpoint",
    "derive_endpoint",
    "is_loopback_host",
    "parse_jwt",
    "token_hash",
]

#: Hosts under this domain are AAC's own; regional hosts differ, so match the suffix.
AAC_DOMAIN = "alteryxcloud.com"

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


def _number(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenFormatError(f"access token: claim '{name}' is not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        number = math.inf
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


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_aac_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == AAC_DOMAIN or host.endswith("." + AAC_DOMAIN)


def check_endpoint(url: str, *, explicit: bool) -> str:
    """Vet a token endpoint URL and return it normalised.

    A derived endpoint must be https under alteryxcloud.com. An explicit one may be any
    https URL, or http on a loopback address (tests, the sandbox).
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise EndpointNotAllowedError(
            "token endpoint: not a valid URL; pass --token-endpoint https://..."
        ) from exc
    if parts.scheme not in ("https", "http") or not host:
        raise EndpointNotAllowedError(
            "token endpoint: must be an https:// URL with a host; pass --token-endpoint"
        )
    if parts.username or parts.password:
        raise EndpointNotAllowedError("token endpoint: credentials in the URL are not allowed")
    if parts.scheme == "http" and not is_loopback_host(host):
        raise EndpointNotAllowedError(
            f"token endpoint: plain http to {host} is refused; use https "
            "(http is allowed only on a loopback address)"
        )
    if not explicit and not (parts.scheme == "https" and _is_aac_host(host)):
        raise EndpointNotAllowedError(
            f"token endpoint: the token's issuer host {host} is not under {AAC_DOMAIN}; "
            "if you trust it, pass --token-endpoint explicitly"
        )
    return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))


def derive_endpoint(issuer: str) -> str:
    """The token endpoint for an issuer: ``iss`` + ``/token``, without doubling either."""
    base = issuer.strip().rstrip("/")
    if base.endswith("/token"):
        return base
    return base + "/token"
