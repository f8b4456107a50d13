"""``aac-tokend demo``: the daemon at work against the sandbox, in plain words, in a minute.

Everything runs as real processes in a throw-away AAC_TOKEND_HOME: the sandbox token
server, ``import``, the daemon, token reads over its socket, API calls with the token,
the commands a user types (``status``, ``token --header | curl -H @-``), and at the end a
stolen refresh token replayed by a third party, as ``status --check`` reports it. Tokens
are shown only by their short hash.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import requests

from ..client import ControlClient, read_token
from ..core.tokens import token_hash

__all__ = ["add_arguments", "run_cli"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=45.0, help="how long to watch refreshes")
    parser.add_argument("--access-ttl", type=int, default=15, help="sandbox access token life")
    parser.add_argument(
        "--fleet", action="store_true", help="three hosts sharing one chain through a local etcd"
    )


def _say(text: str) -> None:
    print(text, flush=True)


class _Demo:
    def __init__(self, seconds: float, ttl: int) -> None:
        self.seconds, self.ttl = seconds, ttl
        self.home = tempfile.mkdtemp(prefix="atk-demo-", dir="/tmp")
        self.env = dict(os.environ, AAC_TOKEND_HOME=self.home)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cmd = [sys.executable, "-m", "aac_tokend"]

    def start(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(os.path.join(self.home, log), "wb")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(self.cmd + args, env=self.env, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def read_log(self, name: str) -> str:
        with open(os.path.join(self.home, name)) as f:
            return f.read()

    def control(self, op: str, **fields: Any) -> dict[str, Any]:
        with ControlClient(os.path.join(self.home, "run", "control.sock")) as client:
            return client.request(op, **fields)

    def wait_for(self, what: str, check: Any, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"demo: {what} did not happen within {timeout:.0f} s")

    def run(self) -> int:
        _say(f"== aac-tokend demo (files under {self.home}, removed at the end)")
        self.start(["sandbox", "--port", "0", "--access-ttl", str(self.ttl)], "sandbox.log")
        self.wait_for("the sandbox start", lambda: "listening" in self.read_log("sandbox.log"))
        url = self.read_log("sandbox.log").split("listening on ", 1)[1].split()[0]
        _say(f"1. Sandbox token server (like AAC's PingFederate) runs at {url}; "
             f"its access tokens live {self.ttl} s.")  # fmt: skip
        pair = requests.post(f"{url}/sandbox/generate", json={}, timeout=5).json()
        stolen = pair["refresh_token"]
        access = token_hash(pair["access_token"])
        _say(f"2. 'Generate' in the sandbox gave a token pair: access {access}, "
             f"refresh {token_hash(stolen)} (hashes; tokens are never shown).")  # fmt: skip
        # The JSON carries refresh_token_expires_in: with the lifetime known, the replay in
        # step 5 can be called a theft rather than "expired or reused".
        subprocess.run(
            [*self.cmd, "import", "--token-endpoint", f"{url}/as/token"],
            input=json.dumps(pair).encode(), env=self.env, check=True,
        )  # fmt: skip
        _say("3. Imported it (from stdin, never argv). Starting the daemon...")
        self.start(["run"], "daemon.log")
        sock = os.path.join(self.home, "run", "default.token.sock")
        self.wait_for("the token socket", lambda: bool(read_token(sock)))
        _say(f"4. Watching for {self.seconds:.0f} s: the daemon refreshes each token well before "
             "it expires; a tool reads the token from the socket and calls the API.")  # fmt: skip
        start, seen = time.monotonic(), None
        while time.monotonic() - start < self.seconds:
            token = read_token(sock)
            api = requests.get(f"{url}/iam/v1/workspaces/current",
                               headers={"Authorization": f"Bearer {token}"}, timeout=5)  # fmt: skip
            row = self.control("status")["profiles"][0]
            if token_hash(token) != seen:
                _say(f"   t={time.monotonic() - start:4.0f}s  token {token_hash(token)}  API says "
                     f"{api.status_code}  refreshes so far: {row['refresh_count']}  next refresh "
                     f"{row['next_refresh_at']}")  # fmt: skip
                seen = token_hash(token)
            time.sleep(1.0)
        self.show_shell(url)
        if not self.rotated(url):
            # A short run may end before the first refresh: the original refresh token would
            # still be the live one, and replaying it would be no theft at all.
            _say(f"   (no refresh yet in {self.seconds:.0f} s; asking the daemon for one now, "
                 "so that the original refresh token is a spent one)")  # fmt: skip
            self.control("refresh", profile="default")
        _say("6. A thief replays the original refresh token at the server:")
        form = {"grant_type": "refresh_token", "refresh_token": stolen,
                "client_id": "aac-sandbox-client"}  # fmt: skip
        answer = requests.post(f"{url}/as/token", timeout=5, data=form)
        outcome = self.sandbox_log(url)[-1]["outcome"]
        said = f"   server answers {answer.status_code} {answer.json().get('error') or ''}".rstrip()
        if outcome == "reuse_revoked":
            _say(f"{said}: that token was already rotated, so it revoked the whole token "
                 "family, ours included.")  # fmt: skip
        else:
            taken = "a normal refresh" if outcome == "rotated" else outcome
            _say(f"{said} (sandbox log: {outcome}): the replay was taken as {taken}, "
                 "not as a theft.")  # fmt: skip
        _say("7. The daemon's next refresh:")
        self.control("refresh", profile="default")
        row = self.control("status")["profiles"][0]
        _say(f"   state: {row['state']}, reason: {(row['rejection'] or {}).get('reason')}")
        _say(f"   alert: {row['alert']}")
        if row["state"] == "rejected":
            still = read_token(sock)
            _say("   it does not retry blindly; the last access token is still served until it "
                 f"expires ({row['access_expires_at']}): {'yes' if still else 'no'}; "
                 "then readers get nothing.")  # fmt: skip
        check = self.aac("status", "--check")
        meaning = {0: "every profile is fine", 69: "a person must act",
                   75: "no token yet, the daemon retries"}  # fmt: skip
        _say(f"   $ aac-tokend status --check; echo $?   -> {check.returncode} (what a script "
             f"or monitor sees: {meaning.get(check.returncode, 'see the README')})")  # fmt: skip
        _say("== demo finished; stopping the daemon and the sandbox.")
        return 0

    def sandbox_log(self, url: str) -> list[dict[str, Any]]:
        """The sandbox's token-request log: what the server did, not what we expected."""
        log: list[dict[str, Any]] = requests.get(f"{url}/sandbox/log", timeout=5).json()
        return log

    def rotated(self, url: str) -> bool:
        return any(entry["outcome"] == "rotated" for entry in self.sandbox_log(url))

    def aac(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One ``aac-tokend`` command, as a user types it, run to completion."""
        return subprocess.run(
            [*self.cmd, *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def show_shell(self, url: str) -> None:
        """What a user types: ``status``, and the token handed to curl on stdin."""
        api = f"{url}/iam/v1/workspaces/current"
        _say("5. From a shell, the same as you would type it:")
        _say("   $ aac-tokend status")
        for line in self.aac("status").stdout.splitlines():
            _say(f"     {line}")
        _say(f"   $ aac-tokend token --header | curl -sS -H @- {api}")
        curl = shutil.which("curl")
        if curl is None:
            _say("     (curl is not installed here, so this step is skipped)")
            return
        token = subprocess.Popen(
            [*self.cmd, "token", "--header"], env=self.env, stdout=subprocess.PIPE
        )
        answer = subprocess.run(
            [curl, "-sS", "-w", "\\n(HTTP %{http_code})", "-H", "@-", api],
            stdin=token.stdout, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert token.stdout is not None
        token.stdout.close()
        token.wait(timeout=30)
        for line in (answer.stdout + answer.stderr).splitlines():
            _say(f"     {line}")
        _say("     (the token went through a pipe: it is in no process's argv)")

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.home, ignore_errors=True)


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo; it always cleans up its processes and files."""
    if args.fleet:
        from .demo_fleet import run_fleet_demo

        return run_fleet_demo(args.seconds, args.access_ttl)
    demo = _Demo(args.seconds, args.access_ttl)
    try:
        return demo.run()
    finally:
        demo.cleanup()
