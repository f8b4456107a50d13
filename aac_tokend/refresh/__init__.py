"""One refresh of one profile: the token endpoint client, the courier that carries the
refresh and its journal (in process or in a spawned process), and its typed result.

Imports ``core``, ``store`` and ``errors``, kept light for the spawned courier; used by
``daemon`` and ``commands``.
"""
