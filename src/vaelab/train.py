"""The training loop: on-device batches, beta annealing, metrics, checkpoints and exact resume.

``train(config, out)`` runs a whole training and returns the final test metrics. Everything a
resume needs (weights, optimiser, beta schedule, RNG states, epoch, step within the epoch, the
epoch's running sums and all metrics so far) is in every checkpoint, so a run killed at any
moment and resumed ends with the same weights and metrics as one never interrupted (on the
same device, with the same thread count and torch version; on CUDA within float tolerance).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab import __version__
from vaelab.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    read_config,
    save_checkpoint,
    save_final,
    weights_bytes,
)
from vaelab.config import TrainConfig, check_fits, resume_config
from vaelab.data import (
    Batcher,
    Dataset,
    binarize_dataset,
    binarized_record,
    check_binarized,
    load_dataset,
)
from vaelab.errors import CheckpointError, ConfigError, NumericalError, VaelabError
from vaelab.evaluate import evaluate_elbo
from vaelab.io import atomic_write_json, atomic_write_text
from vaelab.locks import FolderLock, is_lock_file
from vaelab.models import ConvVAE, ModelSpec, build_model
from vaelab.objectives import (
    BetaSchedule,
    elbo_terms,
    iwae_log_weights,
    iwae_loss,
    make_beta_schedule,
    training_loss,
)
from vaelab.precision import MIN_GAIN, MIN_MFLOP, bf16_speedup, forward_mflops

REFRESH_STEPS = 25  # read the device-side sums this often (progress bar, NaN check)
# the binarizing generator's seed is the run's seed plus this (plus 7919 per rank), mod 2^64:
# far from the seeds of the noise generator (seed + 1) and the epochs' permutations (seed + e)
BINARIZE_STREAM = 0x9E3779B97F4A7C15
WARMUP_STEPS = 3  # eager full-batch steps on CUDA before the training step is captured


class Interrupted(VaelabError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``resume_command`` continues the run."""

    def __init__(self, message: str, resume_command: str, signum: int) -> None:
        super().__init__(message)
        self.resume_command = resume_command
        self.signum = signum


