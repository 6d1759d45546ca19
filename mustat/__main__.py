"""``python -m mustat`` (and ``torchrun ... -m mustat prune ...``)."""

import sys

from mustat.cli import main

sys.exit(main())
