"""Typed training configuration and the presets, in one place.

The ``study`` preset is the study's table (latent 2, batch 128, Adam lr 1e-3, 30 epochs, a
10-epoch linear KL warm-up; ``seed`` is its old name). ``quick`` is a first look on the first
10,000 images (a small MLP, six epochs: digits, clusters and a CVAE that draws the class asked
for, in a minute or two on a 2-core CPU); ``smoke`` is a few hundred images for one epoch
through a tiny network: the tests.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from vaelab.data import BINARIZATIONS
from vaelab.errors import ConfigError
from vaelab.models import ACTIVATIONS, ARCHS, MLP_HIDDEN, MODEL_KINDS, ModelSpec
from vaelab.objectives import (
    BETA_SCHEDULE_ALIASES,
    BETA_SCHEDULES,
    LIKELIHOODS,
    OBJECTIVES,
    warn_renamed,
)

DEVICES = ("auto", "cpu", "cuda")
# the architecture fields of TrainConfig, each also a ModelSpec field
ARCHITECTURE_KNOBS = ("channels", "enc_hidden", "dec_hidden", "activation", "dec_mlp_layers",
                      "dec_refine", "enc_mlp_layers", "enc_refine", "dec_full_channels",
                      "arch", "mlp_hidden", "label_conditioning")
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
SEED_MAX = 2**63 - 1  # torch and numpy take any seed in 0 ... 2^64 - 1; vaelab adds offsets
MAX_WARMUP_EPOCHS = 1e9  # beyond this, warm-up epochs x steps overflows nothing useful
MAX_IWAE_SAMPLES = 100_000  # K beyond this is an evaluation's, not a training step's
# Settings a resumed run may change (``vaelab train --resume``): where it runs, how often it
# checkpoints and how it evaluates, none of which changes the weights it trains. ``epochs`` may
# change too, when the schedules do not depend on the run's length (``resume_config``).
RESUME_SAFE = ("device", "cuda_graphs", "checkpoint_every", "eval_batch_size")
# Old names (issue 19), old name -> its name now: still accepted, with a deprecation notice.
PRESET_ALIASES = {"seed": "study"}
# the config fields whose values were renamed: (field, what the notice calls it, old -> new).
# A TrainConfig holds only the new names; a config.json written with an old one reads as the
# new one (``TrainConfig.from_dict``), so an old run resumes and compares as the same settings.
RENAMED_VALUES = (("preset", "preset", PRESET_ALIASES),
                  ("beta_schedule", "beta schedule", BETA_SCHEDULE_ALIASES))


def canonical_name(field_name: str, value: Any, *, warn: bool = True) -> Any:
    """``value`` of config field ``field_name``, or the name an old one is now
    (``RENAMED_VALUES``), with a ``DeprecationWarning`` when ``warn``; else as it is."""
    for name, what, aliases in RENAMED_VALUES:
        if name == field_name and isinstance(value, str) and value in aliases:
            if warn:
                warn_renamed(what, value, aliases[value])
            return aliases[value]
    return value


def canonical_preset(preset: Any, *, warn: bool = True) -> Any:
    """``preset``, or the preset an old name is now (``seed``: ``study``)."""
    return canonical_name("preset", preset, warn=warn)


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as ``config.json`` in the run folder."""

    model: str = "vae"
    dataset: str = "mnist"
    latent_dim: int = 2
    channels: tuple[int, int] = (32, 64)
    enc_hidden: int = 1024
    dec_hidden: int = 512
    activation: str = "gelu"  # smooth: the exact log p(x)'s rules converge fast (README)
    dec_mlp_layers: int = 2
    dec_refine: int = 2
    enc_mlp_layers: int = 2
    enc_refine: int = 2
    dec_full_channels: int = 0
    arch: str = "conv"
    mlp_hidden: tuple[int, int] = MLP_HIDDEN
    label_conditioning: str = "film"  # a CVAE's: film, film-both, or input (the study's)
    likelihood: str = "bernoulli"
    objective: str = "elbo"
    k: int = 1  # samples of z per image: the IWAE bound's K
    binarize: str = "none"
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW), on weight matrices and kernels only
    lr_schedule: str = "constant"
    epochs: int = 30
    # early stopping: stop once this many epochs in a row bring no better validation -ELBO,
    # and keep the weights of the best epoch (0: off, train every epoch, keep the last)
    patience: int = 0
    beta_schedule: str = "linear-step"  # "linear" is its old name
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

    def __post_init__(self) -> None:
        self.rename_old_names()

    def rename_old_names(self, *, warn: bool = True) -> None:
        """Replace an old name (``RENAMED_VALUES``: preset ``seed``, beta schedule ``linear``)
        by its name now, with a ``DeprecationWarning`` when ``warn``."""
        for name, _, _ in RENAMED_VALUES:
            setattr(self, name, canonical_name(name, getattr(self, name), warn=warn))

    def validate(self, *, check_memory: bool = True) -> TrainConfig:
        """Raise ``ConfigError`` naming the first value of a wrong type or out of range, and,
        with ``check_memory``, a model too large to train in this machine's memory (before
        anything is allocated: ``check_fits``); return self."""
        self.rename_old_names()  # an old name set after construction (cfg.preset = "seed")
        self.check_types()
        self.channels = tuple(int(c) for c in self.channels)  # type: ignore[assignment]
        self.mlp_hidden = tuple(int(h) for h in self.mlp_hidden)  # type: ignore[assignment]
        checks: list[tuple[bool, str]] = [
            (self.model in MODEL_KINDS, f"unknown model {_short(self.model)}: choose vae or cvae"),
            (self.epochs >= 1, f"epochs must be >= 1, got {_short(self.epochs)}"),
            (self.latent_dim >= 1, f"latent size must be >= 1, got {_short(self.latent_dim)}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {_short(self.batch_size)}"),
            (math.isfinite(self.lr) and self.lr > 0,
             f"learning rate must be > 0, got {_short(self.lr)}"),
            (math.isfinite(self.weight_decay) and 0 <= self.weight_decay * self.lr < 1,
             f"weight decay must be >= 0 and below 1 / lr, got {_short(self.weight_decay)}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"unknown lr schedule {_short(self.lr_schedule)}: choose "
             f"{' or '.join(LR_SCHEDULES)}"),
            (self.beta_schedule in BETA_SCHEDULES,
             f"unknown beta schedule {_short(self.beta_schedule)}: choose one of "
             f"{', '.join(BETA_SCHEDULES)}"),
            (0 <= self.warmup_epochs <= MAX_WARMUP_EPOCHS,
             f"warm-up epochs must be >= 0 and <= {MAX_WARMUP_EPOCHS:g}, "
             f"got {_short(self.warmup_epochs)}"),
            (0 <= self.seed <= SEED_MAX, seed_message(self.seed)),
            (math.isfinite(self.beta) and self.beta >= 0,
             f"beta must be >= 0, got {_short(self.beta)}"),
            (self.cycles >= 1, f"cycles must be >= 1, got {_short(self.cycles)}"),
            (math.isfinite(self.free_bits) and self.free_bits >= 0,
             f"free bits must be >= 0, got {_short(self.free_bits)}"),
            (self.likelihood in LIKELIHOODS,
             f"unknown likelihood {_short(self.likelihood)}: choose one of "
             f"{', '.join(LIKELIHOODS)}"),
            (self.arch in ARCHS,
             f"unknown architecture {_short(self.arch)}: choose {' or '.join(ARCHS)}"),
            (self.objective in OBJECTIVES,
             f"unknown objective {_short(self.objective)}: choose {' or '.join(OBJECTIVES)}"),
            (1 <= self.k <= MAX_IWAE_SAMPLES,
             f"k must be from 1 to {MAX_IWAE_SAMPLES:,} samples, got {_short(self.k)}"),
            (self.k == 1 or self.objective == "iwae",
             f"--k {_short(self.k)} is for --objective iwae: the ELBO takes one sample of z"),
            (self.free_bits == 0 or self.objective != "iwae",
             "--free-bits is for --objective elbo: it clamps each dimension's KL, a term the "
             "IWAE bound does not have"),
            (self.binarize in BINARIZATIONS,
             f"unknown binarization {_short(self.binarize)}: choose "
             f"{' or '.join(BINARIZATIONS)}"),
            (self.activation in ACTIVATIONS,
             f"unknown activation {_short(self.activation)}: choose one of "
             f"{', '.join(ACTIVATIONS)}"),
            (self.device in DEVICES,
             f"unknown device {_short(self.device)}: choose auto, cpu or cuda"),
            (isinstance(self.cuda_graphs, bool),
             f"cuda_graphs must be true or false, got {_short(self.cuda_graphs)}"),
            (self.precision in PRECISIONS,
             f"unknown precision {_short(self.precision)}: choose auto, fp32 or bf16"),
            (self.val_size >= 0, f"validation size must be >= 0, got {_short(self.val_size)}"),
            (self.limit is None or self.limit >= 1,
             f"limit must be >= 1, got {_short(self.limit)}"),
            (self.patience >= 0, f"patience must be >= 0 epochs, got {_short(self.patience)}"),
            (self.patience == 0 or self.val_size > 0,
             "--patience needs a validation split to watch: --val-size must be > 0"),
            (self.checkpoint_every >= 0,
             f"checkpoint-every must be >= 0 steps, got {_short(self.checkpoint_every)}"),
            (self.eval_batch_size >= 1, "eval batch size must be >= 1"),
            (self.dataset == "mnist" or self.dataset.startswith("idx:"),
             f"unknown dataset {_short(self.dataset)}: choose mnist or idx:DIR"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.model_spec()  # shape checks live with the model
        if check_memory:
            check_fits(self)
        return self

    def check_types(self) -> None:
        """Raise ``ConfigError`` naming the first field whose value has the wrong type (a
        hand-edited config.json: ``"limit": "abc"``, ``"epochs": 2.5``, ``"channels": 8``)."""
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            ok, what = _type_check(default, value)
            if not ok:
                raise ConfigError(f"{f.name} must be {what}, got {_short(value)}")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(kind=self.model, latent_dim=self.latent_dim,
                         **{k: getattr(self, k) for k in ARCHITECTURE_KNOBS})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields: {field_names(unknown)}")
        # a knob a run's config.json predates was not in its network: take ModelSpec's default
        # (the layer absent), never TrainConfig's (vaelab's current architecture)
        spec_defaults = {f.name: f.default for f in fields(ModelSpec)}
        d = {**{k: spec_defaults[k] for k in ARCHITECTURE_KNOBS if k not in d}, **d}
        # a config.json written before a rename (preset "seed", beta schedule "linear") reads
        # as the new name, silently: the run is the same, only the name changed
        d = {k: canonical_name(k, v, warn=False) for k, v in d.items()}
        cfg = cls(**d)
        cfg.check_types()
        cfg.channels = tuple(cfg.channels)  # type: ignore[assignment]
        cfg.mlp_hidden = tuple(cfg.mlp_hidden)  # type: ignore[assignment]
        return cfg


def field_names(names: Any, most: int = 5) -> str:
    """Field names for a message: the first ``most``, each cut short, quoted when not plain."""
    shown = [n if isinstance(n, str) and n.isidentifier() and len(n) <= 40 else _short(n)
             for n in sorted(names, key=str)[:most]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_check(default: Any, value: Any) -> tuple[bool, str]:
    """(does ``value`` have the type of a field whose default is ``default``, its name)."""
    if isinstance(default, bool):
        return isinstance(value, bool), "true or false"
    if isinstance(default, int):
        return _is_int(value), "a whole number"
    if isinstance(default, float):  # NaN and infinity are a range check's to refuse
        return _is_int(value) or isinstance(value, float), "a number"
    if isinstance(default, str):
        return isinstance(value, str), "a string"
    if isinstance(default, tuple):
        return (isinstance(value, (list, tuple)) and len(value) == len(default)
                and all(_is_int(v) for v in value)), f"a list of {len(default)} whole numbers"
    if default is None:
        return value is None or _is_int(value), "a whole number or null"
    if isinstance(default, dict):
        return isinstance(value, dict), "an object"
    return True, ""


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters (a config value may be anything)."""
    if _is_int(value) and value.bit_length() > 128:
        return f"an integer of about {magnitude(value)}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def magnitude(n: int) -> str:
    """A whole number as "10^k" (k from its bit length: ``str`` refuses numbers of more than
    4300 digits)."""
    return f"10^{int(n.bit_length() * math.log10(2))}"


def seed_message(seed: Any) -> str:
    return f"seed must be a whole number from 0 to 2^63 - 1, got {_short(seed)}"


def check_seed(seed: Any) -> int:
    """``seed`` as an int if it is a whole number (numpy's too) in 0 ... 2^63 - 1; else
    ``ConfigError``."""
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
            and 0 <= seed <= SEED_MAX):
        raise ConfigError(seed_message(seed))
    return int(seed)


# --------------------------------------------------------------------------------------------
# Will it fit? An estimate from the config alone, checked before anything is allocated
# --------------------------------------------------------------------------------------------
def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def training_memory_bytes(cfg: TrainConfig) -> int:
    """About how many bytes training ``cfg`` needs: weights, gradients and Adam's two moments
    (4 numbers of 4 bytes per parameter), the training batch's activations and their gradients,
    and an evaluation batch's activations. An estimate, in exact integers."""
    spec = cfg.model_spec()
    cap = cfg.limit if cfg.limit is not None else cfg.batch_size
    batch, eval_batch = min(cfg.batch_size, cap), min(cfg.eval_batch_size, max(cap, 1))
    acts = spec.activations_per_image(samples=cfg.k)  # a training step decodes K samples
    return 4 * (4 * spec.parameter_count() + 2 * batch * acts
                + eval_batch * spec.activations_per_image())


def format_bytes(n: int) -> str:
    if n.bit_length() > 70:
        return f"about {magnitude(n)} bytes"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def check_fits(cfg: TrainConfig, memory: int | None = None, where: str = "this machine") -> None:
    """Refuse a config whose training memory estimate exceeds ``memory`` bytes (default: this
    machine's physical memory; 1 PiB where the OS does not say), before anything is built."""
    have = memory if memory is not None else (machine_memory() or 2**50)
    need = training_memory_bytes(cfg)
    if need > have:
        params = cfg.model_spec().parameter_count()
        count = f"{params:,}" if params.bit_length() < 50 else magnitude(params)
        raise ConfigError(
            f"the model cannot fit: {count} parameters at batch {_short(cfg.batch_size)} need "
            f"{format_bytes(need)} to train (estimated: weights, gradients, Adam's moments and "
            f"activations, 4 bytes each), more than {where}'s {format_bytes(have)} of memory; "
            "choose smaller sizes (--latent-dim, --enc-hidden, --dec-hidden, --channels, "
            "--mlp-hidden, --batch-size, --k)")


# --------------------------------------------------------------------------------------------
# Resuming: which options may differ from the run's config
# --------------------------------------------------------------------------------------------
def option_name(name: str) -> str:
    """The ``vaelab train`` option of config field ``name``."""
    if name == "cuda_graphs":
        return "--no-cuda-graphs"
    if name in ("eval_batch_size", "extra"):
        return name  # no option: set through the API only
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_short(v) for v in value)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) and len(value) <= 80 else _short(value, 80)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def length_dependence(cfg: TrainConfig) -> str | None:
    """Why ``cfg``'s schedules depend on its number of epochs (None: they do not), so that a
    run of ``cfg`` cannot be lengthened or shortened on resume without changing its past."""
    why = []
    if cfg.lr_schedule == "cosine":
        why.append("its cosine learning rate decays over all the run's epochs")
    if cfg.beta_schedule == "cyclical":
        why.append("its cyclical beta spreads its cycles over all the run's epochs")
    return " and ".join(why) or None


def resume_config(saved: TrainConfig, changes: Mapping[str, Any], *, run: str) -> TrainConfig:
    """The config a resumed run continues with: ``saved`` (the run's config.json) with the
    ``changes`` that are safe (``RESUME_SAFE``; ``epochs`` when ``length_dependence`` is None).

    Values equal to the saved ones, and None, are no change. Any other change raises one
    ``ConfigError`` that lists every conflicting option with the run's value, e.g.
    ``--resume: these options differ from RUN's config: --lr 0.5 (run has 0.001)``.
    """
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(changes) - known
    if unknown:
        raise ConfigError(f"unknown config fields: {field_names(unknown)}")
    # an old name is the same setting as its new one: no change (``canonical_name``)
    changes = {k: canonical_name(k, v) for k, v in changes.items()}
    safe: dict[str, Any] = {}
    conflicts: list[str] = []
    for name, value in changes.items():
        old = getattr(saved, name)
        if value is None or _same(value, old):
            continue
        if name in RESUME_SAFE:
            safe[name] = value
        elif name == "epochs" and length_dependence(saved) is None:
            safe[name] = value
        elif name == "epochs":
            conflicts.append(f"--epochs {_shown(value)} (run has {old}: "
                             f"{length_dependence(saved)})")
        else:
            conflicts.append(f"{option_name(name)} {_shown(value)} (run has {_shown(old)})")
    if conflicts:
        allowed = ", ".join(option_name(n) for n in ("epochs", *RESUME_SAFE[:3]))
        raise ConfigError(
            f"--resume: these options differ from {run}'s config: {', '.join(conflicts)}. "
            f"A resumed run keeps its config but for {allowed}, --quiet and --tensorboard; "
            "to train other settings, start a new run (another --out, or --force)")
    return replace(saved, **safe).validate()


class RenamedKeys(dict):
    """A dict whose old keys (``aliases``: old -> new) still find their value: ``in``,
    ``[]`` and ``get`` take either name; iterating, ``keys()`` and ``len`` give the new ones."""

    def __init__(self, data: Mapping[str, Any], aliases: Mapping[str, str]) -> None:
        super().__init__(data)
        self.aliases = dict(aliases)

    def _key(self, key: Any) -> Any:
        return self.aliases.get(key, key) if isinstance(key, str) else key

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._key(key))

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(self._key(key), default)


# The study's table (latent 2, batch 128, Adam 1e-3, 30 epochs, 10-epoch warm-up). vaelab's own
# choices on top: a per-step warm-up, the architecture (TrainConfig defaults) and a cosine decay
# of the learning rate from the study's 1e-3; ``--lr-schedule constant`` undoes only the last
# (README, "Training", names the flags nearest the study's recipe).
PRESETS: dict[str, dict[str, Any]] = RenamedKeys({
    "study": dict(
        latent_dim=2, batch_size=128, lr=1e-3, epochs=30, beta_schedule="linear-step",
        warmup_epochs=10.0, lr_schedule="cosine",
    ),
    # A first look (``vaelab reproduce --quick``): an MLP (the conv network learns less per
    # second on a CPU) on the first 10,000 training and test images, at a brisker learning rate
    # and a smaller batch than the study's, for more steps per second of training. It and the
    # tests' tiny ``smoke`` runs keep the network they were measured and tuned with (ReLU, the
    # label at the first layer), whatever vaelab's default network becomes.
    "quick": dict(
        latent_dim=2, arch="mlp", mlp_hidden=(512, 256), batch_size=64, lr=3e-3, epochs=6,
        beta_schedule="linear-step", warmup_epochs=2.0, limit=10_000, val_size=1000,
        activation="relu", label_conditioning="input",
    ),
    "smoke": dict(
        latent_dim=2, batch_size=64, lr=1e-3, epochs=1, beta_schedule="linear-step",
        warmup_epochs=0.5, limit=512, val_size=128, channels=(8, 16), enc_hidden=64,
        dec_hidden=64, dec_mlp_layers=1, dec_refine=0, enc_mlp_layers=1, enc_refine=0,
        dec_full_channels=0, activation="relu", label_conditioning="input",
    ),
}, PRESET_ALIASES)


def resolve_config(preset: str = "study", **overrides: Any) -> TrainConfig:
    """The preset's values, then every override that is not None; validated. ``seed`` (the
    old name of ``study``) and beta schedule ``linear`` (of ``linear-step``) give the same
    config as their new names, with a ``DeprecationWarning``."""
    preset = canonical_preset(preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    cfg = replace(TrainConfig(), **PRESETS[preset], preset=preset)
    changes = {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in fields(TrainConfig)}
    bad = set(changes) - known
    if bad:
        raise ConfigError(f"unknown config fields: {field_names(bad)}")
    return replace(cfg, **changes).validate()
