"""``python -m finepruner`` (also the entry point for ``torchrun -m finepruner``)."""

import sys

from finepruner.cli import main

sys.exit(main())
