"""Profile state: typed, immutable, serialised to JSON and back, never showing a token."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.core.outcome import UNREACHED_PREFIX, FailureKind
from aac_tokend.core.state import (
    FORMAT_VERSION,
    InFlight,
    ProfileState,
    Rejection,
    RejectionReason,
    TokenKind,
    state_from_json,
    state_to_json,
    validate_profile_name,
)
from aac_tokend.errors import ProfileError, StateCorruptError
from aac_tokend.testing import oauth_state

ACCESS = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE4MDAwMDAwMDB9.c2lnbmF0dXJlLXNlY3JldA"
REFRESH = "refresh-secret-Kq0pZx81Lm"

profile_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False, allow_infinity=False)
maybe_times = st.none() | times
texts = st.text(max_size=40)
maybe_texts = st.none() | texts
counts = st.integers(min_value=0, max_value=2**53)

states = st.builds(
    ProfileState,
    profile=profile_names,
    kind=st.sampled_from(TokenKind),
    access_token=st.text(min_size=1, max_size=80),
    refresh_token=maybe_texts,
    token_endpoint=maybe_texts,
    client_id=maybe_texts,
    api_base_url=texts,
    access_obtained_at=times,
    access_expires_at=maybe_times,
    refresh_expires_at=maybe_times,
    imported_at=times,
    last_refresh_at=maybe_times,
    refresh_count=counts,
    consecutive_failures=counts,
    last_error=maybe_texts,
    last_failure=st.none() | st.sampled_from(FailureKind),
    last_attempt_at=maybe_times,
    retry_not_before=maybe_times,
    rejection=st.none()
    | st.builds(Rejection, st.sampled_from(RejectionReason), texts, maybe_texts, times),
    in_flight=st.none() | st.builds(InFlight, st.text(max_size=16), times),
    ambiguous_rt_hash=maybe_texts,
    generation=counts,
)


def sample(**changes: Any) -> ProfileState:
    fields: dict[str, Any] = {
        "access_token": ACCESS,
        "refresh_token": REFRESH,
        "imported_at": 0.0,
        "rejection": Rejection(RejectionReason.REUSE_SUSPECTED, "invalid_grant", "no", 1.0),
        "in_flight": InFlight("0123456789abcdef", 2.0),
    }
    return oauth_state(**{**fields, **changes})


def as_dict(state: ProfileState) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(state_to_json(state))
    return data


def from_dict(data: dict[str, Any]) -> ProfileState:
    return state_from_json(json.dumps(data).encode())


class TestRoundTrip:
    """state_to_json and state_from_json are inverses."""

    @given(states)
    @settings(max_examples=300)
    def test_any_state(self, state: ProfileState) -> None:
        """Any state (any text, times, counters, journal, rejection) comes back equal."""
        assert state_from_json(state_to_json(state)) == state

    def test_format_version_written(self) -> None:
        """The serialised form carries the format version."""
        assert as_dict(sample())["format"] == FORMAT_VERSION

    def test_whole_number_times_read_as_floats(self) -> None:
        """A time written as an integer is read back as a float of the same value."""
        data = as_dict(sample()) | {"access_obtained_at": 5, "imported_at": 0}
        state = from_dict(data)
        assert state.access_obtained_at == 5.0 and isinstance(state.access_obtained_at, float)

    def test_defaults_fill_missing_optional_fields(self) -> None:
        """Only profile, kind and access_token are required; older files lacking later
        fields still load."""
        data = as_dict(sample())
        for name in ("refresh_count", "generation", "in_flight", "rejection", "imported_at"):
            del data[name]
        state = from_dict(data)
        assert (state.refresh_count, state.generation, state.in_flight) == (0, 0, None)


class TestFailureKindOfOlderFiles:
    """A state written before format 4 gets its failure kind from its last error's words."""

    @pytest.mark.parametrize("version", [1, 2, 3])
    def test_unreached_words_read_as_unreached(self, version: int) -> None:
        """An older file whose last error is the endpoint's unreached wording loads typed."""
        data = as_dict(sample(last_error=f"{UNREACHED_PREFIX}: ConnectTimeout"))
        del data["last_failure"]
        data["format"] = version
        assert from_dict(data).last_failure is FailureKind.UNREACHED

    @pytest.mark.parametrize("words", [None, "token endpoint answered HTTP 503", "interrupted"])
    def test_other_words_read_as_unknown(self, words: str | None) -> None:
        """Any other last error of an older file leaves the kind unknown (None)."""
        data = as_dict(sample(last_error=words))
        del data["last_failure"]
        data["format"] = 3
        assert from_dict(data).last_failure is None

    def test_current_files_are_not_read_by_words(self) -> None:
        """A format-4 file's kind is the stored one, whatever its last error says."""
        data = as_dict(sample(last_error=f"{UNREACHED_PREFIX}: x", last_failure=None))
        assert from_dict(data).last_failure is None


