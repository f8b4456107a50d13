"""Import: pasted tokens become a profile state, strictly, and no token is ever echoed."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.core import importer as importer_module
from aac_tokend.core.importer import (
    DEFAULT_API_BASE_URL,
    MAX_INPUT_BYTES,
    ImportRequest,
    build_state,
    parse_import_text,
)
from aac_tokend.core.outcome import Rejected
from aac_tokend.core.policy import classify_rejection
from aac_tokend.core.state import RejectionReason, TokenKind
from aac_tokend.errors import EndpointNotAllowedError, InputError, TokenFormatError
from aac_tokend.sandbox.jwt_sign import sign_hs256

NOW = 1_800_000_000.0
DAY = 86400.0
KEY = b"k" * 32
ISSUER = "https://pingauth.alteryxcloud.com/as"
REFRESH = "opaque-refresh-token-Zx81Kq0p"
OPAQUE = "opaque-access-token-Qw3rTy9u"


def jwt(**claims: Any) -> str:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "client_id": "aac-client",
        "sub": "user",
        "iat": NOW - 60,
        "exp": NOW + 3540,
    }
    base.update(claims)
    return sign_hs256({k: v for k, v in base.items() if v is not None}, KEY)


ACCESS = jwt()


def run_import(text: str, *, legacy: bool = False, **options: Any) -> Any:
    """parse_import_text then build_state, as the import command does."""
    request = parse_import_text(text, profile="work", legacy=legacy)
    return build_state(replace(request, **options), NOW)


def assert_clean(exc: BaseException, *secrets: str) -> None:
    """One line, and no token (nor a 12-char piece of one) in it."""
    text = str(exc)
    assert "\n" not in text and "\r" not in text
    for secret in secrets:
        secret = secret.strip()
        for i in range(0, max(len(secret) - 11, 1)):
            piece = secret[i : i + 12]
            if len(piece) == 12:
                assert piece not in text, f"message echoes {piece!r}: {text}"


class TestTwoLines:
    """Two lines: access token, then refresh token."""

    def test_jwt_pair(self) -> None:
        """Endpoint, client id and times come from the JWT; the refresh token is kept."""
        state = run_import(f"{ACCESS}\n{REFRESH}\n")
        assert state.kind is TokenKind.OAUTH
        assert (state.access_token, state.refresh_token) == (ACCESS, REFRESH)
        assert state.token_endpoint == ISSUER + "/token"
        assert state.client_id == "aac-client"
        assert (state.access_obtained_at, state.access_expires_at) == (NOW - 60, NOW + 3540)
        assert state.api_base_url == DEFAULT_API_BASE_URL
        assert state.refresh_expires_at is None
        assert state.imported_at == NOW
        assert state.generation == 0 and state.refresh_count == 0

    def test_blank_lines_and_spaces_around_ignored(self) -> None:
        """Blank lines, CRLF and surrounding spaces do not matter."""
        state = run_import(f"\r\n  {ACCESS}  \r\n\r\n\t{REFRESH}\r\n\r\n")
        assert (state.access_token, state.refresh_token) == (ACCESS, REFRESH)

    def test_iat_in_future_means_now(self) -> None:
        """A token issued 'in the future' (clock skew) counts as obtained now."""
        state = run_import(f"{jwt(iat=NOW + 500)}\n{REFRESH}")
        assert state.access_obtained_at == NOW

    def test_no_iat_means_now(self) -> None:
        """Without iat, the token counts as obtained now."""
        state = run_import(f"{jwt(iat=None)}\n{REFRESH}")
        assert state.access_obtained_at == NOW

    def test_options_override_token(self) -> None:
        """--token-endpoint, --client-id and --base-url win over the token's claims."""
        state = run_import(
            f"{ACCESS}\n{REFRESH}",
            token_endpoint="https://idp.example.com/oauth/token",
            client_id="other",
            api_base_url="https://api.eu1.alteryxcloud.com/",
        )
        assert state.token_endpoint == "https://idp.example.com/oauth/token"
        assert state.client_id == "other"
        assert state.api_base_url == "https://api.eu1.alteryxcloud.com"

    def test_refresh_lifetime_days(self) -> None:
        """--refresh-lifetime-days counts from the access token's iat (the pair's birth)."""
        state = run_import(f"{ACCESS}\n{REFRESH}", refresh_lifetime_days=90)
        assert state.refresh_expires_at == NOW - 60 + 90 * DAY

    def test_loopback_endpoint_allowed(self) -> None:
        """An explicit http endpoint on loopback (the sandbox) is accepted."""
        state = run_import(
            f"{jwt(iss='http://127.0.0.1:8080/as')}\n{REFRESH}",
            token_endpoint="http://127.0.0.1:8080/as/token",
        )
        assert state.token_endpoint == "http://127.0.0.1:8080/as/token"


