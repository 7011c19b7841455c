"""The training loop: ``Trainer`` runs one run's epochs to the end, and ``train`` is its one-call
form. What a step does is ``step.TrainingStep``; what a checkpoint holds, ``state``; the run
folder, ``run_dir``; torchrun, ``distributed``; the bar, log lines and TensorBoard, ``logs``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from vaelab.backends import cuda_settings
from vaelab.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_weights,
    read_checkpoint,
    save_final,
)
from vaelab.config import TrainConfig
from vaelab.data import (
    Batcher,
    Dataset,
    binarize_dataset,
    binarized_record,
    check_binarized,
    load_dataset,
)
from vaelab.errors import NumericalError, VaelabError
from vaelab.evaluate import evaluate_elbo
from vaelab.io import atomic_write_json
from vaelab.locks import FolderLock
from vaelab.models import ConvVAE, build_model
from vaelab.objectives import BetaSchedule, make_beta_schedule
from vaelab.training import distributed as ddp
from vaelab.training import state
from vaelab.training.hardware import run_device, run_precision
from vaelab.training.logs import TensorBoardLog, bar_status, epoch_line, progress_bar
from vaelab.training.optim import decay_groups, learning_rate, make_adam, set_learning_rate
from vaelab.training.run_dir import (
    check_request,
    open_run,
    prepare_run_dir,
    resume_command,
    write_metrics,
)
from vaelab.training.signals import StopSignals
from vaelab.training.step import TrainingStep

REFRESH_STEPS = 25  # read the device-side sums this often (progress bar, NaN check)
# the binarizing generator's seed is the run's seed plus this (plus 7919 per rank), mod 2^64:
# far from the seeds of the noise generator (seed + 1) and the epochs' permutations (seed + e)
BINARIZE_STREAM = 0x9E3779B97F4A7C15


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


class Trainer:
    """Owns the model, optimiser, schedules and generators of one run; ``fit()`` runs it to
    the end. Everything that can refuse the run (the folder, the options, the device, the
    data) is checked before anything is written: a bad input leaves the folder as it was."""

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
        check_request(config, resume=resume, force=force)
        self.rank, self.world_size, local_rank = ddp.dist_env()
        self.progress = progress and self.rank == 0
        self.detect_anomaly = detect_anomaly
        self.log = log if (log is not None and self.rank == 0) else (lambda s: None)
        # one writer per run folder: a second process is refused here (FolderInUse), and a
        # start refused below leaves no folder it created behind
        self._folder_lock = FolderLock(self.out).acquire() if self.rank == 0 else None
        try:
            cfg, self.saved_raw, self.resume_changes = open_run(
                self.out, config, resume=resume, force=force, changes=changes,
                writer=self.rank == 0, log=self.log)
            why = self._place(cfg, local_rank, resume)
            self._build(dataset)
            if not resume and self.rank == 0:
                prepare_run_dir(self.out, self.config, resume=False, force=force,
                                data=binarized_record(self.data),
                                resolved={"device": str(self.device),
                                          "precision": self.precision, "precision_reason": why})
            ddp.barrier(self.world_size)
            if resume:
                state.resume(self)
            self.log(f"precision: {self.precision} ({why})")
            self.tb = TensorBoardLog(self.out) if tensorboard and self.rank == 0 else None
        except BaseException:
            self.close()
            raise
        if self._folder_lock is not None:
            self._folder_lock.keep()

    def close(self) -> None:
        """Let go of the run folder's lock (``fit`` does this when it ends)."""
        if getattr(self, "_folder_lock", None) is not None:
            self._folder_lock.release()

    # ---- setting up -----------------------------------------------------------------------
    def _place(self, cfg: TrainConfig, local_rank: int, resume: bool) -> str:
        """The device, the precision and whether the step is graphed; returns why that
        precision."""
        self.config = cfg
        self.distributed = self.world_size > 1
        self._owns_process_group = self.distributed and ddp.join_process_group(
            cfg, self.world_size)
        self.device = run_device(cfg, local_rank if self.distributed else None)
        saved = self.saved_raw.get("resolved") if self.saved_raw is not None else None
        self.precision, why = run_precision(cfg, self.device, saved, resumed=resume,
                                            rank=self.rank, world_size=self.world_size)
        # one CUDA graph replays the whole training step (forward, backward, Adam, the sums):
        # the step is ~100 small kernels, whose launches cost more than their arithmetic
        self._graphable = (self.device.type == "cuda" and cfg.cuda_graphs
                           and not self.distributed and not self.detect_anomaly)
        return why

    def _build(self, dataset: Dataset | None) -> None:
        """The data, the network, the optimiser, the schedule, the generators and the step."""
        cfg = self.config
        self.data = training_data(cfg, dataset, self.saved_raw, self.out)
        # under torchrun each rank takes its shard of every epoch; the global batch stays
        # batch_size, so each step sees the single-process run's images (but each rank draws
        # its own z, and free bits clamp per rank: README, "Scaling out")
        self.batcher = Batcher(self.data.train, cfg.batch_size // self.world_size,
                               device=self.device, seed=cfg.seed, rank=self.rank,
                               world_size=self.world_size)
        self.steps_per_epoch = len(self.batcher)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.spec = cfg.model_spec()
        self.model, self.net = build_network(cfg, self.data, self.device, self.distributed)
        self.optimizer, self._graphable = build_optimizer(self.model, cfg, self._graphable)
        self.schedule: BetaSchedule = make_beta_schedule(
            cfg.beta_schedule, steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=cfg.warmup_epochs, beta=cfg.beta, cycles=cfg.cycles,
            total_epochs=cfg.epochs,
        )
        self.noise = torch.Generator(device=self.device).manual_seed(self.noise_seed())
        # --binarize dynamic: each batch's pixels drawn afresh, x ~ Bernoulli(intensity)
        self.binarizer = torch.Generator(device=self.device).manual_seed(
            self.binarize_seed()) if cfg.binarize == "dynamic" else None
        self.stepper = TrainingStep(
            self.model, self.net, self.optimizer, cfg, self.device, self.precision,
            use_graph=self._graphable, detect_anomaly=self.detect_anomaly,
            anomaly=lambda detail: numerical_error(self.out, self.epoch, self.global_step, detail))
        self.epoch = 0  # the epoch in progress (0-based)
        self.step_in_epoch = 0
        self.global_step = 0  # optimisation steps taken, over all epochs
        self.metrics: list[dict[str, Any]] = []
        self.epoch_seconds = 0.0
        self.stop = StopSignals(self.world_size, self.device)
        self._writer = state.CheckpointWriter(self)

    def noise_seed(self, step: int = 0) -> int:
        return self.config.seed + 1 + 7919 * self.rank + step

    def binarize_seed(self, step: int = 0) -> int:
        return (self.config.seed + BINARIZE_STREAM + 7919 * self.rank + step) % 2**64

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """The epoch's running sums on the device (``step.zero_sums``)."""
        return self.stepper.sums

    # ---- checkpoints --------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Save a checkpoint of this moment (on CUDA written in the background:
        ``state.CheckpointWriter``); the path it is saved under."""
        snapshot = state.capture(self)  # collective under torchrun: every rank takes part
        if self.rank == 0:
            self._writer.write(snapshot)
        ddp.barrier(self.world_size)
        return self.out / "checkpoints" / checkpoint_name(self.global_step)

    def best_row(self) -> dict[str, Any] | None:
        """With ``--patience``: the metrics row of the epoch with the lowest validation -ELBO
        so far (the first of equals), whose checkpoint holds the run's model; else None."""
        return best_epoch_row(self.metrics) if self.config.patience > 0 else None

    def patience_spent(self) -> bool:
        """``--patience N``: the last N epochs brought no better validation -ELBO."""
        best = self.best_row()
        return best is not None and len(self.metrics) - int(best["epoch"]) >= \
            self.config.patience

    def wait_for_writes(self) -> None:
        """Block until a checkpoint written in the background is on disk (or raise its error)."""
        self._writer.wait()

    # ---- the steps ----------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return learning_rate(self.config.lr_schedule, self.config.lr, step, self.total_steps)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimisation step on batch ``(x, y)``; its terms are added to the epoch's sums.
        The pixels (``--binarize dynamic``) and the noise are drawn here, from the run's
        generators, whether the step then runs eagerly or as a replayed CUDA graph."""
        set_learning_rate(self.optimizer, self.lr_at(self.global_step))
        if self.binarizer is not None:
            x = torch.bernoulli(x, generator=self.binarizer)
        cfg = self.config
        shape = (x.shape[0], cfg.latent_dim)
        eps = torch.randn((cfg.k, *shape) if cfg.objective == "iwae" else shape,
                          generator=self.noise, device=self.device, dtype=torch.float32)
        self.stepper.take(x, y, eps, self.schedule.beta,
                          full_batch=x.shape[0] == self.batcher.batch_size)
        self.schedule.step()
        self.global_step += 1
        self.step_in_epoch += 1

    def prime_graph(self) -> None:
        """Take this run's next steps here, until its training step is captured as a CUDA
        graph; a run whose epoch would end first trains on eagerly. After this no capture is
        left to happen while other runs train beside it (``train_concurrently``)."""
        st = self.stepper
        if st.use_graph and st.graph is None and self.epoch < self.config.epochs:
            with cuda_settings(self.device, benchmark=True):
                st.step_index.fill_(self.global_step)
                batches = self.batcher.epoch(self.epoch)
                for x, y in islice(batches, self.step_in_epoch, self.steps_per_epoch - 1):
                    self.train_step(x, y)
                    if st.graph is not None:
                        break
        if st.graph is None:
            st.use_graph = False

    def _check_finite(self) -> None:
        bad = int(ddp.global_sums(self.sums, self.world_size)["bad_step"])
        if bad >= 0:
            raise numerical_error(self.out, self.epoch, bad)

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the last epoch (or the next interruption); the folder's lock is let go
        however it ends."""
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        old_handlers = self.stop.install()
        self.model.train()
        try:
            with cuda_settings(self.device, benchmark=True), \
                    torch.autograd.set_detect_anomaly(self.detect_anomaly), \
                    progress_bar(self.progress) as bar:
                task = bar.add_task("train", total=self.total_steps, completed=self.global_step,
                                    status="") if bar else None
                while self.epoch < self.config.epochs and not self.patience_spent():
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
            self.stop.restore(old_handlers)
            if self.tb is not None:
                self.tb.close()
            self._writer.close()
        try:
            return self._finish()
        finally:
            self._leave_process_group()

    def _leave_process_group(self) -> None:
        """Destroy the process group this trainer made, after its DDP wrapper is let go."""
        if not self._owns_process_group:
            return
        self._owns_process_group = False
        self.net = self.stepper.net = self.model
        ddp.leave_process_group()

    def _run_epoch(self, bar: Any, task: Any) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        self.stepper.step_index.fill_(self.global_step)
        for x, y in islice(self.batcher.epoch(self.epoch), self.step_in_epoch, None):
            self.train_step(x, y)
            if self.step_in_epoch % REFRESH_STEPS == 0:
                self._check_finite()
                if bar is not None:
                    n = max(float(self.sums["count"]), 1.0)
                    r, k = (self.sums["terms"][:2] / n).tolist()
                    bar.update(task, completed=self.global_step, status=bar_status(
                        self.epoch + 1, cfg.epochs, r, k, self.schedule.beta))
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                self._check_finite()
                self.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self.checkpoint()
            if self.stop.should_stop(self.step_in_epoch):
                self._interrupt(t0)
        self._check_finite()
        self.epoch_seconds += time.perf_counter() - t0
        row = self._epoch_metrics()
        self.metrics.append(row)
        self.epoch += 1
        self.step_in_epoch = 0
        self.stepper.reset_sums()
        self.epoch_seconds = 0.0
        if self.rank == 0:
            write_metrics(self.out, self.metrics)
        self.checkpoint()
        if self.tb is not None:
            self.tb.epoch(row, self.model, self.data.test, cfg.latent_dim, self.device)
        self.log(epoch_line(row, cfg.epochs))
        if self.stop.should_stop(self.step_in_epoch):
            self._interrupt(time.perf_counter())

    def _epoch_metrics(self) -> dict[str, Any]:
        s = ddp.global_sums(self.sums, self.world_size)
        n = max(float(s["count"]), 1.0)
        recon, kl, nelbo, loss = (s["terms"] / n).tolist()
        row: dict[str, Any] = {
            "epoch": self.epoch + 1, "step": self.global_step,
            "beta": self.schedule.value(self.global_step - 1),
            "lr": self.lr_at(self.global_step - 1),
            "train_recon": recon, "train_kl": kl, "train_neg_elbo": nelbo, "train_loss": loss,
            "train_kl_per_dim": (s["kl_dim"] / n).tolist(),
            **held_out_metrics(self.model, self.data, self.config),
            "seconds": self.epoch_seconds, "images_per_s": n / max(self.epoch_seconds, 1e-9),
        }
        self.model.train()
        return row

    def _interrupt(self, t0: float) -> None:
        self.epoch_seconds += time.perf_counter() - t0
        self._check_finite()
        path = self.checkpoint()
        self.wait_for_writes()  # the message says it is saved
        sig = self.stop.signum or signal.SIGINT
        raise Interrupted(f"{signal.Signals(sig).name}: saved {path.name} at epoch "
                          f"{self.epoch + 1}, step {self.global_step}",
                          resume_command(self.out), sig)

    def _finish(self) -> TrainResult:
        self._keep_best_epoch()
        if self.rank == 0:
            save_final(self.out, self.model, self.spec)
        summary = run_summary(self.config, self.metrics, epochs=self.epoch,
                              steps=self.global_step, device=self.device,
                              precision=self.precision, processes=self.world_size)
        if self.rank == 0:
            atomic_write_json(self.out / "summary.json", summary)
        ddp.barrier(self.world_size)
        return TrainResult(self.out, self.model.eval(), self.metrics, summary)

    def _keep_best_epoch(self) -> None:
        """``--patience``: put the best epoch's weights (from its checkpoint) into the model,
        which then becomes the run's final model."""
        best = self.best_row()
        if best is None:
            return
        stopped = self.epoch < self.config.epochs
        self.log(("early stop: " if stopped else "")
                 + f"the best validation -ELBO, {best['val_neg_elbo']:.2f}, was epoch "
                 f"{best['epoch']}'s" + (f" (none better in the {self.config.patience} epochs "
                                         "since)" if stopped else "")
                 + "; its weights are the run's model")
        if int(best["step"]) != self.global_step:
            path = self.out / "checkpoints" / checkpoint_name(int(best["step"]))
            load_weights(self.model, read_checkpoint(path, self.spec).weights, path)


