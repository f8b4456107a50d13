"""Stored data never breaks a reader: import range-checks what it stores, status renders anything.

Issue 11, item 10. Import accepts only numbers and dates that a state can hold and ``status``
can show; pasted tokens are cleaned when the wrapping is unambiguous and refused (without an
echo) when not; and ``status`` renders any state the store can load.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aac_tokend.core.conditions import condition_of
from aac_tokend.core.importer import (
    ImportRequest,
    build_state,
    clean_token,
    parse_expiry_date,
    parse_import_text,
)
from aac_tokend.core.policy import PolicySettings, next_refresh_at
from aac_tokend.core.report import iso, profile_report, status_text
from aac_tokend.core.state import (
    InFlight,
    ProfileState,
    Rejection,
    RejectionReason,
    TokenKind,
    state_from_json,
    state_to_json,
)
from aac_tokend.errors import InputError, StateCorruptError, TokenFormatError
from aac_tokend.sandbox.jwt_sign import sign_hs256
from tests.scenario_support import cli, short_dir, write_config

NOW = 1_800_000_000.0
DAY = 86400.0
ISSUER = "https://pingauth.alteryxcloud.com/as"
ACCESS = sign_hs256(
    {"iss": ISSUER, "client_id": "aac-client", "iat": NOW - 60, "exp": NOW + 3540}, b"k" * 32
)
REFRESH = "opaque-refresh-token-Zx81Kq0p"
OPAQUE = "opaque-access-token-Qw3rTy9u"


def assert_one_line_without(exc: BaseException, *secrets: str) -> None:
    """One line, and no 12-character piece of any secret in it."""
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text
    for secret in secrets:
        for i in range(max(len(secret) - 11, 1)):
            piece = secret[i : i + 12]
            assert len(piece) < 12 or piece not in text, f"message echoes {piece!r}: {text}"


def assert_renders(state: ProfileState, now: float) -> None:
    """The state survives the store's round trip and both forms of ``status``."""
    loaded = state_from_json(state_to_json(state))
    assert loaded == state
    at = next_refresh_at(loaded, now, PolicySettings())
    row = profile_report(loaded, now, next_refresh=at, token_socket="/run/x.token.sock")
    json.dumps({"profiles": [row.to_wire()]}, allow_nan=False)  # strict JSON: no NaN or Infinity
    text = status_text([row], daemon_running=True)
    assert text.startswith(f"{state.profile}: ")
    condition_of(loaded, now)


# Numbers as a JSON document can carry them: every float, huge and tiny ints, and strings.
json_numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([0, 1, 59, 3600, 366 * DAY, 366 * DAY + 1, 10**10, 10**12, "600", "x"])
)


