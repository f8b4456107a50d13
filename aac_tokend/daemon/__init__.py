"""The long-running daemon: the engine that holds every profile and decides its refreshes,
the scheduling of its wake-ups, the alerts, and the wiring that builds and runs them.

The top of the runtime: it may import every subpackage but ``commands`` and ``sandbox``;
started by ``aac-tokend run``; its engine answers the control operations of ``serve``.
"""
