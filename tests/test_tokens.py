"""Token facts: unverified JWT claims, and where (and whether) a refresh token may be sent."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.core.origin import check_endpoint, derive_endpoint, is_loopback_host
from aac_tokend.core.tokens import (
    MAX_JWT_BYTES,
    TokenClaims,
    parse_jwt,
    token_hash,
)
from aac_tokend.errors import EndpointNotAllowedError, TokenFormatError
from aac_tokend.sandbox.jwt_sign import sign_hs256

KEY = b"k" * 32
ISSUER = "https://pingauth.alteryxcloud.com/as"
AAC_ISSUER_RE = r"https://[a-z]{1,10}\.alteryxcloud\.com(/[a-z]{1,6}){0,3}/?"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_of(payload: bytes, header: bytes = b'{"alg":"HS256","typ":"JWT"}') -> str:
    """A three-part token with the given raw header and payload and a made-up signature."""
    return f"{b64(header)}.{b64(payload)}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk"


def assert_no_echo(exc: BaseException, token: str) -> None:
    """The message names a part but contains neither the token nor any of its segments."""
    text = str(exc)
    assert "\n" not in text
    if token.strip():
        assert token.strip() not in text
    for segment in token.strip().split("."):
        if len(segment) >= 8:
            assert segment not in text


class TestParseClaims:
    """parse_jwt reads the claims the daemon needs, without verifying anything."""

    def test_reads_all_claims(self) -> None:
        """exp, iat, iss, client_id and sub are returned as typed values."""
        token = sign_hs256(
            {"exp": 1_800_000_600, "iat": 1_800_000_000, "iss": ISSUER, "client_id": "c1",
             "sub": "u1"},
            KEY,
        )  # fmt: skip
        assert parse_jwt(token) == TokenClaims(
            exp=1_800_000_600.0, iat=1_800_000_000.0, iss=ISSUER, client_id="c1", sub="u1"
        )

    def test_only_exp_is_required(self) -> None:
        """A payload with just exp parses, the other claims are None."""
        claims = parse_jwt(sign_hs256({"exp": 5}, KEY))
        assert claims == TokenClaims(exp=5.0, iat=None, iss=None, client_id=None, sub=None)

    def test_surrounding_whitespace_is_ignored(self) -> None:
        """A pasted token with a trailing newline parses like the bare token."""
        token = sign_hs256({"exp": 7}, KEY)
        assert parse_jwt(f"  {token}\n") == parse_jwt(token)

    def test_float_exp_is_kept(self) -> None:
        """A fractional exp is read as a float, not truncated."""
        assert parse_jwt(sign_hs256({"exp": 12.5}, KEY)).exp == 12.5

    def test_signature_is_not_checked(self) -> None:
        """Any third segment is accepted: the daemon is a client, not the audience."""
        assert parse_jwt(jwt_of(b'{"exp": 9}')).exp == 9.0

    def test_token_hash_is_short_and_stable(self) -> None:
        """token_hash gives 16 hex characters, the same for the same token."""
        assert token_hash("abc") == token_hash("abc")
        assert len(token_hash("abc")) == 16
        assert token_hash("abc") != token_hash("abd")
        int(token_hash("abc"), 16)


MALFORMED = {
    "empty": ("   ", "empty"),
    "two parts": ("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjEyMzQ1Njc4OX0", "3 dot-separated parts"),
    "four parts": ("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjEyMzQ1Njc4OX0.c2ln.c2ln", "this has 4"),
    "bad base64 header": ("eyJhbGciOiJIUzI1Ni.eyJleHAiOjEyMzQ1Njc4OX0.c2lnbmF0dXJl", "header"),
    "header not json": (jwt_of(b'{"exp": 1}', header=b"not json at all"), "header is not JSON"),
    "payload not json": (jwt_of(b"definitely not json"), "payload is not JSON"),
    "payload not utf8": (jwt_of(b"\xff\xfe\xfd{}"), "payload is not JSON"),
    "payload a list": (jwt_of(b'[{"exp": 1}]'), "payload is not a JSON object"),
    "payload a string": (jwt_of(b'"exp"'), "payload is not a JSON object"),
    "no exp": (jwt_of(b'{"iss": "https://x.alteryxcloud.com/as"}'), "no 'exp' claim"),
    "exp a string": (jwt_of(b'{"exp": "1800000000"}'), "'exp' is not a number"),
    "exp a bool": (jwt_of(b'{"exp": true}'), "'exp' is not a number"),
    "exp NaN": (jwt_of(b'{"exp": NaN}'), "'exp' is not a finite number"),
    "exp Infinity": (jwt_of(b'{"exp": -Infinity}'), "'exp' is not a finite number"),
    "exp overflows float": (jwt_of(b'{"exp": 1' + b"0" * 400 + b"}"), "'exp'"),
    "exp past year 9999": (jwt_of(b'{"exp": 1e13}'), "'exp' is out of range"),
    "exp 5000 digits": (jwt_of(b'{"exp": ' + b"9" * 5000 + b"}"), "payload is not JSON"),
    "deeply nested": (jwt_of(b"[" * 5000 + b"]" * 5000), "payload is not JSON"),
    "iat a string": (jwt_of(b'{"exp": 1, "iat": "now"}'), "'iat' is not a number"),
    "iss a number": (jwt_of(b'{"exp": 1, "iss": 5}'), "'iss' is not a string"),
    "client_id a list": (jwt_of(b'{"exp": 1, "client_id": ["a"]}'), "'client_id'"),
    "space inside": ("eyJhbGciOiJIUzI1NiJ9.eyJleHAi OjEyMzQ1Njc4OX0.c2ln", "spaces"),
    "non-ascii": ("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjEyMzQ1Njc4OX0é.c2ln", "non-ASCII"),
    "huge": ("eyJ" + "A" * MAX_JWT_BYTES + ".eyJleHAiOjF9.c2ln", "longer than"),
}


class TestMalformedTokens:
    """Every malformed token is a TokenFormatError that names the part and echoes nothing."""

    @pytest.mark.parametrize(("token", "names"), MALFORMED.values(), ids=MALFORMED.keys())
    def test_message_names_the_part_without_the_token(self, token: str, names: str) -> None:
        """The one-line message says what is wrong and contains no part of the token."""
        with pytest.raises(TokenFormatError) as info:
            parse_jwt(token)
        assert names in str(info.value)
        assert_no_echo(info.value, token)

    def test_payload_secret_is_not_echoed(self) -> None:
        """A payload that fails late (no exp) does not leak its JSON content either."""
        payload = b'{"secret_claim": "do-not-print-this-value-anywhere"}'
        with pytest.raises(TokenFormatError) as info:
            parse_jwt(jwt_of(payload))
        assert "do-not-print" not in str(info.value)
        assert b64(payload) not in str(info.value)


class TestDeriveEndpoint:
    """derive_endpoint appends /token to the issuer without doubling a slash or /token."""

    @pytest.mark.parametrize(
        ("issuer", "endpoint"),
        [
            (ISSUER, ISSUER + "/token"),
            (ISSUER + "/", ISSUER + "/token"),
            (ISSUER + "/token", ISSUER + "/token"),
            (ISSUER + "/token/", ISSUER + "/token"),
            (" https://pingauth-eu.alteryxcloud.com/as ",
             "https://pingauth-eu.alteryxcloud.com/as/token"),
            ("https://pingauth.alteryxcloud.com", "https://pingauth.alteryxcloud.com/token"),
        ],
    )  # fmt: skip
    def test_derivation(self, issuer: str, endpoint: str) -> None:
        """The derived endpoint is the issuer plus exactly one /token."""
        assert derive_endpoint(issuer) == endpoint

    @given(st.from_regex(AAC_ISSUER_RE, fullmatch=True))
    @settings(max_examples=100)
    def test_idempotent(self, issuer: str) -> None:
        """Deriving twice gives the same endpoint, which ends in one /token and no //."""
        once = derive_endpoint(issuer)
        assert derive_endpoint(once) == once
        assert once.endswith("/token")
        assert "//" not in once.removeprefix("https://")
        assert not once.endswith("/token/token")


