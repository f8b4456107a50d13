"""The sandbox as the fleet campaign runs it: ``python -m aac_tokend.sandbox`` as a child.

Its own process, not a SandboxServer thread inside the campaign: the campaign's process
already runs the readers and the proxies' relays, and the sandbox's answer delays must not
stretch with their load. It is driven over its /sandbox/ control routes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import requests

from .crash_rig import TIMEOUT

__all__ = ["SandboxProcess"]


class SandboxProcess:
    """``python -m aac_tokend.sandbox`` as a child process, driven over its /sandbox/ routes."""

    def __init__(self, access_ttl: float, log_path: Path) -> None:
        cmd = [sys.executable, "-m", "aac_tokend.sandbox", "--access-ttl", str(access_ttl)]
        with log_path.open("ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("sandbox listening on "):
            self.stop()
            raise RuntimeError(f"the sandbox did not start: {line!r}")
        self.url = line.split()[3]
        self.token_endpoint = self.url + "/as/token"
        self.api_url = self.url

    def generate(self) -> dict[str, object]:
        """A new family (what crash_rig.Rig.import_profile pastes)."""
        answer = requests.post(self.url + "/sandbox/generate", json={}, timeout=TIMEOUT)
        answer.raise_for_status()
        return cast(dict[str, object], answer.json())

    def log(self) -> list[dict[str, Any]]:
        """The sandbox's token-request log, oldest first."""
        answer = requests.get(self.url + "/sandbox/log", timeout=TIMEOUT)
        answer.raise_for_status()
        return cast(list[dict[str, Any]], answer.json())

    def set_answer_delay(self, seconds: float) -> None:
        answer = requests.post(
            self.url + "/sandbox/answer-delay", json={"seconds": seconds}, timeout=TIMEOUT
        )
        answer.raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
