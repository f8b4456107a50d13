"""A local AAC-like OAuth server on loopback (rotation, family revocation, injected
failures) and a demo of the daemon against it, for tests, demos and trials.

Imports ``core``, ``errors`` and ``client``; nothing in the daemon imports it: only
``commands`` mounts it (``aac-tokend sandbox``, ``aac-tokend demo``), and the tests use it.
"""
