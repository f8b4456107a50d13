"""Generation marks: each host refuses a generation older than one it has seen.

Real files in a temporary directory; the crash is a real process that dies between the
write of the new file and its rename; the concurrent notes are real threads and processes.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aac_tokend.errors import AlertError, RollbackError, StateCorruptError, StorageError
from aac_tokend.fleet.highwater import HighWater
from aac_tokend.testing import FailingFileLayer

ROOT = Path(__file__).resolve().parents[1]


class TestMarks:
    """A mark rises with note, never falls, and check refuses what is below it."""

    def test_fresh_host_has_seen_nothing(self, tmp_path: Path) -> None:
        """Without a mark file every profile's mark is 0 and any generation passes."""
        hw = HighWater(tmp_path, "prod")
        assert hw.mark("p") == 0
        hw.check("p", 0)

    def test_note_raises_and_never_lowers(self, tmp_path: Path) -> None:
        """note keeps the highest generation it was given."""
        hw = HighWater(tmp_path, "prod")
        hw.note("p", 7)
        hw.note("p", 3)
        assert hw.mark("p") == 7

    def test_rollback_is_refused_as_an_alert(self, tmp_path: Path) -> None:
        """A generation below the mark is a RollbackError (stop and alert) naming both numbers."""
        hw = HighWater(tmp_path, "prod")
        hw.note("p", 7)
        with pytest.raises(RollbackError, match=r"generation 6 .* has seen 7") as caught:
            hw.check("p", 6)
        assert isinstance(caught.value, AlertError)
        assert "\n" not in str(caught.value)

    def test_equal_and_newer_pass(self, tmp_path: Path) -> None:
        """The generation already seen, and any newer one, pass the check."""
        hw = HighWater(tmp_path, "prod")
        hw.note("p", 7)
        hw.check("p", 7)
        hw.check("p", 8)

    def test_marks_survive_a_new_instance(self, tmp_path: Path) -> None:
        """The marks are on disk: a restarted daemon refuses the same rollback."""
        HighWater(tmp_path, "prod").note("p", 5)
        with pytest.raises(RollbackError):
            HighWater(tmp_path, "prod").check("p", 4)

    def test_profiles_and_fleets_are_separate(self, tmp_path: Path) -> None:
        """A mark belongs to one (fleet, profile)."""
        HighWater(tmp_path, "prod").note("a", 9)
        HighWater(tmp_path, "prod").check("b", 1)
        HighWater(tmp_path, "staging").check("a", 1)

    def test_file_is_private(self, tmp_path: Path) -> None:
        """The mark file is 0600 in a 0700 directory."""
        hw = HighWater(tmp_path / "state", "prod")
        hw.note("p", 1)
        assert os.stat(hw.path).st_mode & 0o777 == 0o600
        assert os.stat(tmp_path / "state").st_mode & 0o777 == 0o700


class TestDamage:
    """A mark file that cannot be read is an error, never a reset to zero."""

    @pytest.mark.parametrize(
        "content",
        [
            b"",
            b"not json",
            b"\xff\xfe",
            b"[]",
            b'{"format": 1, "fleet": "prod", "marks": {"p": -1}}',
            b'{"format": 1, "fleet": "prod", "marks": {"p": true}}',
            b'{"format": 1, "fleet": "prod", "marks": {"p": "7"}}',
            b'{"format": 1, "fleet": "other", "marks": {"p": 7}}',
            b'{"format": 2, "fleet": "prod", "marks": {"p": 7}}',
            b'{"format": 1, "fleet": "prod", "marks": []}',
        ],
    )
    def test_damaged_file_is_refused(self, tmp_path: Path, content: bytes) -> None:
        """check and note both raise StateCorruptError, and the file is left as it was."""
        hw = HighWater(tmp_path, "prod")
        hw.path.write_bytes(content)
        with pytest.raises(StateCorruptError, match="not reset"):
            hw.check("p", 0)
        with pytest.raises(StateCorruptError):
            hw.note("p", 9)
        assert hw.path.read_bytes() == content

    def test_symlink_is_not_followed(self, tmp_path: Path) -> None:
        """A symlink in the mark file's place is refused."""
        real = HighWater(tmp_path / "real", "prod")
        real.note("p", 3)
        hw = HighWater(tmp_path, "prod")
        os.symlink(real.path, hw.path)
        with pytest.raises(StorageError, match="symlink"):
            hw.check("p", 0)


class TestCrash:
    """A failed or interrupted save keeps the previous marks, readable."""

    @pytest.mark.parametrize("op", ["write", "fsync", "rename"])
    def test_failed_save_keeps_old_marks(self, tmp_path: Path, op: str) -> None:
        """An I/O error before the rename: StorageError, old marks intact, no temp file left."""
        HighWater(tmp_path, "prod").note("p", 4)
        hw = HighWater(tmp_path, "prod", FailingFileLayer(failures={op: errno.EIO}))
        with pytest.raises(StorageError, match="previous marks are kept"):
            hw.note("p", 9)
        assert HighWater(tmp_path, "prod").mark("p") == 4
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []

    def test_process_killed_between_write_and_rename(self, tmp_path: Path) -> None:
        """A process that dies after writing the new file but before renaming it leaves the
        old marks readable, and the next note succeeds."""
        HighWater(tmp_path, "prod").note("p", 4)
        script = (
            "import os, sys\n"
            "from pathlib import Path\n"
            "from aac_tokend.fleet.highwater import HighWater\n"
            "from aac_tokend.store.fileio import OsFileLayer\n"
            "class Dies(OsFileLayer):\n"
            "    def rename(self, src, dst):\n"
            "        os._exit(9)\n"
            "HighWater(Path(sys.argv[1]), 'prod', Dies()).note('p', 9)\n"
        )
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, check=False)
        assert done.returncode == 9
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # it did die mid-save
        hw = HighWater(tmp_path, "prod")
        assert hw.mark("p") == 4
        hw.note("p", 5)
        assert hw.mark("p") == 5


class TestConcurrentNotes:
    """Notes racing from threads and from processes keep the highest generation."""

    def test_threads(self, tmp_path: Path) -> None:
        """Four threads noting interleaved generations leave the maximum."""
        hw = HighWater(tmp_path, "prod")

        def run(start: int) -> None:
            for gen in range(start, 80, 4):
                hw.note("p", gen)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert hw.mark("p") == 79

    def test_processes(self, tmp_path: Path) -> None:
        """Three processes noting two profiles each lose no profile and keep each maximum."""
        script = (
            "import sys\n"
            "from pathlib import Path\n"
            "from aac_tokend.fleet.highwater import HighWater\n"
            "hw = HighWater(Path(sys.argv[1]), 'prod')\n"
            "me = int(sys.argv[2])\n"
            "for gen in range(me, 30, 3):\n"
            "    hw.note(f'p{me}', gen)\n"
            "    hw.note('shared', gen)\n"
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(i)], cwd=ROOT)
            for i in range(3)
        ]
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
        marks = json.loads(HighWater(tmp_path, "prod").path.read_text())["marks"]
        assert marks == {"p0": 27, "p1": 28, "p2": 29, "shared": 29}