@dataclass
class TrainResult:
    run_dir: Path
    model: ConvVAE
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a device, else the CPU. On CUDA, fp32 is made IEEE fp32
    (see ``ieee_fp32_on_cuda``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    if name == "cuda":
        ieee_fp32_on_cuda()
    return torch.device(name)


def ieee_fp32_on_cuda() -> None:
    """Turn TF32 off for cuDNN convolutions and matrix products (PyTorch leaves it on for
    convolutions): vaelab's fp32 training and every evaluation are then fp32 as on the CPU,
    and bf16 is asked for by name (``--precision``)."""
    # the long-standing flags: torch refuses to read them back once its newer per-operator
    # settings (fp32_precision) have been mixed in, so vaelab sets only these
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def cpu_bf16_hardware() -> str | None:
    """The instructions that compute bf16 natively on this CPU, as torch's oneDNN sees them:
    ``"AMX"`` (Intel Sapphire Rapids and later), ``"AVX512-BF16"`` (Cooper Lake, AMD Zen 4 and
    later), or None (AVX2-only CPUs, where bf16 is emulated and slower than fp32)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def resolve_precision(name: str, device: torch.device, spec: ModelSpec | None = None,
                      batch_size: int = 128) -> tuple[str, str]:
    """The precision a run of network ``spec`` (default: vaelab's default network) at
    ``batch_size`` trains in, and why, in a few words. ``auto``: on CUDA, bf16 where the GPU
    computes it; on a CPU with bf16 instructions (``cpu_bf16_hardware``) and a network of at
    least ``MIN_MFLOP`` per image, bf16 where it trains this network at least ``MIN_GAIN``
    times as fast as fp32, as measured here (``vaelab.precision``); fp32 elsewhere. The
    loss, the KL and every evaluation stay fp32 either way."""
    if name != "auto":
        return name, "asked for by name"
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ("bf16" if bf16 else "fp32"), "auto: CUDA " + ("computes" if bf16 else "lacks") \
            + " bf16"
    isa = cpu_bf16_hardware() if device.type == "cpu" else None
    if not isa:
        return "fp32", "auto: this CPU has no bf16 instructions"
    spec = spec or TrainConfig().model_spec()
    mflop = forward_mflops(spec)
    if mflop < MIN_MFLOP:
        return "fp32", (f"auto: this CPU has {isa}, but this network is too small for bf16 "
                        f"to pay ({mflop:.1f} < {MIN_MFLOP:g} MFLOP per image)")
    gain = bf16_speedup(spec, batch_size)
    chosen = "bf16" if gain >= MIN_GAIN else "fp32"
    return chosen, (f"auto: this CPU has {isa}; bf16 measured {gain:.2f}x as fast as fp32 "
                    f"for this network ({'>=' if chosen == 'bf16' else '<'} {MIN_GAIN:g}x)")


def pick_precision(name: str, device: torch.device, spec: ModelSpec | None = None,
                   batch_size: int = 128) -> str:
    """The precision of ``resolve_precision``."""
    return resolve_precision(name, device, spec, batch_size)[0]


def precision_reason(name: str, device: torch.device, spec: ModelSpec | None = None,
                     batch_size: int = 128) -> str:
    """Why ``pick_precision`` chose what it did, in a few words."""
    return resolve_precision(name, device, spec, batch_size)[1]


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


def _cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor in it copied to the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def versions() -> dict[str, str]:
    import matplotlib
    import safetensors

    return {
        "vaelab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "safetensors": safetensors.__version__,
        "matplotlib": matplotlib.__version__, "platform": platform.platform(),
    }


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def resume_command(out: Path) -> str:
    """The command that continues the run in ``out``, quoted for a POSIX shell."""
    return f"vaelab train --resume --out {shlex.quote(str(out))}"


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------
# what a run that saved nothing holds: its config, an empty metrics file, folders without
# a checkpoint (a write's temporaries at most), TensorBoard events
_NOTHING_SAVED = ("config.json", "metrics.jsonl", "checkpoints", "tensorboard")
FINAL_FILES = ("model.safetensors", "model.json", "summary.json")


def saved_nothing(out: Path) -> bool:
    """True when ``out`` holds a run that kept nothing to resume or use: no checkpoint, no
    final weights, no metrics row (a NaN at the first step, a kill before the first
    checkpoint). A plain re-run starts such a run over, without ``--force``."""
    if not (out / "config.json").is_file() or list_checkpoints(out):
        return False
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return False
    for child in out.iterdir():
        if is_lock_file(child) or child.name.startswith("."):
            continue  # the lock, and a killed write's temporaries
        if child.name not in _NOTHING_SAVED:
            return False
        if child.name == "checkpoints" and not child.is_dir():
            return False
    try:  # a config.json that is not vaelab's is someone's file: never replaced unasked
        read_config(out)
    except CheckpointError:
        return False
    return True


def check_run_dir(out: Path, *, force: bool) -> bool:
    """Refuse an output folder that holds something, unless ``force`` and it is a run folder,
    or it holds a run that saved nothing (``saved_nothing``).

    Writes nothing; True when the folder holds a run that is to be replaced.
    """
    if not (out.exists() and any(not is_lock_file(p) for p in out.iterdir())):
        return False
    if saved_nothing(out):
        return True
    is_run = (out / "config.json").exists() or (out / "checkpoints").exists()
    if not force:
        what = "a run" if is_run else "other files"
        raise ConfigError(
            f"output folder {out} already holds {what}: use --resume to continue it "
            "or --force to replace it"
        )
    if not is_run:
        raise ConfigError(f"--force replaces only run folders; {out} holds other files")
    return True


def resumed_config(
    out: Path, config: TrainConfig | None, changes: dict[str, Any] | None,
) -> tuple[dict[str, Any], TrainConfig, TrainConfig]:
    """The run's config.json (as read), its saved config, and the config its resume
    continues with: the saved
    one, changed only where ``changes`` (options given on resume) and the fields in which
    ``config`` differs from it are safe to change (``config.resume_config``)."""
    if not (out / "config.json").exists():
        raise CheckpointError(f"cannot resume: {out} holds no run (no config.json)")
    try:
        raw, saved = read_config(out)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from None
    wanted = dict(changes or {})
    if config is not None:
        wanted.update({k: v for k, v in config.to_dict().items()
                       if v != saved.to_dict()[k]})
    return raw, saved, resume_config(saved, wanted, run=str(out))


def prepare_run_dir(out: Path, config: TrainConfig, *, resume: bool, force: bool,
                    data: dict[str, Any] | None = None,
                    resolved: dict[str, Any] | None = None) -> TrainConfig:
    """Create or reopen the run folder; on resume the saved config is the one used. ``data``
    (``data.binarized_record``) goes into config.json as ``data``, and ``resolved`` (what
    ``auto`` became on this machine: device, precision and why) as ``resolved``."""
    cfg_path = out / "config.json"
    if resume:
        return resumed_config(out, None, None)[2]
    if check_run_dir(out, force=force):  # the old run goes; the lock held on out stays
        for child in out.iterdir():
            if not is_lock_file(child):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() \
                    else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, {
        "config": config.to_dict(), "model": config.model_spec().to_dict(),
        "versions": versions(), "seed": config.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv), **({"data": data} if data is not None else {}),
        **({"resolved": resolved} if resolved is not None else {}),
    })
    return config


def write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Owns the model, optimiser, schedules and RNG of one run; ``fit()`` runs it to the end."""

    def __init__(
        self,
        config: TrainConfig | None,
        out: str | os.PathLike,
        *,
        resume: bool = False,
        force: bool = False,
        progress: bool = True,
        dataset: Dataset | None = None,
        detect_anomaly: bool = False,
        tensorboard: bool = False,
        log: Callable[[str], None] | None = None,
        changes: dict[str, Any] | None = None,
    ) -> None:
        """``resume``: continue the run in ``out`` with its saved config. ``config`` may then
        be None; a field in which it differs from the saved config, and each of ``changes``
        (field: value, None for no change), must be one a resume may change
        (``config.RESUME_SAFE``, or ``epochs`` where the schedules allow), else ConfigError
        listing them all. ``force`` replaces a run in ``out`` (not with ``resume``)."""
        self.out = Path(out)
        if resume and force:
            raise ConfigError("--resume continues the run in --out and --force replaces it: "
                              "give one or the other")
        if config is None and not resume:
            raise ConfigError("a new run needs a config (only a resume reads the saved one)")
        if config is not None:
            config.validate()
        self.rank, self.world_size, local_rank = dist_env()
        # one writer per run folder: a second process is refused here (FolderInUse), and a
        # start refused below leaves no folder it created behind
        self._folder_lock = FolderLock(self.out).acquire() if self.rank == 0 else None
        try:
            self._setup(config, resume=resume, force=force, progress=progress,
                        dataset=dataset, detect_anomaly=detect_anomaly,
                        tensorboard=tensorboard, log=log, local_rank=local_rank,
                        changes=changes)
        except BaseException:
            self.close()
            raise
        if self._folder_lock is not None:
            self._folder_lock.keep()

    def close(self) -> None:
        """Let go of the run folder's lock (``fit`` does this when it ends)."""
        if getattr(self, "_folder_lock", None) is not None:
            self._folder_lock.release()

    def _setup(
        self, config: TrainConfig | None, *, resume: bool, force: bool, progress: bool,
        dataset: Dataset | None, detect_anomaly: bool, tensorboard: bool,
        log: Callable[[str], None] | None, local_rank: int, changes: dict[str, Any] | None,
    ) -> None:
        self.progress = progress and self.rank == 0
        self.detect_anomaly = detect_anomaly
        self.log = log if (log is not None and self.rank == 0) else (lambda s: None)
        # Everything that can refuse the run (folder, options, device, data) is checked before
        # anything is written: a bad input leaves the output folder as it was.
        self._saved_raw: dict[str, Any] | None = None
        self._resume_changes: dict[str, tuple[Any, Any]] = {}
        if resume:
            self._saved_raw, saved, cfg = resumed_config(self.out, config, changes)
            before = saved.to_dict()
            self._resume_changes = {k: (before[k], v) for k, v in cfg.to_dict().items()
                                    if before[k] != v}
        else:
            assert config is not None
            cfg = config
            if saved_nothing(self.out):
                self.log(f"{self.out} holds a run that saved nothing (no checkpoint, no "
                         "weights, no finished epoch): starting it over")
            if self.rank == 0:  # the one writer checks (and under torchrun its refusal
                check_run_dir(self.out, force=force)  # stops every rank)
        self.config = cfg
        self.distributed = self.world_size > 1
        if self.distributed:
            self._init_distributed(cfg)
        self.device = pick_device(cfg.device)
        if self.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        if self.device.type == "cuda":  # the machine's memory was checked by validate()
            props = torch.cuda.get_device_properties(self.device)
            check_fits(cfg, props.total_memory, where=props.name)
        self.precision, why = self._precision(cfg)
        # one CUDA graph replays the whole training step (forward, backward, Adam, the sums):
        # the step is ~100 small kernels, whose launches cost more than their arithmetic
        self.use_graphs = (self.device.type == "cuda" and cfg.cuda_graphs
                           and not self.distributed and not detect_anomaly)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
        torch.manual_seed(cfg.seed)

        self.data = dataset or load_dataset(cfg.dataset, val_size=cfg.val_size, limit=cfg.limit)
        if cfg.binarize == "dynamic":  # val and test once, pinned; training per batch below
            self.data = binarize_dataset(self.data)
            if self._saved_raw is not None:
                check_binarized(self.data, self._saved_raw.get("data"), str(self.out))
        # under torchrun each rank takes its shard of every epoch; the global batch stays
        # batch_size, so each step sees the single-process run's images (but each rank draws
        # its own z, and free bits clamp per rank: README, "Scaling out")
        self.batcher = Batcher(self.data.train, cfg.batch_size // self.world_size,
                               device=self.device, seed=cfg.seed, rank=self.rank,
                               world_size=self.world_size)
        self.steps_per_epoch = len(self.batcher)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.spec = cfg.model_spec()
        self.model = build_model(self.spec)
        mean = float(self.data.train.images.float().mean() / 255) if len(self.data.train) else 0.5
        self.model.decoder.set_output_bias(mean)
        # channels-last convolutions and a fused Adam step: measured faster on this CPU (see
        # BENCHMARKS.md) and the usual fast path on CUDA; the maths is unchanged
        self.model.to(self.device, memory_format=torch.channels_last)
        self.net: torch.nn.Module = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        try:
            self.optimizer = make_adam(decay_groups(self.model, cfg.weight_decay), cfg.lr,
                                       capturable=self.use_graphs)
        except (RuntimeError, TypeError, ValueError):  # a torch without tensor-lr fused Adam
            self.use_graphs = False
            self.optimizer = make_adam(decay_groups(self.model, cfg.weight_decay), cfg.lr)
        self._graph: Any = None  # torch.cuda.CUDAGraph, captured after WARMUP_STEPS eager steps
        self._graph_inputs: tuple[torch.Tensor, ...] = ()
        self._eager_full_steps = 0
        self._writer: Any = None  # a one-thread executor writing checkpoints (CUDA)
        self._pending_write: Any = None
        self.schedule: BetaSchedule = make_beta_schedule(
            cfg.beta_schedule, steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=cfg.warmup_epochs, beta=cfg.beta, cycles=cfg.cycles,
            total_epochs=cfg.epochs,
        )
        self.noise = torch.Generator(device=self.device).manual_seed(
            cfg.seed + 1 + 7919 * self.rank)
        # --binarize dynamic: each batch's pixels drawn afresh, x ~ Bernoulli(intensity)
        self.binarizer = torch.Generator(device=self.device).manual_seed(
            self._binarize_seed()) if cfg.binarize == "dynamic" else None
        self.epoch = 0  # the epoch in progress (0-based)
        self.step_in_epoch = 0
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        self.sums = self._zero_sums()
        # the index of the step in flight, on the device (a captured graph cannot read self.step)
        self._step_dev = torch.zeros((), device=self.device, dtype=torch.int64)
        self.epoch_seconds = 0.0
        self._stop_signal: int | None = None
        if not resume and self.rank == 0:
            prepare_run_dir(self.out, cfg, resume=False, force=force,
                            data=binarized_record(self.data),
                            resolved={"device": str(self.device), "precision": self.precision,
                                      "precision_reason": why})
        self._barrier()
        if resume:
            self._restore()
        self.log(f"precision: {self.precision} ({why})")
        self.tb = self._tensorboard() if tensorboard and self.rank == 0 else None

    def _precision(self, cfg: TrainConfig) -> tuple[str, str]:
        """The precision this run trains in, and why. A resumed run keeps the one it began
        with (config.json's ``resolved``; runs from before that record resolved ``auto`` to
        fp32 on a CPU), so it ends as it would have uninterrupted, on any machine."""
        if self._saved_raw is not None and cfg.precision == "auto":
            saved = self._saved_raw.get("resolved")
            if isinstance(saved, dict) and saved.get("precision") in ("fp32", "bf16"):
                return saved["precision"], "kept from the run's start"
            if self.device.type == "cpu":
                return "fp32", "kept from the run's start (auto was fp32 on every CPU then)"
        batch = max(1, cfg.batch_size // self.world_size)
        if not (self.distributed and self.device.type == "cpu"):
            return resolve_precision(cfg.precision, self.device, cfg.model_spec(), batch)
        import torch.distributed as dist

        # a timed choice could differ between ranks: every rank takes rank 0's
        pick = [resolve_precision(cfg.precision, self.device, cfg.model_spec(), batch)
                if self.rank == 0 else None]
        dist.broadcast_object_list(pick, src=0)
        return pick[0]

    # ---- state --------------------------------------------------------------------------
    def _reset_sums(self) -> None:
        """Zero the epoch's running sums in place (a captured graph holds their addresses)."""
        for k, v in self._zero_sums().items():
            self.sums[k].copy_(v)

    def _zero_sums(self) -> dict[str, torch.Tensor]:
        d = self.config.latent_dim
        return {
            "terms": torch.zeros(4, device=self.device, dtype=torch.float64),
            "kl_dim": torch.zeros(d, device=self.device, dtype=torch.float64),
            "count": torch.zeros((), device=self.device, dtype=torch.float64),
            "bad_step": torch.full((), -1, device=self.device, dtype=torch.int64),
        }

    # ---- distributed (torchrun) -----------------------------------------------------------
    def _init_distributed(self, config: TrainConfig) -> None:
        import torch.distributed as dist

        if config.batch_size % self.world_size:
            raise ConfigError(f"batch size {config.batch_size} does not split evenly over "
                              f"{self.world_size} processes")
        if not dist.is_initialized():
            use_nccl = config.device != "cpu" and torch.cuda.is_available()
            dist.init_process_group("nccl" if use_nccl else "gloo")
            self._owns_process_group = True

    def _barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _global_sums(self) -> dict[str, torch.Tensor]:
        """The epoch's running sums over all ranks (a collective call under torchrun)."""
        if not self.distributed:
            return self.sums
        import torch.distributed as dist

        out = {k: v.clone() for k, v in self.sums.items()}
        for k in ("terms", "kl_dim", "count"):
            dist.all_reduce(out[k])
        dist.all_reduce(out["bad_step"], op=dist.ReduceOp.MAX)
        return out

    def _binarize_seed(self, step: int = 0) -> int:
        return (self.config.seed + BINARIZE_STREAM + 7919 * self.rank + step) % 2**64

    def _noise_states(self, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        state = (generator or self.noise).get_state().cpu()
        if not self.distributed:
            return [state]
        import torch.distributed as dist

        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def _should_stop(self) -> bool:
        if not self.distributed:
            return self._stop_signal is not None
        if self.step_in_epoch % REFRESH_STEPS:
            return False
        import torch.distributed as dist

        flag = torch.tensor([self._stop_signal or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) and self._stop_signal is None:
            self._stop_signal = int(flag)
        return bool(int(flag))

    # ---- state --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a resume needs. Under torchrun the sums are the global ones (restored on
        rank 0 only, since they add up) and every rank's noise generator state is kept."""
        noise = self._noise_states()
        binarize = self._noise_states(self.binarizer) if self.binarizer is not None else None
        optimizer = self.optimizer.state_dict()
        for group in optimizer["param_groups"]:  # saved device-neutral: a plain lr, not capturable
            group["lr"] = float(group["lr"])
            group["capturable"] = False
        return {
            "optimizer": optimizer,
            "schedule": self.schedule.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "noise": noise[0], "noise_per_rank": noise,
                    **({"binarize_per_rank": binarize} if binarize is not None else {})},
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step,
            "world_size": self.world_size,
            "sums": {k: v.cpu() for k, v in self._global_sums().items()},
            "epoch_seconds": self.epoch_seconds,
            "metrics": json.dumps(self.metrics),
        }

    def checkpoint(self) -> Path:
        """Save a checkpoint of this moment. On CUDA a snapshot is taken here and written by a
        background thread while training goes on (a write took 170 ms there, against
        0.42 s for an epoch's steps on an H100); the next checkpoint, the end, an
        interruption or an error waits for it."""
        state = self.state()  # collective under torchrun: every rank takes part
        path = self.out / "checkpoints" / f"step-{self.step:08d}"
        if self.rank == 0:
            self.wait_for_writes()
            if self.device.type == "cuda":
                from concurrent.futures import ThreadPoolExecutor

                weights = weights_bytes(self.model, self.spec)
                state = _cpu_copy(state)  # the live tensors change with the next step
                self._writer = self._writer or ThreadPoolExecutor(1, "vaelab-checkpoint")
                self._pending_write = self._writer.submit(
                    save_checkpoint, self.out, weights, self.spec, state,
                    step=self.step, epoch=self.epoch)
            else:
                path = save_checkpoint(self.out, self.model, self.spec, state,
                                       step=self.step, epoch=self.epoch)
        self._barrier()
        return path

    def wait_for_writes(self) -> None:
        """Block until a checkpoint being written in the background is on disk; raise its
        error, if it failed."""
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            pending.result()

    def _restore(self) -> None:
        # a kill in the middle of a write leaves its temporary behind: never read, now removed
        if self.rank == 0:
            for stale in (self.out / "checkpoints").glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.out.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        self._barrier()
        ckpt, refused = latest_checkpoint(self.out, self.spec)
        for message in refused:
            self.log(f"refused checkpoint: {message}; falling back to an older one")
        if ckpt is None:
            if refused:
                self.log("no good checkpoint left: starting the run again from scratch")
            else:
                self.log(f"{self.out} holds no checkpoint: the run starts from its first step")
            self._save_resume_changes()
            self._reset_metrics_file()
            return
        load_weights(self.model, ckpt.weights, ckpt.path)
        s = ckpt.state
        try:
            self.optimizer.load_state_dict(s["optimizer"])
            if self.use_graphs:
                for group in self.optimizer.param_groups:
                    group["capturable"] = True
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32,
                                               device=self.device)
            self.schedule.load_state_dict(s["schedule"])
            torch.set_rng_state(s["rng"]["torch"])
            per_rank = s["rng"].get("noise_per_rank") or [s["rng"]["noise"]]
            if len(per_rank) == self.world_size:
                self.noise.set_state(per_rank[self.rank].to(self.noise.get_state().device))
            else:
                self.log(f"the checkpoint was written by {len(per_rank)} process(es), this run "
                         f"has {self.world_size}: the noise generators are reseeded")
                self.noise.manual_seed(self.config.seed + 1 + 7919 * self.rank + s["step"])
            if self.binarizer is not None:
                states = s["rng"]["binarize_per_rank"]
                if len(states) == self.world_size:
                    self.binarizer.set_state(
                        states[self.rank].to(self.binarizer.get_state().device))
                else:  # logged with the noise generators above
                    self.binarizer.manual_seed(self._binarize_seed(s["step"]))
            self.epoch, self.step_in_epoch, self.step = s["epoch"], s["step_in_epoch"], s["step"]
            for k, v in s["sums"].items():
                # the saved sums are global: under torchrun one rank carries them
                keep = self.rank == 0 or k == "bad_step"
                self.sums[k].copy_(v if keep else torch.zeros_like(v))
            self.epoch_seconds = float(s["epoch_seconds"])
            self.metrics = json.loads(s["metrics"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{ckpt.path}: state.pt lacks what a resume needs ({e})"
            ) from None
        epochs = self.config.epochs
        if self.epoch > epochs or (self.epoch == epochs and self.step_in_epoch > 0):
            done = f"{self.epoch} epochs" + (f" and {self.step_in_epoch} steps of the next"
                                             if self.step_in_epoch else "")
            raise ConfigError(f"--epochs {epochs}: {self.out} has already trained {done}; a "
                              "resume cannot take steps back")
        self._save_resume_changes()
        if self.rank == 0:
            write_metrics(self.out, self.metrics)
        self.log(f"resumed from {ckpt.path.name} (epoch {self.epoch + 1}, step {self.step})")

    def _save_resume_changes(self) -> None:
        """Record the options a resume changed in config.json (``resumes``: when, what), so a
        later plain ``--resume`` continues with them; a finished run given more epochs is
        unfinished again: its final weights and summary go until its new last epoch ends."""
        if not self._resume_changes or self.rank != 0 or self._saved_raw is None:
            return
        raw = dict(self._saved_raw)
        raw["config"] = self.config.to_dict()
        earlier = raw.get("resumes")
        raw["resumes"] = [*(earlier if isinstance(earlier, list) else []), {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
            "changed": {k: {"from": old, "to": new}
                        for k, (old, new) in self._resume_changes.items()}}]
        atomic_write_json(self.out / "config.json", raw)
        if "epochs" in self._resume_changes and self.epoch < self.config.epochs:
            gone = [n for n in FINAL_FILES if (self.out / n).exists()]
            for name in gone:
                (self.out / name).unlink()
            if gone:
                old = self._resume_changes["epochs"][0]
                self.log(f"training {self.out} on from {old} to {self.config.epochs} epochs: "
                         f"{', '.join(gone)} are written again when it ends")

    def _reset_metrics_file(self) -> None:
        if self.rank == 0:
            write_metrics(self.out, [])

    # ---- signals ------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _install_signal_handlers(self) -> dict[int, Any]:
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        return old

    # ---- the loop -----------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        if self.config.lr_schedule == "cosine":
            return self.config.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.total_steps))
        return self.config.lr

    def _set_lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimisation step on batch ``(x, y)``; its terms are added to the epoch's sums.

        On CUDA a full batch replays a captured graph of ``_step_body`` (after WARMUP_STEPS
        eager ones); the noise is drawn outside it from the run's generator, so both paths
        consume the same random numbers and resume the same way.
        """
        self._set_lr(self.lr_at(self.step))
        if self.binarizer is not None:
            x = torch.bernoulli(x, generator=self.binarizer)
        cfg = self.config
        shape = (x.shape[0], cfg.latent_dim)
        eps = torch.randn((cfg.k, *shape) if cfg.objective == "iwae" else shape,
                          generator=self.noise, device=self.device, dtype=torch.float32)
        beta = self.schedule.beta
        if self.use_graphs and x.shape[0] == self.batcher.batch_size:
            self._graphed_step(x, y, eps, beta)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._step_body(x, y, eps, beta)
        self.schedule.step()
        self.step += 1
        self.step_in_epoch += 1

    def _step_body(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                   beta: float | torch.Tensor) -> None:
        """Forward, loss, backward, Adam and the running sums: device work only, in place."""
        cfg = self.config
        # autocast's weight cache must stay off under graph capture (and buys nothing here)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.precision == "bf16", cache_enabled=False)
        with autocast:
            out = self.net(x, y if self.model.conditional else None, eps=eps)
        mu, logvar, logits = out.mu.float(), out.logvar.float(), out.logits.float()
        if cfg.objective == "iwae":  # the metrics' ELBO terms from the first of the K samples
            terms = elbo_terms(x, mu, logvar, logits[0], cfg.likelihood)
            loss = iwae_loss(iwae_log_weights(x, out.z.float(), mu, logvar, logits,
                                              cfg.likelihood, beta))
        else:
            terms = elbo_terms(x, mu, logvar, logits, cfg.likelihood)
            loss = training_loss(terms, beta, cfg.free_bits)
        try:
            loss.backward()
        except RuntimeError as e:  # anomaly mode: "Function 'X' returned nan values ..."
            if not (self.detect_anomaly and "returned nan values" in str(e)):
                raise
            raise self._numerical_error(self.step, f"autograd anomaly mode: {e}") from None
        self.optimizer.step()
        b = x.shape[0]
        with torch.no_grad():
            s = self.sums
            s["terms"] += torch.stack([terms.recon.sum(), terms.kl.sum(), terms.neg_elbo.sum(),
                                       loss * b]).double()
            s["kl_dim"] += terms.kl_per_dim.sum(0).double()
            s["count"] += b
            first_bad = ~torch.isfinite(loss) & (s["bad_step"] < 0)
            s["bad_step"].copy_(torch.where(first_bad, self._step_dev, s["bad_step"]))
            self._step_dev += 1

    def prime_graph(self) -> None:
        """Take this run's next steps here, until its training step is captured as a CUDA
        graph; a run whose epoch would end first trains on eagerly. After this no capture is
        left to happen while other runs train beside it (``train_concurrently``)."""
        if self.use_graphs and self._graph is None and self.epoch < self.config.epochs:
            self._step_dev.fill_(self.step)
            batches = self.batcher.epoch(self.epoch)
            for x, y in islice(batches, self.step_in_epoch, self.steps_per_epoch - 1):
                self.train_step(x, y)
                if self._graph is not None:
                    break
        if self._graph is None:
            self.use_graphs = False

    def _graphed_step(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                      beta: float) -> None:
        dev = self.device
        if self._graph is None and self._eager_full_steps < WARMUP_STEPS:
            # real steps, run eagerly on a side stream: cuDNN, cuBLAS and Adam's state are set
            # up before capture, as torch.cuda.graph asks
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                self._step_body(x, y, eps, beta)
            torch.cuda.current_stream(dev).wait_stream(side)
            self._eager_full_steps += 1
            return
        if self._graph is None:
            self._graph_inputs = (x.clone(), y.clone(), eps.clone(),
                                  torch.zeros((), device=dev, dtype=torch.float32))
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates .grad in the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(dev)):
                self._step_body(*self._graph_inputs)
            self._graph = graph  # capture runs nothing: the replay below does this step
        sx, sy, seps, sbeta = self._graph_inputs
        sx.copy_(x)
        sy.copy_(y)
        seps.copy_(eps)
        sbeta.fill_(beta)
        self._graph.replay()

    def _check_finite(self) -> None:
        bad = int(self._global_sums()["bad_step"] if self.distributed else self.sums["bad_step"])
        if bad >= 0:
            raise self._numerical_error(bad)

    def _numerical_error(self, step: int, detail: str = "") -> NumericalError:
        detail = (detail.strip().splitlines() or [""])[0].rstrip(".")
        return NumericalError(
            f"the loss became NaN/Inf at epoch {self.epoch + 1}, step {step}"
            + (f" ({detail})" if detail else "")
            + (f"; the last good checkpoint is kept in {self.out / 'checkpoints'}"
               if list_checkpoints(self.out) else
               "; no checkpoint had been saved, so nothing of the run is kept to resume")
            + ". Usual causes: "
            "a learning rate too high, corrupted input data, or log-variance overflow; try a "
            + ("lower --lr" if detail else "lower --lr, or --detect-anomaly to find the operation")
        )

    def _epoch_metrics(self) -> dict[str, Any]:
        cfg = self.config
        s = self._global_sums()
        n = max(float(s["count"]), 1.0)
        recon, kl, nelbo, loss = (s["terms"] / n).tolist()
        row: dict[str, Any] = {
            "epoch": self.epoch + 1, "step": self.step,
            "beta": self.schedule.value(self.step - 1), "lr": self.lr_at(self.step - 1),
            "train_recon": recon, "train_kl": kl, "train_neg_elbo": nelbo, "train_loss": loss,
            "train_kl_per_dim": (s["kl_dim"] / n).tolist(),
        }
        for name, split in (("val", self.data.val), ("test", self.data.test)):
            if len(split) == 0:
                continue
            ev = evaluate_elbo(self.model, split, likelihood=cfg.likelihood,
                               batch_size=cfg.eval_batch_size, seed=cfg.seed)
            row.update({f"{name}_recon": ev["recon"], f"{name}_kl": ev["kl"],
                        f"{name}_neg_elbo": ev["neg_elbo"], f"{name}_kl_per_dim": ev["kl_per_dim"]})
        self.model.train()
        row["seconds"] = self.epoch_seconds
        row["images_per_s"] = n / max(self.epoch_seconds, 1e-9)
        return row

    def fit(self) -> TrainResult:
        """Train to the last epoch (or the next interruption); the folder's lock is let go
        however it ends."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        cfg = self.config
        old_handlers = self._install_signal_handlers()
        self.model.train()
        try:
            with torch.autograd.set_detect_anomaly(self.detect_anomaly), self._bar() as bar:
                task = bar.add_task("train", total=self.total_steps, completed=self.step,
                                    status="") if bar else None
                while self.epoch < cfg.epochs:
                    self._run_epoch(bar, task)
            self.wait_for_writes()
        except BaseException:
            # the error in flight is the one to report; a checkpoint still being written is
            # let finish (its own failure, if any, leaves the previous checkpoints in place)
            try:
                self.wait_for_writes()
            except Exception:  # noqa: BLE001
                pass
            raise
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if self.tb is not None:
                self.tb.close()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
        try:
            return self._finish()
        finally:
            self._leave_process_group()

    def _leave_process_group(self) -> None:
        """Destroy the process group this trainer made. The DDP wrapper holds the group, so it
        is freed first: freed after the group (when the trainer goes), it can abort the process
        (see ``vaelab/__main__.py``)."""
        if not getattr(self, "_owns_process_group", False):
            return
        import gc

        import torch.distributed as dist

        self._owns_process_group = False
        self.net = self.model
        gc.collect()
        dist.destroy_process_group()

    def _run_epoch(self, bar: Any, task: Any) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        self._step_dev.fill_(self.step)
        batches = islice(self.batcher.epoch(self.epoch), self.step_in_epoch, None)
        for x, y in batches:
            self.train_step(x, y)
            if self.step_in_epoch % REFRESH_STEPS == 0:
                self._check_finite()
                if bar is not None:
                    n = max(float(self.sums["count"]), 1.0)
                    r, k = (self.sums["terms"][:2] / n).tolist()
                    bar.update(task, completed=self.step, status=(
                        f"epoch {self.epoch + 1}/{cfg.epochs}  recon {r:6.2f}  KL {k:5.2f}  "
                        f"beta {self.schedule.beta:.2f}"))
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                self._check_finite()
                self.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.checkpoint()
            if self._should_stop():
                self._interrupt(t0)
        self._check_finite()
        self.epoch_seconds += time.perf_counter() - t0
        row = self._epoch_metrics()
        self.metrics.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        self._reset_sums()
        self.epoch_seconds = 0.0
        if self.rank == 0:
            write_metrics(self.out, self.metrics)
        self.checkpoint()
        self._tensorboard_epoch(row)
        self.log(
            f"epoch {row['epoch']:>3}/{cfg.epochs}  train -ELBO {row['train_neg_elbo']:7.2f}  "
            + (f"test recon {row['test_recon']:7.2f}  KL {row['test_kl']:5.2f}  "
               f"-ELBO {row['test_neg_elbo']:7.2f}  " if "test_recon" in row else "")
            + f"beta {row['beta']:.2f}  {row['images_per_s']:,.0f} img/s"
        )
        if self._should_stop():
            self._interrupt(time.perf_counter())

    def _interrupt(self, t0: float) -> None:
        self.epoch_seconds += time.perf_counter() - t0
        self._check_finite()
        path = self.checkpoint()
        self.wait_for_writes()  # the message says it is saved
        sig = self._stop_signal or signal.SIGINT
        name = signal.Signals(sig).name
        raise Interrupted(
            f"{name}: saved {path.name} at epoch {self.epoch + 1}, step {self.step}",
            resume_command(self.out), sig,
        )

    def _finish(self) -> TrainResult:
        if self.rank == 0:
            save_final(self.out, self.model, self.spec)
        last = self.metrics[-1] if self.metrics else {}
        summary = {
            "model": self.config.model, "epochs": self.epoch, "steps": self.step,
            "test": {k[5:]: last[k] for k in ("test_recon", "test_kl", "test_neg_elbo",
                                               "test_kl_per_dim") if k in last},
            "val": {k[4:]: last[k] for k in ("val_recon", "val_kl", "val_neg_elbo") if k in last},
            "train_seconds": sum(m["seconds"] for m in self.metrics),
            "device": str(self.device), "precision": self.precision,
        }
        summary["processes"] = self.world_size
        if self.rank == 0:
            atomic_write_json(self.out / "summary.json", summary)
        self._barrier()
        return TrainResult(self.out, self.model.eval(), self.metrics, summary)

    # ---- optional outputs ---------------------------------------------------------------
    def _bar(self) -> Any:
        from contextlib import nullcontext

        if not self.progress:
            return nullcontext(None)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        )

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: "
                              "pip install 'vaelab[tensorboard]'") from None
        return SummaryWriter(log_dir=str(self.out / "tensorboard"))

    def _tensorboard_epoch(self, row: dict[str, Any]) -> None:
        if self.tb is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.tb.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        with torch.inference_mode():
            self.model.eval()
            x = self.data.test.images[:32].to(self.device).unsqueeze(1).float() / 255
            y = self.data.test.labels[:32].to(self.device)
            yy = y if self.model.conditional else None
            mu, _ = self.model.encode(x, yy)
            recon = torch.sigmoid(self.model.decode(mu, yy))
            z = torch.randn(32, self.config.latent_dim,
                            generator=torch.Generator().manual_seed(0)).to(self.device)
            samples = torch.sigmoid(self.model.decode(z, yy))
            self.model.train()
        self.tb.add_images("reconstructions", torch.cat([x, recon]).cpu(), row["epoch"])
        self.tb.add_images("samples", samples.cpu(), row["epoch"])


