"""Socket activation: the listening sockets systemd passes in (sd_listen_fds_with_names(3)).

systemd hands a service its sockets as file descriptors 3, 4, ... and describes them in
three variables: LISTEN_PID (the process they are meant for), LISTEN_FDS (how many) and
LISTEN_FDNAMES (colon-separated names, from FileDescriptorName= in the .socket unit).
"""

from __future__ import annotations

import os
import socket

from aac_tokend.errors import InputError

__all__ = ["SD_LISTEN_FDS_START", "UNKNOWN_NAME", "listen_fds"]

#: the first passed descriptor, after stdin, stdout and stderr
SD_LISTEN_FDS_START = 3
#: the name of a descriptor that LISTEN_FDNAMES does not name, as in libsystemd
UNKNOWN_NAME = "unknown"

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(unset_env: bool = True) -> dict[str, list[socket.socket]]:
    """The sockets passed to this process, grouped by name; empty when none were.

    Each descriptor gets FD_CLOEXEC, so that no child (a refresh courier) inherits a
    listener. With ``unset_env`` the three variables are removed from the environment
    whatever the outcome, so that children do not mistake them for their own.
    Raises InputError when the variables are meant for us but garbled.
    """
    pid_text = os.environ.get("LISTEN_PID")
    count_text = os.environ.get("LISTEN_FDS")
    names_text = os.environ.get("LISTEN_FDNAMES")
    if unset_env:
        for name in _VARIABLES:
            os.environ.pop(name, None)
    if not pid_text or not count_text:
        return {}
    if pid_text.strip() != str(os.getpid()):
        return {}  # inherited from a parent that was activated itself
    try:
        count = int(count_text)
    except ValueError:
        count = -1
    if count < 0:
        raise InputError(
            f"LISTEN_FDS={count_text!r} is not a number of sockets; "
            "start aac-tokend from its .socket unit or unset LISTEN_FDS"
        )
    names = names_text.split(":") if names_text else []
    found: dict[str, list[socket.socket]] = {}
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else UNKNOWN_NAME
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise InputError(
                f"socket activation passed fd {fd} ({name}), which is not an open socket "
                f"({exc.strerror}); fix the .socket unit"
            ) from exc
        found.setdefault(name, []).append(sock)
    return found
