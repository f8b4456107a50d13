"""Fleet mode: one chain's state in etcd v3, owned by one elected host, served on every host.

Only its foundation is here so far, and the daemon refuses a ``[fleet]`` table until the rest
lands: an etcd v3 client over the JSON gateway (``etcd``, ``etcd_watch``) whose failures say
whether a write may have been applied; sealing of what goes to etcd under a fleet key
(``sealing``); each host's high-water mark of generations seen (``highwater``); and the
``[fleet]`` settings with their timing checks (``settings``, pure). With fleet mode off,
nothing here is imported but ``settings``, and that only to parse a ``[fleet]`` table.
"""
