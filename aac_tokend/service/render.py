"""The files that run aac-tokend under systemd or launchd, rendered from package data.

The unit files (``systemd/``) and the LaunchAgent (``launchd/``) ship with ``@NAME@``
placeholders. A Layout (``layout``) says what they depend on (platform, user, program,
directories); rendering it is pure (a Layout in, text out).
"""

from __future__ import annotations

import os
import plistlib
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from aac_tokend.errors import InputError
from aac_tokend.service.layout import LABEL, SERVICE_UNIT, SOCKET_UNIT, Layout

__all__ = [
    "check_socket_room",
    "read_template",
    "render_env_file",
    "render_launchd",
    "render_systemd",
]

# Usable bytes of sockaddr_un.sun_path (its size minus the NUL) on the target platform; the
# host's value is in unixsock, but a dry run for the other platform needs that one's.
_SOCKET_PATH_MAX = {"linux": 107, "macos": 103}

# The only PATH launchd gives an agent.
_LAUNCHD_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

# Where `[tool.setuptools.package-dir]` maps the top-level template directories.
_TEMPLATE_PACKAGES = {
    "systemd": "aac_tokend._units_systemd",
    "launchd": "aac_tokend._units_launchd",
}

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@")
_BLOCK_PLACEHOLDER = re.compile(r"^@([A-Z][A-Z_]*)@\n", re.MULTILINE)


def read_template(kind: str, name: str) -> str:
    """A template from the package data, or from the source checkout next to the package."""
    try:
        return resources.files(_TEMPLATE_PACKAGES[kind]).joinpath(name).read_text("utf-8")
    except (ModuleNotFoundError, OSError):
        pass  # an editable install does not map the package-dir entries
    try:
        return (Path(__file__).resolve().parents[2] / kind / name).read_text("utf-8")
    except OSError as exc:
        raise InputError(
            f"the template {kind}/{name} is missing from this aac-tokend; reinstall aac-tokend"
        ) from exc


def _fill(template: str, values: Mapping[str, str], blocks: Mapping[str, list[str]]) -> str:
    # A block placeholder stands alone on its line and becomes zero or more lines.
    text = _BLOCK_PLACEHOLDER.sub(lambda m: "".join(f"{line}\n" for line in blocks[m[1]]), template)
    return _PLACEHOLDER.sub(lambda m: values[m[1]], text)


def _unit_word(word: str, *, exec_argument: bool = False) -> str:
    """``word`` as one word of a unit-file setting (systemd.syntax(7) quoting)."""
    if exec_argument:
        word = word.replace("$", "$$")  # Exec lines expand $VAR in arguments, not in the path
    if re.search(r"[\s\"'\\;]", word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _unit_path(path: Path, layout: Layout) -> str:
    """``path`` with the %t or %h specifier where it applies, other % escaped."""
    for base, spec in ((layout.runtime_base, "%t"), (layout.home, "%h")):
        if base is not None and path.is_relative_to(base):
            rest = str(path.relative_to(base)).replace("%", "%%")
            return spec if rest == "." else f"{spec}/{rest}"
    return str(path).replace("%", "%%")


def check_socket_room(layout: Layout) -> str:
    """Refuse a control socket path over the platform's limit; say what room profiles have."""
    limit = _SOCKET_PATH_MAX[layout.platform]
    control = layout.paths.control_socket
    if len(os.fsencode(control)) > limit:
        raise InputError(
            f"control socket path {control} is {len(os.fsencode(control))} bytes, over the "
            f"{limit}-byte limit of Unix sockets; install with AAC_TOKEND_HOME set to a "
            "shorter directory, e.g. AAC_TOKEND_HOME=~/.aac-tokend"
        )
    # A one-letter profile's path, less that letter: what the name itself may take.
    room = limit - len(os.fsencode(layout.paths.token_socket("x"))) + 1
    return f"note: token socket paths leave room for profile names of up to {room} bytes"


def render_systemd(layout: Layout) -> dict[str, str]:
    """The socket and service unit for ``layout``, by file name."""
    dirs = (layout.paths.config_dir, layout.paths.state_dir, layout.paths.runtime_dir)
    for path in dirs:
        for tmp in layout.private_tmp:
            if path.is_relative_to(tmp):
                raise InputError(
                    f"{path} is under {tmp}, which the service replaces with a private one "
                    "(PrivateTmp=yes); set AAC_TOKEND_HOME to a directory elsewhere"
                )
    values = {
        "PROGRAM": " ".join(
            _unit_word(w.replace("%", "%%"), exec_argument=i > 0)
            for i, w in enumerate(layout.program)
        ),
        "CONTROL_SOCKET": _unit_path(layout.paths.control_socket, layout),
        "READ_WRITE_PATHS": " ".join(_unit_word("-" + _unit_path(p, layout)) for p in dirs),
    }
    environment = [
        "Environment=" + _unit_word(f"{name}={value}".replace("%", "%%"))
        for name, value in (*layout.environment, *layout.plain_network)
    ]
    if layout.secret_network:
        # No "-": without the file the daemon would not get past the proxy; better that the
        # unit fails at once and says which file is missing.
        environment.append("EnvironmentFile=" + _unit_word(_unit_path(layout.env_file, layout)))
    return {
        name: _fill(read_template("systemd", name), values, {"ENVIRONMENT": environment})
        for name in (SOCKET_UNIT, SERVICE_UNIT)
    }


def render_env_file(layout: Layout) -> str:
    """The EnvironmentFile for the variables that carry credentials (systemd.exec(5))."""
    lines = ["# Written by `aac-tokend service install`: proxy settings with credentials (0600)."]
    for name, value in layout.secret_network:
        # Double quotes: systemd takes the value literally, bar these backslash escapes.
        quoted = re.sub(r'([\\"$`])', r"\\\1", value)
        lines.append(f'{name}="{quoted}"')
    return "".join(f"{line}\n" for line in lines)


def render_launchd(layout: Layout) -> str:
    """The LaunchAgent plist for ``layout``."""
    indent = " " * 8
    program_dir = os.path.dirname(layout.program[0])
    environment = [
        ("PATH", f"{program_dir}:{_LAUNCHD_PATH}"),
        *layout.environment,
        *layout.network,
    ]
    blocks = {
        "PROGRAM_ARGUMENTS": [f"{indent}<string>{xml_escape(w)}</string>" for w in layout.program],
        "ENVIRONMENT": [
            f"{indent}<key>{xml_escape(k)}</key>\n{indent}<string>{xml_escape(v)}</string>"
            for k, v in environment
        ],
    }
    text = _fill(
        read_template("launchd", f"{LABEL}.plist"),
        {"LOG_FILE": xml_escape(str(layout.log_file))},
        blocks,
    )
    plistlib.loads(text.encode("utf-8"))  # a template that renders to a broken plist is a bug
    return text
