"""``python -m vaelab`` (and ``torchrun -m vaelab``) runs the ``vaelab`` command."""

import os
import sys

from vaelab.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun, leave without the interpreter's teardown. With torch 2.13, a process that
    # trained a DistributedDataParallel model over gloo is sometimes aborted during that
    # teardown, after destroy_process_group ("terminate called without an active exception",
    # then SIGABRT; a 12-line DDP script without vaelab does it too, about once in 40 runs).
    # Every file vaelab writes is already on disk (atomic, fsynced); only stdio is buffered.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
