"""`aac-tokend demo` as a user runs it: a real process, a real sandbox, daemon and curl."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers_e2e import token_like_runs


def run_demo(path: str, seconds: str = "2", ttl: str = "4") -> str:
    """The output of a short demo run with ``PATH`` as given (it must succeed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AAC_", "XDG_RUNTIME"))}
    env["PATH"] = path
    result = subprocess.run(
        [sys.executable, "-m", "aac_tokend", "demo", "--seconds", seconds, "--access-ttl", ttl],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert token_like_runs(result.stdout + result.stderr) == [], "a token was shown"
    return result.stdout


class TestDemoEnding:
    """The demo ends with the commands a user types: status, token piped to curl, --check."""

    @pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/sysdeps)")
    def test_status_and_curl_against_the_sandbox(self) -> None:
        """`status` shows the healthy profile, curl gets 200 with the piped header, --check 69."""
        out = run_demo(os.environ.get("PATH", "/usr/bin:/bin"))
        shell = out[out.index("$ aac-tokend status\n") :]
        assert "default: ok (oauth)" in shell
        assert "$ aac-tokend token --header | curl -sS -H @- http://127.0.0.1:" in shell
        assert '"name": "Sandbox workspace"' in shell and "(HTTP 200)" in shell
        assert out.index("(HTTP 200)") < out.index("A thief replays")
        assert "$ aac-tokend status --check; echo $?   -> 69 " in out.splitlines()[-2]

    def test_a_short_run_narrates_what_the_server_did(self) -> None:
        """Ended before any refresh, it asks for one, so the replay really is of a spent token."""
        out = run_demo("/nonexistent", seconds="0", ttl="60")  # first refresh due at ~45 s
        assert "asking the daemon for one now" in out
        theft = out[out.index("A thief replays") :]
        assert "server answers 400 invalid_grant: that token was already rotated" in theft
        assert "state: rejected, reason: reuse_suspected" in theft
        assert "refused_after_import" not in out and "answers 200" not in out

    def test_without_curl_it_says_so(self) -> None:
        """With no curl on PATH the demo still finishes, saying the curl step was skipped."""
        out = run_demo("/nonexistent")
        assert "curl is not installed here, so this step is skipped" in out
        assert "(HTTP 200)" not in out and "-> 69 " in out
