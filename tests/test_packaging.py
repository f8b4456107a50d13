"""Packaging: the sdist and wheel build clean, install into a fresh venv and run from there.

The build runs on a copy of the tracked files, so nothing (build/, *.egg-info) is written
into the checkout. The fresh venv gets the wheel and its runtime dependencies from the
package index (pip's cache makes later runs quick); the repository is never on its path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers_e2e import RecordingSandbox, running_sandbox, wait_until

REPO = Path(__file__).resolve().parent.parent
#: A wheel install into a new venv pulls cryptography & co. from pip's cache or the index.
INSTALL_TIMEOUT = 300.0
#: Building the sdist and the wheel from it takes a few seconds; minutes means a hang.
BUILD_TIMEOUT = 180.0
#: Any command of the installed program that takes longer is hung, not slow.
RUN_TIMEOUT = 60.0


def _tracked_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
    ).stdout
    return [name for name in out.decode().split("\0") if name]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of this test run's Python or aac-tokend vars."""
    drop = ("PYTHON", "VIRTUAL_ENV", "AAC_", "PIP_REQUIRE", "XDG_RUNTIME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(dist directory, build output) of `python -m build` run on a copy of the tracked files."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files are tracked")
    pytest.importorskip("build", reason="the build frontend is a test extra: pip install .[test]")
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    for name in _tracked_files():
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, target)
    dist = root / "dist"
    # --no-isolation: setuptools and wheel come from the test extras, so no network is
    # needed for the build itself.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        cwd=root,
        env=_clean_env(),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    yield dist, output


