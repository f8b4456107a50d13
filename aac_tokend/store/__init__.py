"""The state store: the ``StateStore`` interface and ``FileStore``, its encrypted files, the
state key (file or OS keyring), the profile lock and its owner, writes not yet durable.

Imports ``core``, ``errors``, ``host`` (paths) and ``rundir``; used by ``refresh``, ``daemon``,
``commands`` and ``testing``, never by ``core``.
"""
