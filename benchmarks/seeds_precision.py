"""The seed preset over seeds and precisions on this machine: every run's final test metrics,
and per (model, precision) the mean, std and worst over seeds, against the targets.

    vaelab train --model M --preset seed --seed S --precision P --out runs/M-P-S  (each run)
    python benchmarks/seeds_precision.py runs/*-*-* --out benchmarks/seeds-cpu.json [--keep]

Each run is read from its folder (config.json, summary.json, metrics.jsonl); nothing is
trained here. The precision is the one the run trained in (config.json's ``resolved``).
``--keep`` keeps the rows already in ``--out`` (as they were read then, with the machine and
the command that read them: their folders may be gone) and adds or replaces the runs given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from vaelab.bench import machine
from vaelab.checkpoint import read_config
from vaelab.config import ARCHITECTURE_KNOBS
from vaelab.io import atomic_write_json

TARGETS = {"vae": {"each": 136.0}, "cvae": {"each": 125.0, "mean": 124.5}}


def run_row(folder: Path) -> dict:
    raw, config = read_config(folder)
    cfg = config.to_dict()
    summary = json.loads((folder / "summary.json").read_text())
    if summary["epochs"] != cfg["epochs"]:
        raise SystemExit(f"{folder}: not finished ({summary['epochs']} of {cfg['epochs']} epochs)")
    network = {k: cfg[k] for k in ARCHITECTURE_KNOBS}
    if cfg["model"] == "vae":  # a VAE has no label: its runs group together whatever it says
        network["label_conditioning"] = None
    return {
        "run": str(folder), "model": cfg["model"], "seed": cfg["seed"],
        "precision": summary["precision"],
        "network": network, "label_conditioning": network["label_conditioning"],
        "activation": cfg["activation"], "resolved": raw.get("resolved"),
        "preset": cfg["preset"], "epochs": cfg["epochs"],
        "test": summary["test"], "val": summary["val"], "train_seconds": summary["train_seconds"],
        "images_per_s": [round(json.loads(line)["images_per_s"])
                         for line in (folder / "metrics.jsonl").read_text().splitlines()],
    }


def network_key(r: dict) -> tuple:
    """Runs of one model and network (every architecture knob alike) group together."""
    return r["model"], json.dumps(r["network"], sort_keys=True)


def groups(rows: list[dict]) -> list[dict]:
    out = []
    def key(r: dict) -> tuple:
        return *network_key(r), r["precision"]

    for k in sorted({key(r) for r in rows}, key=str):
        model, _, precision = k
        these = sorted((r for r in rows if key(r) == k), key=lambda r: r["seed"])
        first = these[0]
        values = [r["test"]["neg_elbo"] for r in these]
        target = TARGETS[model]
        out.append({
            "model": model, "network": first["network"], "activation": first["activation"],
            "label_conditioning": first["label_conditioning"], "precision": precision,
            "seeds": [r["seed"] for r in these], "neg_elbo": values,
            "mean": statistics.fmean(values),
            "val_mean": statistics.fmean(r["val"]["neg_elbo"] for r in these),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "worst": max(values), "target": target,
            "met": max(values) <= target["each"]
            and statistics.fmean(values) <= target.get("mean", float("inf")),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--keep", action="store_true",
                   help="keep the rows already in --out, adding or replacing the runs given")
    args = p.parse_args(argv)
    here = machine()
    command = "python benchmarks/seeds_precision.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv)
    rows = [{**run_row(r), "machine": here, "read_by": command} for r in args.runs]
    commands = [command]
    if args.keep and args.out.exists():
        old = json.loads(args.out.read_text())
        new = {r["run"] for r in rows}
        kept = [{"machine": old["machine"], "read_by": old["command"], **r}
                for r in old["runs"] if r["run"] not in new]
        rows = kept + rows
        commands = [*old.get("commands", [old["command"]]), command]
    atomic_write_json(args.out, {
        "kind": "vaelab-seeds-precision", "machine": here, "command": command,
        "commands": commands, "runs": rows, "groups": groups(rows),
    })
    for g in groups(rows):
        cond = g["label_conditioning"] or "-"
        n = g["network"]
        print(f"{g['model']:4} {g['activation']} {g['precision']} {cond:5} "
              f"enc {n['enc_hidden']}/{n['enc_refine']} seeds {g['seeds']}: "
              + " ".join(f"{v:.2f}" for v in g["neg_elbo"]) + f"  mean {g['mean']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
