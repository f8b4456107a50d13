"""Fleet mode: one chain's state in etcd v3 with one elected owner (issue #13).

Only its foundation is here so far: an etcd v3 client over the JSON gateway (``etcd``,
``etcd_watch``) whose failures say whether a write may have been applied. Nothing else in
the package imports this subpackage: with fleet mode off, the client is never loaded.
"""
