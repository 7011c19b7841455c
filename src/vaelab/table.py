"""``vaelab table``: binarized MNIST test log-likelihoods beside the published ones.

One command trains the grid of runs (each architecture x latent size x seed, dynamically
binarized MNIST, ``--binarize dynamic``) and evaluates log p(x) on the binarized test split:

- the headline cell: exact by quadrature where the latent is 1- or 2-D
  (``vaelab.evaluate.exact_log_px_per_image``), else importance sampling with K = ``is_k``
  (5000, as Burda et al. 2016 evaluate);
- beside it, importance sampling with the paper's own K (500, Davidson et al. 2018), so that
  like is compared with like: IS at small K understates log p(x), and the exact value beside it
  must not replace it.

The grid is a sweep (``vaelab.sweep.plan_sweep``): each cell is an ordinary run folder
``OUT/arch=conv,latent_dim=2,seed=0``, trained through the sweep's Ray tasks when Ray is
installed (``train_trials``) and one after another in this process otherwise (``run_trial``).
A finished run is never trained again and an unfinished one is resumed. Each estimate is
cached in its run folder (``table_eval.json``: per-image values, keyed by the estimator, its
K or tolerance, the images and the weights' SHA-256), so running the command again trains
and computes nothing. The folder::

    table.json   the plan, the evaluation settings, every cell with its standard error and
                 training budget, the published numbers (``vaelab.literature``)
    table.md     the table: vaelab conv, vaelab MLP, the papers' N-VAE and S-VAE
    NAME/        a run folder (+ table_eval.json)

Nothing is chosen on the test split: the runs train a fixed number of epochs and keep their
final weights, or with ``--patience N`` stop early on the validation split and keep their best
validation epoch's weights (``selection``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vaelab.config import canonical_preset
from vaelab.errors import ConfigError, VaelabError
from vaelab.io import atomic_write_json, atomic_write_text, sha256_file
from vaelab.literature import BURDA_NOTES, PROVENANCE, TABLE_ROWS, published_dict
from vaelab.locks import FolderLock, check_output_folder
from vaelab.sweep import SweepPlan, Trial, plan_sweep

TABLE_FORMAT = 1
TABLE_FILE = "table.json"
MARKDOWN_FILE = "table.md"
EVAL_FILE = "table_eval.json"
EVAL_FORMAT = 1
DEFAULT_LATENT_DIMS = (2, 5, 10, 20, 40)
DEFAULT_ARCHS = ("conv", "mlp")
IS_K = 5000  # Burda et al. 2016's evaluation
PAPER_K = 500  # Davidson et al. 2018's evaluation
DEFAULT_TOLERANCE = 0.1  # nats, for every image, of the exact value
EVAL_SEED = 0  # the importance samples' generator: the same draws on every re-evaluation
RUNNERS = ("auto", "ray", "local")
GRID_OPTIONS = {"arch": "--archs", "latent_dim": "--latent-dims", "seed": "--seeds"}
SELECTION = ("none: every run trains its fixed number of epochs and keeps its final weights "
             "(no early stopping); the validation split is only watched and the test split "
             "is used for nothing but this table")
EARLY_STOPPING = ("early stopping on the validation split: each run trains at most its "
                  "epochs, stops once {patience} epochs in a row bring no better validation "
                  "-ELBO, and keeps the weights of its best validation epoch; the test split is "
                  "used for nothing but this table")


def selection(trials: Sequence[Trial]) -> str:
    """How the runs' weights were chosen: the final ones, or early stopping's (one patience
    for the whole grid, the way ``vaelab table`` sets it)."""
    patience = sorted({t.config.patience for t in trials})
    if patience in ([], [0]):
        return SELECTION
    return EARLY_STOPPING.format(patience=" or ".join(map(str, patience)))
ARCH_LABELS = {"conv": "vaelab conv", "mlp": "vaelab MLP"}
# The network the table's runs were measured with where it differs from vaelab's default: SiLU,
# the default when they trained (GELU became it later). A table without these options in its
# plan had them, so tables from before and after merge (``merge_tables``); ``vaelab table
# --activation`` overrides it.
TABLE_NETWORK = {"activation": "silu"}


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
@dataclass
class TablePlan:
    """The grid of runs (a ``SweepPlan``) and the evaluation every run gets."""

    sweep: SweepPlan
    latent_dims: list[int]
    archs: list[str]
    seeds: list[int]
    is_k: int = IS_K
    paper_k: int = PAPER_K
    test_images: int = 0  # 0: the whole test split
    tolerance: float = DEFAULT_TOLERANCE
    arch_epochs: dict[str, int] = field(default_factory=dict)  # an architecture's own budget
    cells: list[Cell] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.sweep.out

    def evaluation(self) -> dict[str, Any]:
        return {"is_k": self.is_k, "paper_k": self.paper_k,
                "test_images": self.test_images or "all", "tolerance": self.tolerance,
                "is_seed": EVAL_SEED, "quantity": "log p(x), nats per image",
                "split": "test, binarized once with the pinned seed "
                         "vaelab.data.BINARIZE_SEEDS['test']"}


@dataclass
class Cell:
    """One (architecture, latent size): its runs, one per seed."""

    arch: str
    latent_dim: int
    trials: list[Trial]

    @property
    def exact(self) -> bool:
        from vaelab.evaluate import EXACT_MAX_LATENT

        return self.latent_dim <= EXACT_MAX_LATENT


def _whole(value: Any, what: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{what} must be a whole number >= {least}, got {value!r:.40}")
    return value


def plan_table(
    out: str | os.PathLike,
    *,
    latent_dims: Sequence[int] = DEFAULT_LATENT_DIMS,
    archs: Sequence[str] = DEFAULT_ARCHS,
    seeds: Sequence[int] = (0,),
    preset: str = "study",
    options: dict[str, Any] | None = None,
    is_k: int = IS_K,
    paper_k: int = PAPER_K,
    test_images: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    arch_epochs: dict[str, int] | None = None,
) -> TablePlan:
    """The table's grid over ``preset`` and the train ``options`` (every run dynamically
    binarized, a VAE), each config validated, and its evaluation settings checked.
    ``arch_epochs`` gives an architecture its own number of epochs (the small MLP takes many
    more than the conv network in the same time); the others train ``options``' or the
    preset's. Raises ``ConfigError`` (one line) before anything is written or trained."""
    from vaelab.models import ARCHS

    given = {k: v for k, v in (options or {}).items() if v is not None}
    for key, flag in GRID_OPTIONS.items():
        if key in given:
            raise ConfigError(f"--{key.replace('_', '-')} is the table's grid: give {flag}")
    if given.get("binarize", "dynamic") != "dynamic":
        raise ConfigError("the table is dynamically binarized MNIST: --binarize is always "
                          f"dynamic, got {given['binarize']!r:.40}")
    if given.get("model", "vae") != "vae":
        raise ConfigError(f"the table is of VAEs: --model must be vae, got "
                          f"{given['model']!r:.40}")
    if not latent_dims:
        raise ConfigError("--latent-dims: give at least one latent size")
    if not archs:
        raise ConfigError("--archs: give at least one architecture")
    if not seeds:
        raise ConfigError("--seeds: at least one seed")
    for d in latent_dims:
        _whole(d, "--latent-dims", 1)
    for a in archs:
        if a not in ARCHS:
            raise ConfigError(f"--archs: unknown architecture {a!r:.40}: choose from "
                              f"{', '.join(ARCHS)}")
    arch_epochs = dict(arch_epochs or {})
    for a, n in arch_epochs.items():
        if a not in archs:
            raise ConfigError(f"--arch-epochs {a!r:.40}: not one of the table's --archs "
                              f"({', '.join(archs)})")
        _whole(n, f"--arch-epochs {a}", 1)
    _whole(is_k, "--is-k", 1)
    _whole(paper_k, "--paper-k", 1)
    _whole(test_images, "--test-images", 0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not (math.isfinite(tolerance) and tolerance > 0):
        raise ConfigError(f"--tolerance must be > 0 nats per image, got {tolerance!r:.40}")
    sweep = plan_sweep(out, preset=preset,
                       grid={"arch": list(archs), "latent_dim": list(latent_dims),
                             "seed": list(seeds)},
                       options={**TABLE_NETWORK, **given, "binarize": "dynamic",
                                "model": "vae"})
    sweep.trials = [replace(t, config=replace(t.config, epochs=arch_epochs[t.values["arch"]]))
                    if t.values["arch"] in arch_epochs else t for t in sweep.trials]
    plan = TablePlan(sweep, list(latent_dims), list(archs), list(seeds), is_k=is_k,
                     paper_k=paper_k, test_images=test_images, tolerance=float(tolerance),
                     arch_epochs=arch_epochs)
    for arch in archs:
        for d in latent_dims:
            trials = [t for t in sweep.trials
                      if t.values["arch"] == arch and t.values["latent_dim"] == d]
            plan.cells.append(Cell(arch, d, trials))
    return plan


# --------------------------------------------------------------------------------------------
# Estimates: per image, cached in the run folder; means and standard errors
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimator:
    """``quadrature`` (exact, within ``tolerance`` nats per image) or ``importance sampling``
    with ``k`` samples of q(z|x) per image."""

    method: str
    k: int | None = None
    tolerance: float | None = None

    def key(self, images: int) -> str:
        n = images or "all"
        if self.method == "quadrature":
            from vaelab.evaluate import EXACT_RULES

            return f"quadrature,rules={EXACT_RULES},tolerance={self.tolerance:g},images={n}"
        return f"importance sampling,K={self.k},seed={EVAL_SEED},images={n}"

    def label(self) -> str:
        if self.method == "quadrature":
            return "exact (quadrature)"
        return f"IS, K = {self.k}"

    def to_dict(self) -> dict[str, Any]:
        return {"estimator": self.method, "K": self.k, "tolerance": self.tolerance}


def estimators(cell: Cell, plan: TablePlan) -> dict[str, Estimator]:
    """``best`` (exact for a 1- or 2-D latent, else IS with ``is_k``) and ``paper_k``."""
    best = (Estimator("quadrature", tolerance=plan.tolerance) if cell.exact
            else Estimator("importance sampling", k=plan.is_k))
    return {"best": best, "paper_k": Estimator("importance sampling", k=plan.paper_k)}


def mean_se(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1) and standard error std / sqrt(n) of
    ``values``; std and se are None below two values."""
    n = len(values)
    if n == 0:
        raise ConfigError("no values to average")
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "std": None, "se": None, "n": n}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "std": std, "se": std / math.sqrt(n), "n": n}


def combine_seeds(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A cell's value from its seeds' ``{"mean", "se", "n"}`` (over images): one seed keeps
    its standard error over images; several give the mean of their means and the standard
    error over seeds (std of the means / sqrt(seeds)). ``se_over`` says which."""
    if len(per_seed) == 1:
        s = per_seed[0]
        return {"mean": s["mean"], "se": s["se"], "se_over": "images", "seeds": 1,
                "n_images": s["n"]}
    over = mean_se([s["mean"] for s in per_seed])
    return {"mean": over["mean"], "se": over["se"], "se_over": "seeds",
            "seeds": len(per_seed), "n_images": per_seed[0]["n"]}


def _read_cache(path: Path, weights: str) -> dict[str, Any]:
    try:
        saved = json.loads((path / EVAL_FILE).read_text())
        if saved.get("format") == EVAL_FORMAT and saved.get("weights_sha256") == weights \
                and isinstance(saved.get("entries"), dict):
            return saved
    except (OSError, ValueError, AttributeError):
        pass
    return {"format": EVAL_FORMAT, "weights_sha256": weights, "entries": {}}


def cached_entries(path: Path) -> dict[str, Any]:
    """The estimates cached in run folder ``path`` for its present weights ({} if none)."""
    return _read_cache(path, sha256_file(path / "model.safetensors"))["entries"]


def evaluate_run(path: Path, wanted: Iterable[Estimator], *, test_images: int = 0,
                 device: str = "auto", log: Any = None, progress: bool = False,
                 compute: bool = True) -> tuple[dict[str, dict[str, Any]], int]:
    """Every estimator in ``wanted`` of finished run ``path`` on its binarized test split
    (the first ``test_images``, 0: all), from the cache where it holds one, else computed on
    ``device`` (auto: CUDA where there is one) and cached, each as soon as it is done
    (``EVAL_FILE``, written atomically under the run's lock). Returns ({key: entry}, how many
    were computed now); an entry holds ``per_image`` log p(x) and its summary. With
    ``compute`` False nothing is computed: only the cached estimates are returned."""
    wanted = list(wanted)
    weights = sha256_file(path / "model.safetensors")
    cache = _read_cache(path, weights)
    missing = [e for e in dict.fromkeys(wanted) if e.key(test_images) not in cache["entries"]]
    if not compute:
        return {e.key(test_images): cache["entries"][e.key(test_images)] for e in wanted
                if e not in missing}, 0
    if missing:
        from vaelab.checkpoint import load_run
        from vaelab.evaluate import dataset_for_run, exact_log_px_per_image, log_px_per_image
        from vaelab.training import pick_device

        where = pick_device(device)
        run = load_run(path, device=where)
        model = run.model.eval()
        likelihood = run.config["config"].get("likelihood", "bernoulli")
        data = dataset_for_run(run)
        cache["data"] = {f"{part}_images": len(getattr(data, part))
                         for part in ("train", "val", "test")}
        split = data.test.subset(test_images) if test_images else data.test
        for est in missing:
            if log is not None:
                log(f"{path.name}: {est.label()} on {len(split):,} test images")
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            if est.method == "quadrature":
                exact = exact_log_px_per_image(model, split, likelihood=likelihood,
                                               tolerance=est.tolerance, progress=progress)
                values = exact.log_px.tolist()
                extra = {"error_estimate_mean": float(exact.error.mean()),
                         "error_max": float(exact.error.max()),
                         "over_tolerance": int((exact.error > est.tolerance).sum()),
                         "nodes": exact.nodes}
            else:
                lp, _ = log_px_per_image(model, split, num_samples=est.k,
                                         likelihood=likelihood, seed=EVAL_SEED,
                                         progress=progress)
                values = lp.tolist()
            seconds = time.perf_counter() - t0
            cache["entries"][est.key(test_images)] = {
                **est.to_dict(), **mean_se(values), **extra, "seconds": seconds,
                "seconds_per_image": seconds / max(len(values), 1), "device": str(where),
                "per_image": values}
            with FolderLock(path):  # kept at once: an interrupted table keeps what it finished
                atomic_write_json(path / EVAL_FILE, cache)
    return {e.key(test_images): cache["entries"][e.key(test_images)] for e in wanted}, \
        len(missing)


# --------------------------------------------------------------------------------------------
# Training the grid
# --------------------------------------------------------------------------------------------
def ray_installed() -> bool:
    return importlib.util.find_spec("ray") is not None


def train_cells(plan: TablePlan, *, runner: str = "auto", force: bool = False,
                address: str | None = None, num_cpus: int | None = None,
                cpus_per_trial: float | None = None, gpus_per_trial: float | None = None,
                max_retries: int | None = None, console: Any = None,
                progress: bool = False) -> tuple[list[str], dict[str, str]]:
    """Bring every run of the plan to a finished run: on Ray (the sweep's tasks) with
    ``runner`` ray, or auto where Ray is installed; else one after another in this process.
    Finished runs are left alone (Ray is not started when all are). Returns (the runs trained
    now, {run: error} for those that failed)."""
    from vaelab.sweep import (
        DEFAULT_RETRIES,
        check_data,
        choose_resources,
        refuse_other_settings,
        run_trial,
        train_trials,
    )

    out, trials = plan.out, plan.sweep.trials
    states = refuse_other_settings(out, trials, force=force)
    todo = [t for t in trials if states[t.name] != "done"]
    if not todo:
        return [], {}
    use_ray = runner == "ray" or (runner == "auto" and ray_installed())
    if use_ray:
        res = choose_resources(address=address, num_cpus=num_cpus,
                               cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
        outcome = train_trials(out, trials, res, tolerance=0.0, force=force,
                               max_retries=DEFAULT_RETRIES if max_retries is None
                               else max_retries, console=console, progress=progress)
        trained = [t.name for t in trials if outcome.records.get(t.name, {}).get("trained")]
        return trained, dict(outcome.failures)
    import torch

    from vaelab.training import Interrupted

    check_data(todo)
    trained, failures = [], {}
    for t in todo:
        if console is not None:
            console.print(f"training {t.name} ({states[t.name]})")
        try:
            record = run_trial(t.config.to_dict(), str(out / t.name),
                               threads=torch.get_num_threads(), force=force)
        except Interrupted as e:  # a signal stops the whole table, not just this run
            raise Interrupted(f"{e} in {t.name}; the runs after it were not started", "the "
                              "same `vaelab table` command (it resumes this run, then trains "
                              "the rest)", e.signum) from None
        except VaelabError as e:
            failures[t.name] = str(e)
            continue
        if record["trained"]:
            trained.append(t.name)
    return trained, failures


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
def _prepare_table_dir(out: Path) -> None:
    """``out`` is new, empty, or a table's folder (``table.json``); anything else is refused."""
    check_output_folder(out, TABLE_FILE, "a table's")


def _budget(path: Path, trial: Trial) -> dict[str, Any]:
    """What the run was trained with: epochs (trained: early stopping may end a run before
    ``max_epochs``), images, steps, time."""
    cfg = trial.config
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    try:
        record = json.loads((path / "config.json").read_text()).get("data") or {}
        data = json.loads((path / EVAL_FILE).read_text()).get("data") or {}
    except (OSError, ValueError, AttributeError):
        record, data = {}, {}
    train = data.get("train_images")
    epochs = int(summary.get("epochs") or cfg.epochs)
    stopping = summary.get("early_stopping") or {}
    return {"epochs": epochs, "max_epochs": cfg.epochs, "patience": cfg.patience,
            "best_epoch": stopping.get("best_epoch"),
            "steps": summary.get("steps"), "batch_size": cfg.batch_size,
            "train_images": train, "images_seen": None if train is None else train * epochs,
            "val_images": data.get("val_images"), "test_sha256": record.get("test_sha256"),
            "limit": cfg.limit, "lr": cfg.lr,
            "lr_schedule": cfg.lr_schedule, "beta_schedule": cfg.beta_schedule,
            "warmup_epochs": cfg.warmup_epochs, "objective": cfg.objective, "k": cfg.k,
            "train_seconds": summary.get("train_seconds"), "val": summary.get("val")}


def _cell_result(plan: TablePlan, cell: Cell, failures: dict[str, str],
                 evaluated: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    ests = estimators(cell, plan)
    out: dict[str, Any] = {"arch": cell.arch, "latent_dim": cell.latent_dim,
                           "runs": [t.name for t in cell.trials],
                           "seeds": [t.config.seed for t in cell.trials],
                           "budget": [_budget(plan.out / t.name, t) for t in cell.trials]}
    failed = [t.name for t in cell.trials if t.name in failures]
    if failed:
        out["failed"] = {n: failures[n] for n in failed}
    for role, est in ests.items():
        key = est.key(plan.test_images)
        per_seed = []
        for t in cell.trials:
            entry = evaluated.get(t.name, {}).get(key)
            if entry is not None:
                per_seed.append({"seed": t.config.seed, "run": t.name,
                                 **{k: v for k, v in entry.items() if k != "per_image"}})
        value: dict[str, Any] = {**est.to_dict(), "label": est.label(), "per_seed": per_seed}
        if len(per_seed) == len(cell.trials):
            value.update(combine_seeds(per_seed))
        else:
            value.update(mean=None, se=None, se_over=None)
        out[role] = value
    return out


def compute_seconds(result: dict[str, Any]) -> dict[str, float]:
    """The seconds the table's numbers took: every run's training and every estimate of it,
    as their records give them (a run or estimate done by an earlier invocation counts)."""
    train = sum(b.get("train_seconds") or 0.0 for c in result["cells"] for b in c["budget"])
    done = {(s["run"], s.get("estimator"), s.get("K"), s.get("tolerance")): s.get("seconds") or 0.0
            for c in result["cells"] for role in ("best", "paper_k")
            for s in c.get(role, {}).get("per_seed", [])}  # one estimate may fill two rows
    evaluate = sum(done.values())
    return {"train": train, "evaluate": evaluate, "total": train + evaluate}


def evaluate_cells(plan: TablePlan, failures: dict[str, str], *, log: Any, progress: bool,
                   compute: bool) -> tuple[dict[str, dict[str, dict[str, Any]]], int, list[str]]:
    """Every finished run's estimates (``evaluate_run``): {run: {key: entry}}, how many were
    computed now, and the estimates still missing ("run: estimator", with ``compute``
    False)."""
    evaluated: dict[str, dict[str, dict[str, Any]]] = {}
    computed, unestimated = 0, []
    for cell in plan.cells:
        wanted = list(estimators(cell, plan).values())
        for t in cell.trials:
            path = plan.out / t.name
            if t.name in failures or not (path / "summary.json").exists():
                continue
            evaluated[t.name], now = evaluate_run(
                path, wanted, test_images=plan.test_images, device=t.config.device,
                log=log, progress=progress, compute=compute)
            computed += now
            unestimated += [f"{t.name}: {e.label()}" for e in dict.fromkeys(wanted)
                            if e.key(plan.test_images) not in evaluated[t.name]]
    return evaluated, computed, unestimated


def run_table(plan: TablePlan, *, runner: str = "auto", force: bool = False,
              address: str | None = None, num_cpus: int | None = None,
              cpus_per_trial: float | None = None, gpus_per_trial: float | None = None,
              max_retries: int | None = None, console: Any = None,
              progress: bool = False, command: str | None = None,
              train: bool = True, estimate: bool = True) -> dict[str, Any]:
    """Train the plan's runs (``train_cells``), evaluate each (``evaluate_run``, cached), then
    write ``table.json`` and ``table.md`` into ``plan.out``. Returns what ``table.json``
    holds, with ``command`` (the command line, for the record) and ``compute_seconds`` (each
    run's training and each estimate's time, whenever they were done: a re-run that trains and
    computes nothing keeps the table's own cost). A run that fails to train leaves its cells
    empty; the table is written, then ``VaelabError`` names the failures. ``train=False``
    tabulates what is there: nothing is trained, the finished runs are evaluated, and the
    others' cells stay empty (``status`` "partial", ``untrained`` names them).
    ``estimate=False`` computes no estimate: the cached ones are tabulated and the others'
    cells stay empty (``unestimated`` names them), e.g. to train on a CPU and estimate on a
    GPU."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner must be one of {', '.join(RUNNERS)}, got {runner!r:.40}")
    if max_retries is not None and max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {max_retries}")
    if runner == "ray" and not ray_installed():
        raise ConfigError("--runner ray needs Ray: pip install 'vaelab[sweep]'")
    from vaelab.sweep import check_data, refuse_other_settings

    out = plan.out
    _prepare_table_dir(out)
    states = refuse_other_settings(out, plan.sweep.trials, force=force)  # before any write
    todo = [t for t in plan.sweep.trials if states[t.name] != "done"]
    if todo and train:
        check_data(todo)
    t0 = time.perf_counter()
    log = None if console is None else console.print
    with FolderLock(out) as lock:  # one table command at a time in a folder
        lock.keep()
        result: dict[str, Any] = {
            "format": TABLE_FORMAT, "status": "running", "plan": plan.sweep.to_dict(),
            "latent_dims": plan.latent_dims, "archs": plan.archs, "seeds": plan.seeds,
            "arch_epochs": plan.arch_epochs,
            "evaluation": plan.evaluation(), "selection": selection(plan.sweep.trials),
            "published": published_dict(), "cells": []}
        atomic_write_json(out / TABLE_FILE, result)
        trained: list[str] = []
        failures: dict[str, str] = {}
        if train:
            trained, failures = train_cells(
                plan, runner=runner, force=force, address=address, num_cpus=num_cpus,
                cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                max_retries=max_retries, console=console, progress=progress)
        evaluated, computed, unestimated = evaluate_cells(
            plan, failures, log=log, progress=progress, compute=estimate)
        from vaelab.bench import machine

        untrained = [t.name for t in plan.sweep.trials
                     if not (out / t.name / "summary.json").exists() and t.name not in failures]
        result.update(status="failed" if failures else
                      "partial" if untrained or unestimated else "done",
                      untrained=untrained, unestimated=unestimated,
                      cells=[_cell_result(plan, c, failures, evaluated) for c in plan.cells],
                      trained=len(trained), trained_runs=trained, computed=computed,
                      seconds=time.perf_counter() - t0, machine=machine(), command=command)
        result["compute_seconds"] = compute_seconds(result)
        atomic_write_json(out / TABLE_FILE, result)
        atomic_write_text(out / MARKDOWN_FILE, render_markdown(result))
    if failures:
        first = next(iter(failures.items()))
        raise VaelabError(f"{len(failures)} of {len(plan.sweep.trials)} runs failed "
                          f"({first[0]}: {first[1]}); see {out / TABLE_FILE}")
    return result


def _alike(result: dict[str, Any]) -> tuple:
    """What two tables must share for their cells to sit in one table: the evaluation, the
    runs' options, the preset and the selection rule (and, for each architecture both have,
    its epochs: ``_epochs_alike``)."""
    plan = result["plan"]
    return (result["evaluation"], {**TABLE_NETWORK, **plan["options"]},
            canonical_preset(plan["preset"], warn=False), result["selection"])


def _epochs_alike(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ea, eb = a.get("arch_epochs") or {}, b.get("arch_epochs") or {}
    return all(ea.get(arch) == eb.get(arch) for arch in set(a["archs"]) & set(b["archs"]))


# what one table command did, not what the table holds: a merged table keeps each in its
# ``sources`` entry, and its own trained / computed / seconds / trained_runs are the sums
_PER_COMMAND = ("command", "machine", "trained", "computed", "seconds", "trained_runs")


def merge_tables(base: dict[str, Any], *others: dict[str, Any]) -> dict[str, Any]:
    """One table from ``base`` and the tables in ``others`` (each what ``run_table`` wrote),
    e.g. cells trained on another machine with ``--archs conv --latent-dims 20 40``. A cell of
    a later table replaces the earlier one where its runs are trained; ``untrained`` and
    ``unestimated`` then name only what no table measured. The tables must be alike (the
    same evaluation, run options, preset, selection and per-architecture epochs), else
    ``ConfigError``; ``sources`` names each one's command, machine, what it trained and
    computed, its seconds and the cells it gave; the merged ``trained``, ``computed``,
    ``seconds`` and ``trained_runs`` add them up."""
    tables = [base, *others]
    for t in others:
        if _alike(t) != _alike(base) or not _epochs_alike(t, base):
            raise ConfigError(f"cannot merge tables measured differently ({t.get('command')!r} "
                              f"against {base.get('command')!r}): the evaluation, run "
                              "options, preset, selection and epochs must be the same")
    cells: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
    for i, t in enumerate(tables):
        untrained = set(t.get("untrained") or [])
        for c in t["cells"]:
            key = (c["arch"], c["latent_dim"])
            if key not in cells or not untrained.intersection(c["runs"]):
                cells[key] = (i, c)
    archs = [a for t in tables for a in t["archs"]]
    dims = sorted({d for t in tables for d in t["latent_dims"]})
    merged = {k: v for k, v in base.items() if k not in _PER_COMMAND}
    merged["archs"] = list(dict.fromkeys(archs))
    merged["latent_dims"] = dims
    merged["seeds"] = sorted({s for t in tables for s in t["seeds"]})
    merged["cells"] = [cells[k][1] for k in sorted(cells, key=lambda k: (
        merged["archs"].index(k[0]), k[1]))]

    def named(field: str) -> list[str]:
        return [entry for i, c in cells.values() for entry in tables[i].get(field) or []
                if entry.split(":")[0] in c["runs"]]

    merged["untrained"], merged["unestimated"] = named("untrained"), named("unestimated")
    merged["status"] = ("failed" if any(c.get("failed") for _, c in cells.values()) else
                        "partial" if merged["untrained"] or merged["unestimated"] else "done")
    merged["sources"] = [
        {**{k: t.get(k) for k in _PER_COMMAND},
         "cells": [[c["arch"], c["latent_dim"]] for j, c in cells.values() if j == i]}
        for i, t in enumerate(tables)]
    merged["trained"] = sum(t.get("trained") or 0 for t in tables)
    merged["computed"] = sum(t.get("computed") or 0 for t in tables)
    merged["seconds"] = sum(t.get("seconds") or 0.0 for t in tables)
    merged["trained_runs"] = [r for t in tables for r in t.get("trained_runs") or []]
    merged["compute_seconds"] = compute_seconds(merged)
    return merged


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _pm(mean: float | None, spread: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if spread is None else f"{mean:.2f} ± {spread:.2f}"


def published_rows(dims: Sequence[int]) -> list[str]:
    """The papers' rows (``vaelab.literature.TABLE_ROWS``) over latent sizes ``dims``."""
    return [f"| {r.name}, {r.citation.short()} ({r.estimator}) | "
            + " | ".join(_pm(*r.values.get(d, (None, None))) for d in dims) + " |"
            for r in TABLE_ROWS]


def _header(dims: Sequence[int]) -> list[str]:
    return ["| log p(x), nats per image | " + " | ".join(f"d = {d}" for d in dims) + " |",
            "|---|" + "---:|" * len(dims)]


def published_markdown() -> str:
    """The published rows alone (the README shows these until the table is measured)."""
    dims = sorted({d for r in TABLE_ROWS for d in r.values})
    lines = _header(dims) + published_rows(dims)
    return "\n".join(lines + ["", *_citation_lines()])


def _citation_lines() -> list[str]:
    cites = {r.citation.key: r.citation for r in TABLE_ROWS}
    cites.update({n["citation"].key: n["citation"] for n in BURDA_NOTES})
    burda = " and ".join(f"-log p(x) = {n['value']:.2f} for the {n['name']} (trained on the "
                         f"{n['trained']})" for n in BURDA_NOTES)
    return [f"Published rows: mean ± standard deviation over the paper's runs, as printed in "
            f"{TABLE_ROWS[0].citation.full()}.",
            f"For reference, {BURDA_NOTES[0]['citation'].full()}: one stochastic layer of "
            f"{BURDA_NOTES[0]['latent_dim']} units, {burda}, both estimated by "
            f"{BURDA_NOTES[0]['estimator']}; not a row here (no latent size of the grid "
            "matches).",
            "", f"Provenance: {PROVENANCE}"]


def _over_tolerance(result: dict[str, Any]) -> str:
    exact = [s for c in result["cells"] if c["best"]["estimator"] == "quadrature"
             for s in c["best"]["per_seed"]]
    left = [s for s in exact if s.get("over_tolerance")]
    if not left:
        return ""
    return ("; images still above it when the work budget ran out: " + ", ".join(
        f"{s['run']}: {s['over_tolerance']:,} of {s['n']:,}, error estimate "
        f"{s['error_estimate_mean']:.2f} nats per image on average and {s['error_max']:.1f} at "
        f"most (by these estimates the cell's mean is within {s['error_estimate_mean']:.2f} of "
        "the exact value)" for s in left))


def _cell_rows(result: dict[str, Any], dims: Sequence[int], suffix: str = "") -> list[str]:
    """Two rows per architecture of ``result`` (exact or IS at ``is_k``; IS at ``paper_k``),
    each label followed by ``suffix``; "—" where it has no cell."""
    cells = {(c["arch"], c["latent_dim"]): c for c in result["cells"]}
    lines = []
    for arch in result["archs"]:
        label = ARCH_LABELS.get(arch, f"vaelab {arch}") + suffix
        for role, name in (("best", "exact (d ≤ 2) or IS, K = "
                            f"{result['evaluation']['is_k']}"),
                           ("paper_k", f"IS, K = {result['evaluation']['paper_k']}")):
            row = [_pm(cells[(arch, d)][role]["mean"], cells[(arch, d)][role]["se"])
                   if (arch, d) in cells else "—" for d in dims]
            lines.append(f"| {label}, {name} | " + " | ".join(row) + " |")
    return lines


def render_markdown(result: dict[str, Any], *, heading: bool = True,
                    more: Sequence[tuple[str, dict[str, Any]]] = ()) -> str:
    """``table.md``: one row per architecture and estimator, the papers' rows, the notes.
    ``more``: (suffix, table) pairs of tables trained another way (say, the paper's own
    recipe), each set as rows of its own under ``result``'s, its labels ending in the suffix,
    with a line on its training."""
    dims = result["latent_dims"]
    lines = ["# Binarized MNIST: vaelab against the literature", ""] if heading else []
    lines += _header(dims)
    lines += _cell_rows(result, dims)
    for suffix, other in more:
        lines += _cell_rows(other, dims, suffix)
    lines += published_rows(dims)
    ev = result["evaluation"]
    seeds = result["seeds"]
    images = ev["test_images"]
    lines += [
        "",
        f"vaelab rows: log p(x) on {'all the' if images == 'all' else f'the first {images:,}'} "
        "images of the binarized test split, mean ± standard error "
        + ("over the test images (one seed: std / sqrt(n))" if len(seeds) == 1 else
           f"over {len(seeds)} seeds (std of the seeds' means / sqrt({len(seeds)}))")
        + f". Exact: quadrature within {ev['tolerance']} nats per image by its error "
        f"estimate (d ≤ 2{_over_tolerance(result)}); IS: "
        "importance sampling with q(z|x) as the proposal, K samples per image. IS at small K "
        "understates log p(x): compare the K = "
        f"{ev['paper_k']} row with the papers' rows.",
        f"Training: dynamically binarized MNIST, preset "
        f"{canonical_preset(result['plan']['preset'], warn=False)}, "
        f"{_budget_words(result)}, seed(s) {', '.join(map(str, seeds))}. "
        f"Selection: {result['selection']}.",
        *_untrained_line(result)]
    for suffix, other in more:
        lines.append(f"Rows ending \"{suffix.lstrip(', ')}\": preset "
                     f"{canonical_preset(other['plan']['preset'], warn=False)} with "
                     f"{_options_words(other)}; {_budget_words(other)}, seed(s) "
                     f"{', '.join(map(str, other['seeds']))}. Selection: {other['selection']}.")
        lines += _untrained_line(other)
    lines += ["", *_citation_lines()]
    return "\n".join(lines) + "\n"


def _options_words(result: dict[str, Any]) -> str:
    """The train options a table's runs were given, as flags: "--activation relu --lr ..."."""
    options = {**TABLE_NETWORK, **result["plan"]["options"]}
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(options.items()))


def _budget_words(result: dict[str, Any]) -> str:
    """Each architecture's epochs and training images seen per run, e.g. "vaelab conv 30
    epoch(s), 1,650,000 training images seen per run; vaelab MLP 200 epoch(s), ..."."""
    parts = []
    for arch in result["archs"]:
        budget = [b for c in result["cells"] if c["arch"] == arch for b in c["budget"]]
        epochs = sorted({b["epochs"] for b in budget})
        seen = sorted({b["images_seen"] for b in budget if b["images_seen"] is not None})
        stopped = [(c["latent_dim"], b) for c in result["cells"] if c["arch"] == arch
                   for b in c["budget"] if b.get("best_epoch") is not None]
        if stopped:  # early stopping: each run's own length
            runs = ", ".join(f"d = {d}: {b['epochs']} (best {b['best_epoch']})"
                             for d, b in stopped)
            parts.append(f"{ARCH_LABELS.get(arch, f'vaelab {arch}')} at most "
                         f"{max(b['max_epochs'] for _, b in stopped)} epochs, trained and "
                         f"best validation epochs {runs}, {_count_words(stopped)}")
            continue
        words = f"{', '.join(map(str, epochs))} epoch(s), " + (
            f"{', '.join(f'{n:,}' for n in seen)} training images seen per run" if seen
            else "training images not recorded" if any(b.get("steps") for b in budget)
            else "not trained yet")
        parts.append(f"{ARCH_LABELS.get(arch, f'vaelab {arch}')} {words}"
                     if len(result["archs"]) > 1 else words)
    return "; ".join(parts)


def _count_words(stopped: list[tuple[int, dict[str, Any]]]) -> str:
    seen = [b["images_seen"] for _, b in stopped if b["images_seen"] is not None]
    return (f"{min(seen):,} to {max(seen):,} training images seen per run" if seen
            else "training images not recorded")


def _untrained_line(result: dict[str, Any]) -> list[str]:
    untrained, lines = result.get("untrained") or [], []
    if untrained:
        total = sum(len(c["runs"]) for c in result["cells"])
        lines.append(f"— : not trained yet ({len(untrained)} of {total} runs: "
                     f"{', '.join(untrained)}); the table command without --no-train trains "
                     "them.")
    if result.get("unestimated"):
        lines.append(f"— : not estimated yet ({', '.join(result['unestimated'])}); the table "
                     "command without --no-estimate computes them.")
    return lines
