"""Decodes per second of the study's decoder by batch size, in fp32 inference, on this machine.

    python benchmarks/decode_batch.py --out benchmarks/decode-batch-cpu.json

The evaluation decodes latents in slices of ``vaelab.evaluate.CPU_DECODE_BATCH`` on a CPU
(the quadrature's nodes, the importance samples, the Gauss-Hermite nodes); this measures why.
The networks are the ``study`` preset's VAE and CVAE at their initial weights (the speed does
not depend on the weights), each batch size timed in alternating rounds for at least
``--seconds`` per round, with torch's thread count as it is (recorded in ``machine``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vaelab.bench import machine
from vaelab.config import resolve_config
from vaelab.evaluate import CPU_DECODE_BATCH
from vaelab.io import atomic_write_json
from vaelab.models import build_model

SIZES = (64, 128, 256, 512, 1024, 2048, 5000)


def decodes_per_second(model: torch.nn.Module, batch: int, seconds: float) -> float:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, model.latent_dim, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen) if model.conditional else None
    with torch.inference_mode():
        model.decode(z, y)
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            model.decode(z, y)
            reps += 1
        return batch * reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()
    result = {"machine": machine(), "sizes": list(SIZES), "cpu_decode_batch": CPU_DECODE_BATCH,
              "rounds": args.rounds, "seconds_per_round": args.seconds, "models": {}}
    for kind in ("vae", "cvae"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model(resolve_config("study", model=kind).model_spec()).eval()
        per_round = [{str(b): decodes_per_second(model, b, args.seconds) for b in SIZES}
                     for _ in range(args.rounds)]
        best = {str(b): max(r[str(b)] for r in per_round) for b in SIZES}
        result["models"][kind] = {"per_round": per_round, "best": best}
        print(kind, {b: f"{v:,.0f}" for b, v in best.items()}, flush=True)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
