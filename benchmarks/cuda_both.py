"""Wall time of training the VAE and the CVAE (study preset, 30 epochs each) on one GPU.

    python benchmarks/cuda_both.py parallel2 [precision=fp32]   # side by side
    python benchmarks/cuda_both.py sequential                    # one after the other

Prints one JSON line: the seconds from the first Trainer to the last result (CUDA initialised
before), and each run's final test -ELBO and training seconds. Numbers: benchmarks/h100-runs.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from vaelab.config import resolve_config
from vaelab.training import train, train_concurrently


def main(mode: str, options: list[str]) -> None:
    kw = dict(a.split("=", 1) for a in options)
    root = Path("/tmp/both") / mode
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    t_init = time.perf_counter() - t0
    cfgs = [resolve_config("study", model=m, **kw) for m in ("vae", "cvae")]
    t0 = time.perf_counter()
    if mode == "sequential":
        res = [train(c, root / c.model, progress=False) for c in cfgs]
    else:
        res = train_concurrently([(c, root / c.model, {}) for c in cfgs],
                                 parallel=int(mode.removeprefix("parallel")), progress=False)
    out = {"mode": mode, **kw, "seconds": round(time.perf_counter() - t0, 2),
           "cuda_init_s": round(t_init, 2)}
    for r in res:
        s = r.summary
        out[s["model"]] = {"neg_elbo": round(s["test"]["neg_elbo"], 2),
                           "train_s": round(s["train_seconds"], 2), "precision": s["precision"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
