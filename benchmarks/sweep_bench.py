"""The six ablation runs of ``vaelab reproduce --ablations`` through the sweep, against one after
another (what reproduce did on a CPU before the sweep).

    python benchmarks/sweep_bench.py --out benchmarks/sweep-cpu.json          # the full runs
    python benchmarks/sweep_bench.py --out X.json --epochs 2 --limit 6000     # a small grid
    python benchmarks/sweep_bench.py --out benchmarks/sweep-full-cpu.json \
        --modes one_after_another sweep                                        # skip 1 thread

The runs are those ``--ablations`` adds to the two main ones: the VAE and the CVAE at seeds 1
and 2, and each without KL warm-up (constant beta = 1), on the ``study`` preset. *One after
another*: ``vaelab.training.train`` in this process, run after run, torch using every core (as
``train_concurrently`` does off CUDA), and the same with one torch thread (each sweep trial's
share, which tells the sweep's parallelism from a machine's thread contention). *Sweep*:
``vaelab.sweep.train_trials`` on a local Ray with one trial per core, one torch thread each.
The modes alternate over ``--rounds`` rounds, each into fresh folders; the file is rewritten
after each mode, so a long measurement that is stopped keeps what it finished. Also times a
bare local Ray's start and stop (``ray.init``, one task, ``ray.shutdown``). Writes the machine (the
CPU as lscpu names it, its cores, the load average before and after each mode: the machine may
be shared), the settings, and per mode the wall seconds and each run's test -ELBO;
BENCHMARKS.md's section is rendered from that file
by benchmarks/render_docs.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vaelab.bench import machine
from vaelab.config import TrainConfig, resolve_config
from vaelab.io import atomic_write_json
from vaelab.report import _annealing_pair
from vaelab.sweep import Trial, choose_resources, train_trials
from vaelab.training import train

# one process using every core; the same with one thread (what each sweep trial has); the sweep
MODES = ("one_after_another", "one_after_another_1_thread", "sweep")


def ablation_runs(*, preset: str, dataset: str, epochs: int | None, limit: int | None,
                  seeds: tuple[int, ...] = (1, 2)) -> list[tuple[str, TrainConfig]]:
    """(name, config) of the runs ``reproduce --ablations`` adds, named as reproduce names
    them."""
    jobs = []
    for kind in ("vae", "cvae"):
        base = resolve_config(preset, model=kind, dataset=dataset, seed=0, epochs=epochs,
                              limit=limit, device="cpu")
        jobs += [(f"{kind}-seed{s}", replace(base, seed=s)) for s in seeds]
        jobs += [(name, cfg) for name, cfg in _annealing_pair(base, kind).values() if name]
    return jobs


def lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "CPU family", "Model", "Thread(s) per core", "Core(s) per socket",
            "Socket(s)", "CPU(s)", "Hypervisor vendor")
    rows = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: rows[k].strip() for k in keep if k in rows}


def neg_elbos(root: Path, names: list[str]) -> dict[str, float]:
    return {n: json.loads((root / n / "summary.json").read_text())["test"]["neg_elbo"]
            for n in names}


def one_after_another(root: Path, jobs: list[tuple[str, TrainConfig]],
                      threads: int | None = None) -> float:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        for name, cfg in jobs:
            train(cfg, root / name, progress=False)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)


def through_the_sweep(root: Path, jobs: list[tuple[str, TrainConfig]], cpus: int) -> float:
    trials = [Trial(name, {}, cfg) for name, cfg in jobs]
    res = choose_resources(address=None, num_cpus=cpus, cpus_per_trial=None, gpus_per_trial=0)
    t0 = time.perf_counter()  # Ray's start and stop included
    outcome = train_trials(root, trials, res, tolerance=0.0)
    seconds = time.perf_counter() - t0
    if outcome.failures:
        raise SystemExit(f"trials failed: {outcome.failures}")
    return seconds


def ray_start_stop() -> float:
    """Seconds for a fresh local Ray to start, run one trivial task and stop."""
    import ray

    t0 = time.perf_counter()
    res = choose_resources(address=None, num_cpus=len(os.sched_getaffinity(0)),
                           cpus_per_trial=None, gpus_per_trial=0)
    from vaelab.sweep import _start_ray

    _start_ray(ray, res)
    try:
        ray.get(ray.remote(lambda: 1).remote())
    finally:
        ray.shutdown()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="study")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--limit", type=int, default=None, help="images per split (default: all)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--note", default="", help="a sentence shown with the table")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="which ways to run the grid (default: all three)")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    jobs = ablation_runs(preset=args.preset, dataset=args.dataset, epochs=args.epochs,
                         limit=args.limit)
    names = [n for n, _ in jobs]
    result: dict[str, Any] = {
        "machine": {**machine(), "lscpu": lscpu(), "affinity_cores": cores},
        "settings": {"preset": args.preset, "dataset": args.dataset,
                     "epochs": jobs[0][1].epochs, "limit": args.limit, "runs": names,
                     "rounds": args.rounds, "sequential_threads": torch.get_num_threads(),
                     "sweep_trials_at_once": cores, "sweep_threads_per_trial": 1},
        "note": args.note, "rounds": [],
        "ray_start_stop_seconds": [ray_start_stop() for _ in range(3)]}
    modes = tuple(m for m in MODES if m in args.modes)
    for r in range(args.rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        result["rounds"].append({})
        for mode in order:
            root = Path(tempfile.mkdtemp(prefix=f"sweep-bench-{mode}-"))
            load_before = os.getloadavg()
            seconds = (one_after_another(root, jobs) if mode == "one_after_another"
                       else one_after_another(root, jobs, threads=1)
                       if mode == "one_after_another_1_thread"
                       else through_the_sweep(root, jobs, cores))
            result["rounds"][-1][mode] = {
                "seconds": seconds, "neg_elbo": neg_elbos(root, names),
                "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
            atomic_write_json(args.out, result)
            print(f"round {r + 1} {mode}: {seconds:.1f} s", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {args.out}; BENCHMARKS.md shows it (python benchmarks/render_docs.py)")


if __name__ == "__main__":
    main()
