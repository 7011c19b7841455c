"""torch's process-wide backend switches, set only for the length of a run and then restored.

PyTorch runs cuDNN's fp32 convolutions in TF32 unless told not to (its matrix products it
leaves at fp32). vaelab's fp32 training and every evaluation are to be fp32 as on the CPU, and
bf16 is asked for by name (``--precision``), so a run on CUDA turns TF32 off, and a training
run with fixed shapes lets cuDNN pick its fastest kernels once (``cudnn.benchmark``). A
library call must not leave those switches changed behind it: ``cuda_settings`` sets them on
entry and puts the process's own values back when the outermost scope ends. Scopes nest and
may be entered from several threads at once (``train_concurrently``): the first entry saves,
the last exit restores.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

_lock = threading.Lock()
_depth = 0
_saved: dict[str, bool] = {}


def _flags() -> dict[str, bool]:
    """The switches as they are; those torch will not read back (some versions refuse once
    its newer per-operator settings, ``fp32_precision``, have been mixed in) left out, and so
    left as the run sets them."""
    readers = {"cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
               "matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
               "cudnn.benchmark": lambda: torch.backends.cudnn.benchmark}
    flags = {}
    for name, read in readers.items():
        try:
            flags[name] = bool(read())
        except RuntimeError:
            pass
    return flags


def _set(flags: dict[str, bool]) -> None:
    # the long-standing flags only, set and never mixed with the newer per-operator settings
    if "cudnn.allow_tf32" in flags:
        torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    if "matmul.allow_tf32" in flags:
        torch.backends.cuda.matmul.allow_tf32 = flags["matmul.allow_tf32"]
    if "cudnn.benchmark" in flags:
        torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]


@contextmanager
def cuda_settings(device: torch.device | str, *, benchmark: bool = False) -> Iterator[None]:
    """Within: on CUDA, convolutions and matrix products in IEEE fp32 (TF32 off), and with
    ``benchmark`` cuDNN's kernel search on; on any other device, nothing changes. The
    process's values come back when the outermost scope ends."""
    global _depth
    if torch.device(device).type != "cuda":
        yield
        return
    with _lock:
        if _depth == 0:
            _saved.clear()
            _saved.update(_flags())
        _depth += 1
        _set({"cudnn.allow_tf32": False, "matmul.allow_tf32": False,
              "cudnn.benchmark": benchmark or torch.backends.cudnn.benchmark})
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(_saved)


F = TypeVar("F", bound=Callable[..., Any])


def fp32_on_model_device(fn: F) -> F:
    """Run ``fn(model, ...)`` inside ``cuda_settings`` of the model's device: an evaluation on
    CUDA computes in IEEE fp32 whatever the process's TF32 switches say, and leaves them as
    they were."""

    @functools.wraps(fn)
    def scoped(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        param = next(model.parameters(), None)
        with cuda_settings(param.device if param is not None else "cpu"):
            return fn(model, *args, **kwargs)

    return scoped  # type: ignore[return-value]


def keeps_process_rng(fn: F) -> F:
    """Run ``fn`` inside ``torch.random.fork_rng`` (the CPU's generator and every CUDA
    device's): what it seeds and draws with torch's global generator, as a benchmark of a
    tutorial-style loop must, is undone when it returns."""

    @functools.wraps(fn)
    def forked(*args: Any, **kwargs: Any) -> Any:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            return fn(*args, **kwargs)

    return forked  # type: ignore[return-value]
