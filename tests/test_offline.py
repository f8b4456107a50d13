"""Without a daemon, the commands read, import and remove in the real store under the locks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aac_tokend.commands import offline
from aac_tokend.core.importer import ImportRequest
from aac_tokend.core.report import RowState
from aac_tokend.errors import StateCorruptError
from aac_tokend.host.paths import Paths, resolve_paths
from aac_tokend.store.opening import open_file_store, open_stored_state
from aac_tokend.testing import oauth_state


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return resolve_paths({"AAC_TOKEND_HOME": str(tmp_path / "home")})


def request(profile: str = "work") -> ImportRequest:
    return ImportRequest(profile=profile, access_token="unused-here")


class TestOpening:
    """The store is opened in one place; a reader never creates a key."""

    def test_nothing_stored_is_no_store_and_no_key(self, paths: Paths) -> None:
        """No key and no state file: no store, and no key is made by looking."""
        assert open_stored_state(paths) is None
        assert offline.profile_names(paths) == [] and offline.status_rows(paths) == []
        assert not paths.key_file.exists()

    def test_a_saved_state_is_found_by_readers(self, paths: Paths) -> None:
        """What open_file_store saved, open_stored_state reads back."""
        open_file_store(paths).save(oauth_state())
        store = open_stored_state(paths)
        assert store is not None and store.profiles() == ["work"]


class TestImportAndRemove:
    """import and remove write to the store with the daemon's own claim and locks."""

    def test_import_then_read_then_remove(self, paths: Paths) -> None:
        """An imported state is listed, loaded and reported; removed, it is gone."""
        state = oauth_state(access_expires_at=time.time() + 3600)
        assert offline.import_state(paths, request(), state) is True
        assert offline.profile_names(paths) == ["work"]
        loaded = offline.load_profile(paths, "work")
        assert loaded is not None and loaded.access_token == state.access_token
        (row,) = offline.status_rows(paths)
        assert row.profile == "work" and row.state is RowState.OK and row.token_socket is None
        offline.remove_profile(paths, "work")
        assert offline.profile_names(paths) == [] and offline.load_profile(paths, "work") is None

    def test_the_same_pair_again_changes_nothing(self, paths: Paths) -> None:
        """The claim is ownership.claim's: the current pair again is no change."""
        state = oauth_state()
        assert offline.import_state(paths, request(), state) is True
        assert offline.import_state(paths, request(), state) is False

    def test_a_corrupt_file_is_reported_not_raised(self, paths: Paths) -> None:
        """status reports a state file it cannot read as corrupt; load raises."""
        offline.import_state(paths, request(), oauth_state())
        (paths.state_dir / "work.state").write_bytes(b"not a state file")
        (row,) = offline.status_rows(paths)
        assert row.state is RowState.CORRUPT and row.alert
        with pytest.raises(StateCorruptError):
            offline.load_profile(paths, "work")
