"""What fleet mode writes to etcd: AES-GCM blobs that only holders of the fleet key can read.

``Sealer`` is pure apart from ``secrets`` (the nonces). The fleet key lives in a local file
(``fleet.key`` in the config directory, 0600) and never goes to etcd; the functions at the
bottom create, load, export and import it, on the patterns of ``store/keyfile.py``.

Blob format (version 1)::

    MAGIC (5) | generation (8, big-endian) | nonce (12) | AES-GCM ciphertext and tag

The associated data authenticates MAGIC, the fleet name, the profile and the generation, so
a blob copied to another fleet's or another profile's key, or given another generation, does
not open. The generation is in clear so that a reader can compare it with its high-water
mark (``highwater.py``) before trusting anything; it is authenticated all the same.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import FleetKeyFormatError, StateCorruptError, StorageError
from ..store.fileio import FileLayer, OsFileLayer, ensure_private_dir
from ..store.keyfile import read_key_file, write_new_key_file

__all__ = [
    "FLEET_KEY_BYTES",
    "FLEET_KEY_FILENAME",
    "Sealer",
    "create_fleet_key",
    "export_fleet_key",
    "import_fleet_key",
    "load_fleet_key",
    "parse_fleet_key",
]

MAGIC = b"AAFL\x01"
NONCE_BYTES = 12
_GENERATION = struct.Struct(">Q")
HEADER_BYTES = len(MAGIC) + _GENERATION.size + NONCE_BYTES
TAG_BYTES = 16
#: Generations are etcd-style counters: non-negative and below 2**63 (etcd's int64 revisions).
MAX_GENERATION = 2**63 - 1

FLEET_KEY_BYTES = 32
FLEET_KEY_FILENAME = "fleet.key"
#: The export's prefix names what the text is, so a pasted state key or token is refused.
EXPORT_PREFIX = "aacfleetkey1."
#: 4 checksum bytes: a mistyped or truncated paste passes by chance once in 2**32.
CHECKSUM_BYTES = 4


def _aad(fleet: str, profile: str, generation: int) -> bytes:
    # Length-prefixed so that ("ab", "c") and ("a", "bc") cannot share associated data.
    parts = [fleet.encode(), profile.encode()]
    framed = b"".join(struct.pack(">I", len(p)) + p for p in parts)
    return MAGIC + framed + _GENERATION.pack(generation)


class Sealer:
    """Seals and opens one fleet's blobs under its 32-byte key.

    ``lock`` is held around every AES-GCM call: in the daemon it is ``store.files.CRYPTO_LOCK``,
    so a forked courier never inherits an OpenSSL lock held by another thread.
    """

    def __init__(
        self,
        key: bytes,
        fleet: str,
        lock: contextlib.AbstractContextManager[object] | None = None,
    ) -> None:
        if len(key) != FLEET_KEY_BYTES:
            raise ValueError(f"a fleet key is {FLEET_KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self._fleet = fleet
        self._lock = lock if lock is not None else contextlib.nullcontext()

    def seal(self, profile: str, generation: int, plaintext: bytes) -> bytes:
        """``plaintext`` sealed for ``profile`` at ``generation`` in this fleet."""
        if not 0 <= generation <= MAX_GENERATION:
            raise ValueError(f"a generation is from 0 to {MAX_GENERATION}")
        # Random 96-bit nonces: a fleet seals a few blobs per refresh, far below the 2**32
        # messages per key after which NIST asks for another construction.
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self._lock:
            sealed = self._aead.encrypt(nonce, plaintext, _aad(self._fleet, profile, generation))
        return MAGIC + _GENERATION.pack(generation) + nonce + sealed

    def generation_of(self, profile: str, blob: bytes) -> int:
        """The generation a blob claims, unauthenticated: for a rollback check before ``unseal``."""
        self._check_frame(profile, blob)
        return int(_GENERATION.unpack_from(blob, len(MAGIC))[0])

    def unseal(self, profile: str, blob: bytes) -> tuple[int, bytes]:
        """``(generation, plaintext)`` of a blob sealed for ``profile`` in this fleet.

        Anything else (another fleet or profile, a changed generation, a truncated or altered
        blob, another key) is a StateCorruptError whose message never quotes the blob.
        """
        generation = self.generation_of(profile, blob)
        nonce = blob[len(MAGIC) + _GENERATION.size : HEADER_BYTES]
        try:
            with self._lock:
                plaintext = self._aead.decrypt(
                    nonce, blob[HEADER_BYTES:], _aad(self._fleet, profile, generation)
                )
        except InvalidTag:
            raise StateCorruptError(
                f"fleet {self._fleet!r}: the etcd value of profile {profile!r} does not open "
                "with this host's fleet key (another fleet, another profile, an altered "
                "generation or damage); it is left untouched: check that every host has the "
                "same fleet key and fleet name"
            ) from None
        return generation, plaintext

    def _check_frame(self, profile: str, blob: bytes) -> None:
        if len(blob) < HEADER_BYTES + TAG_BYTES or not blob.startswith(MAGIC):
            raise StateCorruptError(
                f"fleet {self._fleet!r}: the etcd value of profile {profile!r} is not a sealed "
                f"fleet blob ({len(blob)} bytes, truncated or written by something else); it is "
                "left untouched: find what wrote it"
            )


# -- the fleet key file: an edge (file I/O), kept beside the format it keys ---------------


def export_fleet_key(key: bytes) -> str:
    """The key as one line of text to carry to another host (a secret: treat it as one)."""
    check = _checksum(key)
    return EXPORT_PREFIX + base64.urlsafe_b64encode(key + check).decode().rstrip("=")


def parse_fleet_key(text: str) -> bytes:
    """The key in an ``export_fleet_key`` line; a mistyped or truncated one is refused."""
    cleaned = "".join(text.split())  # a paste wrapped by a terminal or a mail client
    if not cleaned.startswith(EXPORT_PREFIX):
        raise FleetKeyFormatError(
            f"not an exported fleet key (it must start with {EXPORT_PREFIX!r}); "
            "paste the whole line that 'export' printed on the first host"
        )
    body = cleaned[len(EXPORT_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raw = b""
    if len(raw) != FLEET_KEY_BYTES + CHECKSUM_BYTES or not secrets.compare_digest(
        raw[FLEET_KEY_BYTES:], _checksum(raw[:FLEET_KEY_BYTES])
    ):
        raise FleetKeyFormatError(
            "the exported fleet key is mistyped or incomplete (its checksum does not match); "
            "copy the whole line again"
        )
    return raw[:FLEET_KEY_BYTES]


def _checksum(key: bytes) -> bytes:
    return hashlib.sha256(b"aac-tokend fleet key\0" + key).digest()[:CHECKSUM_BYTES]


def create_fleet_key(config_dir: Path, fs: FileLayer | None = None) -> bytes:
    """A new fleet key in ``config_dir/fleet.key`` (0600, atomic); refused if one is there.

    Never overwrites: a second key would make every blob the fleet wrote unreadable here.
    """
    key = secrets.token_bytes(FLEET_KEY_BYTES)
    _install(config_dir, key, fs, "create")
    return key


def import_fleet_key(config_dir: Path, text: str, fs: FileLayer | None = None) -> bytes:
    """The key of an export line, installed in ``config_dir/fleet.key`` (never overwriting).

    Importing the key that is already there is a no-op, so a retried step is harmless.
    """
    key = parse_fleet_key(text)
    _install(config_dir, key, fs, "import")
    return key


def load_fleet_key(config_dir: Path) -> bytes:
    """The fleet key, checked: a regular file of ours, mode 0600, exactly 32 bytes."""
    path = config_dir / FLEET_KEY_FILENAME
    try:
        return read_key_file(path, FLEET_KEY_BYTES, "fleet key", unreadable=_AGAIN, damaged=_AGAIN)
    except FileNotFoundError:
        raise StorageError(
            f"no fleet key at {path}; create it on the fleet's first host (`aac-tokend fleet "
            "key create`), or on this one run `aac-tokend fleet key import` with the line that "
            "`aac-tokend fleet key export` printed on a host of the fleet"
        ) from None


_AGAIN = "import it again from another host of the fleet"


def _install(config_dir: Path, key: bytes, fs: FileLayer | None, verb: str) -> None:
    fs = fs or OsFileLayer()
    ensure_private_dir(config_dir)
    path = config_dir / FLEET_KEY_FILENAME
    try:
        write_new_key_file(path, key, fs)
    except FileExistsError:
        existing = load_fleet_key(config_dir)
        if verb == "import" and secrets.compare_digest(existing, key):
            return
        raise StorageError(
            f"a fleet key is already at {path} and is never replaced (blobs sealed under it "
            "would become unreadable); move it aside yourself if this host leaves its fleet"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot {verb} the fleet key {path}: {exc.strerror}") from exc
