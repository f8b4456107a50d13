"""``python -m aac_tokend``: the same as the ``aac-tokend`` command."""

import sys

from .cli import main

sys.exit(main())
