"""Fleet sealing: nothing readable in etcd, and the fleet key file that opens it.

The blob tests are pure (hypothesis drives the inputs); the key file tests use real files
in a temporary directory, with ``testing.FailingFileLayer`` for the failures.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aac_tokend.errors import FleetKeyFormatError, InputError, StateCorruptError, StorageError
from aac_tokend.fleet.sealing import (
    FLEET_KEY_BYTES,
    FLEET_KEY_FILENAME,
    MAX_GENERATION,
    Sealer,
    create_fleet_key,
    export_fleet_key,
    import_fleet_key,
    load_fleet_key,
    parse_fleet_key,
)
from aac_tokend.testing import FailingFileLayer

KEY = bytes(range(32))
SEALER = Sealer(KEY, "prod")
profiles = st.text(min_size=1, max_size=40)
generations = st.integers(min_value=0, max_value=MAX_GENERATION)
payloads = st.binary(max_size=2048)


class TestRoundTrip:
    """What is sealed opens again, for any profile, generation and plaintext."""

    @given(profiles, generations, payloads)
    def test_unseal_returns_what_was_sealed(self, profile: str, gen: int, data: bytes) -> None:
        """unseal gives back the generation and the plaintext that seal was given."""
        assert SEALER.unseal(profile, SEALER.seal(profile, gen, data)) == (gen, data)

    @given(generations)
    def test_generation_is_readable_before_unsealing(self, gen: int) -> None:
        """generation_of reads the clear generation without decrypting."""
        assert SEALER.generation_of("p", SEALER.seal("p", gen, b"x")) == gen

    def test_plaintext_is_not_in_the_blob(self) -> None:
        """The blob holds ciphertext only: a recognisable plaintext does not appear in it."""
        secret = b"refresh-token-" + b"A" * 64
        assert secret[:16] not in SEALER.seal("p", 1, secret)

    def test_two_seals_differ(self) -> None:
        """Each seal takes a fresh nonce, so equal inputs give different blobs."""
        assert SEALER.seal("p", 1, b"same") != SEALER.seal("p", 1, b"same")


class TestRefused:
    """Any blob not sealed for this fleet, profile and generation is a StateCorruptError."""

    @given(profiles, generations, payloads, st.data())
    def test_any_single_bit_flip_is_refused(
        self, profile: str, gen: int, data: bytes, draw: st.DataObject
    ) -> None:
        """Flipping any one bit of a blob makes unseal refuse it."""
        blob = bytearray(SEALER.seal(profile, gen, data))
        bit = draw.draw(st.integers(min_value=0, max_value=len(blob) * 8 - 1))
        blob[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(StateCorruptError):
            SEALER.unseal(profile, bytes(blob))

    @given(profiles, generations, payloads, st.data())
    def test_any_truncation_is_refused(
        self, profile: str, gen: int, data: bytes, draw: st.DataObject
    ) -> None:
        """A blob cut short at any length is refused."""
        blob = SEALER.seal(profile, gen, data)
        cut = draw.draw(st.integers(min_value=0, max_value=len(blob) - 1))
        with pytest.raises(StateCorruptError):
            SEALER.unseal(profile, blob[:cut])

    def test_another_profile_is_refused(self) -> None:
        """A blob sealed for one profile does not open as another's."""
        with pytest.raises(StateCorruptError, match="'b'"):
            SEALER.unseal("b", SEALER.seal("a", 1, b"x"))

    def test_another_fleet_is_refused(self) -> None:
        """A blob of another fleet does not open, even under the same key."""
        with pytest.raises(StateCorruptError, match="fleet key and fleet name"):
            Sealer(KEY, "staging").unseal("p", SEALER.seal("p", 1, b"x"))

    def test_another_key_is_refused(self) -> None:
        """A blob sealed under another fleet key does not open."""
        with pytest.raises(StateCorruptError):
            Sealer(bytes(32), "prod").unseal("p", SEALER.seal("p", 1, b"x"))

    def test_a_changed_generation_is_refused(self) -> None:
        """Rewriting the clear generation (to dodge a rollback check) breaks the tag."""
        blob = bytearray(SEALER.seal("p", 5, b"x"))
        blob[5:13] = (9).to_bytes(8, "big")
        with pytest.raises(StateCorruptError):
            SEALER.unseal("p", bytes(blob))

    def test_message_is_one_line_and_quotes_nothing(self) -> None:
        """The refusal is one line that never echoes the blob's bytes."""
        blob = b"AAFL\x01" + b"SECRETSECRETSECRETSECRETSECRETSECRET"
        with pytest.raises(StateCorruptError) as caught:
            SEALER.unseal("p", blob)
        assert "\n" not in str(caught.value) and "SECRET" not in str(caught.value)

    def test_a_foreign_value_is_named(self) -> None:
        """A value without the format tag is called "not a sealed fleet blob"."""
        with pytest.raises(StateCorruptError, match="not a sealed fleet blob"):
            SEALER.unseal("p", b"{" + b"x" * 80 + b"}")

    def test_the_lock_is_held_around_crypto(self) -> None:
        """The lock given to the Sealer is taken around each AES-GCM call."""
        taken = []

        class Recording:
            def __enter__(self) -> None:
                taken.append(1)

            def __exit__(self, *exc: object) -> None:
                return None

        sealer = Sealer(KEY, "prod", lock=Recording())  # type: ignore[arg-type]
        sealer.unseal("p", sealer.seal("p", 1, b"x"))
        assert len(taken) == 2


