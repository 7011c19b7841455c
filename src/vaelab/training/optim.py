"""The optimiser and the learning rate: Adam (fused where torch has it), decoupled weight decay
on the weight matrices, and the learning-rate schedules every trainer in vaelab uses."""

from __future__ import annotations

import math
from typing import Any

import torch

from vaelab.config import LR_SCHEDULES


def learning_rate(schedule: str, base: float, step: int, total_steps: int) -> float:
    """The learning rate at optimisation step ``step`` (0-based) of ``total_steps``.

    ``constant``: ``base``. ``cosine``: ``base * (1 + cos(pi * step / total_steps)) / 2``,
    from ``base`` at the first step down to 0 after the last.
    """
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    if schedule == "constant":
        return base
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose from {LR_SCHEDULES}")


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Every parameter group's learning rate to ``value`` (in place where it is a device
    tensor, as a captured CUDA graph reads it from there)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Adam's parameter groups: one without decay when ``weight_decay`` is 0 (the layout every
    earlier checkpoint has); else the weight matrices and conv kernels decayed, and the rest
    (biases, FiLM's per-class rows, which start at the identity) not."""
    if weight_decay == 0:
        return [{"params": list(model.parameters())}]
    decay, keep = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and ".film." not in f".{name}" else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": keep, "weight_decay": 0.0}]


def make_adam(params: Any, lr: float, *, capturable: bool = False) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch has it for the device, else the default.

    ``params``: tensors, or parameter groups (``decay_groups``); a group's ``weight_decay`` is
    decoupled from the gradient (AdamW's). ``capturable``: the learning rate is a device
    tensor and the update reads nothing from the host, so the step can be captured in a CUDA
    graph (CUDA only).
    """
    params = list(params)
    opts: dict[str, Any] = {"decoupled_weight_decay": True}
    if capturable:
        first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
        lr_t = torch.tensor(lr, dtype=torch.float32, device=first.device)
        return torch.optim.Adam(params, lr=lr_t, fused=True, capturable=True, **opts)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **opts)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, **opts)
