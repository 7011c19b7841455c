"""Training under torchrun: the process group, and the collectives the trainer needs (the
epoch's sums, every rank's generator states, a stop signal seen by any rank). Each function
is a plain call in a single process (``world_size`` 1), so the trainer reads the same both
ways."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from vaelab.config import TrainConfig
from vaelab.errors import ConfigError

T = TypeVar("T")


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def join_process_group(config: TrainConfig, world_size: int) -> bool:
    """Check the batch splits over the ranks and start the process group where none is: True
    when this call started it (and so the trainer is to destroy it)."""
    import torch.distributed as dist

    if config.batch_size % world_size:
        raise ConfigError(f"batch size {config.batch_size} does not split evenly over "
                          f"{world_size} processes")
    if dist.is_initialized():
        return False
    use_nccl = config.device != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_nccl else "gloo")
    return True


def leave_process_group() -> None:
    """Destroy the process group, after the garbage a DDP wrapper left is freed: freed after
    the group, it can abort the process (see ``vaelab/__main__.py``)."""
    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


def barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def global_sums(sums: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """The epoch's running sums over all ranks: added up, and the first bad step the latest
    any rank saw (a collective call under torchrun)."""
    if world_size == 1:
        return sums
    import torch.distributed as dist

    out = {k: v.clone() for k, v in sums.items()}
    for k in ("terms", "kl_dim", "count"):
        dist.all_reduce(out[k])
    dist.all_reduce(out["bad_step"], op=dist.ReduceOp.MAX)
    return out


def gathered(obj: Any, world_size: int) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    objs: list[Any] = [None] * world_size
    dist.all_gather_object(objs, obj)
    return objs


def stop_signal_anywhere(signum: int | None, device: torch.device) -> int | None:
    """The signal any rank has caught (the largest number), or None: every rank stops at the
    same step."""
    import torch.distributed as dist

    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) or None


def from_rank_zero(rank: int, world_size: int, compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its answer on every rank (a choice that is timed could differ
    between ranks)."""
    if world_size == 1:
        return compute()
    import torch.distributed as dist

    box: list[Any] = [compute() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