class TestSecrecy:
    """repr never shows a token."""

    @given(states)
    @settings(max_examples=200)
    def test_repr_has_no_tokens(self, state: ProfileState) -> None:
        """repr names profile, kind and counters, never the access or refresh token."""
        state = replace(state, access_token=ACCESS, refresh_token=REFRESH)
        assert ACCESS not in repr(state) and REFRESH not in repr(state)
        assert ACCESS not in str(state) and REFRESH not in str(state)
        assert state.profile in repr(state)

    def test_bumped_keeps_secrecy_and_counts(self) -> None:
        """bumped() advances the generation and applies changes."""
        state = sample(generation=4)
        after = state.bumped(refresh_count=9)
        assert (after.generation, after.refresh_count) == (5, 9)
        assert REFRESH not in repr(after)


CORRUPT: dict[str, bytes] = {
    "not json": b"\x00\x01 not json",
    "not utf8": b"\xff\xfe{}",
    "json list": b"[1, 2]",
    "json string": b'"state"',
    "deep nesting": b"[" * 100_000,
    "int of 5000 digits": b'{"format": ' + b"9" * 5000 + b"}",
    "empty": b"",
}


class TestCorrupt:
    """Anything that is not a state we wrote is StateCorruptError."""

    @pytest.mark.parametrize("raw", CORRUPT.values(), ids=CORRUPT.keys())
    def test_not_a_state_object(self, raw: bytes) -> None:
        """Garbage, other JSON shapes and pathological JSON are refused."""
        with pytest.raises(StateCorruptError):
            state_from_json(raw)

    def test_wrong_format_version(self) -> None:
        """A future or missing format version is refused."""
        for version in (FORMAT_VERSION + 1, 0, None, "1", True, 1.0):
            data = as_dict(sample())
            data["format"] = version
            with pytest.raises(StateCorruptError, match="format"):
                from_dict(data)

    def test_unknown_field(self) -> None:
        """A field we do not know is refused rather than dropped."""
        with pytest.raises(StateCorruptError, match="unexpected"):
            from_dict(as_dict(sample()) | {"surprise": 1})

    @pytest.mark.parametrize("name", ["profile", "kind", "access_token"])
    def test_missing_required_field(self, name: str) -> None:
        """profile, kind and access_token must be present."""
        data = as_dict(sample())
        del data[name]
        with pytest.raises(StateCorruptError):
            from_dict(data)

    @pytest.mark.parametrize(
        ("name", "value"),
        [
            ("access_token", 5),
            ("access_token", None),
            ("refresh_token", ["x"]),
            ("token_endpoint", 1.5),
            ("client_id", {"a": 1}),
            ("api_base_url", None),
            ("kind", "bearer"),
            ("kind", 1),
            ("access_obtained_at", "soon"),
            ("access_obtained_at", None),
            ("access_expires_at", "2027-01-01"),
            ("access_expires_at", True),
            ("refresh_count", "3"),
            ("refresh_count", 1.5),
            ("refresh_count", True),
            ("consecutive_failures", None),
            ("generation", [1]),
            ("last_error", 404),
            ("ambiguous_rt_hash", 7),
            ("last_failure", "lost"),
            ("last_failure", 1),
            ("rejection", "rejected"),
            ("rejection", [1]),
            ("rejection", {"reason": "bogus", "error": "e", "at": 1.0}),
            ("rejection", {"reason": "oauth_error", "error": 5, "at": 1.0}),
            ("rejection", {"reason": "oauth_error", "error": "e", "at": "then"}),
            ("rejection", {"reason": "oauth_error", "error": "e", "error_description": 1,
                           "at": 1.0}),
            ("rejection", {"reason": "oauth_error"}),
            ("in_flight", {"rt_hash": 5, "started_at": 1.0}),
            ("in_flight", {"rt_hash": "abc"}),
            ("in_flight", {"rt_hash": "abc", "started_at": None}),
            ("in_flight", 3),
            ("profile", 12),
        ],
    )  # fmt: skip
    def test_wrong_type(self, name: str, value: object) -> None:
        """A field of the wrong type is refused when read, not when used later."""
        data = as_dict(sample())
        data[name] = value
        with pytest.raises(StateCorruptError):
            from_dict(data)

    @pytest.mark.parametrize("profile", ["", "../x", "a/b", ".hidden", "x.lock", "a" * 65])
    def test_bad_profile_name(self, profile: str) -> None:
        """A state naming an unusable profile is refused."""
        with pytest.raises((StateCorruptError, ProfileError)):
            from_dict(as_dict(sample()) | {"profile": profile})

    def test_message_has_no_token(self) -> None:
        """The corruption message does not quote the content."""
        data = as_dict(sample())
        data["refresh_count"] = REFRESH
        with pytest.raises(StateCorruptError) as info:
            from_dict(data)
        assert REFRESH not in str(info.value) and ACCESS not in str(info.value)


class TestProfileNames:
    """Profile names become file and socket names."""

    @pytest.mark.parametrize("name", ["default", "work", "a", "A.b-c_d", "9", "x" * 64])
    def test_allowed(self, name: str) -> None:
        """Letters, digits, '.', '-', '_', 1 to 64 long, starting alphanumeric."""
        assert validate_profile_name(name) == name

    @pytest.mark.parametrize(
        "name", ["", "-x", ".x", "_x", "a b", "a/b", "é", "x" * 65, "a.lock", "a.state", "a.tmp",
                 "a\n"]
    )  # fmt: skip
    def test_refused(self, name: str) -> None:
        """Anything else is a ProfileError."""
        with pytest.raises(ProfileError):
            validate_profile_name(name)