class TestNumbersImportAccepts:
    """Each accepted number gives a state that round-trips and renders; others name the option."""

    @settings(max_examples=300, deadline=None)
    @given(expires_in=json_numbers, refresh_expires_in=st.none() | json_numbers)
    def test_json_expires_in(self, expires_in: Any, refresh_expires_in: Any) -> None:
        """expires_in / refresh_token_expires_in: refused in one line naming the field, or fine."""
        body: dict[str, Any] = {
            "access_token": OPAQUE,
            "refresh_token": REFRESH,
            "expires_in": expires_in,
        }
        if refresh_expires_in is not None:
            body["refresh_token_expires_in"] = refresh_expires_in
        try:
            request = parse_import_text(json.dumps(body), profile="work")
            state = build_state(
                replace(request, token_endpoint=ISSUER + "/token", client_id="aac-client"), NOW
            )
        except InputError as exc:
            assert_one_line_without(exc, OPAQUE, REFRESH)
            assert "expires_in" in str(exc)
            return
        assert state.access_expires_at is not None
        assert 0 < state.access_expires_at - NOW <= 366 * DAY
        assert_renders(state, NOW)

    @settings(max_examples=300, deadline=None)
    @given(days=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**20), 10**20))
    @example(days=math.nan)
    @example(days=-1.0)
    @example(days=1e-300)
    def test_refresh_lifetime_days(self, days: float) -> None:
        """--refresh-lifetime-days: 1 to 365 days, else a one-line error naming the option."""
        request = parse_import_text(f"{ACCESS}\n{REFRESH}", profile="work")
        try:
            state = build_state(replace(request, refresh_lifetime_days=days), NOW)
        except InputError as exc:
            assert_one_line_without(exc, ACCESS, REFRESH)
            assert "--refresh-lifetime-days" in str(exc)
            assert not (isinstance(days, float | int) and 1 <= days <= 365)
            return
        assert 1 <= days <= 365
        assert_renders(state, NOW)

    @settings(max_examples=300, deadline=None)
    @given(
        text=st.datetimes(timezones=st.none() | st.timezones()).map(lambda d: d.isoformat())
        | st.text(max_size=40)
    )
    @example(text="9999-12-31T23:00:00-05:00")
    @example(text="10000-01-01")
    @example(text="2027-01-31T00:00:00+99:00")
    @example(text="0001-01-01T00:00:00+05:00")
    @example(text="2027-01-31")
    def test_expires_dates(self, text: str) -> None:
        """--expires: a date 1970-2286 that status can show, else one line naming --expires."""
        try:
            when = parse_expiry_date(text)
        except InputError as exc:
            assert "--expires" in str(exc) and "\n" not in str(exc)
            return
        request = ImportRequest(
            profile="old", access_token=OPAQUE, legacy=True, legacy_expires_at=when
        )
        state = build_state(request, NOW)
        assert state.access_expires_at == when
        assert_renders(state, NOW)

    @settings(max_examples=300, deadline=None)
    @given(
        exp=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**12), 10**12),
        iat=st.none() | st.floats(allow_nan=False, allow_infinity=False),
        legacy=st.booleans(),
    )
    @example(exp=253_402_300_799, iat=None, legacy=True)
    @example(exp=-253_402_300_799, iat=None, legacy=False)
    def test_jwt_times(self, exp: float, iat: float | None, legacy: bool) -> None:
        """A JWT's exp and iat: dates status can show, else a one-line error naming the claim."""
        claims: dict[str, Any] = {"iss": ISSUER, "client_id": "aac-client", "exp": exp}
        if iat is not None:
            claims["iat"] = iat
        token = sign_hs256(claims, b"k" * 32)
        text = token if legacy else f"{token}\n{REFRESH}"
        try:
            state = build_state(parse_import_text(text, profile="w", legacy=legacy), NOW)
        except InputError as exc:
            assert_one_line_without(exc, token, REFRESH)
            assert "'exp'" in str(exc) or "'iat'" in str(exc)
            return
        assert 0 < exp <= 1e10 and (iat is None or 0 < iat <= 1e10)
        assert_renders(state, NOW)

    @pytest.mark.parametrize(
        ("text", "words"),
        [
            ("9999-12-31T23:00:00-05:00", "out of range"),
            ("10000-01-01", "ISO date"),
            ("2027-01-31T00:00:00+99:00", "offsets"),
            ("1969-12-31", "out of range"),
        ],
    )
    def test_out_of_range_dates_are_refused(self, text: str, words: str) -> None:
        """Year 10000 (also via an offset), a 99-hour offset and dates before 1970 are refused."""
        with pytest.raises(InputError, match=words) as info:
            parse_expiry_date(text)
        assert "--expires" in str(info.value)

    def test_an_offset_is_honoured(self) -> None:
        """An offset moves the instant: 2027-01-31T01:00+01:00 is midnight UTC."""
        assert parse_expiry_date("2027-01-31T01:00:00+01:00") == parse_expiry_date("2027-01-31")

    def test_wire_expiry_is_range_checked_by_build_state(self) -> None:
        """A legacy expiry from the control socket is checked where the state is built."""
        request = ImportRequest(
            profile="old", access_token=OPAQUE, legacy=True, legacy_expires_at=math.inf
        )
        with pytest.raises(InputError, match="--expires"):
            build_state(request, NOW)


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_dir()
    write_config(path, "notifications = false\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class TestCommandLine:
    """The command line refuses what status could not show, and status shows what it stored."""

    def test_far_future_expires_is_refused_and_nothing_is_saved(self, home: Path) -> None:
        """--expires at year 10000 in UTC (9999 with a -05:00 offset): exit 65, one line."""
        done = cli(home, "import", "--legacy", "--expires", "9999-12-31T23:00:00-05:00",
                   "-p", "old", stdin=OPAQUE)  # fmt: skip
        assert done.returncode == 65, done.stderr
        assert done.stderr.count("\n") == 1 and "--expires" in done.stderr
        assert not (home / "state" / "old.state").exists()
        assert cli(home, "status").returncode == 0

    def test_nan_lifetime_is_refused_naming_the_option(self, home: Path) -> None:
        """--refresh-lifetime-days nan: exit 65, one line naming the option, no token echoed."""
        done = cli(home, "import", "--refresh-lifetime-days", "nan", "-p", "w",
                   stdin=f"{ACCESS}\n{REFRESH}\n")  # fmt: skip
        assert done.returncode == 65, done.stderr
        assert done.stderr.count("\n") == 1 and "--refresh-lifetime-days" in done.stderr
        assert REFRESH not in done.stderr and ACCESS[-12:] not in done.stderr


class TestPastedTokens:
    """Quotes, Bearer prefixes, spaces and CRLF around a token are removed; the rest refused."""

    @pytest.mark.parametrize(
        "wrapped",
        [
            f'"{REFRESH}"',
            f"'{REFRESH}'",
            f"  {REFRESH}\t",
            f"{REFRESH}\r",
            f"Bearer {REFRESH}",
            f"bearer  {REFRESH}",
            f'"Bearer {REFRESH}"',
            f'Bearer "{REFRESH}"',
            f"' {REFRESH} '",
        ],
    )
    def test_unambiguous_wrapping_is_removed(self, wrapped: str) -> None:
        """The cleaned token is exactly the bare one."""
        assert clean_token(wrapped, "refresh token") == REFRESH

    def test_a_pair_pasted_with_crlf_quotes_and_bearer_imports_cleanly(self) -> None:
        """A Windows clipboard with a quoted Bearer header value gives the same state as bare."""
        bare = build_state(parse_import_text(f"{ACCESS}\n{REFRESH}\n", profile="w"), NOW)
        text = f"\r\n\"Bearer {ACCESS}\"\r\n  '{REFRESH}'  \r\n"
        assert build_state(parse_import_text(text, profile="w"), NOW) == bare

    def test_json_values_are_cleaned_too(self) -> None:
        """A token-endpoint JSON whose access_token carries a Bearer prefix still imports."""
        body = json.dumps({"access_token": f"Bearer {ACCESS}", "refresh_token": f" {REFRESH} "})
        state = build_state(parse_import_text(body, profile="w"), NOW)
        assert (state.access_token, state.refresh_token) == (ACCESS, REFRESH)

    @pytest.mark.parametrize(
        "wrapped",
        [
            f'"{REFRESH}',  # unbalanced
            f"{REFRESH}'",
            f"\"{REFRESH}'",  # mismatched
            f'{REFRESH[:10]}"{REFRESH[10:]}',  # a quote inside
            f"{REFRESH[:10]}\\{REFRESH[10:]}",
            f"Token {REFRESH}",  # another scheme: a space inside is ambiguous
            '""',
            "Bearer ",
        ],
    )
    def test_ambiguous_wrapping_is_refused_without_echo(self, wrapped: str) -> None:
        """A one-line TokenFormatError that quotes no part of the token."""
        with pytest.raises(TokenFormatError) as info:
            clean_token(wrapped, "refresh token")
        assert_one_line_without(info.value, REFRESH)
        assert str(info.value).startswith("refresh token: ")

    @settings(max_examples=300)
    @given(
        token=st.text(
            alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/=",
            min_size=12,
            max_size=200,
        ),
        quote=st.sampled_from(["", "'", '"']),
        bearer=st.sampled_from(["", "Bearer ", "BEARER\t"]),
        pad=st.sampled_from(["", " ", "\r", "\t  "]),
    )
    def test_any_wrapped_token_comes_back_bare(
        self, token: str, quote: str, bearer: str, pad: str
    ) -> None:
        """Any token-alphabet string, wrapped in any unambiguous way, is recovered exactly."""
        wrapped = f"{pad}{quote}{bearer}{token}{quote}{pad}"
        assert clean_token(wrapped, "access token") == token

    @settings(max_examples=500)
    @given(st.text(max_size=80))
    def test_anything_pasted_is_cleaned_or_refused_in_one_line(self, text: str) -> None:
        """Arbitrary text: a printable space-free result, or a one-line error without an echo."""
        try:
            value = clean_token(text, "access token")
        except TokenFormatError as exc:
            assert_one_line_without(exc, text.strip())
            return
        assert value and value.isascii() and value.isprintable()
        assert not any(c.isspace() or c in "'\"\\" for c in value)


profile_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
# Any finite float is loadable, so status must render it; a few famous edges are pinned.
any_time = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -1.0, 253_402_300_799.0, 253_402_300_800.0, -62_135_596_800.0, 1e308, -1e308]
)
maybe_time = st.none() | any_time
texts = st.text(max_size=40)
maybe_texts = st.none() | texts
counts = st.integers(min_value=-(2**70), max_value=2**70)

