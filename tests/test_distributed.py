"""torchrun: two CPU processes (gloo) train one run; the run folder is whole and resumable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from synthetic import dark_noise, write_synthetic

pytestmark = pytest.mark.slow


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    if exe:
        return [exe]
    return [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("ddp-data"), dark_noise, 256, 64, seed=0,
                           power=3)


def _run(data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = _torchrun() + ["--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                         "--master-port", str(_free_port()),
                         "-m", "vaelab", "train", "--preset", "quick",
                         "--dataset", f"idx:{data_dir}", "--val-size", "32",
                         "--batch-size", "32", "--out", str(out), "--quiet", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_writes_a_whole_run(data_dir, tmp_path):
    out = tmp_path / "run"
    r = _run(data_dir, out, "--epochs", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "model.json", "model.safetensors",
                 "summary.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    # each rank took half of every epoch: 224 training images / global batch 32 = 7 steps
    assert summary["steps"] == 2 * 7
    # the metrics count every image once, over both ranks
    assert all(np.isfinite(row["test_neg_elbo"]) for row in rows)
    from vaelab.checkpoint import load_run

    run = load_run(out)
    assert run.model.latent_dim == 2


def test_torchrun_resume_continues_the_run(data_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    r0 = _run(data_dir, straight, "--epochs", "2")
    assert r0.returncode == 0, r0.stderr[-3000:]
    r1 = _run(data_dir, split, "--epochs", "2")
    assert r1.returncode == 0, r1.stderr[-3000:]
    # drop the final state and the last epoch's checkpoint, then resume from epoch 1
    ckpts = sorted((split / "checkpoints").glob("step-*"))
    shutil.rmtree(ckpts[-1])
    for name in ("model.json", "model.safetensors", "summary.json"):
        (split / name).unlink()
    r2 = _run(data_dir, split, "--resume")
    assert r2.returncode == 0, r2.stderr[-3000:]
    a = load_file(straight / "model.safetensors")
    b = load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
