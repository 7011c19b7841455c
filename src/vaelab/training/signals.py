"""SIGINT and SIGTERM while a run trains: the run stops at its next step and saves a checkpoint
(``loop.Interrupted`` then names the command that resumes it). Under torchrun a signal caught
by any rank stops every rank at the same step."""

from __future__ import annotations

import signal
from typing import Any

import torch

from vaelab.training.distributed import stop_signal_anywhere

CHECK_EVERY = 25  # under torchrun, the ranks compare what they caught this often (steps)


class StopSignals:
    """The signal a run has caught (``signum``, None until one arrives)."""

    def __init__(self, world_size: int, device: torch.device) -> None:
        self.world_size, self.device = world_size, device
        self.signum: int | None = None

    def catch(self, signum: int, frame: Any = None) -> None:
        self.signum = signum

    def install(self) -> dict[int, Any]:
        """Catch SIGINT and SIGTERM (from the main thread; elsewhere nothing changes); the
        handlers they had, for ``restore``."""
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, self.catch)
            except ValueError:  # not the main thread
                pass
        return old

    @staticmethod
    def restore(old: dict[int, Any]) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def should_stop(self, step_in_epoch: int) -> bool:
        if self.world_size == 1:
            return self.signum is not None
        if step_in_epoch % CHECK_EVERY:
            return False
        seen = stop_signal_anywhere(self.signum, self.device)
        if seen and self.signum is None:
            self.signum = seen
        return seen is not None
