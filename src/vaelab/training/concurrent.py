"""Several runs trained side by side on one GPU, or on a CPU's cores (``train_concurrently``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from vaelab.backends import cuda_settings
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError
from vaelab.training.distributed import dist_env
from vaelab.training.hardware import pick_device
from vaelab.training.loop import Interrupted, Trainer, TrainResult, train
from vaelab.training.run_dir import resume_command


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
    (within float tolerance, as any two CUDA runs). On a CPU where torch has a thread for each,
    up to ``parallel`` runs train at once, each in its own thread with its share of torch's
    threads (the intra-op thread count, set for these runs and restored after): a small
    network's step at batch 128 keeps one core busier than it keeps two, so two runs side by
    side train more images per second in all than one after the other (``benchmarks/
    cpu_pair.py`` measures it). Each run
    then computes what it would alone with that many threads. Otherwise the runs train one
    after the other, with their progress bars. SIGINT or SIGTERM stops every run at its next
    step with a checkpoint (``Interrupted``).
    """
    if parallel < 1:
        raise ConfigError(f"parallel must be >= 1, got {parallel}")
    kinds = {pick_device(cfg.device).type for cfg, _, _ in jobs}
    width = min(parallel, len(jobs))
    alone = len(jobs) < 2 or parallel == 1 or len(kinds) != 1 or dist_env()[1] > 1
    if not alone and kinds == {"cuda"}:
        with cuda_settings("cuda", benchmark=True):  # one scope over every thread's run
            return _side_by_side(jobs, parallel, log)
    if not alone and kinds == {"cpu"} and torch.get_num_threads() >= width:
        with cpu_threads(max(1, torch.get_num_threads() // width)):
            return _side_by_side(jobs, width, log)
    return [train(cfg, out, progress=progress, log=log, **kw) for cfg, out, kw in jobs]


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, and restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _side_by_side(jobs: Sequence[tuple[TrainConfig, str | os.PathLike, dict[str, Any]]],
                  parallel: int, log: Callable[[str], None] | None) -> list[TrainResult]:
    from concurrent.futures import ThreadPoolExecutor

    def tagged(out: str | os.PathLike) -> Callable[[str], None] | None:
        return None if log is None else (lambda s: log(f"[{Path(out).name}] {s}"))

    # built here, one after the other: weight initialisation stays deterministic; and every
    # CUDA graph is captured here, since a capture fails if another thread uses the GPU
    # meanwhile
    trainers = [Trainer(cfg, out, progress=False, log=tagged(out), **kw) for cfg, out, kw in jobs]
    cuda = all(t.device.type == "cuda" for t in trainers)
    if cuda:
        for t in trainers:
            t.prime_graph()
        torch.cuda.synchronize()  # data and weights are on the GPU before other streams read
        # them
    stop: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop.append(signum)
        for t in trainers:
            t.stop.catch(signum)

    def fit(t: Trainer) -> TrainResult:
        if stop:  # stopped before this run began: it stays as it is, resumable
            raise Interrupted(f"{signal.Signals(stop[0]).name}: {t.out} not started",
                              resume_command(t.out), stop[0])
        if not cuda:
            return t.fit()
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
