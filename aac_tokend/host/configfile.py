"""The edge that reads ``config.toml``: a bounded read of a regular file, then the pure parser.

``core.config.parse_config`` checks the text; this module turns what can go wrong with the
file itself (unreadable, not a regular file, too large, not UTF-8) into one ConfigError line.
"""

from __future__ import annotations

from pathlib import Path

from ..core.config import CONFIG_FILENAME, MAX_CONFIG_BYTES, Config, parse_config
from ..errors import ConfigError
from ..store.fileio import read_regular_file

__all__ = ["load_config"]


def load_config(config_dir: Path) -> Config:
    """The config in ``config_dir/config.toml``; all defaults when the file does not exist."""
    path = config_dir / CONFIG_FILENAME
    try:
        data, _ = read_regular_file(path, MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"config error in {path}: cannot read the file ({reason}); fix its permissions "
            "or put a regular file there"
        ) from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config error in {path}: the file is larger than {MAX_CONFIG_BYTES} bytes; "
            "is this the right file?"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config error in {path}: not UTF-8 text (bad byte at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    config = parse_config(text, str(path))
    if config.fleet is not None:  # fleet mode only: see fleet/
        from ..fleet.connect import check_files

        check_files(config.fleet, str(path))
    return config