def train(config: TrainConfig | None, out: str | os.PathLike, **kwargs: Any) -> TrainResult:
    """Train ``config`` into run folder ``out``; see ``Trainer`` for the keyword options
    (``resume=True`` continues the run there, and ``config`` may then be None)."""
    return Trainer(config, out, **kwargs).fit()


def train_concurrently(
    jobs: Sequence[tuple[TrainConfig, str | os.PathLike, dict[str, Any]]],
    *,
    parallel: int = 2,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[TrainResult]:
    """Train several runs, ``jobs`` = [(config, out, Trainer keyword options), ...], in order.

    On CUDA, up to ``parallel`` runs train at once, each in its own thread and CUDA stream: at
    batch 128 one run's step is a few hundred small kernels that leave most of the GPU idle, so
    a second run fills it (measured in BENCHMARKS.md). Each run computes what it would alone
    (within float tolerance, as any two CUDA runs). Elsewhere the runs train one after the
    other, with their progress bars. SIGINT or
    SIGTERM stops every run at its next step with a checkpoint (``Interrupted``).
    """
    if parallel < 1:
        raise ConfigError(f"parallel must be >= 1, got {parallel}")
    cuda = [pick_device(cfg.device).type == "cuda" for cfg, _, _ in jobs]
    if len(jobs) < 2 or parallel == 1 or not all(cuda) or dist_env()[1] > 1:
        return [train(cfg, out, progress=progress, log=log, **kw) for cfg, out, kw in jobs]
    from concurrent.futures import ThreadPoolExecutor

    def tagged(out: str | os.PathLike) -> Callable[[str], None] | None:
        return None if log is None else (lambda s: log(f"[{Path(out).name}] {s}"))

    # built here, one after the other: seeding and weight initialisation stay deterministic;
    # and every CUDA graph is captured here, since a capture fails if another thread uses the
    # GPU meanwhile
    trainers = [Trainer(cfg, out, progress=False, log=tagged(out), **kw) for cfg, out, kw in jobs]
    for t in trainers:
        t.prime_graph()
    torch.cuda.synchronize()  # data and weights are on the GPU before other streams read them
    stop: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(signum)
        for t in trainers:
            t._stop_signal = signum

    def fit(t: Trainer) -> TrainResult:
        if stop:  # stopped before this run began: it stays as it is, resumable
            raise Interrupted(f"{signal.Signals(stop[0]).name}: {t.out} not started",
                              resume_command(t.out), stop[0])
        with torch.cuda.stream(torch.cuda.Stream(t.device)):
            result = t.fit()
        torch.cuda.current_stream(t.device).synchronize()
        return result

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(fit, t) for t in trainers]
            while not all(f.done() for f in futures):
                time.sleep(0.05)  # the main thread stays free to take signals
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # a real failure before an interruption it may have caused elsewhere
            raise next((e for e in errors if not isinstance(e, Interrupted)), errors[0])
        return [f.result() for f in futures]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
