"""The study's VAE and CVAE trained side by side (as ``vaelab reproduce`` trains them), in a
process whose allocator keeps freed blocks (``vaelab.memory.keep_freed_memory``, what the
``vaelab`` command does) against one that hands them back to the kernel (glibc's default).

    python benchmarks/malloc_keep.py --out benchmarks/malloc-keep-cpu.json [--images 12800]
        [--rounds 3]

Each round trains the pair for one epoch on the first ``--images`` training images in a fresh
process and folder, once each way, alternating; each run's training images per second (its
epoch's, from metrics.jsonl) and the process's page faults are written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from vaelab.bench import machine
from vaelab.io import atomic_write_json

_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from vaelab import memory
    from vaelab.config import resolve_config
    from vaelab.training import train_concurrently
    mode, images, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    if mode == "keep":
        assert memory.keep_freed_memory()
    val = max(128, images // 10)
    cfgs = [resolve_config("study", model=k, epochs=1, limit=images + val, val_size=val)
            for k in ("vae", "cvae")]
    train_concurrently([(c, out / c.model, {}) for c in cfgs], progress=False)
    rates = {c.model: json.loads((out / c.model / "metrics.jsonl").read_text()
                                 .splitlines()[-1])["images_per_s"] for c in cfgs}
    precision = json.loads((out / "cvae" / "config.json").read_text())["resolved"]["precision"]
    print(json.dumps({"images_per_s": rates, "precision": precision,
                      "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt}))
""")


def _round(mode: str, images: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(images), tmp],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, default=12800)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    load = list(os.getloadavg())
    rounds = []
    for _ in range(args.rounds):
        r = {mode: _round(mode, args.images) for mode in ("plain", "keep")}
        rounds.append(r)
        print(r, flush=True)
    median = {mode: {m: statistics.median(r[mode]["images_per_s"][m] for r in rounds)
                     for m in ("vae", "cvae")} for mode in ("plain", "keep")}
    atomic_write_json(args.out, {
        "machine": machine(), "images": args.images, "rounds": rounds,
        "precision": rounds[0]["keep"]["precision"], "median_images_per_s": median,
        "speedup": {m: median["keep"][m] / median["plain"][m] for m in ("vae", "cvae")},
        "load_average": [load, list(os.getloadavg())],
        "command": "python benchmarks/malloc_keep.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