class TestExport:
    """The export line carries the key to a new host and catches a mistyped paste."""

    @given(st.binary(min_size=FLEET_KEY_BYTES, max_size=FLEET_KEY_BYTES))
    def test_round_trip(self, key: bytes) -> None:
        """parse_fleet_key reads back what export_fleet_key wrote."""
        assert parse_fleet_key(export_fleet_key(key)) == key

    def test_wrapped_paste_is_accepted(self) -> None:
        """Whitespace and line breaks inserted by a terminal are ignored."""
        line = export_fleet_key(KEY)
        assert parse_fleet_key(f"  {line[:20]}\n{line[20:]}\n") == KEY

    @given(st.data())
    def test_any_one_character_typo_is_caught(self, draw: st.DataObject) -> None:
        """Changing any one character of the body to another base64url character is refused."""
        line = export_fleet_key(KEY)
        start = len("aacfleetkey1.")
        pos = draw.draw(st.integers(min_value=start, max_value=len(line) - 1))
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        other = draw.draw(st.sampled_from(alphabet.replace(line[pos], "")))
        typo = line[:pos] + other + line[pos + 1 :]
        with pytest.raises(FleetKeyFormatError, match="checksum"):
            parse_fleet_key(typo)

    def test_truncated_paste_is_caught(self) -> None:
        """A paste missing its last characters is refused."""
        with pytest.raises(FleetKeyFormatError):
            parse_fleet_key(export_fleet_key(KEY)[:-3])

    def test_something_else_is_refused_without_echo(self) -> None:
        """A pasted token is refused as not a fleet key, and not quoted back."""
        with pytest.raises(FleetKeyFormatError) as caught:
            parse_fleet_key("eyJhbGciOiJSUzI1NiJ9.secretpayload.sig")
        assert "secretpayload" not in str(caught.value)
        assert isinstance(caught.value, InputError)


class TestKeyFile:
    """The fleet key file is created once (0600, atomically), checked on every load."""

    def test_create_then_load(self, tmp_path: Path) -> None:
        """A created key loads back, from a 0600 file."""
        key = create_fleet_key(tmp_path / "cfg")
        assert load_fleet_key(tmp_path / "cfg") == key
        mode = os.stat(tmp_path / "cfg" / FLEET_KEY_FILENAME).st_mode & 0o777
        assert mode == 0o600

    def test_never_overwritten(self, tmp_path: Path) -> None:
        """A second create is refused and the first key stays."""
        key = create_fleet_key(tmp_path)
        with pytest.raises(StorageError, match="never replaced"):
            create_fleet_key(tmp_path)
        assert load_fleet_key(tmp_path) == key

    def test_concurrent_creates_leave_one_key(self, tmp_path: Path) -> None:
        """Racing creates: exactly one wins, and the file holds the winner's key."""
        won: list[bytes] = []
        lost: list[Exception] = []

        def create() -> None:
            try:
                won.append(create_fleet_key(tmp_path))
            except StorageError as exc:
                lost.append(exc)

        threads = [threading.Thread(target=create) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == 5
        assert load_fleet_key(tmp_path) == won[0]

    def test_import_installs_the_exported_key(self, tmp_path: Path) -> None:
        """A key exported on one host and imported on another is the same key."""
        first = create_fleet_key(tmp_path / "host1")
        line = export_fleet_key(load_fleet_key(tmp_path / "host1"))
        assert import_fleet_key(tmp_path / "host2", line) == first
        assert load_fleet_key(tmp_path / "host2") == first

    def test_import_again_is_harmless_but_another_key_is_refused(self, tmp_path: Path) -> None:
        """Re-importing the same key is a no-op; importing a different one is refused."""
        import_fleet_key(tmp_path, export_fleet_key(KEY))
        import_fleet_key(tmp_path, export_fleet_key(KEY))
        with pytest.raises(StorageError, match="never replaced"):
            import_fleet_key(tmp_path, export_fleet_key(bytes(32)))
        assert load_fleet_key(tmp_path) == KEY

    def test_failed_write_leaves_no_key_and_no_stray_copy(self, tmp_path: Path) -> None:
        """ENOSPC while writing: a StorageError, no key file, no temporary copy left behind."""
        fs = FailingFileLayer(failures={"fsync": errno.ENOSPC})
        with pytest.raises(StorageError, match="cannot create"):
            create_fleet_key(tmp_path, fs)
        assert os.listdir(tmp_path) == []

    def test_missing_key_says_how_to_get_one(self, tmp_path: Path) -> None:
        """Loading without a key names both ways to get one."""
        with pytest.raises(StorageError, match="import"):
            load_fleet_key(tmp_path)

    def test_loose_mode_is_refused(self, tmp_path: Path) -> None:
        """A fleet key readable by others is refused."""
        create_fleet_key(tmp_path)
        os.chmod(tmp_path / FLEET_KEY_FILENAME, 0o644)
        with pytest.raises(StorageError, match="0600"):
            load_fleet_key(tmp_path)

    def test_wrong_length_is_damage(self, tmp_path: Path) -> None:
        """A key file of the wrong length is a StateCorruptError."""
        path = tmp_path / FLEET_KEY_FILENAME
        path.write_bytes(b"short")
        path.chmod(0o600)
        with pytest.raises(StateCorruptError, match="damaged"):
            load_fleet_key(tmp_path)

    def test_symlink_is_not_followed(self, tmp_path: Path) -> None:
        """A symlink in the key's place is refused, not read."""
        create_fleet_key(tmp_path / "real")
        os.symlink(tmp_path / "real" / FLEET_KEY_FILENAME, tmp_path / FLEET_KEY_FILENAME)
        with pytest.raises(StorageError, match="symlink"):
            load_fleet_key(tmp_path)
