"""``python -m nanoseek`` (and ``torchrun -m nanoseek``): the same CLI as the ``nanoseek`` script."""

import sys

from nanoseek.cli import main

sys.exit(main())
