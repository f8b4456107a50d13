"""The systemd units, the LaunchAgent and `aac-tokend service`, rendered and checked for real."""

from __future__ import annotations

import argparse
import io
import os
import plistlib
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from aac_tokend.errors import InputError
from aac_tokend.host.paths import Paths
from aac_tokend.service import install as service
from aac_tokend.service.render import read_template
from aac_tokend.service.steps import Completed, SubprocessRunner

_REPO = Path(__file__).resolve().parent.parent
_TIMEOUT = 60.0  # generous: systemd-analyze or a Python start on a loaded machine


class RecordingRunner:
    """A CommandRunner that records every command and answers from a table."""

    def __init__(
        self,
        *,
        missing: Sequence[str] = (),
        answers: dict[tuple[str, ...], Completed] | None = None,
    ) -> None:
        self.missing = set(missing)
        self.answers = answers or {}
        self.ran: list[tuple[str, ...]] = []

    def which(self, name: str) -> str | None:
        return None if name in self.missing else f"/usr/bin/{name}"

    def run(self, argv: Sequence[str], *, capture: bool = True) -> Completed:
        self.ran.append(tuple(argv))
        return self.answers.get(tuple(argv), Completed(0))


def make_layout(
    platform: str,
    home: Path,
    *,
    program: tuple[str, ...] = ("/opt/aac/bin/aac-tokend",),
    private_tmp: tuple[Path, ...] = (),
    environment: tuple[tuple[str, str], ...] = (),
    network: tuple[tuple[str, str], ...] = (),
) -> service.Layout:
    """A Layout under ``home`` with the platform's default directories."""
    if platform == "linux":
        runtime_base = home / "run"
        paths = Paths(
            home / ".config" / "aac-tokend",
            home / ".local" / "share" / "aac-tokend",
            runtime_base / "aac-tokend",
        )
    else:
        runtime_base = None
        support = home / "Library" / "Application Support" / "aac-tokend"
        paths = Paths(support, support, home / "Library" / "Caches" / "TemporaryItems" / "ak")
    return service.Layout(
        platform=platform,
        home=home,
        uid=os.getuid(),
        program=program,
        paths=paths,
        environment=environment,
        network=network,
        runtime_base=runtime_base,
        lingering=True,
        private_tmp=private_tmp,
    )


def parse_cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aac-tokend service")
    service.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = tempfile.mkdtemp(prefix="atk", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path)