class TestCheckEndpoint:
    """check_endpoint sends refresh tokens only where they belong."""

    @pytest.mark.parametrize(
        "url",
        [
            "https://pingauth.alteryxcloud.com/as/token",
            "https://pingauth-eu.alteryxcloud.com/as/token",
            "https://PingAuth.AlteryxCloud.com/as/token",
            "https://pingauth.alteryxcloud.com./as/token",
            "https://pingauth.alteryxcloud.com:443/as/token",
        ],
    )
    def test_derived_aac_hosts_pass(self, url: str) -> None:
        """A derived https endpoint under alteryxcloud.com (regional ones too) is allowed."""
        assert check_endpoint(url, explicit=False) == url

    @pytest.mark.parametrize(
        "url",
        [
            "https://evilalteryxcloud.com/as/token",
            "https://alteryxcloud.com.evil.io/as/token",
            "https://pingauth.alteryxcloud.co/as/token",
            "https://example.com/as/token",
            "http://pingauth.alteryxcloud.com/as/token",
            "http://127.0.0.1:8080/as/token",
        ],
    )
    def test_derived_other_hosts_refused(self, url: str) -> None:
        """A derived endpoint off alteryxcloud.com, or not https, is refused."""
        with pytest.raises(EndpointNotAllowedError):
            check_endpoint(url, explicit=False)

    def test_derived_refusal_says_what_to_do(self) -> None:
        """The refusal of a foreign issuer names the host and the --token-endpoint way out."""
        with pytest.raises(EndpointNotAllowedError) as info:
            check_endpoint("https://evilalteryxcloud.com/as/token", explicit=False)
        assert "evilalteryxcloud.com" in str(info.value)
        assert "--token-endpoint" in str(info.value)

    @pytest.mark.parametrize(
        "url",
        [
            "https://idp.example.com/oauth/token",
            "https://10.0.0.5:8443/token",
            "http://127.0.0.1:8080/as/token",
            "http://127.5.5.5/as/token",
            "http://[::1]:9000/as/token",
            "http://localhost:9000/as/token",
            "http://LOCALHOST/as/token",
        ],
    )
    def test_explicit_https_or_loopback_http_pass(self, url: str) -> None:
        """An explicit endpoint may be any https URL, or http on a loopback address."""
        assert check_endpoint(url, explicit=True) == url

    @pytest.mark.parametrize(
        "url",
        [
            "http://example.com/as/token",
            "http://10.0.0.5/as/token",
            "http://128.0.0.1/as/token",
            "http://localhost.example.com/as/token",
            "http://[::2]/as/token",
        ],
    )
    def test_explicit_plain_http_elsewhere_refused(self, url: str) -> None:
        """Plain http to anything but loopback is refused even when explicit."""
        with pytest.raises(EndpointNotAllowedError, match="plain http"):
            check_endpoint(url, explicit=True)

    @pytest.mark.parametrize(
        "url",
        [
            "https://user:pw@pingauth.alteryxcloud.com/as/token",
            "https://user@pingauth.alteryxcloud.com/as/token",
            "https://:pw@pingauth.alteryxcloud.com/as/token",
            "http://u:p@127.0.0.1:8080/as/token",
        ],
    )
    def test_credentials_in_url_refused(self, url: str) -> None:
        """A URL carrying credentials is refused, and the message does not repeat them."""
        for explicit in (True, False):
            with pytest.raises(EndpointNotAllowedError, match="credentials") as info:
                check_endpoint(url, explicit=explicit)
            assert "pw" not in str(info.value)

    @pytest.mark.parametrize(
        "url", ["ftp://x.alteryxcloud.com/t", "pingauth.alteryxcloud.com/as/token", "https:///x",
                "https://h:99999/t", "https://h:port/t", ""]
    )  # fmt: skip
    def test_not_a_usable_url_refused(self, url: str) -> None:
        """A URL without an http(s) scheme, a host or a valid port is refused."""
        with pytest.raises(EndpointNotAllowedError):
            check_endpoint(url, explicit=True)

    @pytest.mark.parametrize(
        "url", ["https://idp.example.com:0/t", "https://idp.example.com:/t",
                "http://127.0.0.1:0/t", "http://[::1]:/t", "http://localhost:00/t"]
    )  # fmt: skip
    def test_port_zero_or_empty_refused(self, url: str) -> None:
        """Port 0 or a bare ':' is refused in one line naming the port's range."""
        with pytest.raises(EndpointNotAllowedError, match="port must be from 1 to 65535"):
            check_endpoint(url, explicit=True)

    @pytest.mark.parametrize("url", ["http://127.1/t", "https://0x7f.1/t", "http://2130706433/t"])
    def test_shorthand_ip_refused_with_the_full_form(self, url: str) -> None:
        """127.1 and friends are refused saying to write the address in full, not "plain http"."""
        with pytest.raises(EndpointNotAllowedError, match="shorthand IP address; write it in full"):
            check_endpoint(url, explicit=True)

    def test_fragment_dropped(self) -> None:
        """A fragment never goes on the wire, so the normalised URL drops it."""
        url = "https://idp.example.com/token?x=1#frag"
        assert check_endpoint(url, explicit=True) == "https://idp.example.com/token?x=1"

    @pytest.mark.parametrize(
        ("host", "loopback"),
        [("127.0.0.1", True), ("127.255.0.9", True), ("::1", True), ("[::1]", True),
         ("localhost", True), ("128.0.0.1", False), ("example.com", False), ("", False)],
    )  # fmt: skip
    def test_is_loopback_host(self, host: str, loopback: bool) -> None:
        """Loopback means localhost, 127.0.0.0/8 or ::1."""
        assert is_loopback_host(host) is loopback


