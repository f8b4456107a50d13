"""The machine around the daemon: where things live (paths), logging with redaction, core
dumps off, and reading the config file.

Imports ``core``, ``errors``, ``rundir`` and the file helpers of ``store``; used by
``store``, ``daemon``, ``service`` and ``commands``.
"""
