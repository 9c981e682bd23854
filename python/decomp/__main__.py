"""`python -m decomp ...`: the same as the `decomp` command."""

import sys

from .app.cli import main

sys.exit(main())
