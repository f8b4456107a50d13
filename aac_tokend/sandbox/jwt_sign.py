"""HS256 JSON Web Tokens (RFC 7519 compact form): sign, and check a signature.

Only the sandbox signs and checks tokens; the daemon reads claims unverified (see
``tokens``), since it is a client, not the audience. Pure functions of their inputs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping

__all__ = ["sign_hs256", "verify_hs256"]

_HEADER = {"alg": "HS256", "typ": "JWT"}

# base64url without padding; anything else is refused before decoding, because the
# stdlib decoder silently skips characters outside the alphabet.
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode(part: str) -> bytes:
    if not _B64URL.fullmatch(part):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _json(obj: Mapping[str, object]) -> bytes:
    return json.dumps(dict(obj), separators=(",", ":")).encode("utf-8")


def _mac(signing_input: str, key: bytes) -> bytes:
    return hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()


def sign_hs256(claims: Mapping[str, object], key: bytes) -> str:
    """The compact JWT ``header.payload.signature`` for ``claims``, signed with ``key``."""
    signing_input = f"{_encode(_json(_HEADER))}.{_encode(_json(claims))}"
    return f"{signing_input}.{_encode(_mac(signing_input, key))}"


def verify_hs256(token: str, key: bytes) -> dict[str, object] | None:
    """The claims of ``token`` if it is an HS256 JWT signed with ``key``, else None.

    A yes/no check for a server deciding 200 or 401: why a token failed is nobody's
    business but the attacker's. Claims such as ``exp`` are the caller's to judge.
    """
    parts = token.split(".")
    if len(parts) != 3 or not all(_B64URL.fullmatch(p) for p in parts):
        return None
    header_b64, payload_b64, signature_b64 = parts
    try:
        signature = _decode(signature_b64)
        if not hmac.compare_digest(signature, _mac(f"{header_b64}.{payload_b64}", key)):
            return None
        header = json.loads(_decode(header_b64))
        payload = json.loads(_decode(payload_b64))
    except (binascii.Error, ValueError):  # JSONDecodeError and UnicodeDecodeError included
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        return None
    return payload if isinstance(payload, dict) else None