class TestJson:
    """The token endpoint's JSON answer, pasted as is."""

    def test_with_expires_in(self) -> None:
        """expires_in counts from now; refresh_token_expires_in sets the refresh end."""
        text = json.dumps(
            {"access_token": ACCESS, "refresh_token": REFRESH, "expires_in": 1800,
             "refresh_token_expires_in": 7 * DAY, "token_type": "Bearer"}
        )  # fmt: skip
        state = run_import(text)
        assert (state.access_obtained_at, state.access_expires_at) == (NOW, NOW + 1800)
        assert state.refresh_expires_at == NOW - 60 + 7 * DAY  # from the JWT's iat
        assert state.refresh_token == REFRESH

    def test_stale_json_bounded_by_jwt_exp(self) -> None:
        """JSON saved long ago: the JWT's own exp wins over a later now + expires_in."""
        text = json.dumps(
            {"access_token": jwt(iat=NOW - 3000, exp=NOW + 600), "refresh_token": REFRESH,
             "expires_in": 3600}
        )  # fmt: skip
        state = run_import(text)
        assert state.access_expires_at == NOW + 600
        assert state.access_obtained_at == NOW - 3000

    def test_without_expires_in(self) -> None:
        """Without expires_in the JWT's own iat/exp are used."""
        state = run_import(json.dumps({"access_token": ACCESS, "refresh_token": REFRESH}))
        assert state.access_expires_at == NOW + 3540

    def test_expires_in_as_digit_string(self) -> None:
        """A digit-string expires_in is read as a number."""
        text = json.dumps({"access_token": ACCESS, "refresh_token": REFRESH, "expires_in": "600"})
        assert run_import(text).access_expires_at == NOW + 600

    def test_lifetime_option_beats_json(self) -> None:
        """--refresh-lifetime-days wins over refresh_token_expires_in."""
        text = json.dumps(
            {"access_token": ACCESS, "refresh_token": REFRESH, "refresh_token_expires_in": 60}
        )
        assert run_import(text, refresh_lifetime_days=2).refresh_expires_at == NOW - 60 + 2 * DAY


class TestPastedInputQuirks:
    """What editors and shells add to a paste is understood, or refused in one clear line."""

    def test_json_with_a_byte_order_mark(self) -> None:
        """JSON saved with a UTF-8 BOM (Notepad, PowerShell '>') is read as JSON."""
        text = "\ufeff" + json.dumps({"access_token": ACCESS, "refresh_token": REFRESH})
        assert run_import(text).refresh_token == REFRESH

    def test_two_lines_with_a_byte_order_mark(self) -> None:
        """A BOM before two pasted lines is not part of the access token."""
        assert run_import(f"\ufeff{ACCESS}\n{REFRESH}").access_token == ACCESS

    def test_a_replaced_undecodable_byte_is_refused_naming_the_token(self) -> None:
        """A non-UTF-8 byte (decoded as U+FFFD by the command) is refused in one line."""
        with pytest.raises(TokenFormatError, match=r"refresh token: .*non-ASCII") as info:
            run_import(f"{ACCESS}\nr\ufffdfresh")
        assert_clean(info.value, ACCESS)

    @pytest.mark.parametrize("days", [5e10, 1e300, 0.5, 366])
    def test_lifetime_out_of_range_names_the_range(self, days: float) -> None:
        """Any lifetime outside 1..365 days gets the range in its message, however large."""
        with pytest.raises(InputError, match="must be from 1 to 365"):
            run_import(f"{ACCESS}\n{REFRESH}", refresh_lifetime_days=days)


