"""Time the exact log p(x) (quadrature) of trained 2-D runs over the whole test set.

    python benchmarks/exact_logpx.py RUN [RUN ...] --out benchmarks/exact-logpx-cpu.json

Writes the machine, the settings and, per run, the seconds, decoder calls, the mean -log p(x),
its estimated error and the number of images that needed rules of their own; BENCHMARKS.md's
table is rendered from that file by benchmarks/render_docs.py.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from vaelab.bench import exact_speed, machine
from vaelab.evaluate import DEFAULT_TOLERANCE
from vaelab.io import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    args = p.parse_args()
    results = {"machine": machine(), "tolerance": args.tolerance, "runs": {}}
    for path in args.runs:
        load = os.getloadavg()
        results["runs"][path.name] = {**exact_speed(path, tolerance=args.tolerance),
                                      "loadavg_before": list(load)}
        print(path, f"{results['runs'][path.name]['seconds']:.1f} s", flush=True)
    atomic_write_json(args.out, results)
    print(f"wrote {args.out}; BENCHMARKS.md shows it (python benchmarks/render_docs.py)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
