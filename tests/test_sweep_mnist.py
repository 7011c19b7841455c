"""The sweep's first command on real MNIST, as the README gives it: ``vaelab sweep --out
sweeps/seeds --preset quick --grid seed=0,1,2`` trains three seeds of the quick look's VAE on a
local Ray and writes one row, their mean and standard deviation; each trial is an ordinary
run folder that loads and evaluates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_quick_look import _have_mnist
from vaelab.checkpoint import load_run
from vaelab.sweep import mean_std

COMMAND = ["sweep", "--out", "sweeps/seeds", "--preset", "quick", "--grid", "seed=0,1,2"]


@pytest.mark.mnist
@pytest.mark.slow
@pytest.mark.skipif(not _have_mnist(), reason="real MNIST not in data_root()/mnist")
def test_the_readmes_sweep_command_trains_three_seeds_into_one_row(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "vaelab " + " ".join(COMMAND) in readme
    done = subprocess.run([sys.executable, "-m", "vaelab", *COMMAND, "--quiet"], cwd=tmp_path,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "sweeps" / "seeds"
    sweep = json.loads((out / "sweep.json").read_text())
    names = sorted(t["name"] for t in sweep["trials"])
    assert names == ["seed=0", "seed=1", "seed=2"]
    assert sweep["status"] == "done" and all(t["status"] == "done" for t in sweep["trials"])
    (row,) = sweep["rows"]
    metrics = row["metrics"]
    assert sorted(row["seeds"]) == [0, 1, 2] and metrics["neg_elbo"]["n"] == 3
    finals = [json.loads((out / n / "summary.json").read_text())["test"]["neg_elbo"]
              for n in names]
    mean, std = mean_std(finals)
    assert metrics["neg_elbo"]["mean"] == pytest.approx(mean)
    assert metrics["neg_elbo"]["std"] == pytest.approx(std) and std > 0  # the seeds differ
    assert 100 < mean < 250  # a trained model on grey-level MNIST, nats per image
    # a 2-D latent: the exact -log p(x) of each trial, at most its -ELBO (log p(x) >= ELBO)
    exact = [t["metrics"]["neg_log_px"] for t in sorted(sweep["trials"], key=lambda t: t["name"])]
    assert metrics["neg_log_px"]["n"] == 3
    assert all(e is not None and e <= f for e, f in zip(exact, finals, strict=True))
    for n in names:
        assert load_run(out / n, "cpu").model.latent_dim == 2
    assert "-ELBO" in (out / "sweep.md").read_text()
