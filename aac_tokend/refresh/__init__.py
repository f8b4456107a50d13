"""One refresh of one profile: the token endpoint client, the courier that carries the
refresh in a process of its own (forked, or spawned with a spare ready), the transaction it
runs (lock, journal, request, durable outcome), and its typed result.

Imports ``core``, ``store`` and ``errors``, kept light for the spawned courier; used by
``daemon`` and ``commands``.
"""
