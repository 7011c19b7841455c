"""Reproduce the whole study in one command: train, evaluate, draw, and write the report.

``reproduce(out)`` fills one report folder::

    vaelab-report.json   marks the folder as a vaelab report (so a re-run may reuse it)
    runs/vae, runs/cvae  the two models (the ``study`` preset), reused when already finished
    runs/*-seed*, runs/*-no-warmup      ablation runs (``ablations=True``; on a CPU trained
                                        at once through ``vaelab.sweep`` where Ray is installed)
    classifier/          the CNN that judges the CVAE's samples
    evaluations/         each run's numbers, reused while its weights and the settings agree
    figures/{vae,cvae}/  every figure of ``vaelab.plots``, PNG and PDF
    results.json         every number
    README.md            tables, figures with captions and the command that redraws each
    index.html           the same, self-contained (images embedded), readable offline

Every number is computed here; the only constants are the study's reference values
(``STUDY``, kept in ``vaelab.literature``), shown beside ours. Every file goes through
``vaelab.io``'s atomic writes.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vaelab.checkpoint import Run, load_run
from vaelab.config import PRESETS, TrainConfig, canonical_preset, check_seed, resolve_config
from vaelab.data import Dataset
from vaelab.errors import CheckpointError, ConfigError, VaelabError
from vaelab.evaluate import EXACT_RULES, normalise_evaluation
from vaelab.io import atomic_write_json, atomic_write_text
from vaelab.literature import STUDY
from vaelab.locks import FolderLock, is_lock_file
from vaelab.sweep import mean_std, recipe, saved_recipe

if TYPE_CHECKING:
    from vaelab.evaluate import ExactLogPx

REPORT_FORMAT = 1
MARKER = "vaelab-report.json"
KINDS = ("vae", "cvae")

# (key in the comparison, label) of the main table's rows; lower is better for each.
METRICS: tuple[tuple[str, str], ...] = (
    ("recon", "reconstruction"),
    ("kl", "KL"),
    ("neg_elbo", "-ELBO"),
    ("neg_log_px", "-log p(x)"),
)

Block = tuple  # ("h1"|"h2"|"h3"|"p"|"code", text) | ("table", headers, rows) | ("figure", ...)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
# log p(x) with K = 1000 costs 1000 decoder passes per image, twice (q and a Student-t as
# proposals), where the exact log p(x) of an image costs a few hundred: the importance-sampled
# estimates are on the first 500 test images, beside the exact value on the same images, which
# gives their bias image by image (``--logpx-images 0`` uses them all).
DEFAULT_LOGPX_IMAGES = 500

# What the report computes for each preset's runs, where no option says otherwise: K
# importance samples on the first ``logpx_images`` test images, the exact log p(x)'s
# ``tolerance`` (nats per image), CVAE samples per class for the classifier to label, the
# classifier's epochs (it trains on the runs' images: their ``limit``) and ``test_images``, the
# first test images every test-set number is computed on (None: all). ``quick`` is a first
# look: 1,000 test images, a coarser exact log p(x) and fewer samples, so that the evaluation
# takes seconds (on all 10,000, a CVAE's exact log p(x) decodes about four times the nodes).
REPORT_RECIPES: dict[str, dict[str, Any]] = {
    "study": dict(num_samples=1000, logpx_images=DEFAULT_LOGPX_IMAGES, tolerance=0.1,
                 per_class=1000, classifier_epochs=3, test_images=None),
    "quick": dict(num_samples=50, logpx_images=200, tolerance=0.5, per_class=100,
                  classifier_epochs=1, test_images=1000),
    "smoke": dict(num_samples=50, logpx_images=DEFAULT_LOGPX_IMAGES, tolerance=0.1,
                  per_class=50, classifier_epochs=1, test_images=None),
}


def report_preset(preset: str | None, quick: bool) -> str:
    """The preset a study trains: ``preset`` (an old name, ``seed``, is read as ``study``
    with a DeprecationWarning), or ``quick`` when ``quick``, else ``study``."""
    if quick and preset not in (None, "quick"):
        raise ConfigError(f"--quick is --preset quick: give one of them, not --preset {preset}")
    preset = canonical_preset(preset or ("quick" if quick else "study"))
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r:.40}: choose one of {', '.join(PRESETS)}")
    return preset


def report_recipe(preset: str) -> dict[str, Any]:
    """``REPORT_RECIPES[preset]``; the study's for a preset without one."""
    return dict(REPORT_RECIPES.get(preset, REPORT_RECIPES["study"]))

def reduction_pct(vae: float | None, cvae: float | None) -> float | None:
    """Relative reduction of a lower-is-better number, CVAE vs VAE: 100 (vae - cvae) / vae."""
    if vae is None or cvae is None or vae == 0:
        return None
    return 100.0 * (vae - cvae) / vae


def _f(x: float | None, nd: int = 2) -> str:
    if x is None:
        return "—"
    text = f"{x:.{nd}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.00"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}%"


def _pm(mean: float | None, std: float | None, nd: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{nd}f}" if std is None else f"{mean:.{nd}f} ± {std:.{nd}f}"


def _vec(v: Sequence[float], nd: int = 2) -> str:
    return "[" + ", ".join(_f(x, nd) for x in v) + "]"


def _mat(m: Sequence[Sequence[float]], nd: int = 2) -> str:
    if len(m) <= 3:
        return "[" + ", ".join(_vec(r, nd) for r in m) + "]"
    return "diag " + _vec([m[i][i] for i in range(len(m))], nd)


def main_log_px(ev: dict[str, Any]) -> dict[str, Any] | None:
    """The log p(x) a table shows for a run: exact (quadrature, every test image) where the
    latent allows it, else the importance-sampled estimate."""
    return ev.get("exact_log_px") or ev.get("log_px")


def log_px_label(lp: dict[str, Any] | None, first: bool = False) -> str:
    """How a log p(x) was computed, and on how many images (all the test set's, or with
    ``first`` its first ones)."""
    if not lp:
        return "log p(x) was not computed"
    if lp.get("method") == "quadrature":
        return (f"-log p(x) is exact (quadrature, estimated error {lp['error_estimate']:.3f} "
                f"nats per image) on {'the first' if first else 'all'} {lp['n']:,} test images")
    return (f"-log p(x) is importance sampled with K = {lp['num_samples']} on the first "
            f"{lp['n']:,} test images")


def run_metrics(ev: dict[str, Any]) -> dict[str, float | None]:
    """The main table's numbers of one evaluated run."""
    lp = main_log_px(ev)
    return {"recon": ev["elbo"]["recon"], "kl": ev["elbo"]["kl"],
            "neg_elbo": ev["elbo"]["neg_elbo"], "neg_log_px": lp["neg_log_px"] if lp else None}


