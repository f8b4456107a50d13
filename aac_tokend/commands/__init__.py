"""The CLI's subcommands: thin clients of the daemon's sockets, plus what runs without a
daemon (import, remove, status from the state files, service install).

May import any subpackage; only ``cli.py`` mounts it (and ``api.py`` borrows its --profile
option), so ``aac-tokend token`` never imports it.
"""
