"""HS256 signing and checking of the sandbox's access tokens."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from aac_tokend.sandbox.jwt_sign import sign_hs256, verify_hs256

KEY = b"k" * 32
CLAIMS = {"iss": "http://127.0.0.1:1/as", "sub": "u", "exp": 2_000_000_000, "scope": "aac"}


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


class TestSignAndVerify:
    def test_round_trip(self) -> None:
        """A token signed with a key verifies with that key and gives back the claims."""
        assert verify_hs256(sign_hs256(CLAIMS, KEY), KEY) == CLAIMS

    def test_compact_form_without_padding(self) -> None:
        """The token is three base64url parts without '=' and an HS256 JWT header."""
        token = sign_hs256(CLAIMS, KEY)
        header, _, _ = token.split(".")
        assert "=" not in token
        assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}

    def test_another_key_fails(self) -> None:
        """A token signed with another key does not verify."""
        assert verify_hs256(sign_hs256(CLAIMS, b"other"), KEY) is None

    def test_a_changed_payload_fails(self) -> None:
        """Swapping the payload breaks the signature."""
        header, _, signature = sign_hs256(CLAIMS, KEY).split(".")
        forged = f"{header}.{_b64({**CLAIMS, 'sub': 'mallory'})}.{signature}"
        assert verify_hs256(forged, KEY) is None

    def test_alg_none_fails(self) -> None:
        """An unsigned token (alg none) never verifies."""
        token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(CLAIMS)}."
        assert verify_hs256(token, KEY) is None

    def test_a_non_object_payload_fails(self) -> None:
        """A correctly signed payload that is not a JSON object is refused."""
        assert verify_hs256(sign_hs256({}, KEY).replace(_b64({}), _b64([1])), KEY) is None


class TestUntrustedTokens:
    @given(st.text(max_size=300))
    def test_garbage_never_raises(self, token: str) -> None:
        """Any string is either a valid token or None, never an exception."""
        assert verify_hs256(token, KEY) is None

    @given(st.text(alphabet="abcXYZ019-_.=+/", max_size=120))
    def test_near_base64_garbage_never_raises(self, token: str) -> None:
        """Strings made of base64 and JWT characters never raise."""
        assert verify_hs256(token, KEY) is None
