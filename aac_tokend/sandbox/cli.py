"""``aac-tokend sandbox`` and ``python -m aac_tokend.sandbox``: the sandbox's command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from ..errors import AacTokendError

__all__ = ["add_arguments", "main", "run_cli"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``aac-tokend sandbox``."""
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="loopback IP to listen on (default 127.0.0.1)")
    add("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    add("--access-ttl", type=float, default=3600.0, metavar="S", help="access token seconds")
    add("--refresh-ttl", type=float, default=30 * 86400.0, metavar="S", help="family seconds")
    add("--answer-delay", type=float, default=0.0, metavar="MS", help="ms to wait per answer")


def run_cli(args: argparse.Namespace) -> int:
    """Serve in the foreground until SIGTERM or SIGINT; print one line once listening."""
    # Imported here, not at the top: sandbox re-exports this module's names.
    from .server import SandboxServer

    server = SandboxServer(
        host=args.host,
        port=args.port,
        access_ttl=args.access_ttl,
        refresh_ttl=args.refresh_ttl,
        answer_delay=args.answer_delay / 1000.0,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # stop() waits for the serve loop, which runs in this very thread: stop from another.
        threading.Thread(target=server.stop, name="aac-sandbox-stop", daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(
            f"sandbox listening on {server.url} token_endpoint={server.token_endpoint}", flush=True
        )
        server.serve_forever()
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m aac_tokend.sandbox``: the sandbox without the rest of the CLI."""
    parser = argparse.ArgumentParser(
        prog="aac-tokend sandbox", description="A local AAC-like authorization server."
    )
    add_arguments(parser)
    try:
        return run_cli(parser.parse_args(argv))
    except AacTokendError as exc:
        print(f"aac-tokend sandbox: {exc}", file=sys.stderr)
        return exc.exit_code
