"""The daemon's Unix sockets: the token socket (one read, one token), the control socket
(its server loop, connections and wire protocol) and the operations it answers.

Imports ``core``, ``store``, ``errors`` and the ``daemon`` engine (for the operations);
started by ``daemon``; ``client.py`` is its stdlib-only counterpart on the other end.
"""