class TestLifetimeAlreadyOver:
    """A pair that is dead by its own stated lifetime is refused at import."""

    def test_refused_when_the_lifetime_from_iat_is_over(self) -> None:
        """Generated 40 days ago with a 30-day lifetime: refused, saying what to do."""
        access = jwt(iat=NOW - 40 * DAY, exp=NOW - 40 * DAY + 3600)
        with pytest.raises(
            InputError, match=r"--refresh-lifetime-days.*has already ended.*generate a new"
        ) as info:
            run_import(f"{access}\n{REFRESH}", refresh_lifetime_days=30)
        assert_clean(info.value, access, REFRESH)

    def test_refused_from_refresh_token_expires_in(self) -> None:
        """The JSON's refresh_token_expires_in, counted from iat, is over: refused too."""
        text = json.dumps(
            {"access_token": jwt(iat=NOW - 2 * DAY, exp=NOW - 2 * DAY + 3600),
             "refresh_token": REFRESH, "refresh_token_expires_in": DAY}
        )  # fmt: skip
        with pytest.raises(InputError, match=r"refresh_token_expires_in.*already ended"):
            run_import(text)

    def test_still_alive_by_a_minute_is_imported(self) -> None:
        """A lifetime that ends after the import is accepted as before."""
        access = jwt(iat=NOW - 30 * DAY + 60, exp=NOW + 3600)
        state = run_import(f"{access}\n{REFRESH}", refresh_lifetime_days=30)
        assert state.refresh_expires_at == NOW + 60


class TestLifetimeOrigin:
    """A refresh token's known lifetime counts from the pair's generation, not the import."""

    def test_pair_pasted_days_later(self) -> None:
        """A pair generated 3 days before the import ends 30 days after its generation."""
        access = jwt(iat=NOW - 3 * DAY, exp=NOW - 3 * DAY + 3600)
        state = run_import(f"{access}\n{REFRESH}", refresh_lifetime_days=30)
        assert state.refresh_expires_at == NOW + 27 * DAY

    def test_no_false_theft_at_the_natural_end(self) -> None:
        """That pair's invalid_grant at its true end is refresh_token_expired, not theft."""
        access = jwt(iat=NOW - 3 * DAY, exp=NOW - 3 * DAY + 3600)
        state = replace(
            run_import(f"{access}\n{REFRESH}", refresh_lifetime_days=30), refresh_count=40
        )
        reason = classify_rejection(state, Rejected("invalid_grant", None, 400), NOW + 27 * DAY)
        assert reason is RejectionReason.REFRESH_TOKEN_EXPIRED

    def test_iat_in_the_future_counts_from_now(self) -> None:
        """A clock-skewed iat later than the import is not believed: count from the import."""
        access = jwt(iat=NOW + 600, exp=NOW + 4200)
        state = run_import(f"{access}\n{REFRESH}", refresh_lifetime_days=1)
        assert state.refresh_expires_at == NOW + DAY

    def test_opaque_token_counts_from_the_import(self) -> None:
        """An opaque access token has no iat: the import is the best origin there is."""
        text = json.dumps({"access_token": OPAQUE, "refresh_token": REFRESH, "expires_in": 900})
        state = run_import(
            text, token_endpoint="https://idp.example.com/t", client_id="c", refresh_lifetime_days=1
        )
        assert state.refresh_expires_at == NOW + DAY


class TestOpaque:
    """A non-JWT access token needs expires_in, --token-endpoint and --client-id."""

    def opaque_json(self) -> str:
        return json.dumps({"access_token": OPAQUE, "refresh_token": REFRESH, "expires_in": 900})

    def test_all_given(self) -> None:
        """With all three the import succeeds."""
        state = run_import(
            self.opaque_json(), token_endpoint="https://idp.example.com/token", client_id="c"
        )
        assert state.access_expires_at == NOW + 900
        assert state.token_endpoint == "https://idp.example.com/token"

    @pytest.mark.parametrize(
        ("text_kind", "options"),
        [
            ("json", {"client_id": "c"}),
            ("json", {"token_endpoint": "https://idp.example.com/token"}),
            ("lines", {"token_endpoint": "https://idp.example.com/token", "client_id": "c"}),
        ],
    )
    def test_missing_one(self, text_kind: str, options: dict[str, Any]) -> None:
        """Missing any one of the three is a TokenFormatError saying what is needed."""
        text = self.opaque_json() if text_kind == "json" else f"{OPAQUE}\n{REFRESH}"
        with pytest.raises(TokenFormatError, match="--token-endpoint and --client-id") as info:
            run_import(text, **options)
        assert_clean(info.value, OPAQUE, REFRESH)


