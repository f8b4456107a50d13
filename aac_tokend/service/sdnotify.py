"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET`` per message.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op that returns False, so the
daemon calls these helpers unconditionally. A failed send is reported by the return value,
never raised: telling the service manager how we are is never worth stopping the daemon.
Messages carry states and counts, never a token.

The daemon calls ``claim_environment()`` once at start: the address and the watchdog
interval are kept here and the variables leave the environment (sd_notify's
``unset_environment``), so no child (a courier) can take them for its own. Until then, and
in any process that never claims them, every call reads the environment afresh.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = [
    "NOTIFY_TIMEOUT",
    "claim_environment",
    "describe",
    "notify",
    "ready",
    "reloading",
    "stopping",
    "watchdog_interval",
    "watchdog_ping",
]

# The manager drains its notify socket at once; the bound only keeps the calling thread
# (the one that pings the watchdog) from hanging on a wedged manager. Well under the 15 s
# between pings.
NOTIFY_TIMEOUT = 2.0


#: The variables the service manager sets for us alone.
_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# (address, watchdog interval) once claim_environment() has run; None before.
_claimed: tuple[bytes | None, float | None] | None = None


def _address(value: str) -> bytes | None:
    """The sockaddr_un path for a NOTIFY_SOCKET value, or None for a kind we do not speak."""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])  # Linux abstract namespace
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # e.g. vsock:CID:PORT (systemd >= 253, for VMs): not ours to support


def _env_address() -> bytes | None:
    value = os.environ.get("NOTIFY_SOCKET", "")
    return _address(value) if value else None


def claim_environment() -> None:
    """Keep NOTIFY_SOCKET and the watchdog interval here, and unset the variables."""
    global _claimed
    _claimed = (_env_address(), _env_watchdog_interval())
    for name in _VARIABLES:
        os.environ.pop(name, None)


def notify(message: str) -> bool:
    """Send ``message`` (``KEY=VALUE`` lines) to the service manager; True if it was sent."""
    address = _claimed[0] if _claimed is not None else _env_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT)
            sock.sendto(message.encode("utf-8", "replace"), address)
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment inside the datagram.
    return " ".join(text.splitlines())


def ready(description: str) -> bool:
    """Tell the manager the daemon is up (its sockets accept connections), and what it does."""
    return notify(f"READY=1\nSTATUS={_one_line(description)}")


def describe(text: str) -> bool:
    """Set the one line (systemd's STATUS=) that ``systemctl --user status`` shows."""
    return notify(f"STATUS={_one_line(text)}")


def reloading() -> bool:
    """Tell the manager a reload has begun; send ``ready()`` when it is over.

    systemd >= 253 wants the CLOCK_MONOTONIC time of the start of the reload with it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    """Tell the manager the daemon is shutting down."""
    return notify("STOPPING=1")


def watchdog_ping() -> bool:
    """Tell the manager the daemon is alive (resets the WatchdogSec= timer)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec=), or None when none are wanted.

    None when WATCHDOG_USEC is unset or not a positive integer, or when WATCHDOG_PID names
    another process (the variables were inherited, not meant for us).
    """
    return _claimed[1] if _claimed is not None else _env_watchdog_interval()


def _env_watchdog_interval() -> float | None:
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    return usec / 2 / 1_000_000