# --------------------------------------------------------------------------------------------
# Folders, runs and the classifier
# --------------------------------------------------------------------------------------------
def prepare_report_dir(out: Path, force: bool) -> None:
    """Create ``out`` or accept it if empty or a vaelab report; anything else needs ``force``
    (which writes beside the other files and never deletes them)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    others = out.exists() and any(not is_lock_file(p) for p in out.iterdir())
    if others and not (out / MARKER).exists() and not force:
        raise ConfigError(
            f"output folder {out} holds files that are not a vaelab report: choose a new or "
            "empty folder, or --force to write the report beside them"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists():
        atomic_write_json(out / MARKER, {"format": REPORT_FORMAT, "kind": "vaelab-report",
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def load_given_runs(paths: Sequence[str | os.PathLike] | None) -> dict[str, Run]:
    """Load finished runs given by the user and sort them by kind (from each run's config)."""
    given: dict[str, Run] = {}
    for p in paths or []:
        run = load_run(p)
        kind = run.config.get("config", {}).get("model", run.spec.kind)
        if kind not in KINDS:
            raise CheckpointError(f"{p}: unknown model kind '{kind}'")
        if kind in given:
            raise ConfigError(f"two {kind.upper()} runs given ({given[kind].path} and {p}): "
                              "give at most one VAE and one CVAE")
        given[kind] = run
    return given


def _plan_run(
    path: Path, config: TrainConfig, *, force: bool, log: Callable[[str], None],
) -> dict[str, Any] | None:
    """What ``path`` needs to hold a finished run of ``config``: None when it does already,
    else ``train``'s keyword options (``resume`` an unfinished run, ``force`` a replacement)."""
    # a run that differs only in where and how often (say, trained with --device cpu, wanted
    # with auto) is reused; a field its config.json predates takes the value it meant then
    want = recipe(config)
    saved = None
    if (path / "config.json").exists():
        try:
            saved = saved_recipe(path)
        except (ValueError, KeyError, TypeError, AttributeError, ConfigError):
            saved = None
    if saved is not None and saved != want:
        if not force:
            diff = sorted(k for k in set(want) | set(saved) if want.get(k) != saved.get(k))
            raise ConfigError(f"{path} holds a run with other settings ({', '.join(diff)}): "
                              "use --force to train it again, or another --out")
        log(f"{path}: settings changed, training again")
        return {"force": True}
    if saved is not None and (path / "model.json").exists():
        log(f"{path}: finished run found, reused")
        return None
    if saved is not None:
        log(f"{path}: unfinished run found, resuming")
        return {"resume": True}
    log(f"training {path} ({config.model}, preset {config.preset}, seed {config.seed}, "
        f"{config.epochs} epochs)")
    return {"force": force}


def ensure_runs(
    jobs: Sequence[tuple[Path, TrainConfig]], *, force: bool, progress: bool,
    log: Callable[[str], None], device: torch.device, parallel: int = 2,
    sweep: bool = False, console: Any = None, after: Callable[[Path], None] | None = None,
) -> list[Run]:
    """The finished runs ``[(path, config), ...]``: each reused if there, resumed if
    unfinished, trained if absent. On CUDA up to ``parallel`` train side by side in one
    process (``train_concurrently``); elsewhere, with ``sweep`` and Ray installed, they train
    at once as the tasks of a local Ray, one per core (``vaelab.sweep.train_trials``), else one
    after the other. A run of another config is replaced only with ``force``. ``after(path)``:
    called once the run in ``path`` has trained here, on its thread (``train_concurrently``'s
    ``after``; not for runs reused, or trained on a Ray)."""
    from vaelab.training import dist_env, train_concurrently

    todo = []
    for path, config in jobs:
        options = _plan_run(path, config, force=force, log=log)
        if options is not None:
            todo.append((config, path, options))
    folders = {path.parent for _, path, _ in todo}
    if sweep and len(todo) > 1 and device.type != "cuda" and len(folders) == 1 \
            and dist_env()[1] == 1 and _sweep_available(log):
        from vaelab.sweep import Trial, choose_resources, train_trials

        log(f"training {len(todo)} runs at once on a local Ray (vaelab sweep, one per core)")
        outcome = train_trials(
            folders.pop(), [Trial(path.name, {}, cfg) for cfg, path, _ in todo],
            choose_resources(address=None, num_cpus=None, cpus_per_trial=None,
                             gpus_per_trial=0),
            force=force, console=console, progress=progress)
        if outcome.failures:
            name, message = next(iter(outcome.failures.items()))
            raise VaelabError(f"{len(outcome.failures)} of {len(todo)} runs failed "
                              f"({name}: {message})")
    else:
        hook = None if after is None else (lambda i: after(todo[i][1]))
        train_concurrently(todo, parallel=parallel, progress=progress, log=log, after=hook)
    return [load_run(path, device) for path, _ in jobs]


def _sweep_available(log: Callable[[str], None]) -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        log("training the runs one after the other (pip install 'vaelab[sweep]' to train "
            "them at once, one per core)")
        return False
    return True


def ensure_run(
    path: Path, config: TrainConfig, *, force: bool, progress: bool,
    log: Callable[[str], None], device: torch.device,
) -> Run:
    """``ensure_runs`` for one run."""
    return ensure_runs([(path, config)], force=force, progress=progress, log=log,
                       device=device)[0]


def ensure_classifier(
    folder: Path, *, dataset: str, epochs: int, limit: int | None, seed: int, force: bool,
    log: Callable[[str], None], device: torch.device,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The classifier in ``folder`` if trained with these settings, else a new one."""
    from vaelab.classifier import load_classifier, read_classifier_meta, train_classifier

    want = {"dataset": dataset, "epochs": epochs, "limit": limit, "seed": seed}
    retrain = True
    if (folder / "classifier.json").exists():
        meta = read_classifier_meta(folder)
        if all(meta.get(k) == v for k, v in want.items()):
            log(f"{folder}: classifier found, reused")
            retrain = False
        elif not force:
            raise ConfigError(f"{folder} holds a classifier trained otherwise: use --force to "
                              "train it again, or another --out")
    if retrain:
        log(f"training the digit classifier ({epochs} epoch{'s' if epochs != 1 else ''})")
        meta = train_classifier(dataset, folder, epochs=epochs, seed=seed, limit=limit,
                                force=True, log=log)
    meta = read_classifier_meta(folder)
    return load_classifier(folder, device), meta


EVALUATIONS = "evaluations"


def _model_sha256(run: Run) -> str | None:
    try:
        return str(json.loads((run.path / "model.json").read_text())["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


FIGURE_MANIFEST = "figures.json"


def draw_figures(
    run: Run, dataset: Dataset, folder: Path, formats: Sequence[str], *, force: bool,
    log: Callable[[str], None], exact: ExactLogPx | None = None,
) -> dict[str, list[Path]]:
    """Every figure that applies to ``run``, drawn into ``folder`` by ``plots.draw_all``
    (``exact``: the evaluation's per-image exact log p(x), for the true-posterior figure).

    Figures already there for the same weights (the SHA-256 in the run's model.json, kept in
    ``folder/figures.json``) and formats are reused unless ``force``.
    """
    from vaelab import plots

    names = plots.select_figures(run, "all")
    sha = _model_sha256(run)
    try:
        manifest = json.loads((folder / FIGURE_MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    same = sha is not None and manifest.get("model_sha256") == sha and not force
    drawn: dict[str, list[Path]] = {}
    todo = []
    for name in names:
        paths = [folder / f"{name}.{f}" for f in formats]
        if same and name in manifest.get("figures", {}) and all(p.exists() for p in paths):
            drawn[name] = paths
        else:
            todo.append(name)
    if todo:
        log(f"drawing {len(todo)} figure{'s' if len(todo) != 1 else ''} of {run.path} "
            f"into {folder}")
        drawn.update(plots.draw_all(run, dataset, folder, formats=tuple(formats), names=todo,
                                    exact=exact))
    else:
        log(f"{folder}: figures up to date, reused")
    atomic_write_json(folder / FIGURE_MANIFEST, {
        "run": str(run.path), "model_sha256": sha,
        "figures": {n: [p.name for p in drawn[n]] for n in names},
    })
    return {n: drawn[n] for n in names}


def ensure_evaluation(
    path: Path, run: Run, settings: dict[str, Any], evaluate: Callable[[], dict[str, Any]], *,
    force: bool, log: Callable[[str], None],
) -> dict[str, Any]:
    """``evaluate()``'s result for ``run``, kept in ``path`` (written atomically) and reused
    while the run's weights (the SHA-256 in its model.json), the evaluation ``settings`` and
    vaelab's version are the same, unless ``force``. So a reproduce that stops after a long
    evaluation, or is run again with ``--ablations``, does not estimate log p(x) twice. A
    cache file that cannot be read is ignored and written again."""
    from vaelab import __version__

    sha = _model_sha256(run)
    key = {"model_sha256": sha, "settings": settings, "vaelab": __version__,
           "exact_rules": EXACT_RULES}
    if sha is not None and not force:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == json.loads(json.dumps(key)):
                log(f"{path}: evaluation of the same weights and settings found, reused")
                return normalise_evaluation(cached["evaluation"])  # older files too
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    ev = evaluate()
    if sha is not None:
        atomic_write_json(path, {"key": key, "evaluation": ev})
    return ev


def _annealing_pair(base: TrainConfig, kind: str) -> dict[str, tuple[str | None, TrainConfig]]:
    """The two arms of the KL annealing ablation: (run name or None for the main run, config)."""
    if base.beta_schedule == "constant":
        warm = replace(base, beta_schedule="linear-step",
                       warmup_epochs=PRESETS["study"]["warmup_epochs"], beta=1.0)
        return {"warmup": (f"{kind}-warmup", warm), "no_warmup": (None, base)}
    return {"warmup": (None, base),
            "no_warmup": (f"{kind}-no-warmup", replace(base, beta_schedule="constant", beta=1.0))}


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------
def reproduce(out: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Run the whole study into folder ``out`` (see ``run_study`` for the ``options``), holding the
    folder's lock (``vaelab.locks``) throughout: a second reproduce into ``out`` is refused."""
    out = Path(out)
    created = not out.exists()
    with FolderLock(out) as lock:
        try:
            results = run_study(out, **options)
        except BaseException:
            if created:
                _forget_empty_report(out)
            raise
        lock.keep()
    return results


def _forget_empty_report(out: Path) -> None:
    """A study that failed before writing anything of its own leaves no folder: remove the
    report marker of a folder that holds nothing else (the lock, let go next, removes the
    folder it created)."""
    try:
        if {p.name for p in out.iterdir() if not is_lock_file(p)} == {MARKER}:
            (out / MARKER).unlink()
    except OSError:
        pass


@dataclass
class Study:
    """One study's options, checked and filled in from its preset's ``REPORT_RECIPES``
    (``resolve_study``), and what its steps share: the console, the device, the given runs,
    the data sets loaded so far and the seconds each step took."""

    out: Path
    preset: str
    recipe: dict[str, Any]
    tolerance: float
    num_samples: int
    logpx_images: int
    seeds: list[int]
    formats: list[str]
    dataset: str
    precision: str
    ablations: bool
    classifier_epochs: int | None
    force: bool
    progress: bool
    console: Any
    log: Callable[[str], None]
    device: torch.device
    given: dict[str, Run]
    t_start: float
    timings: dict[str, float] = field(default_factory=dict)
    datasets: dict[tuple, Dataset] = field(default_factory=dict)
    # made fresh beside the training (``work_beside_training``): "classifier"; the steps
    # after training reuse it, --force or not
    made: set[str] = field(default_factory=set)

    def forces(self, item: str) -> bool:
        """Whether ``item`` is to be made afresh: with --force, unless made so already."""
        return self.force and item not in self.made

    @property
    def quick(self) -> bool:
        return self.preset == "quick"

    def data_of(self, run: Run) -> Dataset:
        """``run``'s data set, loaded once for all the runs that share it."""
        from vaelab.evaluate import dataset_for_run

        c = run.config["config"]
        key = (c["dataset"], c["val_size"], c.get("limit"), c.get("binarize", "none"))
        if key not in self.datasets:
            self.datasets[key] = dataset_for_run(run)
        return self.datasets[key]

    def test_part_of(self, run: Run) -> Dataset:
        """The data ``run``'s evaluation sees: the recipe's first ``test_images`` (None: all)."""
        ds = self.data_of(run)
        n = self.recipe["test_images"]
        return ds if n is None else replace(ds, test=ds.test.subset(n))


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Put the seconds the ``with`` block took into ``timings[step]`` (when it succeeds)."""
    t0 = time.perf_counter()
    yield
    timings[step] = time.perf_counter() - t0


def _load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run_study(
    out: str | os.PathLike,
    *,
    runs: Sequence[str | os.PathLike] | None = None,
    quick: bool = False,
    preset: str | None = None,
    ablations: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    num_samples: int | None = None,
    logpx_images: int | None = None,
    progress: bool = True,
    force: bool = False,
    dataset: str = "mnist",
    precision: str = "auto",
    classifier_epochs: int | None = None,
    formats: Sequence[str] = ("png", "pdf"),
    console: Any = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Run the whole study into folder ``out`` and return ``results.json``'s content.

    Trains the VAE and the CVAE (``preset``: default ``study``, the study's; ``quick=True`` is
    ``preset="quick"``, a first look on 10,000 images; ``smoke`` a few hundred images for tests)
    into ``out/runs`` unless finished ``runs`` are given (their kind is read from their
    config); trains or reuses the digit classifier in ``out/classifier``; evaluates each run
    (``evaluate.full_evaluation``: the exact log p(x) on every test image, within
    ``tolerance`` nats per image, and ``num_samples`` importance samples on the first
    ``logpx_images``; each None takes the preset's ``REPORT_RECIPES`` value);
    draws every figure into ``out/figures``; writes ``results.json``,
    ``README.md`` and ``index.html``; prints the summary table. ``ablations`` adds runs without
    KL warm-up (constant beta = 1) and one run per extra seed of ``seeds`` for both models, and
    reports mean ± std over seeds. ``precision`` is the training precision of the runs it
    trains (``auto``: bf16 on CUDA, and on a CPU with AMX or AVX512-BF16 that trains the
    network faster in it, else fp32: ``vaelab.training.resolve_precision``). A folder
    that is not empty and not a vaelab report is refused unless ``force``; ``force`` also
    retrains runs whose saved settings differ.
    """
    study = resolve_study(
        out, runs=runs, quick=quick, preset=preset, ablations=ablations, seeds=seeds,
        num_samples=num_samples, logpx_images=logpx_images, progress=progress, force=force,
        dataset=dataset, precision=precision, classifier_epochs=classifier_epochs,
        formats=formats, console=console, tolerance=tolerance)
    load_start = _load_average()
    with _timed(study.timings, "training"):
        plan = plan_runs(study)
        named = train_runs(study, plan, after=work_beside_training(study, plan))
    with _timed(study.timings, "classifier"):
        ccfg = named["cvae"].config["config"]
        classifier, classifier_meta = study_classifier(study, ccfg["dataset"], ccfg.get("limit"))
    with _timed(study.timings, "evaluation"):
        evaluations, exact = evaluate_runs(study, named, classifier, classifier_meta)
    with _timed(study.timings, "figures"):
        figures = draw_study_figures(study, named, exact)
    results = study_results(study, plan, named, classifier_meta, evaluations, figures)
    study.timings["total"] = time.perf_counter() - study.t_start
    results["timings"] = study.timings
    # what else ran beside it: a timing read on a busy machine is not the command's own
    results["load_average"] = {"start": load_start, "end": _load_average()}
    write_report(study, results)
    return results


def resolve_study(
    out: str | os.PathLike, *, runs: Sequence[str | os.PathLike] | None, quick: bool,
    preset: str | None, ablations: bool, seeds: Sequence[int], num_samples: int | None,
    logpx_images: int | None, progress: bool, force: bool, dataset: str, precision: str,
    classifier_epochs: int | None, formats: Sequence[str], console: Any,
    tolerance: float | None,
) -> Study:
    """``run_study``'s options checked (a ConfigError names the first one that is wrong) and
    filled in from the preset's ``REPORT_RECIPES``; the given ``runs`` loaded and sorted by
    kind, and the report folder prepared (``prepare_report_dir``)."""
    from vaelab.io import console as output_console
    from vaelab.training import pick_device

    preset = report_preset(preset, quick)
    recipe = report_recipe(preset)
    tolerance = recipe["tolerance"] if tolerance is None else tolerance
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise ConfigError(f"--tolerance must be > 0 nats per image, got {tolerance}")

    t_start = time.perf_counter()
    console = console or output_console()
    out = Path(out)
    num_samples = recipe["num_samples"] if num_samples is None else num_samples
    logpx_images = recipe["logpx_images"] if logpx_images is None else logpx_images
    if logpx_images < 0:
        raise ConfigError(f"--logpx-images must be >= 0 (0: all), got {logpx_images}")
    if num_samples < 0:
        raise ConfigError(f"the number of importance samples must be >= 0, got {num_samples}")
    seeds = list(dict.fromkeys(check_seed(s) for s in seeds)) or [0]
    formats = list(dict.fromkeys(["png", *formats]))  # index.html embeds the PNGs
    device = pick_device("auto")
    given = load_given_runs(runs)
    prepare_report_dir(out, force)
    return Study(
        out=out, preset=preset, recipe=recipe, tolerance=tolerance, num_samples=num_samples,
        logpx_images=logpx_images, seeds=seeds, formats=formats, dataset=dataset,
        precision=precision, ablations=ablations, classifier_epochs=classifier_epochs,
        force=force, progress=progress, console=console, log=console.print, device=device,
        given=given, t_start=t_start)


@dataclass
class RunPlan:
    """The runs of a study: ``named`` the given ones (by kind), ``jobs`` the configs of those to
    train into ``out/runs`` (by run name, trained together, side by side on CUDA, once all are
    known), ``seed_runs`` each model's runs over the seeds, and ``annealing`` the run names of
    each model's two KL annealing arms (``warmup``, ``no_warmup``)."""

    named: dict[str, Run]
    jobs: dict[str, TrainConfig]
    seed_runs: dict[str, list[str]]
    annealing: dict[str, dict[str, str]]


def plan_runs(study: Study) -> RunPlan:
    """Which runs ``study`` needs: the VAE and the CVAE (given, or the preset's config at the
    first seed), and with ``ablations`` a run per further seed and the other annealing arm."""
    named: dict[str, Run] = {}
    jobs: dict[str, TrainConfig] = {}
    for kind in KINDS:
        if kind in study.given:
            named[kind] = study.given[kind]
            named[kind].model.to(study.device)
            study.log(f"{kind.upper()}: using the given run {study.given[kind].path}")
        else:
            jobs[kind] = resolve_config(study.preset, model=kind, dataset=study.dataset,
                                        seed=study.seeds[0], precision=study.precision)
    seed_runs: dict[str, list[str]] = {k: [k] for k in KINDS}
    annealing: dict[str, dict[str, str]] = {}
    if study.ablations:
        for kind in KINDS:
            base = jobs.get(kind) or TrainConfig.from_dict(named[kind].config["config"])
            base = base.validate()
            for s in study.seeds:
                if s == base.seed:
                    continue
                name = f"{kind}-seed{s}"
                jobs[name] = replace(base, seed=s)
                seed_runs[kind].append(name)
            annealing[kind] = {}
            for arm, (name, cfg) in _annealing_pair(base, kind).items():
                if name is not None:
                    jobs[name] = cfg
                annealing[kind][arm] = name or kind
    return RunPlan(named=named, jobs=jobs, seed_runs=seed_runs, annealing=annealing)


def train_runs(study: Study, plan: RunPlan,
               after: Callable[[Path], None] | None = None) -> dict[str, Run]:
    """Every run of ``plan``, finished (its jobs reused, resumed or trained by ``ensure_runs``,
    which calls ``after(path)`` as each has trained), by name: the VAE and the CVAE first,
    then the ablation runs in the plan's order."""
    jobs = plan.jobs
    runs_done = ensure_runs([(study.out / "runs" / name, cfg) for name, cfg in jobs.items()],
                            force=study.force, progress=study.progress, log=study.log,
                            device=study.device, sweep=study.ablations, console=study.console,
                            after=after)
    named = dict(plan.named)
    named.update(zip(jobs, runs_done, strict=True))
    return {k: named[k] for k in [*KINDS, *(n for n in jobs if n not in KINDS)]}


def work_beside_training(study: Study, plan: RunPlan) -> Callable[[Path], None] | None:
    """What the first of the VAE and the CVAE to finish training does on the core it leaves
    idle while the other still trains (on a CPU, where the two train side by side, one core
    each): the digit classifier (a few minutes of one core, about what the CVAE's longer
    training leaves). It is kept on disk, where the step after training finds and reuses it
    (``ensure_classifier``, also under --force: ``Study.made``), so the report is the same
    either way; ``study.timings["beside_training_classifier"]`` records its seconds (within
    the training's). The evaluations stay after the training, on every core: on a 2-core CPU,
    the CVAE's evaluation on one core beside the VAE's took longer than both in turn on two
    (the CVAE's is the larger, so it set the end). None
    where nothing is gained: on CUDA (the training takes seconds), with ablations (a Ray
    trains the runs), or where not both are trained here."""
    if study.device.type != "cpu" or study.ablations or set(plan.jobs) != set(KINDS):
        return None
    first = threading.Lock()
    cvae = plan.jobs["cvae"]
    quiet = replace(study, progress=False)  # one live display at a time: no bars in threads

    def after(path: Path) -> None:
        if not first.acquire(blocking=False):
            return  # the second to finish: the steps after training do the rest
        with _timed(study.timings, "beside_training_classifier"):
            study_classifier(quiet, cvae.dataset, cvae.limit)
        study.made.add("classifier")

    return after


def study_classifier(
    study: Study, dataset: str, limit: int | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The digit classifier that judges the CVAE's samples, trained on the CVAE's images
    (its ``dataset`` and ``limit``; ``ensure_classifier`` in ``out/classifier``), and its
    metadata."""
    epochs = study.classifier_epochs or study.recipe["classifier_epochs"]
    return ensure_classifier(
        study.out / "classifier", dataset=dataset, epochs=epochs, limit=limit,
        seed=study.seeds[0], force=study.forces("classifier"), log=study.log,
        device=study.device)


def evaluate_runs(
    study: Study, named: dict[str, Run], classifier: torch.nn.Module,
    classifier_meta: dict[str, Any],
) -> tuple[dict[str, dict[str, Any]], dict[str, ExactLogPx | None]]:
    """Each run's evaluation (``evaluate_run``) and its per-image exact log p(x), by name."""
    evaluations: dict[str, dict[str, Any]] = {}
    exact: dict[str, ExactLogPx | None] = {}  # per image, for the true-posterior figure
    for name, run in named.items():
        evaluations[name], exact[name] = evaluate_run(study, name, run, classifier,
                                                      classifier_meta)
    return evaluations, exact


def _evaluation_settings(
    study: Study, run: Run, classifier_meta: dict[str, Any]
) -> dict[str, Any]:
    """The settings an evaluation of ``run`` is cached under (beside its weights)."""
    settings = {"num_samples": study.num_samples, "logpx_images": study.logpx_images,
                "seed": 0, "tolerance": study.tolerance,
                "per_class": study.recipe["per_class"],
                "classifier_sha256": classifier_meta.get("sha256")
                if run.model.conditional else None}
    if study.recipe["test_images"] is not None:  # absent for all: older caches stay valid
        settings["test_images"] = study.recipe["test_images"]
    return settings


def evaluate_run(
    study: Study, name: str, run: Run, classifier: torch.nn.Module,
    classifier_meta: dict[str, Any],
) -> tuple[dict[str, Any], ExactLogPx | None]:
    """``run``'s evaluation (``evaluate.full_evaluation``, reused by ``ensure_evaluation``
    while its weights and settings agree) and the exact log p(x) of every test image (None
    where the latent is too wide for the quadrature and the evaluation was not redone)."""
    from vaelab import __version__
    from vaelab.evaluate import (
        EXACT_MAX_LATENT,
        ExactLogPx,
        exact_log_px_per_image,
        full_evaluation,
    )

    # the exact log p(x) of every test image, kept beside the evaluation (its key: the
    # weights, the images, the tolerance) so the figures reuse it instead of a second
    # quadrature (minutes on a CPU), also when the evaluation itself is reused
    exact_path = study.out / EVALUATIONS / f"{name}-exact.safetensors"
    exact_key = {"model_sha256": _model_sha256(run), "tolerance": study.tolerance,
                 "test_images": len(study.test_part_of(run).test), "vaelab": __version__,
                 "exact_rules": EXACT_RULES}
    wants_exact = study.tolerance is not None and run.model.latent_dim <= EXACT_MAX_LATENT
    exact = ExactLogPx.load(exact_path, exact_key) if wants_exact and not study.force else None
    settings = _evaluation_settings(study, run, classifier_meta)
    n, k = study.logpx_images, study.num_samples

    def evaluate() -> dict[str, Any]:
        nonlocal exact
        study.log(f"evaluating {name} ({run.path}): ELBO, exact log p(x) (latent <= 2), "
                  f"log p(x) with K = {k} "
                  f"on {'all' if not n else f'the first {n:,}'} test "
                  "images, active units, kNN, aggregate posterior, closest pairs"
                  + (", class accuracy of samples" if run.model.conditional else ""))
        data = study.test_part_of(run)
        if exact is None and wants_exact:
            exact = exact_log_px_per_image(
                run.model, data.test, tolerance=study.tolerance, progress=study.progress,
                likelihood=run.config["config"].get("likelihood", "bernoulli"))
            if exact_key["model_sha256"] is not None:
                exact.save(exact_path, exact_key)
        return full_evaluation(
            run, data, num_samples=k, seed=0, progress=study.progress,
            classifier=classifier, per_class=settings["per_class"],
            logpx_images=n, tolerance=study.tolerance, exact=exact)

    ev = ensure_evaluation(study.out / EVALUATIONS / f"{name}.json", run, settings, evaluate,
                           force=study.force, log=study.log)
    ev["run"] = str(run.path)  # a reused evaluation may come from a copied folder
    ev["config"] = run.config["config"]
    ev["train_summary"] = run.summary
    return ev, exact


def draw_study_figures(
    study: Study, named: dict[str, Run], exact: dict[str, ExactLogPx | None]
) -> dict[str, dict[str, list[str]]]:
    """Every figure of the VAE and the CVAE (``draw_figures`` into ``out/figures/<kind>``),
    as paths relative to ``out``, by kind and figure name."""
    figures: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        drawn = draw_figures(named[kind], study.data_of(named[kind]),
                             study.out / "figures" / kind, study.formats, force=study.force,
                             log=study.log, exact=exact.get(kind))
        figures[kind] = {
            name: [os.path.relpath(Path(p), study.out) for p in paths]
            for name, paths in drawn.items()
        }
    return figures


def study_results(
    study: Study, plan: RunPlan, named: dict[str, Run], classifier_meta: dict[str, Any],
    evaluations: dict[str, dict[str, Any]], figures: dict[str, dict[str, list[str]]],
) -> dict[str, Any]:
    """``results.json``'s content (but its ``timings``): every number, setting and path."""
    from vaelab import plots
    from vaelab.bench import machine
    from vaelab.training import versions

    out, given, seed_runs = study.out, study.given, plan.seed_runs
    return {
        "format": REPORT_FORMAT,
        "kind": "vaelab-report",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": reproduce_command(out, runs=[str(r.path) for r in given.values()],
                                     preset=study.preset, ablations=study.ablations,
                                     seeds=study.seeds, num_samples=study.num_samples,
                                     dataset=study.dataset, formats=study.formats,
                                     logpx_images=study.logpx_images,
                                     tolerance=study.tolerance),
        "versions": versions(),
        "machine": machine(),
        "device": str(study.device),
        "out": str(out),
        "settings": {"quick": study.quick, "ablations": study.ablations, "seeds": study.seeds,
                     "num_samples": study.num_samples, "logpx_images": study.logpx_images,
                     "tolerance": study.tolerance, "dataset": study.dataset,
                     "preset": study.preset, "test_images": study.recipe["test_images"],
                     "precision": study.precision,
                     "given_runs": {k: str(r.path) for k, r in given.items()}},
        "reference": {"values": STUDY, "reduction_pct": {
            m: reduction_pct(STUDY["vae"][m], STUDY["cvae"][m]) for m in STUDY["vae"]}},
        "closest_pairs": {name: [[p["a"], p["b"]] for p in ev["closest_pairs"]["pairs"]]
                          for name, ev in evaluations.items()},
        "runs": {name: {"path": str(run.path), "kind": run.spec.kind}
                 for name, run in named.items()},
        "evaluations": evaluations,
        "comparison": comparison_rows(evaluations, seed_runs),
        "seed_runs": seed_runs,
        "classifier": {k: v for k, v in classifier_meta.items() if k != "history"}
        | {"path": str(out / "classifier")},
        "figures": figures,
        "figure_captions": {name: spec.caption for name, spec in plots.FIGURES.items()},
        "ablations": ablation_results(evaluations, seed_runs, plan.annealing)
        if study.ablations else None,
    }


def write_report(study: Study, results: dict[str, Any]) -> None:
    """Write ``results.json``, ``README.md`` and ``index.html`` into ``out`` and print the
    summary (every block but the figures) on the study's console."""
    out = study.out
    atomic_write_json(out / "results.json", results)
    blocks = report_blocks(results)
    atomic_write_text(out / "README.md", render_markdown(blocks))
    atomic_write_text(out / "index.html", render_html(blocks, out))
    render_terminal([b for b in blocks if b[0] != "figure"], study.console)
    study.log(f"report: {out / 'README.md'}  {out / 'index.html'}  "
              f"numbers: {out / 'results.json'}")


def reproduce_command(
    out: Path, *, runs: Sequence[str], preset: str, ablations: bool, seeds: Sequence[int],
    num_samples: int, dataset: str, formats: Sequence[str] = ("png", "pdf"),
    logpx_images: int = 0, tolerance: float | None = None,
) -> str:
    """The ``vaelab reproduce`` command line that makes this report again."""
    recipe = report_recipe(preset)
    parts = ["vaelab", "reproduce", "--out", shlex.quote(str(out))]
    if runs:
        parts += ["--runs", *(shlex.quote(r) for r in runs)]
    if preset == "quick":
        parts.append("--quick")
    elif preset != "study":
        parts += ["--preset", preset]
    if ablations:
        parts.append("--ablations")
        if list(seeds) != [0, 1, 2]:
            parts += ["--seeds", *(str(s) for s in seeds)]
    if num_samples != recipe["num_samples"]:
        parts += ["--samples", str(num_samples)]
    if logpx_images != recipe["logpx_images"]:
        parts += ["--logpx-images", str(logpx_images)]
    if dataset != "mnist":
        parts += ["--dataset", shlex.quote(dataset)]
    if tolerance is not None and tolerance != recipe["tolerance"]:
        parts += ["--tolerance", repr(tolerance)]
    if list(formats) != ["png", "pdf"]:
        parts += ["--format", *formats]
    return " ".join(parts)


def _over_seeds(
    evaluations: dict[str, dict[str, Any]], names: Sequence[str], key: str
) -> dict[str, Any]:
    """One table metric over the seed runs ``names``: mean, std (None for one run), values."""
    values = [run_metrics(evaluations[n])[key] for n in names]
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": values}


def comparison_rows(
    evaluations: dict[str, dict[str, Any]], seed_runs: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """The main table: each metric for the VAE and the CVAE (mean ± std over the seed runs when
    there are several), the relative reduction CVAE vs VAE, and the study's values."""
    rows = []
    for key, label in METRICS:
        row: dict[str, Any] = {"metric": key, "label": label}
        for kind in KINDS:
            spread = _over_seeds(evaluations, seed_runs[kind], key)
            row[kind], row[f"{kind}_std"], row[f"{kind}_values"] = (
                spread["mean"], spread["std"], spread["values"])
            row[f"study_{kind}"] = STUDY[kind].get(key)
        row["reduction_pct"] = reduction_pct(row["vae"], row["cvae"])
        row["study_reduction_pct"] = reduction_pct(row["study_vae"], row["study_cvae"])
        rows.append(row)
    return rows


def _direction(with_: float, without: float, nd: int = 2) -> str:
    """How ``without`` compares with ``with_`` at the precision shown (``nd`` decimals)."""
    diff = round(without, nd) - round(with_, nd)
    if abs(diff) < 0.5 * 10**-nd:
        return "the same"
    return "higher" if diff > 0 else "lower"


def ablation_results(
    evaluations: dict[str, dict[str, Any]], seed_runs: dict[str, list[str]],
    annealing: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """KL annealing (with vs without warm-up) and the spread over seeds, with a sentence per
    model that states what the numbers show."""
    seeds: dict[str, Any] = {}
    for kind, names in seed_runs.items():
        seeds[kind] = {"runs": names,
                       "seeds": [evaluations[n].get("seed") for n in names]}
        for key, _ in METRICS:
            seeds[kind][key] = _over_seeds(evaluations, names, key)
        au = [evaluations[n]["active_units"]["count"] for n in names]
        mean, std = mean_std(au)
        seeds[kind]["active_units"] = {"mean": mean, "std": std, "values": au}
    anneal: dict[str, Any] = {}
    for kind, arms in annealing.items():
        w, n = evaluations[arms["warmup"]], evaluations[arms["no_warmup"]]
        entry = {"runs": arms, "warmup": {}, "no_warmup": {}}
        for arm, ev in (("warmup", w), ("no_warmup", n)):
            entry[arm] = {"kl": ev["elbo"]["kl"], "neg_elbo": ev["elbo"]["neg_elbo"],
                          "recon": ev["elbo"]["recon"],
                          "active_units": ev["active_units"]["count"],
                          "latent_dim": ev["active_units"]["latent_dim"]}
        a, b = entry["warmup"], entry["no_warmup"]
        parts = []
        for key, label in (("kl", "test KL"), ("neg_elbo", "-ELBO")):
            way = _direction(a[key], b[key])
            parts.append(f"{label} {b[key]:.2f} nats without the warm-up vs {a[key]:.2f} with it "
                         + ("(the same to two decimals)" if way == "the same" else
                            f"({way} without, {b[key] - a[key]:+.2f})"))
        au = _direction(a["active_units"], b["active_units"], 0)
        parts.append(f"active units {b['active_units']} of {b['latent_dim']} without vs "
                     f"{a['active_units']} of {a['latent_dim']} with it"
                     + ("" if au == "the same" else f" ({'more' if au == 'higher' else 'fewer'} "
                        "without)"))
        spread = seeds.get(kind, {}).get("neg_elbo", {})
        if spread.get("std") is not None and arms["warmup"] in seeds[kind]["runs"]:
            parts.append(f"for scale, the warm-up run's -ELBO varies with the seed by "
                         f"{spread['std']:.2f} nats (std over seeds "
                         f"{', '.join(str(x) for x in seeds[kind]['seeds'])})")
        entry["text"] = f"{kind.upper()}: " + "; ".join(parts) + "."
        anneal[kind] = entry
    return {"kl_annealing": anneal, "seeds": seeds}


# --------------------------------------------------------------------------------------------
# The document: one list of blocks, rendered as Markdown, HTML and a terminal summary
# --------------------------------------------------------------------------------------------
EXACT_COLUMNS = ["run", "-log p(x)", "est. error", "-ELBO", "gap", "s.e.", "own rules",
                 "images"]


def exact_row(name: str, ex: dict[str, Any]) -> list[str]:
    """The exact-likelihood table's row: gap = log p(x) - ELBO >= 0, so -ELBO is
    -log p(x) + gap."""
    return [name, _f(ex["neg_log_px"]), _f(ex["error_estimate"], 3),
            _f(ex["neg_log_px"] + ex["gap"]), _f(ex["gap"]), _f(ex["log_px_sem"]),
            f"{ex['refined']:,}", f"{ex['n']:,}"]


def evaluation_blocks(
    evaluations: dict[str, dict[str, Any]], *, log_px: bool = True, study: bool = False
) -> list[Block]:
    """Tables of log p(x), active units, kNN, aggregate posterior and closest digit pairs."""
    blocks: list[Block] = []
    exact_rows = []
    for name, ev in evaluations.items():
        ex = ev.get("exact_log_px") if log_px else None
        if ex:
            exact_rows.append(exact_row(name, ex))
    if exact_rows:
        blocks += [("h3", "Exact log-likelihood (2-D latent: quadrature)"),
                   ("p", "log p(x) = int p(x|z) p(z) dz by a trapezoid and a midpoint rule on "
                         "a shared lattice of latent nodes, finer rules of their own (in the "
                         "posterior's principal axes) for images whose posterior is too narrow; "
                         "reported is their mean, with the mean "
                         "over images of |log T - log M| plus the mass at the box's edge as its "
                         "estimated error. gap = log p(x) - ELBO = the mean KL(q(z|x) || p(z|x)) "
                         "over the same images."),
                   ("table", EXACT_COLUMNS, exact_rows)]
    rows = []
    for name, ev in evaluations.items():
        for key, proposal in (("log_px", "q(z|x)"), ("log_px_student_t", "Student-t")):
            lp = ev.get(key) if log_px else None
            if not lp:
                continue
            exact = lp.get("exact_log_px_same_images")
            rows.append([name, proposal, _f(lp["neg_log_px"]), _f(lp.get("neg_elbo_same_images")),
                         _f(lp.get("gap")), _f(lp["log_px_sem"]), str(lp["num_samples"]),
                         f"{lp['n']:,}", _f(None if exact is None else -exact),
                         _f(None if exact is None else -lp["bias"])])
    if rows:
        blocks += [("h3", "Importance-sampled log-likelihood"),
                   ("p", "log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / r(z_k|x) with z_k ~ r "
                         "(Burda et al. 2015), r = q(z|x) or a Student-t with 3 degrees of "
                         "freedom centred on q with q's scales; q's K samples also give the "
                         "ELBO, and the gap log p(x) - ELBO is what the bound loses. Where the "
                         "exact value is known it is shown for the same images, with the "
                         "estimate's bias (estimated -log p(x) minus exact)."),
                   ("table", ["run", "proposal", "-log p(x)", "-ELBO (K samples)", "gap",
                              "s.e.", "K", "images", "exact -log p(x)", "bias"], rows)]
    blocks += [("h3", "Active units"),
               ("p", "A_j = Var_x(E_q[z_j]); unit j is active when A_j > 0.01 "
                     "(Burda et al. 2015)."),
               ("table", ["run", "active", "Var(mu_j) per dimension"],
                [[n, f"{ev['active_units']['count']} of {ev['active_units']['latent_dim']}",
                  _vec(ev["active_units"]["variances"], 3)] for n, ev in evaluations.items()])]
    blocks += [("h3", "k-nearest-neighbour digit accuracy in latent space"),
               ("p", "Each test image's posterior mean takes the majority label of its k nearest "
                     "training posterior means. A CVAE's encoder is given the label, so its codes "
                     "need not carry the digit: there a low accuracy means z holds style only."),
               ("table", ["run", "k", "accuracy", "training codes", "test codes"],
                [[n, str(ev["knn"]["k"]), _pct(100 * ev["knn"]["accuracy"]),
                  f"{ev['knn']['n_train']:,}", f"{ev['knn']['n_test']:,}"]
                 for n, ev in evaluations.items()])]
    blocks += [("h3", "Aggregate posterior vs the prior N(0, I)"),
               ("p", "q(z) = mean over images of q(z|x): mean E[mu], covariance Cov(mu) + "
                     "E[diag sigma^2]; KL is that of the moment-matched Gaussian to the prior."),
               ("table", ["run", "E[mu]", "Cov(mu)", "Cov q(z)", "KL(q || p) (Gaussian fit)"],
                [[n, _vec(ev["aggregate_posterior"]["posterior_means"]["mean"]),
                  _mat(ev["aggregate_posterior"]["posterior_means"]["cov"]),
                  _mat(ev["aggregate_posterior"]["aggregate"]["cov"]),
                  _f(ev["aggregate_posterior"]["aggregate"]["kl_to_prior"], 3)]
                 for n, ev in evaluations.items()])]
    blocks += [("h3", "Closest digit pairs in latent space"),
               ("p", "Distance between the class centroids of the posterior means."
                + (" The study's VAE had "
                   + ", ".join(f"{a}/{b}" for a, b in STUDY["closest_pairs"])
                   + " closest." if study else "")),
               ("table", ["run", "closest pairs (distance)"],
                [[n, ", ".join(f"{p['a']}/{p['b']} ({p['distance']:.2f})"
                               for p in ev["closest_pairs"]["pairs"])]
                 for n, ev in evaluations.items()])]
    return blocks


def first_look_blocks(results: dict[str, Any]) -> list[Block]:
    """For a preset other than the study's: a paragraph that says these numbers are a first
    look, on how many images and how long a training, and not the study's."""
    preset = canonical_preset(results["settings"]["preset"], warn=False)  # older: "seed"
    if preset == "study":
        return []
    ev = results["evaluations"]["vae"]
    c = ev["config"]
    network = (f"an MLP of {' and '.join(str(h) for h in c.get('mlp_hidden', []))} hidden units"
               if c.get("arch") == "mlp" else "a convolutional network")
    return [("p", f"A first look, not the study (preset `{preset}`): each model here trained on "
                  f"{ev['knn']['n_train']:,} training images for {c['epochs']} epoch"
                  f"{'s' if c['epochs'] != 1 else ''} through {network} (batch "
                  f"{c['batch_size']}, learning rate {c['lr']:g}), and the numbers below are "
                  f"on {'the first' if results['settings'].get('test_images') else 'all'} "
                  f"{ev['knn']['n_test']:,} test images. They show the shape of the study "
                  "(digits, clusters, a CVAE that draws the class asked for), not its values: "
                  "`vaelab reproduce` without --quick trains the `study` preset, the study's.")]


def report_blocks(results: dict[str, Any]) -> list[Block]:
    ev = results["evaluations"]
    s = results["settings"]
    first = s.get("test_images")
    seeds_note = ""
    if any(len(r["vae_values"]) > 1 for r in results["comparison"]):
        seeds_note = (" VAE and CVAE values are mean ± std over seeds "
                      f"{', '.join(str(x) for x in s['seeds'])}.")
    blocks: list[Block] = [
        ("h1", "vaelab: the VAE / CVAE study, reproduced"),
        ("p", f"Preset `{s['preset']}` on `{s['dataset']}`, device {results['device']}, "
              f"created {results['created']}. Every number below was computed by this run; the "
              "study's columns are its published values."),
        ("code", results["command"] or "vaelab reproduce"),
        *first_look_blocks(results),
        ("h2", "VAE vs CVAE (test set, nats per image)"),
        ("table",
         ["metric", "VAE", "CVAE", "reduction CVAE vs VAE", "study VAE", "study CVAE",
          "study reduction"],
         [[r["label"], _pm(r["vae"], r["vae_std"]), _pm(r["cvae"], r["cvae_std"]),
           _pct(r["reduction_pct"]), _f(r["study_vae"]), _f(r["study_cvae"]),
           _pct(r["study_reduction_pct"])] for r in results["comparison"]]),
        ("p", "reduction = 100 (VAE - CVAE) / VAE; -ELBO = reconstruction + KL at beta = 1 "
              + (f"on the first {first:,} test images; " if first else "on all test images; ")
              + f"{log_px_label(main_log_px(ev['vae']), bool(first))}." + seeds_note),
    ]
    ca = ev.get("cvae", {}).get("cvae_class_accuracy")
    clf = results["classifier"]
    if ca:
        blocks += [
            ("h2", "Does the CVAE draw the digit it is asked for?"),
            ("p", f"{ca['per_class_n']} samples z ~ N(0, I) per class, decoded under that class "
                  "(Bernoulli means), labelled by the CNN classifier (test accuracy "
                  f"{100 * clf['test_accuracy']:.2f}% on {clf['test_images']:,} real images, "
                  f"{clf['epochs']} epoch{'s' if clf['epochs'] != 1 else ''})."),
            ("table", ["class", *(str(c) for c in range(len(ca["per_class"]))), "all"],
             [["accuracy", *(_pct(100 * a) for a in ca["per_class"]),
               _pct(100 * ca["accuracy"])]]),
        ]
    blocks += [("h2", "The latent space"), *evaluation_blocks(ev, study=True)]
    blocks += ablation_blocks(results.get("ablations"))
    blocks += figure_blocks(results)
    t = results["timings"]
    beside = [k for k in t if k.startswith("beside_training_")]
    blocks += [("h2", "Runtime"),
               ("table", ["step", "seconds"], [[k, f"{v:.1f}"] for k, v in t.items()])]
    if beside:
        blocks += [("p", f"{', '.join(beside)}: in the thread of the first run to finish "
                         "training, beside the other run's training (inside the training's "
                         "seconds; the later steps reused what it made).")]
    return blocks


def ablation_blocks(ab: dict[str, Any] | None) -> list[Block]:
    """The ablations' section (``ablation_results``): the KL annealing table with a sentence
    per model, and the spread over seeds; nothing without ablations."""
    if not ab:
        return []
    blocks: list[Block] = [("h2", "Ablations"),
                           ("h3", "KL annealing: linear warm-up vs constant beta = 1")]
    rows = []
    for kind, entry in ab["kl_annealing"].items():
        for arm, label in (("warmup", "warm-up"), ("no_warmup", "no warm-up")):
            a = entry[arm]
            rows.append([kind.upper(), label, entry["runs"][arm], _f(a["recon"]),
                         _f(a["kl"]), _f(a["neg_elbo"]),
                         f"{a['active_units']} of {a['latent_dim']}"])
    blocks.append(("table", ["model", "KL weight", "run", "recon", "KL", "-ELBO",
                             "active units"], rows))
    blocks += [("p", entry["text"]) for entry in ab["kl_annealing"].values()]
    blocks.append(("h3", "Seeds"))
    rows = []
    for kind, entry in ab["seeds"].items():
        rows.append([kind.upper(), ", ".join(str(x) for x in entry["seeds"]),
                     *(_pm(entry[key]["mean"], entry[key]["std"]) for key, _ in METRICS),
                     _pm(entry["active_units"]["mean"], entry["active_units"]["std"], 1)])
    blocks.append(("table", ["model", "seeds", *(label for _, label in METRICS),
                             "active units"], rows))
    return blocks


def figure_blocks(results: dict[str, Any]) -> list[Block]:
    """The figures' section: each model's figures (the PNG, the other formats beside it), with
    its caption and the ``vaelab plot`` command that redraws it."""
    blocks: list[Block] = [("h2", "Figures")]
    captions = results["figure_captions"]
    for kind, figs in results["figures"].items():
        run_path = results["runs"][kind]["path"]
        blocks.append(("h3", kind.upper()))
        for name, paths in figs.items():
            png = next((p for p in paths if p.endswith(".png")), paths[0] if paths else None)
            if png is None:
                continue
            redraw = f"vaelab plot {shlex.quote(run_path)} --figure {name} --out " \
                f"{shlex.quote(str(Path(results['out']) / 'figures' / kind))}"
            blocks.append(("figure", png, captions.get(name, name), name, redraw,
                           [p for p in paths if p != png]))
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "code":
            lines += ["```", b[1], "```", ""]
        elif kind == "table":
            headers, rows = b[1], b[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "figure":
            _, path, caption, name, command, others = b
            lines += [f"![{name}]({path})", "", f"*{caption}*", "",
                      f"Redraw: `{command}`"
                      + (f" · also {', '.join(f'[{Path(p).suffix[1:]}]({p})' for p in others)}"
                         if others else ""), ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0 1.2em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}
figure{display:inline-block;margin:.6em;vertical-align:top;max-width:520px}
figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#444}
code,pre{background:#f6f6f6;padding:.1em .3em;border-radius:3px}
pre{padding:.6em;overflow-x:auto}
"""


def render_html(blocks: list[Block], root: Path) -> str:
    """Self-contained HTML: inline CSS, PNG figures embedded as base64 data URIs, no links."""
    e = html.escape
    title = next((b[1] for b in blocks if b[0] == "h1"), "vaelab report")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif kind == "code":
            parts.append(f"<pre><code>{e(b[1])}</code></pre>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>"
                           for row in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "figure":
            _, path, caption, name, command, _others = b
            file = root / path
            if file.suffix.lower() != ".png" or not file.exists():
                parts.append(f"<p>{e(name)}: no PNG to show ({e(path)})</p>")
                continue
            data = base64.b64encode(file.read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{data}">'
                         f"<figcaption><b>{e(name)}</b>: {e(caption)}<br>"
                         f"<code>{e(command)}</code></figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_terminal(blocks: list[Block], console: Any) -> None:
    """Tables as rich tables, headings as rules, paragraphs as text."""
    from rich.table import Table
    from rich.text import Text

    for b in blocks:
        kind = b[0]
        if kind == "h1" and console.is_terminal:
            console.rule(f"[bold]{b[1]}")
        elif kind == "h1":  # a rule would be as wide as the console: a heading line instead
            console.print(Text(f"== {b[1]} ==", style="bold"))
        elif kind in ("h2", "h3"):
            console.print(Text(b[1], style="bold" if kind == "h2" else "bold dim"))
        elif kind == "p":
            console.print(Text(b[1]))
        elif kind == "table":
            table = Table()
            for h in b[1]:
                table.add_column(Text(str(h)))
            for row in b[2]:
                table.add_row(*(Text(str(c)) for c in row))
            console.print(table)