any_state = st.builds(
    ProfileState,
    profile=profile_names,
    kind=st.sampled_from(TokenKind),
    access_token=st.text(min_size=1, max_size=40),
    refresh_token=maybe_texts,
    token_endpoint=maybe_texts,
    client_id=maybe_texts,
    api_base_url=texts,
    access_obtained_at=any_time,
    access_expires_at=maybe_time,
    refresh_expires_at=maybe_time,
    imported_at=any_time,
    last_refresh_at=maybe_time,
    refresh_count=counts,
    consecutive_failures=counts,
    last_error=maybe_texts,
    last_attempt_at=maybe_time,
    retry_not_before=maybe_time,
    rejection=st.none()
    | st.builds(Rejection, st.sampled_from(RejectionReason), texts, maybe_texts, any_time),
    in_flight=st.none() | st.builds(InFlight, st.text(max_size=16), any_time),
    ambiguous_rt_hash=maybe_texts,
    generation=counts,
)


class TestStatusOverAnyState:
    """``status`` renders every state the store can load, however extreme its values."""

    @settings(max_examples=500, deadline=None)
    @given(state=any_state, now=any_time)
    def test_status_never_raises(self, state: ProfileState, now: float) -> None:
        """Round trip, report, strict JSON and text: none of them raises."""
        assert_renders(state, now)

    def test_a_time_past_year_9999_is_shown_not_raised(self) -> None:
        """A time no calendar can show is reported as out of range, with its number."""
        assert iso(253_402_300_800.0) == "out of range (2.53402e+11 s since 1970)"
        assert iso(-1e300) is not None and "out of range" in str(iso(-1e300))
        assert iso(253_402_300_799.0) == "9999-12-31T23:59:59Z"

    @pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
    def test_non_finite_times_are_corrupt_not_loaded(self, raw: str) -> None:
        """JSON admits NaN and Infinity; no time we write is one, so the file is corrupt."""
        state = ProfileState(
            profile="p", kind=TokenKind.OAUTH, access_token="a", refresh_token="r",
            token_endpoint=None, client_id=None, api_base_url="https://x",
            access_obtained_at=1.0, access_expires_at=2.0,
        )  # fmt: skip
        blob = state_to_json(state).replace(
            b'"access_expires_at":2.0', f'"access_expires_at":{raw}'.encode()
        )
        assert raw.encode() in blob
        with pytest.raises(StateCorruptError):
            state_from_json(blob)