@pytest.fixture(scope="module")
def installed(built: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh venv (no system site-packages) holding only the wheel."""
    dist, _ = built
    (wheel,) = dist.glob("*.whl")
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(root / "v")
    bindir = root / "v" / "bin"
    proc = subprocess.run(
        [str(bindir / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT, cwd=root, env=_clean_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return bindir


class TestBuild:
    """`python -m build` gives an sdist and a wheel that twine accepts, with no warning."""

    def test_builds_both_without_warnings(self, built: tuple[Path, str]) -> None:
        """Exactly one sdist and one wheel, and no line of the build output warns."""
        dist, output = built
        assert len(list(dist.glob("*.tar.gz"))) == 1, output
        assert len(list(dist.glob("*.whl"))) == 1, output
        warnings = [line for line in output.splitlines() if re.search(r"warn", line, re.I)]
        assert warnings == [], "\n".join(warnings)

    def test_twine_check_strict_passes(self, built: tuple[Path, str]) -> None:
        """twine check --strict passes on both files (metadata, README rendering)."""
        pytest.importorskip("twine", reason="twine is a test extra: pip install .[test]")
        dist, _ = built
        files = sorted(str(p) for p in dist.iterdir())
        proc = subprocess.run(
            [sys.executable, "-m", "twine", "check", "--strict", *files],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, env=_clean_env(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "PASSED" in proc.stdout and "WARNING" not in proc.stdout + proc.stderr

    def test_wheel_carries_license_units_and_spdx_metadata(self, built: tuple[Path, str]) -> None:
        """The wheel holds the license file, the service templates and an SPDX expression."""
        import zipfile

        dist, _ = built
        (wheel,) = dist.glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
            metadata = zf.read(meta).decode()
        assert any(n.endswith(".dist-info/licenses/aac_tokend/LICENSE") for n in names), names
        assert any(n.endswith("_units_systemd/aac-tokend.service") for n in names), names
        assert any(n.endswith(".plist") for n in names), names
        assert "License-Expression: Apache-2.0" in metadata


class TestInstalledWheel:
    """The wheel installed in a fresh venv runs: --version, token from a daemon, service."""

    def test_version(self, installed: Path, tmp_path: Path) -> None:
        """`aac-tokend --version` names the packaged version."""
        from aac_tokend import __version__

        proc = subprocess.run(
            [str(installed / "aac-tokend"), "--version"], capture_output=True, text=True,
            timeout=RUN_TIMEOUT, cwd=tmp_path, env=_clean_env(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"aac-tokend {__version__}"

    def test_not_importing_the_checkout(self, installed: Path, tmp_path: Path) -> None:
        """The venv's aac_tokend is the installed copy, not this repository's files."""
        proc = subprocess.run(
            [str(installed / "python"), "-c", "import aac_tokend; print(aac_tokend.__file__)"],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path, env=_clean_env(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.strip()).is_relative_to(installed.parent), proc.stdout

    def test_token_from_a_running_daemon(self, installed: Path, tmp_path: Path) -> None:
        """import, run and token, all from the installed program, serve the sandbox's token."""
        exe = str(installed / "aac-tokend")
        env = _clean_env(AAC_TOKEND_HOME=str(tmp_path / "h"), PYTHONUNBUFFERED="1")
        with running_sandbox() as sandbox:
            self._import(exe, env, sandbox, tmp_path)
            log = (tmp_path / "daemon.log").open("wb")
            daemon = subprocess.Popen(
                [exe, "run"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                cwd=tmp_path,
            )  # fmt: skip
            try:

                def token() -> str:
                    assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
                    proc = subprocess.run(
                        [exe, "token"], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                        env=env, cwd=tmp_path,
                    )  # fmt: skip
                    return proc.stdout.strip() if proc.returncode == 0 else ""

                served = wait_until(token, 30.0, "a token from the installed daemon", 0.2)
                assert served in sandbox.issued
            finally:
                daemon.terminate()
                daemon.wait(timeout=10)
                log.close()

    @staticmethod
    def _import(exe: str, env: dict[str, str], sandbox: RecordingSandbox, cwd: Path) -> None:
        proc = subprocess.run(
            [exe, "import", "--token-endpoint", sandbox.token_endpoint,
             "--base-url", sandbox.api_url],
            input=json.dumps(sandbox.generate()), capture_output=True, text=True,
            timeout=RUN_TIMEOUT, env=env, cwd=cwd,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr

    def test_service_install_dry_run(self, installed: Path, tmp_path: Path) -> None:
        """service install --dry-run renders the unit from the wheel's template, for this venv."""
        # Not under /tmp: the unit's PrivateTmp=yes would hide it, and install refuses that.
        home = Path("/nonexistent/atk-packaging-home")
        env = _clean_env(HOME=str(home), AAC_TOKEND_HOME=str(home / ".aac-tokend"))
        proc = subprocess.run(
            [str(installed / "aac-tokend"), "service", "install", "--dry-run",
             "--platform", "linux"],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ExecStart=" in proc.stdout and "@PROGRAM@" not in proc.stdout
        assert str(installed) in proc.stdout
        assert f"Environment=AAC_TOKEND_HOME={home}/.aac-tokend" in proc.stdout
        assert not home.exists() and list(tmp_path.iterdir()) == [], "a dry run wrote files"


class TestPipx:
    """pipx installs the wheel as an application whose command runs."""

    def test_pipx_install_runs(self, built: tuple[Path, str], tmp_path: Path) -> None:
        """`pipx install WHEEL` gives an aac-tokend command that prints its version."""
        pipx = shutil.which("pipx")
        if pipx is None:
            pytest.skip("pipx is not installed (.ci/sysdeps installs it on Debian-like systems)")
        dist, _ = built
        (wheel,) = dist.glob("*.whl")
        env = _clean_env(
            PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"),
            PIPX_MAN_DIR=str(tmp_path / "man"), HOME=str(tmp_path),
        )  # fmt: skip
        proc = subprocess.run(
            [pipx, "install", str(wheel)], capture_output=True, text=True,
            timeout=INSTALL_TIMEOUT, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = subprocess.run(
            [str(tmp_path / "bin" / "aac-tokend"), "--version"], capture_output=True, text=True,
            timeout=RUN_TIMEOUT, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.startswith("aac-tokend "), proc.stderr


class TestMakeDemo:
    """`make demo` on a fresh clone installs the package and its runtime needs, nothing more."""

    def test_demo_installs_no_extras(self, tmp_path: Path) -> None:
        """Every pip install `make -n demo` would run installs the bare package, no extra."""
        if shutil.which("make") is None:
            pytest.skip("make is not installed")
        shutil.copy2(REPO / "Makefile", tmp_path / "Makefile")
        shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
        proc = subprocess.run(
            ["make", "-n", "demo"], capture_output=True, text=True, timeout=RUN_TIMEOUT,
            cwd=tmp_path, env=_clean_env(),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        installs = [line for line in proc.stdout.splitlines() if "pip install" in line]
        assert installs, proc.stdout
        for line in installs:
            targets = [a.strip("'\"") for a in line.split("pip install", 1)[1].split()]
            packages = [a for a in targets if not a.startswith("-")]
            assert packages == ["."], f"make demo installs {packages}: {line}"
        assert list(tmp_path.iterdir()) != [] and not (tmp_path / ".venv").exists()
