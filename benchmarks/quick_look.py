"""Measure the quick look: run `vaelab reproduce --quick` and commit what it took and showed.

    OMP_NUM_THREADS=1 python benchmarks/quick_look.py --out /tmp/q
        [--json results/reproduce-quick-cpu.json] [-- --precision fp32]
    python benchmarks/quick_look.py --sweep --out /tmp/s   # README's sweep example, into --json

Runs ``vaelab reproduce --quick --out OUT`` (plus any options after ``--``) as a child process
and writes the report's results.json to ``--json`` with a ``measurement`` block beside it: the
command, its wall time, the child's CPU time (user + system, every thread), this machine's load
average (1, 5 and 15 minutes) before and after, and the three numbers the quick look promises
(VAE active units and 5-NN accuracy, CVAE class accuracy), keeping the file's ``sweep``
measurement (below). On a machine shared with other work
the wall time is longer than on a quiet one; the CPU time and the load say by how much. With
``OMP_NUM_THREADS=1`` (recorded) the CPU time is about the wall time on one quiet core, which
bounds a quiet 2-core machine's; two threads that wait on each other on a busy machine burn CPU
time without progress.

``--sweep`` instead runs the README's ``vaelab sweep --out OUT --preset quick --grid
seed=0,1,2`` (three ``quick`` VAEs on a local Ray, one per core) and adds its wall time, CPU
time, load and test -ELBOs to ``--json``'s measurement as ``sweep``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vaelab.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="report folder (must not exist)")
    p.add_argument("--json", type=Path, default=ROOT / "results" / "reproduce-quick-cpu.json")
    p.add_argument("--sweep", action="store_true", help="measure the README's sweep example")
    p.add_argument("extra", nargs="*", help="more `vaelab reproduce` options, after --")
    args = p.parse_args()
    if args.out.exists():
        p.error(f"{args.out} exists: give a new folder, so that nothing is reused")
    if args.sweep:
        return measure_sweep(args.out, args.json)
    command = ["vaelab", "reproduce", "--quick", "--out", str(args.out), *args.extra]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    results = json.loads((args.out / "results.json").read_text())
    ev = results["evaluations"]
    results["measurement"] = {
        "command": " ".join(shlex.quote(c) for c in command),
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "nice": os.nice(0),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "vae_active_units": ev["vae"]["active_units"]["count"],
        "vae_knn_accuracy": ev["vae"]["knn"]["accuracy"],
        "cvae_class_accuracy": ev["cvae"]["cvae_class_accuracy"]["accuracy"],
        "precision": {kind: json.loads((args.out / "runs" / kind / "config.json").read_text())
                      ["resolved"]["precision"] for kind in ("vae", "cvae")},
    }
    try:  # the sweep example, measured separately (--sweep), stays with the file
        results["measurement"]["sweep"] = json.loads(args.json.read_text())["measurement"]["sweep"]
    except (OSError, ValueError, KeyError):
        pass
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, results)
    print(json.dumps(results["measurement"], indent=1))
    return 0


def measure_sweep(out: Path, path: Path) -> int:
    command = ["vaelab", "sweep", "--out", str(out), "--preset", "quick", "--grid", "seed=0,1,2"]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    sweep = json.loads((out / "sweep.json").read_text())
    results = json.loads(path.read_text())
    results["measurement"]["sweep"] = {
        "command": " ".join(shlex.quote(c) for c in command), "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime, "load_before": list(load_before),
        "load_after": list(os.getloadavg()), "nice": os.nice(0),
        "rows": sweep.get("rows"),
    }
    atomic_write_json(path, results)
    print(json.dumps(results["measurement"]["sweep"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
