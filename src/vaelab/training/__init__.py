"""Training: ``train(config, out)`` runs a whole training into a run folder and returns its
final metrics; ``Trainer`` is the same, one piece at a time.

One job per file:

- ``loop``: ``Trainer`` (the epochs, interruptions, the end of a run) and ``train``;
- ``step``: one optimisation step, eager or a replayed CUDA graph, one maths path;
- ``state``: what a checkpoint holds and how a resume restores it; the background writer;
- ``run_dir``: the run folder (when it may be used or replaced, config.json, metrics.jsonl);
- ``optim``: Adam, weight decay and the learning-rate schedules;
- ``hardware``: the device and the precision (bf16 where it is measured to pay);
- ``distributed``: torchrun's process group and collectives;
- ``logs``: the progress bar, the per-epoch line, TensorBoard;
- ``concurrent``: several runs side by side on one GPU.
"""

from vaelab.training.concurrent import train_concurrently
from vaelab.training.distributed import dist_env
from vaelab.training.hardware import (
    cpu_bf16_hardware,
    pick_device,
    pick_precision,
    precision_reason,
    resolve_precision,
)
from vaelab.training.loop import (
    BINARIZE_STREAM,
    REFRESH_STEPS,
    Interrupted,
    Trainer,
    TrainResult,
    train,
)
from vaelab.training.optim import decay_groups, learning_rate, make_adam, set_learning_rate
from vaelab.training.run_dir import (
    FINAL_FILES,
    check_run_dir,
    prepare_run_dir,
    resume_command,
    resumed_config,
    saved_nothing,
    versions,
    write_metrics,
)
from vaelab.training.step import WARMUP_STEPS, TrainingStep

__all__ = [
    "BINARIZE_STREAM", "FINAL_FILES", "REFRESH_STEPS", "WARMUP_STEPS", "Interrupted",
    "TrainResult", "Trainer", "TrainingStep", "check_run_dir", "cpu_bf16_hardware",
    "decay_groups", "dist_env", "learning_rate", "make_adam", "pick_device", "pick_precision",
    "precision_reason", "prepare_run_dir", "resolve_precision", "resume_command",
    "resumed_config", "saved_nothing", "set_learning_rate", "train", "train_concurrently",
    "versions", "write_metrics",
]
