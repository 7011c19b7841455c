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
    after: Callable[[int], None] | None = None,
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

    ``after(i)``, where given, is called once job ``i`` has trained, in its own thread and
    with its share of the threads, while the other runs may still train: work that needs only
    that run (its evaluation, say) then fills the core it leaves idle. A signal stops the runs
    still training and is raised (``Interrupted``) once they have saved their checkpoints,
    without waiting for an ``after`` in progress: that work must keep nothing it has not
    finished (write its results atomically), as it is abandoned. An ``after`` that fails is
    raised once every run has stopped.
    """
    if parallel < 1:
        raise ConfigError(f"parallel must be >= 1, got {parallel}")
    kinds = {pick_device(cfg.device).type for cfg, _, _ in jobs}
    width = min(parallel, len(jobs))
    alone = len(jobs) < 2 or parallel == 1 or len(kinds) != 1 or dist_env()[1] > 1
    if not alone and kinds == {"cuda"}:
        with cuda_settings("cuda", benchmark=True):  # one scope over every thread's run
            return _side_by_side(jobs, parallel, log, after)
    if not alone and kinds == {"cpu"} and torch.get_num_threads() >= width:
        with cpu_threads(max(1, torch.get_num_threads() // width)):
            return _side_by_side(jobs, width, log, after)
    results = []
    for i, (cfg, out, kw) in enumerate(jobs):
        results.append(train(cfg, out, progress=progress, log=log, **kw))
        if after is not None:
            after(i)
    return results


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
                  parallel: int, log: Callable[[str], None] | None,
                  after: Callable[[int], None] | None = None) -> list[TrainResult]:
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
        lanes = [_Lane(i, t, fit, after, stop) for i, t in enumerate(trainers)]
        for lane in _queued(lanes, parallel):
            lane.start()
        while not all(lane.done(abandon=bool(stop)) for lane in lanes):
            time.sleep(0.05)  # the main thread stays free to take signals
        errors = [lane.error for lane in lanes if lane.error is not None]
        if stop and not any(isinstance(e, Interrupted) for e in errors):
            errors.append(Interrupted(
                f"{signal.Signals(stop[0]).name}: stopped after every run had trained",
                "the same command (the trained runs are kept)", stop[0]))
        if errors:  # a real failure before an interruption it may have caused elsewhere
            raise next((e for e in errors if not isinstance(e, Interrupted)), errors[0])
        return [lane.result for lane in lanes]  # type: ignore[misc]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


class _Lane(threading.Thread):
    """One run's thread: its training, then ``after(i)`` (unless a signal came first), then
    the lanes queued behind it in turn (``_queued``)."""

    def __init__(self, i: int, trainer: Trainer, fit: Callable[[Trainer], TrainResult],
                 after: Callable[[int], None] | None, stop: list[int]) -> None:
        # a daemon: an ``after`` still running when a signal stops the runs is abandoned
        super().__init__(name=f"vaelab-run-{i}", daemon=True)
        self.i, self.trainer, self._fit, self._after, self._stop = i, trainer, fit, after, stop
        self.result: TrainResult | None = None
        self.error: BaseException | None = None
        self.started_work = self.trained = self.finished = False
        self.queue: list[_Lane] = []

    def run(self) -> None:
        for lane in [self, *self.queue]:
            lane.work()

    def work(self) -> None:
        self.started_work = True
        try:
            self.result = self._fit(self.trainer)
        except BaseException as e:  # noqa: BLE001 - raised in the main thread
            self.error = e
        self.trained = True
        if self.error is None and self._after is not None and not self._stop:
            try:
                self._after(self.i)
            except BaseException as e:  # noqa: BLE001 - raised in the main thread
                self.error = e
        self.finished = True

    def done(self, abandon: bool) -> bool:
        """Finished; or, with ``abandon``, not training (its ``after``, or its start, which
        a signal refuses, is left to its thread)."""
        return self.finished or (abandon and (self.trained or not self.started_work))


def _queued(lanes: list[_Lane], parallel: int) -> list[_Lane]:
    """The ``parallel`` lanes that get threads; the others wait in their queues, in turn."""
    heads = lanes[:parallel]
    for j, lane in enumerate(lanes[parallel:]):
        heads[j % parallel].queue.append(lane)
    return heads
