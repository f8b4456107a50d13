"""``python -m aac_tokend.sandbox``: the sandbox without the rest of the CLI."""

import sys

from .cli import main

sys.exit(main())
