"""``python -m fxfuse``: the same as the ``fxfuse`` command."""

import sys

from .cli import main

sys.exit(main())
