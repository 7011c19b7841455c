"""``python -m vaelab`` (and ``torchrun -m vaelab``) runs the ``vaelab`` command."""

import sys

from vaelab.cli import main

sys.exit(main())