def best_epoch_row(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of the lowest ``val_neg_elbo`` (the first of equals; None without one)."""
    rows = [m for m in metrics if m.get("val_neg_elbo") is not None]
    return min(rows, key=lambda m: m["val_neg_elbo"]) if rows else None


def training_data(cfg: TrainConfig, dataset: Dataset | None, saved_raw: dict[str, Any] | None,
                  out: Path) -> Dataset:
    """The run's images: ``dataset`` or the config's; with ``--binarize dynamic`` the val and
    test splits binarized once, pinned (and, on resume, checked against the run's record)."""
    data = dataset or load_dataset(cfg.dataset, val_size=cfg.val_size, limit=cfg.limit)
    if cfg.binarize == "dynamic":  # training images are binarized per batch, in the step
        data = binarize_dataset(data)
        if saved_raw is not None:
            check_binarized(data, saved_raw.get("data"), str(out))
    return data


def build_network(cfg: TrainConfig, data: Dataset, device: torch.device,
                  distributed: bool) -> tuple[ConvVAE, torch.nn.Module]:
    """The model, initialised from the run's seed (inside a fork of the RNG: the process's
    random state is left as it was), its output bias at the training images' mean, on
    ``device``; and what the step calls (the model, or its DDP wrapper under torchrun)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_spec())
    mean = float(data.train.images.float().mean() / 255) if len(data.train) else 0.5
    model.decoder.set_output_bias(mean)
    # channels-last convolutions and a fused Adam step: measured faster on the CPU (see
    # BENCHMARKS.md) and the usual fast path on CUDA; the maths is unchanged
    model.to(device, memory_format=torch.channels_last)
    if not distributed:
        return model, model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=ids)


def build_optimizer(model: ConvVAE, cfg: TrainConfig,
                    graphable: bool) -> tuple[torch.optim.Adam, bool]:
    """Adam over ``decay_groups``, capturable in a CUDA graph where ``graphable``; and whether
    the step can still be graphed (not with a torch that lacks tensor-lr fused Adam)."""
    groups = decay_groups(model, cfg.weight_decay)
    try:
        return make_adam(groups, cfg.lr, capturable=graphable), graphable
    except (RuntimeError, TypeError, ValueError):
        return make_adam(groups, cfg.lr), False


def run_summary(config: TrainConfig, metrics: list[dict[str, Any]], *, epochs: int, steps: int,
                device: torch.device, precision: str, processes: int) -> dict[str, Any]:
    """summary.json: the test and val metrics of the run's model (the last epoch's; with
    ``--patience``, the best epoch's, and ``early_stopping`` says which and why), and what the
    training took."""
    best = best_epoch_row(metrics) if config.patience > 0 else None
    kept = best if best is not None else (metrics[-1] if metrics else {})
    summary = {
        "model": config.model, "epochs": epochs, "steps": steps,
        "test": {k[5:]: kept[k] for k in ("test_recon", "test_kl", "test_neg_elbo",
                                           "test_kl_per_dim") if k in kept},
        "val": {k[4:]: kept[k] for k in ("val_recon", "val_kl", "val_neg_elbo") if k in kept},
        "train_seconds": sum(m["seconds"] for m in metrics),
        "device": str(device), "precision": precision, "processes": processes,
    }
    if best is not None:
        summary["early_stopping"] = {
            "patience": config.patience, "best_epoch": best["epoch"],
            "best_step": best["step"], "epochs_trained": epochs,
            "max_epochs": config.epochs, "stopped_early": epochs < config.epochs,
            "rule": "the weights of the epoch with the lowest validation -ELBO"}
    return summary

def held_out_metrics(model: ConvVAE, data: Dataset, config: TrainConfig) -> dict[str, Any]:
    """The epoch's ``val_*`` and ``test_*`` metrics: the ELBO's terms on each split that has
    images (the fixed-seed estimate of ``evaluate_elbo``)."""
    row: dict[str, Any] = {}
    for name, split in (("val", data.val), ("test", data.test)):
        if len(split) == 0:
            continue
        ev = evaluate_elbo(model, split, likelihood=config.likelihood,
                           batch_size=config.eval_batch_size, seed=config.seed)
        row.update({f"{name}_recon": ev["recon"], f"{name}_kl": ev["kl"],
                    f"{name}_neg_elbo": ev["neg_elbo"], f"{name}_kl_per_dim": ev["kl_per_dim"]})
    return row


def numerical_error(out: Path, epoch: int, step: int, detail: str = "") -> NumericalError:
    """The one-line error of a loss that became NaN/Inf at ``step`` of (0-based) ``epoch``."""
    detail = (detail.strip().splitlines() or [""])[0].rstrip(".")
    return NumericalError(
        f"the loss became NaN/Inf at epoch {epoch + 1}, step {step}"
        + (f" ({detail})" if detail else "")
        + (f"; the last good checkpoint is kept in {out / 'checkpoints'}"
           if list_checkpoints(out) else
           "; no checkpoint had been saved, so nothing of the run is kept to resume")
        + ". Usual causes: "
        "a learning rate too high, corrupted input data, or log-variance overflow; try a "
        + ("lower --lr" if detail else "lower --lr, or --detect-anomaly to find the operation")
    )


def train(config: TrainConfig | None, out: str | os.PathLike, **kwargs: Any) -> TrainResult:
    """Train ``config`` into run folder ``out``; see ``Trainer`` for the keyword options
    (``resume=True`` continues the run there, and ``config`` may then be None)."""
    return Trainer(config, out, **kwargs).fit()
