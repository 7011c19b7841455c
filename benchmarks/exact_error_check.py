"""Check exact log p(x)'s per-image error estimate against the finest of a ladder of rules.

    python benchmarks/exact_error_check.py RUN [RUN ...] --images 500 --levels 5 \
        --out benchmarks/exact-error-check-cpu.json

For a seeded sample of each run's test images it integrates every image with each of the
shared rules ``exact_log_px_per_image`` uses (level 0, then half the spacing each level, over
each image's support), all the way to ``--levels``; the finest is the reference. For each
coarser level it counts the images whose error estimate is within ``--tolerance`` (what the
evaluation would accept there) and, of those, the ones further from the reference than the
tolerance (``wrong``), for the estimate vaelab uses (``QuadratureSums.error`` with the change
from the level before) and for T and M alone. BENCHMARKS.md renders the JSON
(benchmarks/render_docs.py).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from vaelab.bench import machine
from vaelab.checkpoint import load_run
from vaelab.data import Split
from vaelab.evaluate import (
    DEFAULT_TOLERANCE,
    _Decoder,
    _shared_box,
    _shared_rule_pass,
    _support,
    auto_spacing,
    dataset_for_run,
    encode_split,
)
from vaelab.io import atomic_write_json


def ladder(run_dir: Path, images: int, levels: int, tolerance: float, seed: int = 1) -> dict:
    run = load_run(run_dir)
    model, test = run.model.eval(), dataset_for_run(run).test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:images]
    split = Split(test.images[pick], test.labels[pick])
    likelihood = run.config["config"]["likelihood"]
    cpu = torch.device("cpu")
    mu, logvar = encode_split(model, split, batch_size=1000, device=cpu)
    x = split.images.flatten(1).float().div_(255)
    q_sd = torch.exp(0.5 * logvar.double())
    decode = _Decoder(model, cpu, 2048)
    f64 = dict(dtype=torch.float64)
    log_px = torch.zeros(levels, images, **f64)
    err, naive = torch.zeros(levels, images, **f64), torch.zeros(levels, images, **f64)
    spacing = torch.zeros(levels, images, **f64)
    groups = [(c, (split.labels == c).nonzero().squeeze(1)) for c in range(10)] \
        if model.conditional else [(None, torch.arange(images))]
    t0 = time.perf_counter()
    for c, idx in groups:
        if len(idx) == 0:
            continue
        box, support = _shared_box(mu[idx], logvar[idx]), None
        previous = torch.full((len(idx),), -math.inf, **f64)  # as the evaluation starts
        h = auto_spacing(mu[idx], logvar[idx], 12_000)
        for level in range(levels):
            sums = _shared_rule_pass(decode, x[idx], c, box, support, likelihood=likelihood,
                                     spacing=h, node_chunk=2048, image_chunk=2048,
                                     advance=lambda k: None)
            log_px[level, idx] = sums.log_px()
            naive[level, idx] = sums.error(h, narrowest=q_sd[idx])
            err[level, idx] = sums.error(h, narrowest=q_sd[idx], previous=previous)
            spacing[level, idx] = h
            mean, cov = sums.posterior_moments()
            support = _support(mean, cov, mu[idx], q_sd[idx], h)
            previous, h = log_px[level, idx], h / 2
            print(f"  class {c} level {level}: {decode.count:,} decoder calls", flush=True)
    ref = log_px[-1]
    out = {"model": run.spec.kind, "images": images, "sample_seed": seed, "levels": [],
           "reference_spacing": float(spacing[-1].min()), "decoder_calls": decode.count,
           "seconds": time.perf_counter() - t0}
    for level in range(levels - 1):
        miss = (log_px[level] - ref).abs()
        row = {"level": level, "spacing": float(spacing[level].min()),
               "miss_max": float(miss.max()), "miss_mean": float(miss.mean())}
        for name, e in (("vaelab", err[level]), ("t_and_m_alone", naive[level])):
            ok = e <= tolerance
            row[name] = {"accepted": int(ok.sum()),
                         "wrong": int((ok & (miss > tolerance)).sum()),
                         "under_estimated": int(((miss > e) & (miss > 1e-3)).sum())}
        out["levels"].append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    out = {"machine": machine(), "tolerance": args.tolerance, "runs": {}}
    for path in args.runs:
        print(path, flush=True)
        out["runs"][path.name] = ladder(path, args.images, args.levels, args.tolerance)
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}; BENCHMARKS.md shows it (python benchmarks/render_docs.py)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
