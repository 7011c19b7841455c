"""Where a run trains and in which precision: the device, and bf16 where it is measured to pay."""

from __future__ import annotations

from typing import Any

import torch

from vaelab.config import TrainConfig, check_fits
from vaelab.errors import ConfigError
from vaelab.models import ModelSpec
from vaelab.precision import MIN_GAIN, MIN_MFLOP, bf16_speedup, forward_mflops
from vaelab.training.distributed import from_rank_zero


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a device, else the CPU. Changes no process-wide setting:
    a run scopes fp32-as-IEEE-fp32 on CUDA to itself (``vaelab.backends.cuda_settings``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def run_device(cfg: TrainConfig, local_rank: int | None = None) -> torch.device:
    """The device a run trains on: ``pick_device``, under torchrun on CUDA the rank's own GPU
    (``local_rank``, made the process's current device), and on CUDA checked to hold the run
    (the memory ``config.check_fits`` asks)."""
    device = pick_device(cfg.device)
    if local_rank is not None and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        check_fits(cfg, props.total_memory, where=props.name)
    return device


def cpu_bf16_hardware() -> str | None:
    """The instructions that compute bf16 natively on this CPU, as torch's oneDNN sees them:
    ``"AMX"`` (Intel Sapphire Rapids and later), ``"AVX512-BF16"`` (Cooper Lake, AMD Zen 4 and
    later), or None (AVX2-only CPUs, where bf16 is emulated and slower than fp32)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def resolve_precision(name: str, device: torch.device, spec: ModelSpec | None = None,
                      batch_size: int = 128) -> tuple[str, str]:
    """The precision a run of network ``spec`` (default: vaelab's default network) at
    ``batch_size`` trains in, and why, in a few words. ``auto``: on CUDA, bf16 where the GPU
    computes it; on a CPU with bf16 instructions (``cpu_bf16_hardware``) and a network of at
    least ``MIN_MFLOP`` per image, bf16 where it trains this network at least ``MIN_GAIN``
    times as fast as fp32, as measured here (``vaelab.precision``); fp32 elsewhere. The
    loss, the KL and every evaluation stay fp32 either way."""
    if name != "auto":
        return name, "asked for by name"
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ("bf16" if bf16 else "fp32"), "auto: CUDA " + ("computes" if bf16 else "lacks") \
            + " bf16"
    isa = cpu_bf16_hardware() if device.type == "cpu" else None
    if not isa:
        return "fp32", "auto: this CPU has no bf16 instructions"
    spec = spec or TrainConfig().model_spec()
    mflop = forward_mflops(spec)
    if mflop < MIN_MFLOP:
        return "fp32", (f"auto: this CPU has {isa}, but this network is too small for bf16 "
                        f"to pay ({mflop:.1f} < {MIN_MFLOP:g} MFLOP per image)")
    gain = bf16_speedup(spec, batch_size)
    chosen = "bf16" if gain >= MIN_GAIN else "fp32"
    return chosen, (f"auto: this CPU has {isa}; bf16 measured {gain:.2f}x as fast as fp32 "
                    f"for this network ({'>=' if chosen == 'bf16' else '<'} {MIN_GAIN:g}x)")


def pick_precision(name: str, device: torch.device, spec: ModelSpec | None = None,
                   batch_size: int = 128) -> str:
    """The precision of ``resolve_precision``."""
    return resolve_precision(name, device, spec, batch_size)[0]


def precision_reason(name: str, device: torch.device, spec: ModelSpec | None = None,
                     batch_size: int = 128) -> str:
    """Why ``pick_precision`` chose what it did, in a few words."""
    return resolve_precision(name, device, spec, batch_size)[1]


def run_precision(cfg: TrainConfig, device: torch.device, saved: Any, *, resumed: bool,
                  rank: int = 0, world_size: int = 1) -> tuple[str, str]:
    """The precision a run trains in, and why. A resumed run keeps the one it began with
    (``saved``: config.json's ``resolved``; runs from before that record resolved ``auto`` to
    fp32 on a CPU), so it ends as it would have uninterrupted, on any machine. Under torchrun
    on CPUs the timed choice is rank 0's, for every rank."""
    if resumed and cfg.precision == "auto":
        if isinstance(saved, dict) and saved.get("precision") in ("fp32", "bf16"):
            return saved["precision"], "kept from the run's start"
        if device.type == "cpu":
            return "fp32", "kept from the run's start (auto was fp32 on every CPU then)"
    batch = max(1, cfg.batch_size // world_size)

    def pick() -> tuple[str, str]:
        return resolve_precision(cfg.precision, device, cfg.model_spec(), batch)

    if world_size > 1 and device.type == "cpu":
        return from_rank_zero(rank, world_size, pick)
    return pick()
