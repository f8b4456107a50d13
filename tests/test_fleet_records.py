"""The chain record's pure builders, its bytes, and the fleet key layout.

Parsing opened records is parsing untrusted input (whatever a fleet-key holder wrote), so
``decode_record`` and ``decode_tombstone`` are also driven by hypothesis: the only
exception they may raise is StateCorruptError.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aac_tokend.core.policy import begin_attempt
from aac_tokend.errors import StateCorruptError
from aac_tokend.fleet.keys import FleetKeys, KeyKind
from aac_tokend.fleet.records import (
    Attempt,
    ChainRecord,
    Tombstone,
    cancelled,
    decode_record,
    decode_tombstone,
    encode_record,
    encode_tombstone,
    first_record,
    journal_of,
    new_attempt_id,
    outcome_of,
    resolved_by_heir,
    with_state,
)
from aac_tokend.testing import T0, oauth_state

STATE = oauth_state()


def entry_of(record: ChainRecord) -> ChainRecord:
    return journal_of(record, begin_attempt(record.state, T0), Attempt(new_attempt_id(), "h", 10))


class TestBuilders:
    """Every record after the first is one seq above the one it follows."""

    def test_first_record_above_the_floor(self) -> None:
        """An import starts one above every seq seen."""
        assert first_record(STATE, 41) == ChainRecord(42, STATE)

    def test_journal_is_unresolved_until_resolved(self) -> None:
        """A journal entry is unresolved; its outcome, cancellation and heir's resolution
        each resolve it by the attempt's id, one seq above."""
        record = first_record(STATE, 0)
        entry = entry_of(record)
        assert entry.seq == 2 and entry.unresolved == entry.attempt
        assert entry.attempt is not None
        for resolution in (
            outcome_of(entry, STATE),
            cancelled(entry, record.state),
            resolved_by_heir(entry, T0 + 100),
        ):
            assert resolution.seq == 3
            assert resolution.unresolved is None
            assert resolution.resolved == entry.attempt.id

    def test_heir_makes_the_attempt_ambiguous(self) -> None:
        """An heir's resolution is today's interrupted attempt: the token is ambiguous."""
        entry = entry_of(first_record(STATE, 0))
        heirs = resolved_by_heir(entry, T0 + 100)
        assert heirs.state.in_flight is None
        assert entry.state.in_flight is not None
        assert heirs.state.ambiguous_rt_hash == entry.state.in_flight.rt_hash

    def test_resolving_a_plain_record_is_a_bug(self) -> None:
        """Only a journal entry can be resolved."""
        with pytest.raises(ValueError, match="not a journal"):
            outcome_of(first_record(STATE, 0), STATE)

    def test_with_state_clears_the_fleet_part(self) -> None:
        """A plain save is the next seq with nothing in flight and nothing resolved."""
        resolved = outcome_of(entry_of(first_record(STATE, 0)), STATE)
        saved = with_state(resolved, STATE)
        assert saved == ChainRecord(resolved.seq + 1, STATE)

    def test_repr_names_no_token(self) -> None:
        """A record's repr never shows a token."""
        text = repr(entry_of(first_record(STATE, 0)))
        assert STATE.refresh_token is not None
        assert STATE.refresh_token not in text and STATE.access_token not in text

    def test_attempt_ids_differ(self) -> None:
        """Attempt ids are random: two hosts never pick the same."""
        assert len({new_attempt_id() for _ in range(100)}) == 100


class TestBytes:
    """Records and tombstones round-trip; anything else is StateCorruptError."""

    def test_round_trips(self) -> None:
        """Each kind of record, and a tombstone, decodes to what was encoded."""
        record = first_record(STATE, 6)
        entry = entry_of(record)
        for each in (record, entry, outcome_of(entry, STATE)):
            assert decode_record(encode_record(each), "work") == each
        assert decode_tombstone(encode_tombstone(Tombstone(9)), "work") == Tombstone(9)

    def test_another_profiles_state(self) -> None:
        """A record whose state is another profile's is corrupt for this one."""
        with pytest.raises(StateCorruptError, match="'other'"):
            decode_record(encode_record(first_record(STATE, 0)), "other")

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("seq", -1),
            ("seq", True),
            ("seq", 2**63),
            ("seq", "3"),
            ("format", 2),
            ("state", None),
            ("resolved", 5),
            ("attempt", {"id": "x", "host": "h", "send_window": 0}),
            ("attempt", {"id": "x", "host": "h", "send_window": float("inf")}),
            ("attempt", {"id": "x", "host": "h", "send_window": True}),
            ("attempt", {"id": 1, "host": "h", "send_window": 1}),
            ("attempt", []),
        ],
    )
    def test_bad_fields(self, field: str, value: Any) -> None:
        """Each malformed field is StateCorruptError, with a one-line message."""
        doc = json.loads(encode_record(entry_of(first_record(STATE, 0))))
        doc[field] = value
        with pytest.raises(StateCorruptError) as caught:
            decode_record(json.dumps(doc).encode(), "work")
        assert "\n" not in str(caught.value)

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_mutated_records_only_corrupt(self, data: st.DataObject) -> None:
        """A valid record with any field replaced by any JSON value decodes or is
        StateCorruptError; nothing else escapes."""
        doc = json.loads(encode_record(entry_of(first_record(STATE, 0))))
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        )
        target = doc
        path = data.draw(st.sampled_from(["", "state", "attempt"]))
        if path:
            target = doc[path]
        key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=5))
        target[key] = data.draw(json_values)
        raw = json.dumps(doc).encode()
        with contextlib.suppress(StateCorruptError):
            decode_record(raw, "work")

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=64))
    def test_any_bytes_only_corrupt(self, raw: bytes) -> None:
        """Arbitrary bytes as a record or a tombstone: StateCorruptError or a value."""
        for decode in (decode_record, decode_tombstone):
            with contextlib.suppress(StateCorruptError):
                decode(raw, "work")


class TestKeys:
    """Three keys per profile under one prefix per fleet; parse inverts them."""

    def test_layout(self) -> None:
        """The documented key names."""
        keys = FleetKeys("prod")
        assert keys.owner("work") == b"/aac-tokend/prod/owner/work"
        assert keys.chain("work") == b"/aac-tokend/prod/chain/work"
        assert keys.gone("work") == b"/aac-tokend/prod/gone/work"
        assert keys.prefix(KeyKind.CHAIN) == b"/aac-tokend/prod/chain/"

    def test_parse_inverts(self) -> None:
        """parse gives the kind and profile of each of the fleet's keys."""
        keys = FleetKeys("prod")
        for kind, build in (
            (KeyKind.OWNER, keys.owner),
            (KeyKind.CHAIN, keys.chain),
            (KeyKind.GONE, keys.gone),
        ):
            assert keys.parse(build("work")) == (kind, "work")

    @pytest.mark.parametrize(
        "key",
        [
            b"/aac-tokend/prodx/chain/work",  # another fleet whose name starts alike
            b"/aac-tokend/prod/chain/",  # no profile
            b"/aac-tokend/prod/other/work",
            b"/aac-tokend/prod/chain/\xff",  # not UTF-8
            b"/elsewhere",
        ],
    )
    def test_parse_refuses_others(self, key: bytes) -> None:
        """Keys that are not one of this fleet's profile keys parse as None."""
        assert FleetKeys("prod").parse(key) is None

    def test_fleets_apart(self) -> None:
        """No key of one fleet lies under another fleet's prefix, even with a shared start."""
        assert not FleetKeys("prodx").chain("w").startswith(FleetKeys("prod").root)
