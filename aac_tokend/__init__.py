"""aac-tokend: keeps Alteryx Analytics Cloud OAuth 2.0 token chains alive.

The public Python API is ``get_token(profile)`` and the ``requests`` auth class
``TokendAuth``; both are imported lazily, so importing the package (which every
``aac-tokend`` command does) costs nothing.
"""

from __future__ import annotations

# Not `from typing import ...`: importing typing costs ~10 ms on every `aac-tokend token`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"
__all__ = ["TokendAuth", "__version__", "get_token"]


def __getattr__(name: str) -> Any:
    if name in ("get_token", "TokendAuth"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'aac_tokend' has no attribute {name!r}")
