"""``benchmarks/seeds_precision.py``: the seeds table's rows are read from run folders, grouped
by model, network and precision, with the mean, std and worst against the targets; ``--keep``
adds runs to a table whose earlier folders are gone."""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
from pathlib import Path

from helpers import one_thread
from synthetic import noisy_blobs, synthetic_dataset
from vaelab.config import resolve_config
from vaelab.training import Trainer

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location(
        "seeds_precision", ROOT / "benchmarks" / "seeds_precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_group_by_network_and_keep_adds_to_a_table(tmp_path: Path) -> None:
    script = _script()
    ds = synthetic_dataset(noisy_blobs, 96, 32, 32, seed=3)
    runs = {}
    for seed in (0, 1, 2):
        cfg = resolve_config("smoke", model="cvae", seed=seed, limit=None, val_size=32)
        with one_thread():
            Trainer(cfg, tmp_path / f"s{seed}", progress=False, dataset=ds).fit()
        runs[seed] = tmp_path / f"s{seed}"
    out = tmp_path / "seeds.json"
    assert script.main([str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    (group,) = table["groups"]
    tests = [json.loads((runs[s] / "summary.json").read_text())["test"]["neg_elbo"]
             for s in (0, 1)]
    assert group["seeds"] == [0, 1] and group["neg_elbo"] == tests
    assert group["mean"] == statistics.fmean(tests) and group["worst"] == max(tests)
    assert group["met"] == (max(tests) <= 125.0 and statistics.fmean(tests) <= 124.5)
    shutil.rmtree(runs[0])  # its row stays in the table
    assert script.main([str(runs[2]), "--out", str(out), "--keep"]) == 0
    kept = json.loads(out.read_text())
    assert [r["seed"] for r in kept["runs"]] == [0, 1, 2]
    assert kept["groups"][0]["seeds"] == [0, 1, 2]
    assert len(kept["commands"]) == 2 and all("machine" in r for r in kept["runs"])
    assert script.main([str(runs[2]), "--out", str(out), "--keep"]) == 0  # replaced, not added
    assert [r["seed"] for r in json.loads(out.read_text())["runs"]] == [0, 1, 2]