def fake_program(directory: Path) -> str:
    """A tiny executable standing in for aac-tokend (systemd-analyze checks it exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    program = directory / "aac-tokend"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return str(program)


class TestTemplates:
    def test_plist_is_named_after_its_label(self) -> None:
        """The LaunchAgent file is <Label>.plist, and its Label is service.LABEL."""
        path = _REPO / "launchd" / f"{service.LABEL}.plist"
        assert path.is_file()
        assert f"<string>{service.LABEL}</string>" in path.read_text()

    def test_templates_resolve(self) -> None:
        """All three templates load (package data, or the source checkout's directories)."""
        for kind, name in (
            ("systemd", service.SERVICE_UNIT),
            ("systemd", service.SOCKET_UNIT),
            ("launchd", f"{service.LABEL}.plist"),
        ):
            assert read_template(kind, name) == (_REPO / kind / name).read_text()

    def test_every_placeholder_is_filled(self, tmp_path: Path) -> None:
        """Rendering leaves no @NAME@ placeholder behind."""
        env = (("AAC_TOKEND_HOME", "/srv/a"),)
        linux = service.render_systemd(make_layout("linux", tmp_path, environment=env))
        mac = service.render_launchd(make_layout("macos", tmp_path, environment=env))
        for text in [*linux.values(), mac]:
            assert not re.search(r"@[A-Z][A-Z_]*@", text)


def _verify(directory: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify --user` on the rendered units in ``directory``.

    A user manager needs XDG_RUNTIME_DIR (without it verify stops at "Failed to initialize
    manager"); HOME and XDG_CONFIG_HOME point into the temp dir so that the developer's
    own ~/.config/systemd/user units are not loaded. On a machine with user units in
    /etc/systemd/user, verify may warn about those: only lines naming our units count.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "XDG_RUNTIME_DIR": str(directory),
        "HOME": str(directory),
        "XDG_CONFIG_HOME": str(directory / "config"),
        "SYSTEMD_LOG_COLOR": "0",
    }
    done = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--user",
            str(directory / service.SOCKET_UNIT),
            str(directory / service.SERVICE_UNIT),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=_TIMEOUT,
        check=False,
    )
    lines = (done.stdout + done.stderr).splitlines()
    return done.returncode, [line for line in lines if "aac-tokend" in line]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd; make sysdeps)",
)
class TestSystemdAnalyzeVerify:
    def _render_into(self, directory: Path, layout: service.Layout) -> None:
        for name, text in service.render_systemd(layout).items():
            (directory / name).write_text(text)

    def test_rendered_units_verify(self, short_dir: Path) -> None:
        """systemd-analyze verify --user accepts the rendered socket and service side by side."""
        program = fake_program(short_dir / "bin")
        self._render_into(short_dir, make_layout("linux", short_dir, program=(program,)))
        code, ours = _verify(short_dir)
        assert (code, ours) == (0, [])

    def test_awkward_paths_verify(self, short_dir: Path) -> None:
        """Spaces, % and $ in the program path and in AAC_TOKEND_HOME are quoted and escaped."""
        program = fake_program(short_dir / "my bin%n$HOME")
        layout = make_layout(
            "linux",
            short_dir / "home dir",
            program=(program,),
            environment=(("AAC_TOKEND_HOME", "/srv/a b%t$x"),),
        )
        self._render_into(short_dir, layout)
        code, ours = _verify(short_dir)
        assert (code, ours) == (0, [])

    def test_python_module_fallback_verifies(self, short_dir: Path) -> None:
        """The `python -m aac_tokend` form of the program verifies too."""
        layout = make_layout("linux", short_dir, program=(sys.executable, "-m", "aac_tokend"))
        self._render_into(short_dir, layout)
        assert _verify(short_dir) == (0, [])

    def test_network_environment_verifies(self, short_dir: Path) -> None:
        """Proxy variables with %, $ and quotes, and the EnvironmentFile line, verify."""
        program = fake_program(short_dir / "bin")
        layout = make_layout(
            "linux",
            short_dir,
            program=(program,),
            network=(
                ("HTTPS_PROXY", 'http://u:p%40$x"y@proxy:3128'),
                ("no_proxy", "localhost,.corp"),
                ("REQUESTS_CA_BUNDLE", "/etc/ssl/corp ca.pem"),
            ),
        )
        self._render_into(short_dir, layout)
        layout.env_file.parent.mkdir(parents=True, exist_ok=True)
        layout.env_file.write_text(service.render_env_file(layout))
        assert _verify(short_dir) == (0, [])

    def test_verify_catches_a_broken_unit(self, short_dir: Path) -> None:
        """The check is not vacuous: a bad setting in our unit shows up as a line about it."""
        program = fake_program(short_dir / "bin")
        self._render_into(short_dir, make_layout("linux", short_dir, program=(program,)))
        unit = short_dir / service.SERVICE_UNIT
        unit.write_text(unit.read_text().replace("KillMode=process", "KillMode=bogus"))
        _, ours = _verify(short_dir)
        assert any("kill mode" in line.lower() for line in ours)


class TestSystemdUnits:
    def test_service_settings(self, tmp_path: Path) -> None:
        """The service is Type=notify with the program, watchdog, KillMode=process and dirs."""
        units = service.render_systemd(make_layout("linux", tmp_path))
        text = units[service.SERVICE_UNIT]
        settings = dict(
            line.split("=", 1) for line in text.splitlines() if re.match(r"^[A-Z]\w*=", line)
        )
        assert settings["Type"] == "notify"
        assert settings["NotifyAccess"] == "main"
        assert settings["ExecStart"] == "/opt/aac/bin/aac-tokend run"
        assert settings["ExecReload"] == "/opt/aac/bin/aac-tokend reload"
        assert settings["Restart"] == "on-failure"
        assert settings["WatchdogSec"] == "30"
        assert settings["KillMode"] == "process"
        assert int(settings["TimeoutStopSec"]) >= 10  # well above the daemon's 2 s stop
        assert settings["UMask"] == "0077"
        assert settings["ReadWritePaths"] == (
            "-%h/.config/aac-tokend -%h/.local/share/aac-tokend -%t/aac-tokend"
        )
        assert "PrivateUsers" not in settings  # see the unit's comment: fail open, not shut

    def test_unprefixed_lines_are_errors(self, tmp_path: Path) -> None:
        """Lines without a <N> prefix (a fatal error, a traceback) are filed as errors."""
        text = service.render_systemd(make_layout("linux", tmp_path))[service.SERVICE_UNIT]
        assert "\nSyslogLevel=err\n" in text
        assert "SyslogLevelPrefix=no" not in text  # the daemon's own prefixes must count

    def test_socket_settings(self, tmp_path: Path) -> None:
        """The socket unit listens on <runtime>/control.sock, named control, 0600."""
        text = service.render_systemd(make_layout("linux", tmp_path))[service.SOCKET_UNIT]
        assert "\nListenStream=%t/aac-tokend/control.sock\n" in text
        assert "\nFileDescriptorName=control\n" in text
        assert "\nSocketMode=0600\n" in text
        assert "\nDirectoryMode=0700\n" in text
        assert "\nService=aac-tokend.service\n" in text

    def test_environment_is_recorded(self, tmp_path: Path) -> None:
        """AAC_TOKEND_HOME from the installing shell becomes an Environment= line."""
        layout = make_layout("linux", tmp_path, environment=(("AAC_TOKEND_HOME", "/srv/a b"),))
        text = service.render_systemd(layout)[service.SERVICE_UNIT]
        assert '\nEnvironment="AAC_TOKEND_HOME=/srv/a b"\n' in text

    def test_dirs_under_tmp_are_refused(self, tmp_path: Path) -> None:
        """State under /tmp is refused: PrivateTmp would hide it and tmp cleaners delete it."""
        layout = make_layout("linux", Path("/tmp/atk-home"), private_tmp=(Path("/tmp"),))
        with pytest.raises(InputError, match="PrivateTmp"):
            service.render_systemd(layout)

    def test_default_layout_refuses_tmp(self) -> None:
        """The refusal is on by default."""
        layout = service.Layout(
            platform="linux",
            home=Path("/home/x"),
            uid=1000,
            program=("/usr/bin/aac-tokend",),
            paths=Paths(Path("/tmp/c"), Path("/tmp/s"), Path("/run/user/1000/aac-tokend")),
        )
        with pytest.raises(InputError, match="/tmp"):
            service.render_systemd(layout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_MDWE is Linux")
class TestMemoryDenyWriteExecute:
    # Loads every module of the package and the dependencies under the kernel's W^X rule
    # (PR_SET_MDWE, Linux >= 6.3), the rule MemoryDenyWriteExecute=yes enforces, and
    # exercises the crypto and TLS set-up a refresh needs.
    _PROBE = """
import ctypes, importlib, pkgutil, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(3)
import ssl, requests, structlog, apscheduler.schedulers.background
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
import aac_tokend
for info in pkgutil.walk_packages(aac_tokend.__path__, "aac_tokend."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
key = AESGCM.generate_key(256)
box = AESGCM(key)
assert box.decrypt(b"n" * 12, box.encrypt(b"n" * 12, b"state", None), None) == b"state"
ssl.create_default_context()
print("ok")
"""

    def test_dependency_stack_runs_under_mdwe(self) -> None:
        """The package and its dependencies never need writable+executable memory."""
        done = subprocess.run(
            [sys.executable, "-c", self._PROBE],
            env={**os.environ, "PYTHONPATH": str(_REPO)},
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )
        if done.returncode == 3:
            pytest.skip("the kernel has no PR_SET_MDWE (Linux >= 6.3)")
        assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


class TestLaunchAgent:
    def test_plist_keys(self, tmp_path: Path) -> None:
        """The plist parses and has the keys that keep the agent alive and logging."""
        layout = make_layout("macos", tmp_path)
        agent = plistlib.loads(service.render_launchd(layout).encode())
        logs = str(tmp_path / "Library" / "Logs" / "aac-tokend")
        assert agent["Label"] == service.LABEL
        assert agent["ProgramArguments"] == ["/opt/aac/bin/aac-tokend", "run"]
        assert agent["RunAtLoad"] is True
        assert agent["KeepAlive"] == {"SuccessfulExit": False}
        assert agent["StandardOutPath"].startswith(logs + "/")
        assert agent["StandardErrorPath"].startswith(logs + "/")
        assert agent["EnvironmentVariables"]["PATH"].startswith("/opt/aac/bin:")
        assert agent["ProcessType"] == "Background"
        assert agent["AbandonProcessGroup"] is True
        assert 2 < agent["ExitTimeOut"] <= 60
        assert agent["Umask"] == 0o077

    def test_values_are_xml_escaped(self, tmp_path: Path) -> None:
        """Paths and variables with XML's special characters come back intact."""
        layout = make_layout(
            "macos",
            tmp_path / "a&b<c>",
            program=("/Apps/R&D <x>/aac-tokend",),
            environment=(("AAC_TOKEND_HOME", "/x&y"),),
        )
        agent = plistlib.loads(service.render_launchd(layout).encode())
        assert agent["ProgramArguments"][0] == "/Apps/R&D <x>/aac-tokend"
        assert agent["EnvironmentVariables"]["AAC_TOKEND_HOME"] == "/x&y"

    def test_socket_room_for_a_42_character_user_name(self) -> None:
        """The default macOS runtime dir fits a 42-character user name, not 43 (plist comment)."""
        for length, fits in ((42, True), (43, False)):
            home = Path("/Users") / ("u" * length)
            layout = service.detect_layout("macos", {"HOME": str(home)})
            if fits:
                _, notes = service.install_steps(layout)
                assert f"profile names of up to {43 - length} bytes" in notes[0]
            else:
                with pytest.raises(InputError, match="AAC_TOKEND_HOME"):
                    service.install_steps(layout)


class TestDryRun:
    def test_macos_dry_run_shows_plist_and_bootstrap(self) -> None:
        """--dry-run --platform macos prints the plist's path, content and launchctl commands."""
        if service.host_platform() == "macos":
            pytest.skip("this test renders for the other platform")
        out = io.StringIO()
        home = Path("/nonexistent/atk-home")
        args = parse_cli("install", "--dry-run", "--platform", "macos")
        assert service.run_cli(args, env={"HOME": str(home)}, out=out) == 0
        text = out.getvalue()
        plist = home / "Library" / "LaunchAgents" / f"{service.LABEL}.plist"
        assert f"# would write {plist}:\n<?xml" in text
        assert "<key>AbandonProcessGroup</key>" in text
        assert f"launchctl bootstrap gui/{os.getuid()} {plist}" in text
        assert not home.exists()

    @pytest.mark.skipif(service.host_platform() != "linux", reason="renders for this machine")
    def test_linux_dry_run_shows_units_and_systemctl(self, tmp_path: Path) -> None:
        """--dry-run --platform linux prints both units and the systemctl commands only."""
        out = io.StringIO()
        home = Path("/nonexistent/atk-home")
        env = {"HOME": str(home), "AAC_TOKEND_HOME": str(home / ".aac-tokend")}
        args = parse_cli("install", "--dry-run", "--platform", "linux")
        assert service.run_cli(args, env=env, out=out, runner=RecordingRunner()) == 0
        text = out.getvalue()
        unit_dir = home / ".config" / "systemd" / "user"
        assert f"# would write {unit_dir / service.SOCKET_UNIT}:\n" in text
        assert f"# would write {unit_dir / service.SERVICE_UNIT}:\n" in text
        assert "ListenStream=%h/.aac-tokend/run/control.sock" in text
        assert f"Environment=AAC_TOKEND_HOME={home}/.aac-tokend" in text
        assert "# would run: systemctl --user daemon-reload\n" in text
        assert (
            "# would run: systemctl --user enable --now aac-tokend.socket aac-tokend.service\n"
        ) in text
        assert not home.exists()

    def test_other_platform_needs_dry_run(self) -> None:
        """Installing for a platform other than this machine's is refused."""
        other = "linux" if service.host_platform() == "macos" else "macos"
        with pytest.raises(InputError, match="--dry-run"):
            service.run_cli(parse_cli("install", "--platform", other), runner=RecordingRunner())

    def test_status_dry_run(self, tmp_path: Path) -> None:
        """status --dry-run prints the command it would run."""
        out = io.StringIO()
        layout = make_layout("linux", tmp_path)
        assert service.show_service(layout, RecordingRunner(), out, dry_run=True) == 0
        assert out.getvalue() == (
            "# would run: systemctl --user status aac-tokend.service aac-tokend.socket\n"
        )


class TestInstallWithRecordingRunner:
    def test_linux_install_writes_units_and_enables(self, tmp_path: Path) -> None:
        """install writes both units into the fake home, then daemon-reload and enable --now."""
        layout = make_layout("linux", tmp_path)
        runner = RecordingRunner()
        assert service.install(layout, runner, io.StringIO()) == 0
        expected = service.render_systemd(layout)
        for name, text in expected.items():
            written = layout.unit_dir / name
            assert written.read_text() == text
            assert stat.S_IMODE(written.stat().st_mode) == 0o644
        for directory in (layout.paths.config_dir, layout.paths.state_dir):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert runner.ran == [
            ("systemctl", "--user", "show", "--property=Version"),
            ("systemctl", "--user", "daemon-reload"),
            ("systemctl", "--user", "enable", "--now", "aac-tokend.socket", "aac-tokend.service"),
        ]

    def test_linux_uninstall_reverses(self, tmp_path: Path) -> None:
        """uninstall disables and stops both units, removes them, and keeps the state."""
        layout = make_layout("linux", tmp_path)
        service.install(layout, RecordingRunner(), io.StringIO())
        runner = RecordingRunner()
        assert service.uninstall(layout, runner, io.StringIO()) == 0
        assert not (layout.unit_dir / service.SERVICE_UNIT).exists()
        assert not (layout.unit_dir / service.SOCKET_UNIT).exists()
        assert layout.paths.state_dir.is_dir()
        assert runner.ran[1:] == [
            ("systemctl", "--user", "disable", "--now", "aac-tokend.socket", "aac-tokend.service"),
            ("systemctl", "--user", "daemon-reload"),
        ]

    def test_uninstall_when_not_installed(self, tmp_path: Path) -> None:
        """uninstall with nothing installed says so and runs nothing."""
        runner = RecordingRunner()
        out = io.StringIO()
        assert service.uninstall(make_layout("linux", tmp_path), runner, out) == 0
        assert "not installed" in out.getvalue()
        assert runner.ran == []

    def test_macos_install_bootstraps(self, short_dir: Path) -> None:
        """install writes the plist and the log dir, then bootstraps the agent in gui/UID."""
        layout = make_layout("macos", short_dir)
        runner = RecordingRunner()
        assert service.install(layout, runner, io.StringIO()) == 0
        assert layout.plist_path.read_text() == service.render_launchd(layout)
        assert layout.log_file.parent.is_dir()
        uid = os.getuid()
        assert runner.ran == [
            ("launchctl", "print", f"gui/{uid}"),
            ("launchctl", "bootout", f"gui/{uid}/{service.LABEL}"),
            ("launchctl", "enable", f"gui/{uid}/{service.LABEL}"),
            ("launchctl", "bootstrap", f"gui/{uid}", str(layout.plist_path)),
        ]

    def test_macos_reinstall_tolerates_bootout_failure(self, short_dir: Path) -> None:
        """A bootout of an agent that was not loaded does not stop the install."""
        layout = make_layout("macos", short_dir)
        bootout = ("launchctl", "bootout", f"gui/{os.getuid()}/{service.LABEL}")
        runner = RecordingRunner(answers={bootout: Completed(3, "No such process")})
        assert service.install(layout, runner, io.StringIO()) == 0

    def test_macos_uninstall_boots_out(self, short_dir: Path) -> None:
        """uninstall boots the agent out and removes its plist."""
        layout = make_layout("macos", short_dir)
        service.install(layout, RecordingRunner(), io.StringIO())
        runner = RecordingRunner()
        service.uninstall(layout, runner, io.StringIO())
        assert ("launchctl", "bootout", f"gui/{os.getuid()}/{service.LABEL}") in runner.ran
        assert not layout.plist_path.exists()


class TestManagerErrors:
    def test_missing_systemctl(self, tmp_path: Path) -> None:
        """Without systemctl, install fails with one line and writes nothing."""
        layout = make_layout("linux", tmp_path)
        with pytest.raises(InputError) as caught:
            service.install(layout, RecordingRunner(missing=["systemctl"]), io.StringIO())
        assert "systemctl not found" in str(caught.value)
        assert "\n" not in str(caught.value)
        assert not layout.unit_dir.exists()

    def test_missing_systemctl_real_lookup(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The real runner's PATH lookup finds no systemctl in an empty PATH."""
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(InputError, match="systemctl not found"):
            service.check_manager(make_layout("linux", tmp_path), SubprocessRunner())

    def test_unreachable_user_manager(self, tmp_path: Path) -> None:
        """A user manager that does not answer gives one line quoting systemctl."""
        probe = ("systemctl", "--user", "show", "--property=Version")
        failed = Completed(1, "Failed to connect to bus: No medium found\n")
        runner = RecordingRunner(answers={probe: failed})
        with pytest.raises(InputError) as caught:
            service.install(make_layout("linux", tmp_path), runner, io.StringIO())
        message = str(caught.value)
        assert "user manager is unreachable (Failed to connect to bus: No medium found)" in message
        assert "\n" not in message

    def test_missing_launchctl(self, short_dir: Path) -> None:
        """Without launchctl, a macOS install fails with one line."""
        with pytest.raises(InputError, match="launchctl not found"):
            service.install(
                make_layout("macos", short_dir),
                RecordingRunner(missing=["launchctl"]),
                io.StringIO(),
            )

    def test_failed_enable_names_the_command(self, tmp_path: Path) -> None:
        """A failing systemctl step raises with the command, its exit status and first line."""
        enable = (
            "systemctl",
            "--user",
            "enable",
            "--now",
            "aac-tokend.socket",
            "aac-tokend.service",
        )
        failed = Completed(1, "Job for aac-tokend.service failed.\nSee status.\n")
        runner = RecordingRunner(answers={enable: failed})
        with pytest.raises(InputError) as caught:
            service.install(make_layout("linux", tmp_path), runner, io.StringIO())
        assert "(exit 1): Job for aac-tokend.service failed." in str(caught.value)


class TestLayoutDetection:
    def test_program_is_this_installs_console_script(self) -> None:
        """The program is an absolute, executable path (this venv's aac-tokend if it has one)."""
        program = service.find_program(os.environ)
        assert os.path.isabs(program[0])
        assert os.access(program[0], os.X_OK)

    def test_aac_tokend_home_is_passed_on_absolute(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A relative AAC_TOKEND_HOME is recorded for the daemon as an absolute path."""
        monkeypatch.chdir(tmp_path)
        layout = service.detect_layout("macos", {"HOME": str(tmp_path), "AAC_TOKEND_HOME": "rel"})
        assert layout.environment == (("AAC_TOKEND_HOME", str(tmp_path / "rel")),)
        assert layout.paths.runtime_dir == tmp_path / "rel" / "run"


PROXY = "http://proxy.corp.example:3128"
SECRET_PROXY = "http://alice:s3cr%40t@proxy.corp.example:3128"


class TestNetworkEnvironment:
    """service install records the proxy and CA variables of the shell it runs in."""

    @pytest.mark.skipif(service.host_platform() != "linux", reason="renders for this machine")
    def test_linux_dry_run_shows_https_proxy(self) -> None:
        """--dry-run with HTTPS_PROXY, no_proxy and a CA bundle set shows them in the unit."""
        out = io.StringIO()
        home = Path("/nonexistent/atk-home")
        env = {
            "HOME": str(home),
            "AAC_TOKEND_HOME": str(home / ".aac-tokend"),
            "HTTPS_PROXY": PROXY,
            "no_proxy": "localhost,.corp.example",
            "REQUESTS_CA_BUNDLE": "/etc/ssl/corp.pem",
            "SSL_CERT_FILE": "",  # set but empty: not carried
        }
        args = parse_cli("install", "--dry-run", "--platform", "linux")
        assert service.run_cli(args, env=env, out=out, runner=RecordingRunner()) == 0
        text = out.getvalue()
        assert f"\nEnvironment=HTTPS_PROXY={PROXY}\n" in text
        assert "\nEnvironment=no_proxy=localhost,.corp.example\n" in text
        assert "\nEnvironment=REQUESTS_CA_BUNDLE=/etc/ssl/corp.pem\n" in text
        assert "SSL_CERT_FILE" not in text
        assert "\nEnvironmentFile=" not in text
        assert (
            "note: the service gets HTTPS_PROXY, no_proxy, REQUESTS_CA_BUNDLE as set here"
        ) in text

    def test_macos_dry_run_shows_https_proxy_in_plist(self) -> None:
        """--dry-run --platform macos with https_proxy set shows it in the plist's environment."""
        if service.host_platform() == "macos":
            pytest.skip("this test renders for the other platform")
        out = io.StringIO()
        env = {"HOME": "/nonexistent/atk-home", "https_proxy": PROXY, "NO_PROXY": "*.corp"}
        args = parse_cli("install", "--dry-run", "--platform", "macos")
        assert service.run_cli(args, env=env, out=out) == 0
        text = out.getvalue()
        plist = text[text.index("<?xml") : text.index("</plist>") + len("</plist>")]
        agent = plistlib.loads(plist.encode())
        assert agent["EnvironmentVariables"]["https_proxy"] == PROXY
        assert agent["EnvironmentVariables"]["NO_PROXY"] == "*.corp"

    def test_nothing_set_nothing_recorded(self, tmp_path: Path) -> None:
        """Without proxy or CA variables the unit and the notes say nothing about them."""
        env = {"HOME": "/nonexistent/h", "AAC_TOKEND_HOME": "/nonexistent/h/.a"}
        layout = service.detect_layout("linux", env)
        assert layout.network == ()
        _, notes = service.install_steps(layout)
        assert not any("service gets" in note for note in notes)

    def test_line_break_is_refused(self, tmp_path: Path) -> None:
        """A value no service file can carry is refused with one line naming the variable."""
        with pytest.raises(InputError, match=r"^HTTPS_PROXY holds a line break"):
            service.detect_layout("linux", {"HOME": str(tmp_path), "HTTPS_PROXY": "http://a\nb"})

    def test_credentials_go_to_a_private_environment_file(self, tmp_path: Path) -> None:
        """A proxy URL with a password goes into a 0600 EnvironmentFile, never into the unit."""
        layout = make_layout(
            "linux", tmp_path, network=(("HTTPS_PROXY", SECRET_PROXY), ("NO_PROXY", ".corp"))
        )
        out = io.StringIO()
        assert service.install(layout, RecordingRunner(), out) == 0
        unit = (layout.unit_dir / service.SERVICE_UNIT).read_text()
        assert "s3cr" not in unit
        assert "\nEnvironment=NO_PROXY=.corp\n" in unit
        assert "\nEnvironmentFile=%h/.config/aac-tokend/service.env\n" in unit
        assert stat.S_IMODE(layout.env_file.stat().st_mode) == 0o600
        assert f'\nHTTPS_PROXY="{SECRET_PROXY}"\n' in layout.env_file.read_text()
        assert "HTTPS_PROXY holds credentials" in out.getvalue()
        assert "s3cr" not in out.getvalue()

    def test_dry_run_masks_the_password(self, short_dir: Path) -> None:
        """The dry run shows the EnvironmentFile and the plist with the password masked."""
        for platform in ("linux", "macos"):
            layout = make_layout(platform, short_dir, network=(("all_proxy", SECRET_PROXY),))
            out = io.StringIO()
            assert service.install(layout, RecordingRunner(), out, dry_run=True) == 0
            text = out.getvalue()
            assert "s3cr" not in text
            assert "http://alice:***@proxy.corp.example:3128" in text
            assert " (mode 0600):\n" in text

    def test_macos_plist_with_credentials_is_private(self, short_dir: Path) -> None:
        """launchd has no environment file: a plist holding a proxy password is written 0600."""
        plain = make_layout("macos", short_dir, network=(("HTTPS_PROXY", PROXY),))
        service.install(plain, RecordingRunner(), io.StringIO())
        assert stat.S_IMODE(plain.plist_path.stat().st_mode) == 0o644
        secret = make_layout("macos", short_dir, network=(("HTTPS_PROXY", SECRET_PROXY),))
        service.install(secret, RecordingRunner(), io.StringIO())
        assert stat.S_IMODE(secret.plist_path.stat().st_mode) == 0o600
        agent = plistlib.loads(secret.plist_path.read_bytes())
        assert agent["EnvironmentVariables"]["HTTPS_PROXY"] == SECRET_PROXY

    def test_uninstall_removes_the_environment_file(self, tmp_path: Path) -> None:
        """uninstall removes the EnvironmentFile with the units: no password is left behind."""
        layout = make_layout("linux", tmp_path, network=(("HTTPS_PROXY", SECRET_PROXY),))
        service.install(layout, RecordingRunner(), io.StringIO())
        assert layout.env_file.exists()
        service.uninstall(layout, RecordingRunner(), io.StringIO())
        assert not layout.env_file.exists()

    def test_reinstall_without_credentials_removes_the_file(self, tmp_path: Path) -> None:
        """A reinstall without a proxy password removes the EnvironmentFile the last one left."""
        secret = make_layout("linux", tmp_path, network=(("HTTPS_PROXY", SECRET_PROXY),))
        service.install(secret, RecordingRunner(), io.StringIO())
        plain = make_layout("linux", tmp_path, network=(("HTTPS_PROXY", PROXY),))
        service.install(plain, RecordingRunner(), io.StringIO())
        assert not plain.env_file.exists()
        assert "EnvironmentFile=" not in (plain.unit_dir / service.SERVICE_UNIT).read_text()

    def test_environment_file_quoting(self, tmp_path: Path) -> None:
        """Quotes, backslashes, $ and backticks are escaped inside the double-quoted value."""
        layout = make_layout("linux", tmp_path, network=(("HTTPS_PROXY", 'http://u:a"b\\c$d`e@p'),))
        text = service.render_env_file(layout)
        assert text.splitlines()[1] == 'HTTPS_PROXY="http://u:a\\"b\\\\c\\$d\\`e@p"'


class TestMaskCredentials:
    """mask_credentials hides a proxy URL's password whatever it holds."""

    @given(
        st.sampled_from(["http://", "https://", "socks5://", ""]),
        st.text(alphabet=st.characters(blacklist_characters=":@/"), max_size=12),
        st.text(alphabet=st.sampled_from("ab:/@%x"), min_size=1, max_size=20) | st.text(),
        st.text(alphabet=st.characters(blacklist_characters="@"), max_size=20),
    )
    def test_password_never_shown(self, scheme: str, user: str, password: str, host: str) -> None:
        """The masked URL keeps scheme, user and host, and holds no trace of the password."""
        # Without a scheme, "user://rest@host" reads as a URL: a password of "//..." is moot.
        assume(scheme or not password.startswith("//"))
        masked = service.mask_credentials(f"{scheme}{user}:{password}@{host}")
        assert masked == f"{scheme}{user}:***@{host}"

    @pytest.mark.parametrize(
        ("value", "masked"),
        [
            ("http://u:a://b@h:1", "http://u:***@h:1"),
            ("u:p@ss@h:1", "u:***@h:1"),
            ("socks5h://u:p/w@h", "socks5h://u:***@h"),
        ],
    )
    def test_awkward_passwords(self, value: str, masked: str) -> None:
        """Raw ://, @ or / in a password are masked with the rest of it."""
        assert service.mask_credentials(value) == masked

    def test_user_alone_is_masked(self) -> None:
        """A user name without a password may itself be a secret (a token): masked too."""
        assert service.mask_credentials("http://tok3n@proxy:8080") == "http://***@proxy:8080"

    def test_plain_url_untouched(self) -> None:
        """A URL without userinfo comes back as it was."""
        assert service.mask_credentials(PROXY) == PROXY