class TestLegacy:
    """A legacy token is one line, with an expiry from the JWT, given, or none."""

    def test_expiry_from_jwt(self) -> None:
        """A legacy JWT's exp is its expiry."""
        state = run_import(ACCESS, legacy=True)
        assert state.kind is TokenKind.LEGACY
        assert state.refresh_token is None and state.token_endpoint is None
        assert state.access_expires_at == NOW + 3540

    def test_expiry_given(self) -> None:
        """--expires wins over the JWT."""
        state = run_import(ACCESS, legacy=True, legacy_expires_at=NOW + 99)
        assert state.access_expires_at == NOW + 99

    def test_no_expiry(self) -> None:
        """An opaque legacy token without --expires has no known expiry."""
        state = run_import(OPAQUE, legacy=True)
        assert state.access_expires_at is None

    def test_json_legacy_drops_refresh_token(self) -> None:
        """JSON imported as legacy keeps only the access token."""
        text = json.dumps({"access_token": OPAQUE, "refresh_token": REFRESH})
        state = run_import(text, legacy=True)
        assert state.refresh_token is None

    def test_two_lines_refused(self) -> None:
        """A legacy import of two lines is refused."""
        with pytest.raises(InputError, match="one line") as info:
            run_import(f"{ACCESS}\n{REFRESH}", legacy=True)
        assert_clean(info.value, ACCESS, REFRESH)


BIG = "A" * 17_000
BAD_INPUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "empty": ("", {}),
    "blank lines": ("\n \n\t\n", {}),
    "one line": (ACCESS, {}),
    "three lines": (f"{ACCESS}\n{REFRESH}\n{REFRESH}x", {}),
    "space in access": (f"{ACCESS[:30]} {ACCESS[30:]}\n{REFRESH}", {}),
    "space in refresh": (f"{ACCESS}\n{REFRESH[:10]} {REFRESH[10:]}", {}),
    "non-ascii access": (f"{ACCESS}é\n{REFRESH}", {}),
    "non-ascii refresh": (f"{ACCESS}\n{REFRESH}ü", {}),
    "control char": (f"{ACCESS}\n{REFRESH}\x07", {}),
    "huge input": (f"{ACCESS}\n{REFRESH}" + "B" * MAX_INPUT_BYTES, {}),
    "huge token": (f"{ACCESS}\n{REFRESH}{BIG}", {}),
    "json no access_token": (json.dumps({"refresh_token": REFRESH}), {}),
    "json access_token number": (json.dumps({"access_token": 5, "refresh_token": REFRESH}), {}),
    "json no refresh_token": (json.dumps({"access_token": ACCESS}), {}),
    "json refresh_token list": (json.dumps({"access_token": ACCESS, "refresh_token": [1]}), {}),
    "json array": (json.dumps([ACCESS, REFRESH]), {}),
    "json broken": ('{"access_token": "' + ACCESS + '", "refresh_token": ', {}),
    "json nested deep": ("{" + '"a":[' * 3000, {}),
    "expires_in word": (json.dumps({"access_token": ACCESS, "refresh_token": REFRESH,
                                    "expires_in": "soon"}), {}),
    "expires_in negative": (json.dumps({"access_token": ACCESS, "refresh_token": REFRESH,
                                        "expires_in": -5}), {}),
    "expires_in zero": (json.dumps({"access_token": ACCESS, "refresh_token": REFRESH,
                                    "expires_in": 0}), {}),
    "expires_in bool": (json.dumps({"access_token": ACCESS, "refresh_token": REFRESH,
                                    "expires_in": True}), {}),
    "expires_in NaN": ('{"access_token": "' + ACCESS + '", "refresh_token": "' + REFRESH
                       + '", "expires_in": NaN}', {}),
    "expires_in huge int": ('{"access_token": "' + ACCESS + '", "refresh_token": "' + REFRESH
                            + '", "expires_in": 1' + "0" * 400 + "}", {}),
    "expires_in 5000 digits": ('{"access_token": "' + ACCESS + '", "refresh_token": "'
                               + REFRESH + '", "expires_in": ' + "9" * 5000 + "}", {}),
    "expires_in superscript": (json.dumps({"access_token": ACCESS, "refresh_token": REFRESH,
                                           "expires_in": "\u00b2"}), {}),
    "expires_in too large": (json.dumps({"access_token": ACCESS, "refresh_token": REFRESH,
                                         "expires_in": 1e12}), {}),
    "refresh lifetime > 365": (f"{ACCESS}\n{REFRESH}", {"refresh_lifetime_days": 366}),
    "refresh lifetime 0": (f"{ACCESS}\n{REFRESH}", {"refresh_lifetime_days": 0}),
    "http endpoint": (f"{ACCESS}\n{REFRESH}",
                      {"token_endpoint": "http://idp.example.com/token"}),
    "derived non-AAC issuer": (f"{jwt(iss='https://evil.example.com/as')}\n{REFRESH}", {}),
    "derived http issuer": (f"{jwt(iss='http://pingauth.alteryxcloud.com/as')}\n{REFRESH}", {}),
    "no issuer": (f"{jwt(iss=None)}\n{REFRESH}", {}),
    "no client_id": (f"{jwt(client_id=None)}\n{REFRESH}", {}),
    "jwt without exp": (f"{jwt(exp=None)}\n{REFRESH}", {}),
    "http base url": (f"{ACCESS}\n{REFRESH}", {"api_base_url": "http://api.example.com"}),
    "bad profile": (f"{ACCESS}\n{REFRESH}", {"profile": "../etc"}),
}  # fmt: skip


