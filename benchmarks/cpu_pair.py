"""The VAE and the CVAE of the ``study`` preset trained one after the other, against side by side
(``vaelab.training.train_concurrently`` on a CPU), on this machine.

    python benchmarks/cpu_pair.py --out benchmarks/cpu-pair.json [--images 12800] [--rounds 2]

Each round trains both runs on the first ``--images`` training images for one epoch (their
held-out evaluations included, as in ``vaelab reproduce``), first one after the other with all
of torch's threads, then side by side with one share each, in fresh folders; the seconds of
each, alternating, and each run's training images per second (its epoch's, from
metrics.jsonl: the training alone) are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from vaelab.bench import machine
from vaelab.config import resolve_config
from vaelab.io import atomic_write_json
from vaelab.training import train, train_concurrently


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=12800)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    val = max(128, args.images // 10)
    cfgs = [resolve_config("study", model=k, epochs=1, limit=args.images + val, val_size=val)
            for k in ("vae", "cvae")]
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            for c in cfgs:
                train(c, Path(tmp) / f"seq-{c.model}", progress=False)
            t1 = time.perf_counter()
            train_concurrently([(c, Path(tmp) / f"pair-{c.model}", {}) for c in cfgs],
                               progress=False)
            t2 = time.perf_counter()
            resolved = [json.loads((Path(tmp) / f"pair-{c.model}" / "config.json").read_text())
                        ["resolved"] for c in cfgs]
            rate = {f"{mode}-{c.model}": json.loads((Path(tmp) / f"{mode}-{c.model}" /
                                                     "metrics.jsonl").read_text()
                                                    .splitlines()[-1])["images_per_s"]
                    for mode in ("seq", "pair") for c in cfgs}
        rounds.append({"one_after_the_other_s": t1 - t0, "side_by_side_s": t2 - t1,
                       "images_per_s": rate})
        print(rounds[-1], flush=True)
    best = {k: min(r[k] for r in rounds) for k in ("one_after_the_other_s", "side_by_side_s")}
    atomic_write_json(args.out, {
        "machine": machine(), "threads": torch.get_num_threads(), "images": args.images,
        "val_images": val, "rounds": rounds, "best": best,
        "speedup": best["one_after_the_other_s"] / best["side_by_side_s"],
        "load_average": list(os.getloadavg()), "resolved": resolved})


if __name__ == "__main__":
    main()
