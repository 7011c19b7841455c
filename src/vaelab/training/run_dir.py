"""The run folder: what a new run writes first, when a folder may be used or replaced, the
config a resume continues with, and the metrics file."""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab import __version__
from vaelab.checkpoint import list_checkpoints, read_config
from vaelab.config import TrainConfig, resume_config
from vaelab.errors import CheckpointError, ConfigError
from vaelab.io import atomic_write_json, atomic_write_text
from vaelab.locks import is_lock_file

# what a run that saved nothing holds: its config, an empty metrics file, folders without
# a checkpoint (a write's temporaries at most), TensorBoard events
_NOTHING_SAVED = ("config.json", "metrics.jsonl", "checkpoints", "tensorboard")
FINAL_FILES = ("model.safetensors", "model.json", "summary.json")


def versions() -> dict[str, str]:
    import matplotlib
    import safetensors

    return {
        "vaelab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "safetensors": safetensors.__version__,
        "matplotlib": matplotlib.__version__, "platform": platform.platform(),
    }


def resume_command(out: Path) -> str:
    """The command that continues the run in ``out``, quoted for a POSIX shell."""
    return f"vaelab train --resume --out {shlex.quote(str(out))}"


def saved_nothing(out: Path) -> bool:
    """True when ``out`` holds a run that kept nothing to resume or use: no checkpoint, no
    final weights, no metrics row (a NaN at the first step, a kill before the first
    checkpoint). A plain re-run starts such a run over, without ``--force``."""
    if not (out / "config.json").is_file() or list_checkpoints(out):
        return False
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        return False
    for child in out.iterdir():
        if is_lock_file(child) or child.name.startswith("."):
            continue  # the lock, and a killed write's temporaries
        if child.name not in _NOTHING_SAVED:
            return False
        if child.name == "checkpoints" and not child.is_dir():
            return False
    try:  # a config.json that is not vaelab's is someone's file: never replaced unasked
        read_config(out)
    except CheckpointError:
        return False
    return True


def check_run_dir(out: Path, *, force: bool) -> bool:
    """Refuse an output folder that holds something, unless ``force`` and it is a run folder,
    or it holds a run that saved nothing (``saved_nothing``).

    Writes nothing; True when the folder holds a run that is to be replaced.
    """
    if not (out.exists() and any(not is_lock_file(p) for p in out.iterdir())):
        return False
    if saved_nothing(out):
        return True
    is_run = (out / "config.json").exists() or (out / "checkpoints").exists()
    if not force:
        what = "a run" if is_run else "other files"
        raise ConfigError(
            f"output folder {out} already holds {what}: use --resume to continue it "
            "or --force to replace it"
        )
    if not is_run:
        raise ConfigError(f"--force replaces only run folders; {out} holds other files")
    return True


def resumed_config(
    out: Path, config: TrainConfig | None, changes: dict[str, Any] | None,
) -> tuple[dict[str, Any], TrainConfig, TrainConfig]:
    """The run's config.json (as read), its saved config, and the config its resume
    continues with: the saved one, changed only where ``changes`` (options given on resume)
    and the fields in which ``config`` differs from it are safe to change
    (``config.resume_config``)."""
    if not (out / "config.json").exists():
        raise CheckpointError(f"cannot resume: {out} holds no run (no config.json)")
    try:
        raw, saved = read_config(out)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from None
    wanted = dict(changes or {})
    if config is not None:
        wanted.update({k: v for k, v in config.to_dict().items()
                       if v != saved.to_dict()[k]})
    return raw, saved, resume_config(saved, wanted, run=str(out))


def prepare_run_dir(out: Path, config: TrainConfig, *, resume: bool, force: bool,
                    data: dict[str, Any] | None = None,
                    resolved: dict[str, Any] | None = None) -> TrainConfig:
    """Create or reopen the run folder; on resume the saved config is the one used. ``data``
    (``data.binarized_record``) goes into config.json as ``data``, and ``resolved`` (what
    ``auto`` became on this machine: device, precision and why) as ``resolved``."""
    cfg_path = out / "config.json"
    if resume:
        return resumed_config(out, None, None)[2]
    if check_run_dir(out, force=force):  # the old run goes; the lock held on out stays
        for child in out.iterdir():
            if not is_lock_file(child):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() \
                    else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, {
        "config": config.to_dict(), "model": config.model_spec().to_dict(),
        "versions": versions(), "seed": config.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv), **({"data": data} if data is not None else {}),
        **({"resolved": resolved} if resolved is not None else {}),
    })
    return config


def remove_stale_temporaries(out: Path) -> None:
    """A kill in the middle of a write leaves its temporary behind: never read, removed."""
    for stale in (out / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))


def record_resume(out: Path, raw: dict[str, Any], config: TrainConfig,
                  changes: dict[str, tuple[Any, Any]]) -> None:
    """Record the options a resume changed in config.json (``resumes``: when, what), so a
    later plain ``--resume`` continues with them. ``raw`` is config.json as the run began."""
    raw = dict(raw)
    raw["config"] = config.to_dict()
    earlier = raw.get("resumes")
    raw["resumes"] = [*(earlier if isinstance(earlier, list) else []), {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv),
        "changed": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}}]
    atomic_write_json(out / "config.json", raw)


def check_request(config: TrainConfig | None, *, resume: bool, force: bool) -> None:
    """Refuse a request no run folder can answer: ``--resume`` with ``--force``, a new run
    without a config, or an invalid config."""
    if resume and force:
        raise ConfigError("--resume continues the run in --out and --force replaces it: "
                          "give one or the other")
    if config is None and not resume:
        raise ConfigError("a new run needs a config (only a resume reads the saved one)")
    if config is not None:
        config.validate()


def open_run(out: Path, config: TrainConfig | None, *, resume: bool, force: bool,
             changes: dict[str, Any] | None, writer: bool,
             log: Any) -> tuple[TrainConfig, dict[str, Any] | None, dict[str, tuple[Any, Any]]]:
    """The config a run trains with, config.json as it was read (on resume), and the options
    the resume changes (field: (before, after)). A new run gets ``config`` for a folder it may
    use (checked by the one ``writer``: under torchrun its refusal stops every rank)."""
    if resume:
        raw, saved, cfg = resumed_config(out, config, changes)
        before = saved.to_dict()
        return cfg, raw, {k: (before[k], v) for k, v in cfg.to_dict().items() if before[k] != v}
    assert config is not None
    if saved_nothing(out):
        log(f"{out} holds a run that saved nothing (no checkpoint, no weights, no finished "
            "epoch): starting it over")
    if writer:
        check_run_dir(out, force=force)
    return config, None, {}
