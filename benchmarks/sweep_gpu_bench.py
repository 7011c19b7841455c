"""N seeds packed on one GPU through the sweep, against one at a time and ``train_concurrently``.

    python benchmarks/sweep_gpu_bench.py --out benchmarks/sweep-gpu.json            # on CUDA
    python benchmarks/sweep_gpu_bench.py --out /tmp/x.json --cpu --epochs 1 --limit 2000
                                                             # the same code paths on a CPU

The runs are the VAE on the ``seed`` preset at seeds 0..N-1 (``--seeds N``, default 8). Modes,
each timed from the first run's start to the last one's end, into fresh folders:

- ``one_at_a_time``: ``vaelab.training.train``, run after run, in this process;
- ``train_concurrently``: two at a time in this process, each in its own CUDA stream (what
  ``vaelab reproduce`` does on a GPU);
- ``sweep_K``: ``vaelab.sweep.train_trials`` on a local Ray, each trial asking 1/K of the GPU,
  so K trials share it (K from ``--packs``, default 1 2 4 8), each a process of its own.

Writes the machine, the settings and per mode the seconds, each run's test -ELBO and (CUDA) the
largest GPU memory in use, sampled with nvidia-smi while the mode runs. With ``--cpu`` every
mode trains on the CPU and the sweep asks no GPU: a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vaelab.bench import machine
from vaelab.config import TrainConfig, resolve_config
from vaelab.io import atomic_write_json
from vaelab.sweep import Trial, choose_resources, train_trials
from vaelab.training import train, train_concurrently


class GpuMemory:
    """The largest memory.used that nvidia-smi reports while the block runs (MiB)."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5).stdout
                used = max(int(x) for x in text.split())
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def seeds_jobs(n: int, *, epochs: int | None, limit: int | None, device: str,
               ) -> list[tuple[str, TrainConfig]]:
    base = resolve_config("study", model="vae", epochs=epochs, limit=limit, device=device)
    return [(f"seed{s}", replace(base, seed=s)) for s in range(n)]


def run_mode(mode: str, root: Path, jobs: list[tuple[str, TrainConfig]], cpu: bool) -> float:
    t0 = time.perf_counter()
    if mode == "one_at_a_time":
        for name, cfg in jobs:
            train(cfg, root / name, progress=False)
    elif mode == "train_concurrently":
        train_concurrently([(cfg, root / name, {}) for name, cfg in jobs], parallel=2,
                           progress=False)
    else:
        pack = int(mode.split("_")[1])
        res = choose_resources(address=None, num_cpus=None, cpus_per_trial=None,
                               gpus_per_trial=0.0 if cpu else 1.0 / pack)
        outcome = train_trials(root, [Trial(n, {}, c) for n, c in jobs], res)
        if outcome.failures:
            raise SystemExit(f"{mode}: trials failed: {outcome.failures}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's (30)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--cpu", action="store_true", help="check the script on a CPU")
    args = p.parse_args()
    jobs = seeds_jobs(args.seeds, epochs=args.epochs, limit=args.limit,
                      device="cpu" if args.cpu else "cuda")
    modes = ["one_at_a_time", "train_concurrently", *(f"sweep_{k}" for k in args.packs)]
    result: dict[str, Any] = {
        "machine": machine(), "settings": {"seeds": args.seeds, "epochs": jobs[0][1].epochs,
                                           "limit": args.limit, "cpu_check": args.cpu},
        "modes": {}}
    for mode in modes:
        root = Path(tempfile.mkdtemp(prefix=f"sweep-gpu-{mode}-"))
        with GpuMemory() as memory:
            seconds = run_mode(mode, root, jobs, args.cpu)
        result["modes"][mode] = {
            "seconds": seconds, "peak_gpu_mib": memory.peak,
            "neg_elbo": {n: json.loads((root / n / "summary.json").read_text())["test"]
                         ["neg_elbo"] for n, _ in jobs}}
        print(f"{mode}: {seconds:.1f} s, peak GPU memory {memory.peak} MiB", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
