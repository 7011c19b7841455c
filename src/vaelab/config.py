"""Typed training configuration and the presets, in one place.

The ``seed`` preset is the study's table (latent 2, batch 128, Adam lr 1e-3, 30 epochs, a
10-epoch linear KL warm-up). ``quick`` is a few hundred images for one epoch: tests, first looks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from vaelab.errors import ConfigError
from vaelab.models import ACTIVATIONS, MODEL_KINDS, ModelSpec
from vaelab.objectives import BETA_SCHEDULES, LIKELIHOODS

DEVICES = ("auto", "cpu", "cuda")
# the architecture fields of TrainConfig, each also a ModelSpec field
ARCHITECTURE_KNOBS = ("channels", "enc_hidden", "dec_hidden", "activation", "dec_mlp_layers",
                      "dec_refine", "enc_mlp_layers", "enc_refine", "dec_full_channels")
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as ``config.json`` in the run folder."""

    model: str = "vae"
    dataset: str = "mnist"
    latent_dim: int = 2
    channels: tuple[int, int] = (32, 64)
    enc_hidden: int = 512
    dec_hidden: int = 512
    activation: str = "relu"
    dec_mlp_layers: int = 2
    dec_refine: int = 2
    enc_mlp_layers: int = 2
    enc_refine: int = 1
    dec_full_channels: int = 0
    likelihood: str = "bernoulli"
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"
    epochs: int = 30
    beta_schedule: str = "linear"
    warmup_epochs: float = 10.0
    beta: float = 1.0
    cycles: int = 4
    free_bits: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    cuda_graphs: bool = True
    val_size: int = 5000
    limit: int | None = None
    checkpoint_every: int = 0
    eval_batch_size: int = 1000
    preset: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        """Raise ``ConfigError`` naming the first value out of range; return self."""
        self.channels = tuple(int(c) for c in self.channels)  # type: ignore[assignment]
        checks: list[tuple[bool, str]] = [
            (self.model in MODEL_KINDS, f"unknown model '{self.model}': choose vae or cvae"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.latent_dim >= 1, f"latent size must be >= 1, got {self.latent_dim}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"unknown lr schedule '{self.lr_schedule}': choose {' or '.join(LR_SCHEDULES)}"),
            (self.beta_schedule in BETA_SCHEDULES,
             f"unknown beta schedule '{self.beta_schedule}': choose one of "
             f"{', '.join(BETA_SCHEDULES)}"),
            (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"warm-up epochs must be >= 0, got {self.warmup_epochs}"),
            (math.isfinite(self.beta) and self.beta >= 0, f"beta must be >= 0, got {self.beta}"),
            (self.cycles >= 1, f"cycles must be >= 1, got {self.cycles}"),
            (math.isfinite(self.free_bits) and self.free_bits >= 0,
             f"free bits must be >= 0, got {self.free_bits}"),
            (self.likelihood in LIKELIHOODS,
             f"unknown likelihood '{self.likelihood}': choose one of {', '.join(LIKELIHOODS)}"),
            (self.activation in ACTIVATIONS,
             f"unknown activation '{self.activation}': choose one of {', '.join(ACTIVATIONS)}"),
            (self.device in DEVICES, f"unknown device '{self.device}': choose auto, cpu or cuda"),
            (isinstance(self.cuda_graphs, bool),
             f"cuda_graphs must be true or false, got {self.cuda_graphs!r}"),
            (self.precision in PRECISIONS,
             f"unknown precision '{self.precision}': choose auto, fp32 or bf16"),
            (self.val_size >= 0, f"validation size must be >= 0, got {self.val_size}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (self.checkpoint_every >= 0,
             f"checkpoint-every must be >= 0 steps, got {self.checkpoint_every}"),
            (self.eval_batch_size >= 1, "eval batch size must be >= 1"),
            (self.dataset == "mnist" or self.dataset.startswith("idx:"),
             f"unknown dataset '{self.dataset}': choose mnist or idx:DIR"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.model_spec()  # shape checks live with the model
        return self

    def model_spec(self) -> ModelSpec:
        return ModelSpec(kind=self.model, latent_dim=self.latent_dim,
                         **{k: getattr(self, k) for k in ARCHITECTURE_KNOBS})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(sorted(unknown))}")
        # a knob a run's config.json predates was not in its network: take ModelSpec's default
        # (the layer absent), never TrainConfig's (vaelab's current architecture)
        spec_defaults = {f.name: f.default for f in fields(ModelSpec)}
        d = {**{k: spec_defaults[k] for k in ARCHITECTURE_KNOBS if k not in d}, **d}
        cfg = cls(**d)
        cfg.channels = tuple(cfg.channels)  # type: ignore[assignment]
        return cfg


# The study's table (latent 2, batch 128, Adam 1e-3, 30 epochs, 10-epoch warm-up). vaelab's own
# choices on top: a per-step warm-up, the architecture (TrainConfig defaults) and a cosine decay
# of the learning rate from the study's 1e-3; ``--lr-schedule constant`` undoes only the last
# (README, "Training", names the flags nearest the study's recipe).
PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(
        latent_dim=2, batch_size=128, lr=1e-3, epochs=30, beta_schedule="linear",
        warmup_epochs=10.0, lr_schedule="cosine",
    ),
    "quick": dict(
        latent_dim=2, batch_size=64, lr=1e-3, epochs=1, beta_schedule="linear",
        warmup_epochs=0.5, limit=512, val_size=128, channels=(8, 16), enc_hidden=64,
        dec_hidden=64, dec_mlp_layers=1, dec_refine=0, enc_mlp_layers=1, enc_refine=0,
        dec_full_channels=0,
    ),
}


def resolve_config(preset: str = "seed", **overrides: Any) -> TrainConfig:
    """The preset's values, then every override that is not None; validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    cfg = replace(TrainConfig(), **PRESETS[preset], preset=preset)
    changes = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(TrainConfig)}
    bad = set(changes) - known
    if bad:
        raise ConfigError(f"unknown config fields: {', '.join(sorted(bad))}")
    return replace(cfg, **changes).validate()
