"""Many runs at once: a grid of ``vaelab train`` settings run as Ray tasks, one run folder each.

``plan_sweep`` turns a preset, train options and a grid (``{"seed": ["0", "1"], ...}``) into
trials, every value parsed and every config validated before anything starts. ``run_sweep``
runs the trials that are not finished, each as one Ray task (``run_trial``) that calls the
ordinary ``vaelab.training.Trainer`` into ``OUT/NAME`` (``NAME`` from the trial's grid values, e.g.
``latent_dim=2,seed=0``), so ``evaluate``, ``plot`` and ``explore`` work on every trial. The
sweep folder::

    sweep.json   the plan, each trial's status and test metrics, the table's rows
    sweep.md     the table: one row per setting, mean ± std over seeds
    NAME/        an ordinary run folder (+ exact_log_px.json for a 1- or 2-D latent)

Faults: a worker that dies is retried by Ray (``max_retries``) and the retry resumes the run
from its newest checkpoint (``Trainer(resume=True)``); a second sweep over the same folder
skips finished trials and resumes unfinished ones; the run folder's lock (``vaelab.locks``)
keeps two attempts at one trial from writing it at once, and an attempt that finds the lock
held (a dying worker not yet gone) waits for it a little.

Ray is imported only by ``run_sweep`` (``pip install 'vaelab[sweep]'``).
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaelab.config import (
    ARCHITECTURE_KNOBS,
    PRESETS,
    TrainConfig,
    canonical_preset,
    resolve_config,
)
from vaelab.errors import CheckpointError, ConfigError, VaelabError
from vaelab.io import atomic_write_json, atomic_write_text
from vaelab.locks import FolderInUse, FolderLock, check_output_folder, is_lock_file

SWEEP_FORMAT = 1
SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.md"
EXACT_FILE = "exact_log_px.json"
# the train options a grid may vary: the dest names of ``vaelab train``'s options
GRID_KEYS = ("model", "dataset", "latent_dim", "epochs", "batch_size", "lr", "weight_decay",
            "lr_schedule",
             "beta_schedule", "warmup_epochs", "beta", "cycles", "free_bits", "likelihood",
             "seed", "device", "precision", "val_size", "limit", "checkpoint_every", "patience",
             "objective", "k", "binarize", *ARCHITECTURE_KNOBS)
# Settings that say where and how often, not what is trained: a finished trial that differs
# from the wanted config only in these (say, trained with --device cpu) is reused.
RUNTIME_SETTINGS = ("device", "checkpoint_every", "eval_batch_size", "cuda_graphs")
# (key, label) of the table's columns: nats per image on the test set
METRICS: tuple[tuple[str, str], ...] = (
    ("recon", "recon"), ("kl", "KL"), ("neg_elbo", "-ELBO"), ("neg_log_px", "-log p(x), exact"))
LOCK_WAIT_S = 60.0  # how long an attempt waits for a trial folder another attempt holds
DEFAULT_RETRIES = 3
DEFAULT_GPU_SHARE = 0.5  # two trials per GPU, as reproduce trains two runs at once on one


# --------------------------------------------------------------------------------------------
# The grid: keys, values, trials
# --------------------------------------------------------------------------------------------
def _field_types() -> dict[str, str]:
    from dataclasses import fields

    return {f.name: str(f.type) for f in fields(TrainConfig)}


def parse_value(key: str, value: Any, where: str = "--grid") -> Any:
    """One grid value of ``key``, from the command line's text or a spec file's JSON value,
    as ``TrainConfig`` holds it. Raises ``ConfigError`` naming the key and the value."""
    kind = _field_types()[key]
    shown = value if isinstance(value, str) else json.dumps(value)

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where} {key}: '{shown}' is not {what}")

    if kind in ("int", "int | None"):
        if isinstance(value, bool) or isinstance(value, float):
            raise bad("a whole number")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad("a whole number") from None
    if kind == "float":
        if isinstance(value, bool):
            raise bad("a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad("a name")
        return value
    if kind == "tuple[int, int]":  # channels: "16x32" or [16, 32]
        parts = value.split("x") if isinstance(value, str) else value
        try:
            pair = tuple(int(p) for p in parts)
        except (TypeError, ValueError):
            pair = ()
        if len(pair) != 2 or any(isinstance(p, (bool, float)) for p in parts):
            raise bad("two whole numbers like 16x32")
        return pair
    raise ConfigError(f"{where} {key}: this setting cannot be swept")


def parse_grid_option(text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,...`` -> (KEY, [V1, V2, ...]); the values are parsed by ``plan_sweep``."""
    key, sep, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"--grid '{text}': expected KEY=V1,V2,... (e.g. seed=0,1,2)")
    items = [v.strip() for v in values.split(",")] if values.strip() else []
    if any(not v for v in items):
        raise ConfigError(f"--grid '{text}': an empty value in the list")
    return key, items


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """A spec file: JSON ``{"preset": P, "options": {KEY: V}, "grid": {KEY: [V, ...]}}``, each
    part optional; KEY is a train option's name as in ``--grid``."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the spec file {p}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{p} is not JSON ({e})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{p}: a spec is a JSON object with preset, options and grid")
    unknown = set(spec) - {"preset", "options", "grid"}
    if unknown:
        raise ConfigError(f"{p}: unknown spec fields {', '.join(sorted(unknown))} "
                          "(preset, options, grid)")
    for part in ("options", "grid"):
        if not isinstance(spec.get(part, {}), dict):
            raise ConfigError(f"{p}: '{part}' must be an object of KEY: value")
    for key, values in spec.get("grid", {}).items():
        if not isinstance(values, list):
            raise ConfigError(f"{p}: grid '{key}' must be a list of values")
    if "preset" in spec and not isinstance(spec["preset"], str):
        raise ConfigError(f"{p}: 'preset' must be a preset's name")
    return spec


def _value_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return urllib.parse.quote(str(value), safe="=.:+-_")  # no '/' in a folder name


def trial_name(values: dict[str, Any]) -> str:
    """The trial's folder name: ``key=value`` of each grid key (in grid order, seed last),
    joined by ','."""
    return ",".join(f"{k}={_value_text(v)}" for k, v in values.items())


@dataclass(frozen=True)
class Trial:
    name: str
    values: dict[str, Any]  # this trial's grid values, in grid order
    config: TrainConfig


@dataclass
class SweepPlan:
    out: Path
    preset: str
    options: dict[str, Any]  # the train options given (not None), the same for every trial
    grid: dict[str, list[Any]]  # parsed values, in the order given
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "options": _jsonable(self.options),
                "grid": _jsonable(self.grid)}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _absolute_dataset(name: Any) -> Any:
    """``idx:DIR`` with DIR absolute: the trials may run in another working directory."""
    if isinstance(name, str) and name.startswith("idx:"):
        return "idx:" + str(Path(name[4:]).expanduser().absolute())
    return name


def plan_sweep(
    out: str | os.PathLike,
    *,
    grid: dict[str, Sequence[Any]],
    preset: str = "study",
    options: dict[str, Any] | None = None,
) -> SweepPlan:
    """Every trial of ``grid`` (the product of its value lists, in order) over ``preset`` and
    ``options``, each config validated (an old preset name, ``seed``, is planned as its new one,
    ``study``, with a DeprecationWarning). Raises ``ConfigError`` (one line) for an unknown key, a
    value of the wrong type, an empty or repeated list entry, a key given both as an option and
    in the grid, or a config out of range, before anything is written."""
    preset = canonical_preset(preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    if not grid:
        raise ConfigError("a sweep needs at least one --grid KEY=V1,V2,...")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(given) - set(GRID_KEYS) - {"cuda_graphs"})
    if unknown:
        raise ConfigError(f"unknown train option(s): {', '.join(unknown)}")
    parsed: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if key not in GRID_KEYS:
            raise ConfigError(f"--grid {key}: not a train option; choose one of "
                              f"{', '.join(GRID_KEYS)}")
        if key in given:
            raise ConfigError(f"{key} is given both as an option and in the grid: give it once")
        if len(values) == 0:
            raise ConfigError(f"--grid {key}: an empty list of values")
        parsed[key] = [parse_value(key, v) for v in values]
        repeated = [v for i, v in enumerate(parsed[key]) if v in parsed[key][:i]]
        if repeated:
            raise ConfigError(f"--grid {key}: the value {_value_text(repeated[0])} is listed twice")
    given = {k: v if k == "cuda_graphs" else parse_value(k, v, "option") for k, v in given.items()}
    if "dataset" in given:
        given["dataset"] = _absolute_dataset(given["dataset"])
    if "dataset" in parsed:
        parsed["dataset"] = [_absolute_dataset(v) for v in parsed["dataset"]]
    if "seed" in parsed:  # seeds vary fastest, and come last in a trial's name
        parsed["seed"] = parsed.pop("seed")
    plan = SweepPlan(Path(out), preset, given, parsed)
    combos: list[dict[str, Any]] = [{}]
    for key, values in parsed.items():
        combos = [{**c, key: v} for c in combos for v in values]
    for values in combos:
        try:
            config = resolve_config(preset, **given, **values)
        except ConfigError as e:
            raise ConfigError(f"trial {trial_name(values)}: {e}") from None
        plan.trials.append(Trial(trial_name(values), values, config))
    return plan


# --------------------------------------------------------------------------------------------
# One trial: what its folder holds, and the Ray task that trains it
# --------------------------------------------------------------------------------------------
def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RUNTIME_SETTINGS}


def recipe(config: TrainConfig) -> dict[str, Any]:
    """What ``config`` trains, as JSON: every setting but where and how often."""
    return _recipe(_jsonable(config.to_dict()))


def saved_recipe(path: Path) -> dict[str, Any]:
    """The recipe of the run in ``path``, read through ``TrainConfig.from_dict``: a field its
    config.json predates takes the value that meant then (no weight decay, first-layer label
    conditioning, ...), so an older finished trial still counts as the same settings. Raises
    ``OSError``, ``ValueError``, ``KeyError``, ``TypeError`` or ``ConfigError``."""
    saved = json.loads((path / "config.json").read_text())["config"]
    if not isinstance(saved, dict):
        raise TypeError("config.json's config is not an object")
    return _recipe(_jsonable(TrainConfig.from_dict(saved).to_dict()))


def trial_state(path: Path, config: TrainConfig) -> str:
    """``done`` (a finished run of ``config``), ``unfinished`` (a run of it to resume), ``new``
    (nothing there) or ``other`` (a run of other settings, or other files)."""
    if not path.exists() or not any(not is_lock_file(p) for p in path.iterdir()):
        return "new"
    try:
        saved = saved_recipe(path)
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return "other"
    if saved != recipe(config):
        return "other"
    return "done" if (path / "summary.json").exists() else "unfinished"


def _settings_differ(path: Path, config: TrainConfig) -> str:
    try:
        saved = saved_recipe(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError):
        return "files that are not a vaelab run"
    want = recipe(config)
    diff = sorted(k for k in set(want) | set(saved) if want.get(k) != saved.get(k))
    return f"a run with other settings ({', '.join(diff)})"


def _wait_for(make: Callable[[], Any], path: Path, wait: float) -> Any:
    """``make()``, retried while ``path`` is in use by another attempt, for up to ``wait`` s:
    a retried task can start before the killed worker it replaces has quite gone."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return make()
        except FolderInUse:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def needs_exact(config: TrainConfig, tolerance: float) -> bool:
    from vaelab.evaluate import EXACT_MAX_LATENT

    return tolerance > 0 and config.latent_dim <= EXACT_MAX_LATENT