class TestBadInput:
    """Every bad input is an InputError with one line that echoes no token."""

    @pytest.mark.parametrize(("text", "options"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
    def test_refused_cleanly(self, text: str, options: dict[str, Any]) -> None:
        """The error is an InputError (or subclass), one line, without either token."""
        with pytest.raises(InputError) as info:
            run_import(text, **options)
        assert_clean(info.value, ACCESS, REFRESH, BIG)

    def test_endpoint_errors_are_endpoint_not_allowed(self) -> None:
        """A refused endpoint is an EndpointNotAllowedError naming the option."""
        with pytest.raises(EndpointNotAllowedError, match="--token-endpoint"):
            run_import(f"{jwt(iss='https://evil.example.com/as')}\n{REFRESH}")

    def test_base_url_error_names_base_url(self) -> None:
        """A bad --base-url is reported as the API base URL, not as the token endpoint."""
        with pytest.raises(InputError, match="API base URL") as info:
            run_import(f"{ACCESS}\n{REFRESH}", api_base_url="http://api.example.com")
        assert "token endpoint" not in str(info.value)

    def test_build_requires_refresh_token(self) -> None:
        """A non-legacy request without a refresh token is refused."""
        with pytest.raises(InputError, match="refresh token is required"):
            build_state(ImportRequest(profile="p", access_token=ACCESS), NOW)


class TestWire:
    """ImportRequest.from_wire: the control socket's import body, checked field by field."""

    def test_round_trip(self) -> None:
        """to_wire then from_wire gives the same request (op/id envelope fields ignored)."""
        request = ImportRequest(
            profile="p", access_token=ACCESS, refresh_token=REFRESH, expires_in=60.0,
            token_endpoint="https://idp.example.com/t", client_id="c",
            refresh_lifetime_days=30.0, api_base_url="https://api.example.com",
        )  # fmt: skip
        wire = request.to_wire() | {"op": "import", "id": 7}
        assert ImportRequest.from_wire(json.loads(json.dumps(wire))) == request

    def test_numbers_normalised(self) -> None:
        """Numbers arrive as floats even when sent as ints or digit strings."""
        request = ImportRequest.from_wire(
            {"profile": "p", "access_token": OPAQUE, "legacy": True, "legacy_expires_at": "99",
             "expires_in": 5}
        )  # fmt: skip
        assert request.legacy_expires_at == 99.0
        assert request.expires_in == 5.0

    @pytest.mark.parametrize(
        "data",
        [
            {"profile": "p"},
            {"access_token": ACCESS},
            {"profile": 5, "access_token": ACCESS},
            {"profile": "p", "access_token": [ACCESS]},
            {"profile": "p", "access_token": ACCESS, "refresh_token": 5},
            {"profile": "p", "access_token": ACCESS, "token_endpoint": {}},
            {"profile": "p", "access_token": ACCESS, "client_id": 1.5},
            {"profile": "p", "access_token": ACCESS, "api_base_url": True},
            {"profile": "p", "access_token": ACCESS, "expires_in": "soon"},
            {"profile": "p", "access_token": ACCESS, "expires_in": True},
            {"profile": "p", "access_token": ACCESS, "expires_in": -1},
            {"profile": "p", "access_token": ACCESS, "refresh_lifetime_days": [30]},
            {"profile": "p", "access_token": ACCESS, "legacy_expires_at": 1e300},
            {"profile": "p", "access_token": ACCESS, "legacy": "yes"},
            {"profile": "p", "access_token": ACCESS, "surprise": 1},
            {"profile": "p", "access_token": ACCESS, "refresh_token_expires_in": 5},
        ],
    )
    def test_wrong_types_and_unknown_fields(self, data: dict[str, Any]) -> None:
        """Wrong types, missing required fields and unknown fields are InputErrors."""
        with pytest.raises(InputError) as info:
            ImportRequest.from_wire(data)
        assert_clean(info.value, ACCESS)

    def test_repr_hides_tokens(self) -> None:
        """repr of a request names the profile, not the tokens."""
        text = repr(ImportRequest(profile="p", access_token=ACCESS, refresh_token=REFRESH))
        assert ACCESS not in text and REFRESH not in text


#: The importer's own wording: a piece of input that also stands in this source (such as
#: the words "access token") is the message's text, not an echo of the input.
_IMPORTER_SOURCE = inspect.getsource(importer_module)


def echoed(message: str, text: str) -> str | None:
    """A 12-character piece of ``text`` that appears in ``message``, if any."""
    for i in range(len(text) - 11):
        piece = text[i : i + 12]
        if piece in message and piece not in _IMPORTER_SOURCE:
            return piece
    return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8,
)  # fmt: skip
token_like = st.from_regex(r"[A-Za-z0-9._~+/=-]{12,80}", fullmatch=True)


class TestHostileInput:
    """Whatever is pasted, import fails only with InputError and echoes nothing."""

    def check(self, text: str, legacy: bool, secrets: list[str] | None = None) -> None:
        try:
            run_import(text, legacy=legacy)
        except InputError as exc:
            assert "\n" not in str(exc)
            for secret in [text] if secrets is None else secrets:
                piece = echoed(str(exc), secret)
                assert piece is None, f"message echoes {piece!r}: {exc}"

    @given(st.text(max_size=400), st.booleans())
    @settings(max_examples=300)
    def test_arbitrary_text(self, text: str, legacy: bool) -> None:
        """Arbitrary text: parsed, or an InputError without any 12-char piece of the input."""
        self.check(text, legacy)

    @given(st.lists(token_like | st.text(min_size=1, max_size=40), min_size=0, max_size=4),
           st.booleans())  # fmt: skip
    @settings(max_examples=300)
    def test_token_shaped_lines(self, lines: list[str], legacy: bool) -> None:
        """Lines that look like tokens: parsed, or refused without echoing any of them."""
        self.check("\n".join(lines), legacy)

    @given(
        st.dictionaries(
            st.sampled_from(["access_token", "refresh_token", "expires_in",
                             "refresh_token_expires_in", "token_type"]),
            json_values | token_like,
        ),
        st.booleans(),
    )  # fmt: skip
    @settings(max_examples=300)
    def test_arbitrary_json(self, data: dict[str, Any], legacy: bool) -> None:
        """Token-endpoint-like JSON with arbitrary values: parsed or refused, unechoed."""
        self.check(json.dumps(data), legacy, strings_in(data))


def strings_in(value: object) -> list[str]:
    """Every string value (not key: keys are field names the message may name) in ``value``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []
