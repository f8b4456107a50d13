"""Running as a user service: systemd and launchd units and their install, sd_notify, and
the sockets handed over by socket activation.

Imports ``errors``, ``host`` and ``serve`` (socket helpers); used by ``daemon`` (activation,
notify) and ``commands`` (``aac-tokend service ...``).
"""