def exact_done(path: Path, tolerance: float) -> bool:
    """``EXACT_FILE`` holds the exact log p(x) of the run's final weights at ``tolerance``."""
    from vaelab.io import sha256_file

    try:
        saved = json.loads((path / EXACT_FILE).read_text())
        return (saved["tolerance"] == tolerance
                and saved["weights_sha256"] == sha256_file(path / "model.safetensors"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_exact(path: Path, tolerance: float, model: Any = None, data: Any = None) -> None:
    """Exact -log p(x) by quadrature on the trial's test images (``vaelab.evaluate``)."""
    from vaelab.checkpoint import load_run
    from vaelab.evaluate import dataset_for_run, exact_log_px
    from vaelab.io import sha256_file

    if model is None:
        run = load_run(path)
        model, data = run.model, dataset_for_run(run)
    cfg = json.loads((path / "config.json").read_text())["config"]
    result = exact_log_px(model.eval(), data.test, likelihood=cfg["likelihood"],
                          tolerance=tolerance)
    atomic_write_json(path / EXACT_FILE, {
        "tolerance": tolerance, "weights_sha256": sha256_file(path / "model.safetensors"),
        "exact_log_px": result})


def _worker_trial(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``run_trial`` in a Ray worker, a process of this sweep's own: freed blocks are kept for
    the next step (``memory.keep_freed_memory``)."""
    from vaelab.memory import keep_freed_memory

    keep_freed_memory()
    return run_trial(*args, **kwargs)


def run_trial(config: dict[str, Any], out: str, *, threads: int = 1, force: bool = False,
              tolerance: float = 0.0, lock_wait: float = LOCK_WAIT_S) -> dict[str, Any]:
    """Train one trial into run folder ``out`` (Ray runs this in a worker process; it may be
    called directly too). A finished run is left as it is, an unfinished one resumed from its
    newest checkpoint, a run of other settings replaced only with ``force``. ``threads`` torch
    threads (the worker is this sweep's: setting them is the point). Returns what was done."""
    import torch

    from vaelab.training import Trainer

    torch.set_num_threads(max(1, int(threads)))
    cfg = TrainConfig.from_dict(config).validate()
    path = Path(out)
    record: dict[str, Any] = {"pid": os.getpid(), "host": _host(), "node": _ray_node(),
                              "trained": False,
                              "resumed_from_step": None}

    def start() -> Trainer | None:
        state = trial_state(path, cfg)
        if state == "done":
            return None
        if state == "other" and not force:
            raise ConfigError(f"{path} holds {_settings_differ(path, cfg)}: use --force to "
                              "train it again, or another --out")
        try:
            return Trainer(cfg, path, resume=state == "unfinished", force=force,
                           progress=False)
        except (ConfigError, CheckpointError):
            if trial_state(path, cfg) != state:  # another attempt wrote it meanwhile: again
                raise FolderInUse(f"{path} changed while this attempt started") from None
            raise

    trainer = _wait_for(start, path, lock_wait)
    if trainer is not None:
        record["trained"] = True
        record["resumed_from_step"] = trainer.global_step if trainer.global_step or trainer.epoch \
            else None
        trainer.fit()
        if needs_exact(cfg, tolerance):  # the model and data are at hand: no reload
            with _wait_for(lambda: FolderLock(path).acquire(), path, lock_wait):
                _write_exact(path, tolerance, trainer.model, trainer.data)
    if needs_exact(cfg, tolerance) and not exact_done(path, tolerance):
        with _wait_for(lambda: FolderLock(path).acquire(), path, lock_wait):
            if not exact_done(path, tolerance):
                _write_exact(path, tolerance)
    record["evaluated"] = needs_exact(cfg, tolerance)
    return record


def _host() -> str:
    import socket

    return socket.gethostname()


def _ray_node() -> str | None:
    """The Ray node this runs on, when it runs as a Ray task."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


# --------------------------------------------------------------------------------------------
# Results: each trial's metrics, the table over seeds
# --------------------------------------------------------------------------------------------
def trial_metrics(path: Path, tolerance: float) -> dict[str, float | None]:
    """recon, KL, -ELBO (test set, beta = 1) from summary.json; the exact -log p(x) where the
    trial's latent is 1- or 2-D and it was computed at ``tolerance`` (else None)."""
    try:
        test = json.loads((path / "summary.json").read_text())["test"]
    except (OSError, ValueError, KeyError, TypeError):
        return {k: None for k, _ in METRICS}
    out: dict[str, float | None] = {k: test.get(k) for k in ("recon", "kl", "neg_elbo")}
    out["neg_log_px"] = None
    if tolerance > 0 and exact_done(path, tolerance):
        exact = json.loads((path / EXACT_FILE).read_text())["exact_log_px"]
        out["neg_log_px"] = exact["neg_log_px"]
    return out


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the values that are not None; the std is
    None below two values, both None with none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def aggregate(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting: trials ``[{"values": {KEY: V}, "metrics": {M: x}}, ...]`` grouped by
    their values other than ``seed``, in the order first seen; each metric's mean, std (over
    the group's seeds) and values."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        setting = {k: v for k, v in t["values"].items() if k != "seed"}
        groups.setdefault(json.dumps(setting), []).append(t)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = {"settings": json.loads(key),
                               "seeds": [m["values"].get("seed", m.get("seed")) for m in members],
                               "trials": [m.get("name") for m in members], "metrics": {}}
        for metric, _ in METRICS:
            values = [m["metrics"].get(metric) for m in members]
            mean, std = mean_std(values)
            row["metrics"][metric] = {"mean": mean, "std": std,
                                      "n": sum(v is not None for v in values)}
        rows.append(row)
    return rows


def _pm(m: dict[str, Any]) -> str:
    if m["mean"] is None:
        return "—"
    return f"{m['mean']:.2f}" if m["std"] is None else f"{m['mean']:.2f} ± {m['std']:.2f}"


def table_rows(rows: Sequence[dict[str, Any]], grid_keys: Sequence[str]
               ) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of the table: the grid's keys but seed, seeds, each metric."""
    keys = [k for k in grid_keys if k != "seed"]
    headers = [*keys, "seeds", *(label for _, label in METRICS)]
    cells = [[*(_value_text(r["settings"][k]) for k in keys),
              ", ".join(str(s) for s in r["seeds"]),
              *(_pm(r["metrics"][m]) for m, _ in METRICS)] for r in rows]
    return headers, cells


def render_markdown(result: dict[str, Any]) -> str:
    headers, cells = table_rows(result["rows"], list(result["plan"]["grid"]))
    lines = [f"# Sweep: preset {result['plan']['preset']}", "",
             "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i < len(headers) - len(METRICS) else "---:"
                            for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    tol = result["settings"]["tolerance"]
    lines += ["", "Test set, nats per image, mean ± std (n - 1) over the seeds of each row; "
              "recon, KL and -ELBO at beta = 1 from each run's summary.json; -log p(x) exact by "
              + (f"quadrature (every image within {tol} nats) where the latent is 1- or 2-D, "
                 "else —." if tol > 0 else "quadrature: not computed (--tolerance 0)."),
              "", "Trials: " + ", ".join(f"`{t['name']}`" for t in result["trials"]) + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def _prepare_sweep_dir(out: Path) -> None:
    """``out`` is new, empty, or a sweep's folder (``sweep.json``); anything else is refused."""
    check_output_folder(out, SWEEP_FILE, "a sweep's")


@dataclass
class Resources:
    """What each trial asks of Ray (``gpus_per_trial`` None: decided once Ray is up)."""

    cpus_per_trial: float
    gpus_per_trial: float | None
    threads: int
    address: str | None
    local_cpus: int | None


def choose_resources(*, address: str | None, num_cpus: int | None,
                     cpus_per_trial: float | None, gpus_per_trial: float | None) -> Resources:
    """One core per trial (that many torch threads: one) unless ``cpus_per_trial`` says more;
    the local Ray gets ``num_cpus`` (default: this machine's cores)."""
    if num_cpus is not None and num_cpus < 1:
        raise ConfigError(f"--num-cpus must be >= 1, got {num_cpus}")
    if num_cpus is not None and address is not None:
        raise ConfigError("--num-cpus is for a local Ray; a cluster at --address has its own")
    if cpus_per_trial is not None and not (math.isfinite(cpus_per_trial) and cpus_per_trial > 0):
        raise ConfigError(f"--cpus-per-trial must be > 0, got {cpus_per_trial}")
    if gpus_per_trial is not None and not (
            math.isfinite(gpus_per_trial) and gpus_per_trial >= 0
            and (gpus_per_trial <= 1 or gpus_per_trial == int(gpus_per_trial))):
        raise ConfigError("--gpus-per-trial must be a fraction of one GPU (0 to 1) or a whole "
                          f"number of GPUs, got {gpus_per_trial}")
    cpus = 1.0 if cpus_per_trial is None else float(cpus_per_trial)
    return Resources(cpus_per_trial=cpus, gpus_per_trial=gpus_per_trial,
                     threads=max(1, int(cpus)), address=address, local_cpus=num_cpus)


def gpus_for(trials: Sequence[Trial], res: Resources, cluster_gpus: float) -> float:
    """The GPU share of each trial: as given, else ``DEFAULT_GPU_SHARE`` where the cluster has
    GPUs and the trials may use them, else 0. Trials forced onto CUDA need a share."""
    devices = {t.config.device for t in trials}
    gpus = res.gpus_per_trial
    if gpus is None:
        gpus = DEFAULT_GPU_SHARE if cluster_gpus > 0 and devices != {"cpu"} else 0.0
    if "cuda" in devices and gpus == 0:
        raise ConfigError("trials with --device cuda need a GPU: "
                          + ("--gpus-per-trial is 0" if cluster_gpus else "Ray sees none"))
    if gpus > cluster_gpus:
        raise ConfigError(f"--gpus-per-trial {gpus:g}, but Ray sees {cluster_gpus:g} GPU(s)")
    return float(gpus)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise VaelabError(f"vaelab sweep needs Ray ({e}): pip install 'vaelab[sweep]'") from None
    return ray


def _start_ray(ray: Any, res: Resources) -> bool:
    """Join ``res.address``, or start a local Ray; True when this call started it."""
    import logging

    if ray.is_initialized():
        return False
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                   logging_level=logging.ERROR, configure_logging=True)
    try:
        if res.address is not None:
            # the cluster's workers run this vaelab, shipped by Ray, whatever vaelab (if any)
            # their node has installed; torch and the rest must be installed there
            import vaelab

            options["runtime_env"] = {"py_modules": [str(Path(vaelab.__file__).parent)]}
            ray.init(address=res.address, **options)
        else:
            # "local": a new Ray of our own, even where `ray start` left a cluster running
            ray.init(address="local", num_cpus=res.local_cpus or len(os.sched_getaffinity(0)),
                     **options)
    except ConnectionError as e:
        raise VaelabError(
            f"cannot reach the Ray cluster at {res.address}: {e} (a cluster with token "
            "authentication also needs RAY_AUTH_MODE=token and its token, in RAY_AUTH_TOKEN "
            "or ~/.ray/auth_token)") from None
    except (RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {res.address}" if res.address else "a local Ray"
        raise VaelabError(f"cannot start {where}: {str(e).splitlines()[0]}") from None
    return True


def _epochs_done(path: Path) -> int:
    try:
        return sum(1 for line in (path / "metrics.jsonl").read_text().splitlines() if line)
    except OSError:
        return 0


def _holder(path: Path) -> str | None:
    try:
        info = json.loads((path / ".vaelab.lock.json").read_text())
        return f"pid {int(info['pid'])} on {str(info['host'])[:32]}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _ProgressView:
    """A rich progress bar per trial (epochs done, read from its metrics.jsonl, and who is
    training it, from its lock), or one line per finished trial without a terminal."""

    def __init__(self, out: Path, todo: Sequence[Trial], console: Any, live: bool) -> None:
        self.out, self.todo, self.console, self.live = out, todo, console, live
        self.bar: Any = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _ProgressView:
        if self.live and self.console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("epochs"), TimeElapsedColumn(),
                                TextColumn("{task.fields[status]}"), console=self.console)
            self.bar.__enter__()
            for t in self.todo:
                self.tasks[t.name] = self.bar.add_task(t.name, total=t.config.epochs,
                                                       status="waiting")
        return self

    def update(self, done: dict[str, str]) -> None:
        if self.bar is None:
            return
        for t in self.todo:
            path = self.out / t.name
            status = done.get(t.name)
            if status is None:
                who = _holder(path)
                status = f"training ({who})" if who else "waiting"
            self.bar.update(self.tasks[t.name], completed=_epochs_done(path), status=status)

    def finished(self, name: str, status: str) -> None:
        if self.bar is None and self.console is not None:
            self.console.print(f"{name}: {status}")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def run_sweep(
    plan: SweepPlan,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    max_retries: int = DEFAULT_RETRIES,
    tolerance: float = 0.1,
    force: bool = False,
    console: Any = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``plan``'s unfinished trials on Ray, then write ``sweep.json`` and ``sweep.md``.

    ``address`` joins a running cluster (``auto`` or ``HOST:PORT``), else a local Ray is
    started with ``num_cpus`` (default: this machine's cores) and stopped at the end. Each trial
    asks ``cpus_per_trial`` CPUs (default 1; that many torch threads) and ``gpus_per_trial`` of
    a GPU, and is retried ``max_retries`` times if its worker dies. Nothing starts (Ray
    included) when every trial is finished. A trial that fails (a NaN, a bad data set) does
    not stop the others; the sweep then raises ``VaelabError`` naming them, after writing its
    files. Returns what ``sweep.json`` holds."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance must be >= 0 nats per image, got {tolerance}")
    if max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {max_retries}")
    out = plan.out
    res = choose_resources(address=address, num_cpus=num_cpus,
                           cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    _prepare_sweep_dir(out)
    states = refuse_other_settings(out, plan.trials, force=force)  # before a file is written
    check_data([t for t in plan.trials if states[t.name] != "done"])
    t0 = time.perf_counter()
    with FolderLock(out) as lock:  # one sweep at a time in a folder
        lock.keep()
        result: dict[str, Any] = {
            "format": SWEEP_FORMAT, "plan": plan.to_dict(),
            "settings": {"tolerance": tolerance, "max_retries": max_retries,
                         "cpus_per_trial": res.cpus_per_trial,
                         "gpus_per_trial": res.gpus_per_trial,
                         "threads_per_trial": res.threads, "address": address,
                         "ray": None},
            "status": "running", "trials": [], "rows": []}
        atomic_write_json(out / SWEEP_FILE, result)
        outcome = train_trials(out, plan.trials, res, max_retries=max_retries,
                               tolerance=tolerance, force=force, console=console,
                               progress=progress)
        records, failures = outcome.records, outcome.failures
        if outcome.ray is not None:
            result["settings"].update(gpus_per_trial=outcome.ray["gpus_per_trial"],
                                      ray=outcome.ray)
        trials = []
        for t in plan.trials:
            path = out / t.name
            entry = {"name": t.name, "values": _jsonable(t.values), "seed": t.config.seed,
                     "path": str(path), "status": trial_state(path, t.config)
                     if t.name not in failures else "failed",
                     "metrics": trial_metrics(path, tolerance),
                     "this_sweep": records.get(t.name)}
            if t.name in failures:
                entry["error"] = failures[t.name]
            trials.append(entry)
        result.update(status="failed" if failures else "done", trials=trials,
                      rows=aggregate(trials), seconds=time.perf_counter() - t0,
                      trained=sum(bool(r.get("trained")) for r in records.values()))
        atomic_write_json(out / SWEEP_FILE, result)
        atomic_write_text(out / TABLE_FILE, render_markdown(result))
    if failures:
        first = next(iter(failures.items()))
        raise VaelabError(f"{len(failures)} of {len(plan.trials)} trials failed "
                          f"({first[0]}: {first[1]}); see {out / SWEEP_FILE}")
    return result


@dataclass
class Outcome:
    """What ``train_trials`` did: each trained trial's record (``run_trial``'s), the failed
    ones' messages, and the Ray cluster's description (None when nothing was to do)."""

    records: dict[str, dict[str, Any]]
    failures: dict[str, str]
    ray: dict[str, Any] | None


def refuse_other_settings(out: Path, trials: Sequence[Trial], *, force: bool) -> dict[str, str]:
    """Each trial's ``trial_state``; ``ConfigError`` for the first whose folder holds other
    settings, unless ``force``."""
    states = {t.name: trial_state(out / t.name, t.config) for t in trials}
    clash = [t for t in trials if states[t.name] == "other"]
    if clash and not force:
        t = clash[0]
        raise ConfigError(f"{out / t.name} holds {_settings_differ(out / t.name, t.config)}"
                          ": use --force to train it again, or another --out")
    return states


def train_trials(out: Path, trials: Sequence[Trial], res: Resources, *,
                 max_retries: int = DEFAULT_RETRIES, tolerance: float = 0.0,
                 force: bool = False, console: Any = None, progress: bool = False) -> Outcome:
    """Bring every trial's folder ``out/NAME`` to a finished run of its config, on Ray: the
    finished ones are left alone (Ray is not even started when all are), the others trained
    or resumed as tasks. A folder holding other settings is refused (``ConfigError``) before
    anything starts, unless ``force``."""
    states = refuse_other_settings(out, trials, force=force)
    todo = [t for t in trials if states[t.name] != "done"
            or (needs_exact(t.config, tolerance) and not exact_done(out / t.name, tolerance))]
    if not todo:
        return Outcome({}, {}, None)
    check_data(todo)
    return Outcome(*_run_on_ray(out, todo, res, max_retries=max_retries, tolerance=tolerance,
                                force=force, console=console, progress=progress))


def check_data(trials: Sequence[Trial]) -> None:
    """Read each data set of ``trials`` once (MNIST fetched, if missing), before any worker
    starts: a bad one is one line now (``DataError``), and the workers do not all fetch it at
    once."""
    from vaelab.data import load_dataset

    for name in dict.fromkeys(t.config.dataset for t in trials):
        load_dataset(name, val_size=0, limit=1)


def _run_on_ray(out: Path, todo: Sequence[Trial], res: Resources, *, max_retries: int,
                tolerance: float, force: bool, console: Any, progress: bool,
                ) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, Any]]:
    ray = _import_ray()
    started = _start_ray(ray, res)
    records: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    try:
        cluster = ray.cluster_resources()
        gpus = gpus_for(todo, res, float(cluster.get("GPU", 0)))
        info = {"version": ray.__version__, "local": res.address is None,
                "cluster_cpus": cluster.get("CPU", 0), "cluster_gpus": cluster.get("GPU", 0),
                "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                "gpus_per_trial": gpus}
        task = ray.remote(_worker_trial).options(
            num_cpus=res.cpus_per_trial, num_gpus=gpus,
            max_retries=max_retries, retry_exceptions=False)
        futures = {task.remote(t.config.to_dict(), str((out / t.name).absolute()),
                               threads=res.threads, force=force, tolerance=tolerance): t
                   for t in todo}
        pending = list(futures)
        done: dict[str, str] = {}
        with _ProgressView(out, todo, console, progress) as view:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in ready:
                    t = futures[ref]
                    try:
                        records[t.name] = ray.get(ref)
                        m = trial_metrics(out / t.name, tolerance)
                        done[t.name] = (f"done, -ELBO {m['neg_elbo']:.2f}"
                                        if m["neg_elbo"] is not None else "done")
                    except Exception as e:  # noqa: BLE001 - one trial's failure, kept
                        failures[t.name] = _trial_error(e)
                        done[t.name] = f"failed: {failures[t.name]}"
                    view.finished(t.name, done[t.name])
                view.update(done)
    finally:  # on Ctrl-C too: the trials keep their checkpoints, the same command resumes
        if started:
            ray.shutdown()
    return records, failures, info


def _trial_error(e: BaseException) -> str:
    """One line for a trial's failure: the vaelab error inside a Ray error, or Ray's own."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    if isinstance(e, VaelabError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def format_table(result: dict[str, Any], console: Any) -> None:
    """Print the sweep's table: with rich on a terminal, else as ``sweep.md``'s Markdown rows
    (never wrapped, so a log or a pipe keeps every number whole)."""
    from rich.table import Table

    headers, cells = table_rows(result["rows"], list(result["plan"]["grid"]))
    if not console.is_terminal:
        for line in render_markdown(result).splitlines()[2:4 + len(cells)]:
            console.print(line, soft_wrap=True)
        return
    table = Table(*headers, title=f"sweep: preset {result['plan']['preset']}",
                  caption="test set, nats per image, mean ± std over seeds")
    for row in cells:
        table.add_row(*row)
    console.print(table)
