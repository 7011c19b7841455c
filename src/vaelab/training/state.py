"""What a checkpoint holds beyond the weights, and how a resume puts it back.

Everything a resume needs is in every checkpoint: the optimiser, the beta schedule, the noise
and binarizing generators (every rank's), the epoch, the step within it, the epoch's running
sums and all metrics so far. A run killed at any moment and resumed ends with the same weights
and metrics as one never interrupted (on the same device, thread count and torch version; on
CUDA within float tolerance). Training draws no random number from the process's generator,
so a resume leaves that generator alone (its state is still saved, as before, under
``rng.torch``).
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from vaelab.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_weights,
    save_checkpoint,
    weights_bytes,
)
from vaelab.errors import CheckpointError, ConfigError
from vaelab.training.distributed import barrier, gathered, global_sums
from vaelab.training.run_dir import (
    FINAL_FILES,
    record_resume,
    remove_stale_temporaries,
    write_metrics,
)

if TYPE_CHECKING:
    from vaelab.training.loop import Trainer


def capture(t: Trainer) -> dict[str, Any]:
    """The trainer's state now. Under torchrun the sums are the global ones (restored on rank
    0 only, since they add up) and every rank's generator states are kept (a collective)."""
    noise = gathered(t.noise.get_state().cpu(), t.world_size)
    binarize = gathered(t.binarizer.get_state().cpu(), t.world_size) \
        if t.binarizer is not None else None
    optimizer = t.optimizer.state_dict()
    for group in optimizer["param_groups"]:  # saved device-neutral: a plain lr, not capturable
        group["lr"] = float(group["lr"])
        group["capturable"] = False
    return {
        "optimizer": optimizer,
        "schedule": t.schedule.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "noise": noise[0], "noise_per_rank": noise,
                **({"binarize_per_rank": binarize} if binarize is not None else {})},
        "epoch": t.epoch, "step_in_epoch": t.step_in_epoch, "step": t.global_step,
        "world_size": t.world_size,
        "sums": {k: v.cpu() for k, v in global_sums(t.sums, t.world_size).items()},
        "epoch_seconds": t.epoch_seconds,
        "metrics": json.dumps(t.metrics),
    }


def restore(t: Trainer, ckpt: Checkpoint) -> None:
    """Put checkpoint ``ckpt`` back into the trainer; CheckpointError when its state lacks
    something, ConfigError when the run has already trained past ``--epochs``."""
    load_weights(t.model, ckpt.weights, ckpt.path)
    s = ckpt.state
    try:
        t.optimizer.load_state_dict(s["optimizer"])
        if t.stepper.use_graph:
            for group in t.optimizer.param_groups:
                group["capturable"] = True
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32,
                                           device=t.device)
        t.schedule.load_state_dict(s["schedule"])
        _restore_generators(t, s)
        t.epoch, t.step_in_epoch, t.global_step = s["epoch"], s["step_in_epoch"], s["step"]
        for k, v in s["sums"].items():
            # the saved sums are global: under torchrun one rank carries them
            keep = t.rank == 0 or k == "bad_step"
            t.sums[k].copy_(v if keep else torch.zeros_like(v))
        t.epoch_seconds = float(s["epoch_seconds"])
        t.metrics = json.loads(s["metrics"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt.path}: state.pt lacks what a resume needs ({e})") from None
    epochs = t.config.epochs
    if t.epoch > epochs or (t.epoch == epochs and t.step_in_epoch > 0):
        done = f"{t.epoch} epochs" + (f" and {t.step_in_epoch} steps of the next"
                                      if t.step_in_epoch else "")
        raise ConfigError(f"--epochs {epochs}: {t.out} has already trained {done}; a "
                          "resume cannot take steps back")


def _restore_generators(t: Trainer, s: dict[str, Any]) -> None:
    per_rank = s["rng"].get("noise_per_rank") or [s["rng"]["noise"]]
    if len(per_rank) == t.world_size:
        t.noise.set_state(per_rank[t.rank].to(t.noise.get_state().device))
    else:
        t.log(f"the checkpoint was written by {len(per_rank)} process(es), this run "
              f"has {t.world_size}: the noise generators are reseeded")
        t.noise.manual_seed(t.noise_seed(s["step"]))
    if t.binarizer is not None:
        states = s["rng"]["binarize_per_rank"]
        if len(states) == t.world_size:
            t.binarizer.set_state(states[t.rank].to(t.binarizer.get_state().device))
        else:  # logged with the noise generators above
            t.binarizer.manual_seed(t.binarize_seed(s["step"]))


def _cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor in it copied to the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes a run's checkpoints: at once on the CPU; on CUDA from a snapshot, by a background
    thread while training goes on (a write took 170 ms there, against 0.42 s for an epoch's
    steps on an H100). The next write, ``wait`` and ``close`` wait for the one in flight."""

    def __init__(self, t: Trainer) -> None:
        self._t = t
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None

    def write(self, state: dict[str, Any]) -> None:
        t = self._t
        self.wait()
        best = t.best_row()  # early stopping's best epoch: its checkpoint holds the model
        protect = None if best is None else int(best["step"])
        if t.device.type != "cuda":
            save_checkpoint(t.out, t.model, t.spec, state, step=t.global_step, epoch=t.epoch,
                            protect=protect)
            return
        weights = weights_bytes(t.model, t.spec)
        state = _cpu_copy(state)  # the live tensors change with the next step
        self._pool = self._pool or ThreadPoolExecutor(1, "vaelab-checkpoint")
        self._pending = self._pool.submit(save_checkpoint, t.out, weights, t.spec, state,
                                          step=t.global_step, epoch=t.epoch, protect=protect)

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def resume(t: Trainer) -> None:
    """Continue the run in ``t.out`` from its latest good checkpoint (an older one where the
    latest is refused, from the first step where none is left), record the options the resume
    changed, and rewrite the metrics file to the checkpoint's rows."""
    if t.rank == 0:
        remove_stale_temporaries(t.out)
    barrier(t.world_size)
    ckpt, refused = latest_checkpoint(t.out, t.spec)
    for message in refused:
        t.log(f"refused checkpoint: {message}; falling back to an older one")
    if ckpt is not None:
        restore(t, ckpt)
    elif refused:
        t.log("no good checkpoint left: starting the run again from scratch")
    else:
        t.log(f"{t.out} holds no checkpoint: the run starts from its first step")
    _record_resume(t)
    if t.rank == 0:
        write_metrics(t.out, t.metrics)
    if ckpt is not None:
        t.log(f"resumed from {ckpt.path.name} (epoch {t.epoch + 1}, step {t.global_step})")


def _record_resume(t: Trainer) -> None:
    """Record the options a resume changed in config.json; a finished run given more epochs
    is unfinished again: its final weights and summary go until its new last epoch ends."""
    changes = t.resume_changes
    if not changes or t.rank != 0 or t.saved_raw is None:
        return
    record_resume(t.out, t.saved_raw, t.config, changes)
    if "epochs" in changes and t.epoch < t.config.epochs:
        gone = [n for n in FINAL_FILES if (t.out / n).exists()]
        for name in gone:
            (t.out / name).unlink()
        if gone:
            t.log(f"training {t.out} on from {changes['epochs'][0]} to {t.config.epochs} "
                  f"epochs: {', '.join(gone)} are written again when it ends")
