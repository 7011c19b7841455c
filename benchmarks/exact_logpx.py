"""Time the exact log p(x) (quadrature) of trained 2-D runs over the whole test set.

    python benchmarks/exact_logpx.py RUN [RUN ...] --out benchmarks/exact-logpx-cpu.json

Writes the machine, the settings and, per run, the seconds, decoder calls, the mean -log p(x),
its estimated error and the number of images that needed rules of their own; BENCHMARKS.md's
table is rendered from that file by benchmarks/render_docs.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vaelab.bench import machine
from vaelab.checkpoint import load_run
from vaelab.evaluate import DEFAULT_TOLERANCE, dataset_for_run, exact_log_px_per_image
from vaelab.io import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    args = p.parse_args()
    results = {"machine": machine(), "tolerance": args.tolerance, "runs": {}}
    for path in args.runs:
        run = load_run(path)
        ds = dataset_for_run(run)
        t0 = time.perf_counter()
        res = exact_log_px_per_image(run.model, ds.test, tolerance=args.tolerance,
                                     likelihood=run.config["config"]["likelihood"])
        seconds = time.perf_counter() - t0
        results["runs"][path.name] = {"model": run.spec.kind, "seconds": seconds,
                                      **res.summary()}
        print(path, f"{seconds:.1f} s", flush=True)
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}; BENCHMARKS.md shows it (python benchmarks/render_docs.py)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