def three_parts(data: st.DataObject, raw: st.SearchStrategy[bytes]) -> str:
    return ".".join(b64(data.draw(raw)) for _ in range(3))


class TestHostileTokens:
    """Fuzzed input is either parsed or refused with TokenFormatError, never echoed."""

    @given(st.text(min_size=12, max_size=300))
    @settings(max_examples=300)
    def test_arbitrary_text(self, text: str) -> None:
        """Arbitrary text raises only TokenFormatError, without the text in the message."""
        try:
            parse_jwt(text)
        except TokenFormatError as exc:
            if text.strip():
                assert text.strip() not in str(exc)

    @given(st.data())
    @settings(max_examples=300)
    def test_arbitrary_bytes_in_three_parts(self, data: st.DataObject) -> None:
        """Three base64url segments of arbitrary bytes raise only TokenFormatError, unechoed."""
        token = three_parts(data, st.binary(min_size=9, max_size=200))
        try:
            parse_jwt(token)
        except TokenFormatError as exc:
            assert_no_echo(exc, token)

    @given(
        st.dictionaries(
            st.sampled_from(["exp", "iat", "iss", "client_id", "sub", "x"]),
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
            | st.lists(st.integers(), max_size=2),
        )
    )  # fmt: skip
    @settings(max_examples=300)
    def test_arbitrary_claims(self, payload: dict[str, object]) -> None:
        """Any JSON payload object parses to finite typed claims or raises TokenFormatError."""
        token = jwt_of(json.dumps(payload).encode())
        try:
            claims = parse_jwt(token)
        except TokenFormatError as exc:
            assert_no_echo(exc, token)
            return
        assert isinstance(claims.exp, float)
        assert abs(claims.exp) <= 253_402_300_799
        assert claims.iss is None or isinstance(claims.iss, str)
