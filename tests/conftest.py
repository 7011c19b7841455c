"""Shared test settings: one intra-op thread, so parallel test processes do not oversubscribe
the CPU and results are reproducible; plots render without a display."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
