"""Whether bf16 autocast trains a network faster than fp32 on this CPU: measured, not assumed.

bf16 instructions are not enough to make bf16 the faster choice. ``vaelab bench --fp32-too``
found bf16 faster than fp32 for the seed network on an AMD EPYC with AVX512-BF16
(``benchmarks/bench-pythae-cpu.json``) and slower on an Intel Xeon on which torch sees
AVX512-BF16 and no AMX (``benchmarks/bench-xeon-avx512bf16-cpu.json``). So where the CPU has
bf16 instructions, ``--precision auto`` leaves a network of under ``MIN_MFLOP`` million
FLOPs per image forward at fp32 (too little arithmetic for bf16 to pay for its casts, and
too little for a timing to tell apart from overhead). For a larger one it times a few
training steps (forward, the ELBO, backward) of the run's own network in each precision,
alternating, on synthetic images, and takes bf16 only when it is at least ``MIN_GAIN`` times
as fast (``vaelab.training.resolve_precision``).

The probe builds its own copy of the network inside ``torch.random.fork_rng``, with its own
generator for the inputs: the process's random state, and so the run's weights, are the same
whether it ran or not. Its answer is kept for the process (the same network and batch are not
timed twice), and the run records the choice and the ratio in ``config.json``; a resumed run
keeps the choice it began with.
"""

from __future__ import annotations

import statistics
import time

import torch

from vaelab.models import ModelSpec, build_model
from vaelab.objectives import elbo_terms

MIN_MFLOP = 10.0  # forward FLOPs per image, in millions (the seed network: over 30)
MIN_GAIN = 1.1  # bf16 must be this much faster: a near tie is not worth its rounding
ROUNDS = 3
STEPS = 2  # timed steps per precision per round, after WARMUP untimed ones
WARMUP = 2

_measured: dict[tuple[ModelSpec, int, int], float] = {}
_flops: dict[ModelSpec, float] = {}


def forward_mflops(spec: ModelSpec) -> float:
    """Millions of FLOPs of one image's forward pass through network ``spec``
    (``torch.utils.flop_counter``, which counts the matrix products and convolutions)."""
    if spec not in _flops:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(spec)
        x = torch.zeros((1, 1, spec.image_size, spec.image_size))
        y = torch.zeros(1, dtype=torch.long) if spec.kind == "cvae" else None
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, y, eps=torch.zeros((1, spec.latent_dim)))
        _flops[spec] = counter.get_total_flops() / 1e6
    return _flops[spec]


def bf16_speedup(spec: ModelSpec, batch_size: int) -> float:
    """fp32 seconds per training step over bf16 seconds per step for network ``spec`` at
    ``batch_size`` on this CPU, with this process's torch threads (> 1: bf16 is faster).
    The median of ``ROUNDS`` alternating rounds."""
    key = (spec, int(batch_size), torch.get_num_threads())
    if key not in _measured:
        _measured[key] = _measure(spec, batch_size)
    return _measured[key]


def _measure(spec: ModelSpec, batch_size: int) -> float:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(spec).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    side = spec.image_size
    x = torch.rand((batch_size, 1, side, side), generator=gen).bernoulli(generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch_size,), generator=gen)
    eps = torch.randn((batch_size, spec.latent_dim), generator=gen)
    labels = y if spec.kind == "cvae" else None

    def steps(bf16: bool, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                out = model(x, labels, eps=eps)
            terms = elbo_terms(x, out.mu.float(), out.logvar.float(), out.logits.float(),
                               "bernoulli")
            terms.neg_elbo.mean().backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    steps(False, WARMUP)
    steps(True, WARMUP)
    ratios = []
    for _ in range(ROUNDS):
        fp32 = steps(False, STEPS)
        bf16 = steps(True, STEPS)
        ratios.append(fp32 / max(bf16, 1e-9))
    return statistics.median(ratios)
