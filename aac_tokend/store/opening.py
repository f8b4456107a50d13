"""Opening the file store of an aac-tokend home: one place that puts paths and key together.

The daemon and the commands without a daemon both come here; a courier opens the store from
the spec it was handed (``FileStoreSpec.open``), which this module made.
"""

from __future__ import annotations

from ..host.paths import Paths
from .files import FileStore, FileStoreSpec, load_or_create_key, stored_state_count
from .keystore import KEYRING_POINTER

__all__ = ["open_file_store", "open_stored_state", "store_spec"]


def store_spec(paths: Paths) -> FileStoreSpec:
    """What opens the store of ``paths``: its state directory, its key (created on first
    use) and where outcomes the state disk refused are kept (pending.py)."""
    key = load_or_create_key(paths.config_dir, state_dir=paths.state_dir)
    return FileStoreSpec(str(paths.state_dir), key, pending_dir=str(paths.pending_dir))


def open_file_store(paths: Paths) -> FileStore:
    """The store of ``paths``' state directory, with its key and its pending records."""
    return store_spec(paths).open()


def open_stored_state(paths: Paths) -> FileStore | None:
    """The store, for a reader: None when nothing was ever stored (no key, no state file),
    so reading creates no key. State files without their key are opened, and
    load_or_create_key says what is wrong, rather than "no profiles"."""
    no_key = not paths.key_file.exists() and not (paths.config_dir / KEYRING_POINTER).exists()
    if no_key and not stored_state_count(paths.state_dir):
        return None
    return open_file_store(paths)
