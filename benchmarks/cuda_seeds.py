"""The VAE and the CVAE x seeds 0, 1, 2 at one precision, trained side by side on one GPU.

    python benchmarks/cuda_seeds.py fp32 3     # precision, runs at once

Prints one JSON line: wall seconds and each model's final test -ELBO per seed, mean and std.
Numbers: benchmarks/h100-runs.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from vaelab.config import resolve_config
from vaelab.training import train_concurrently


def main(precision: str, parallel: int) -> None:
    root = Path("/tmp/seeds") / precision
    shutil.rmtree(root, ignore_errors=True)
    cfgs = [resolve_config("seed", model=m, seed=s, precision=precision)
            for m in ("vae", "cvae") for s in (0, 1, 2)]
    t0 = time.perf_counter()
    res = train_concurrently([(c, root / f"{c.model}{c.seed}", {}) for c in cfgs],
                             parallel=parallel, progress=False)
    out: dict = {"precision": precision, "parallel": parallel,
                 "seconds": round(time.perf_counter() - t0, 1)}
    for m in ("vae", "cvae"):
        v = [r.summary["test"]["neg_elbo"] for r in res if r.summary["model"] == m]
        out[m] = {"neg_elbo": [round(x, 2) for x in v], "mean": round(statistics.mean(v), 2),
                  "std": round(statistics.stdev(v), 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
