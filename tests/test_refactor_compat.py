"""A run folder written before the training package (vaelab.train, commit cc1184a) still
resumes and finishes with today's code: ``tests/data/pre_refactor_run`` was killed after its
first epoch (``tests/data/make_pre_refactor_run.py`` made it), and the resumed run ends with
the weights the old code's uninterrupted run ended with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from helpers import one_thread
from synthetic import noisy_blobs, write_synthetic
from vaelab.data import load_dataset
from vaelab.training import train

FIXTURE = Path(__file__).parent / "data" / "pre_refactor_run"


def test_a_run_checkpointed_before_the_refactor_resumes_and_finishes(
    tmp_path: Path,
) -> None:
    idx = write_synthetic(tmp_path / "idx", noisy_blobs, 256, 64, seed=0)
    data = load_dataset(f"idx:{idx}", val_size=32)
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run)
    with one_thread():
        result = train(None, run, resume=True, progress=False, dataset=data)
    assert result.summary["epochs"] == 2
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2]
    old = load_file(str(FIXTURE / "uninterrupted-final.safetensors"))
    new = result.model.state_dict()
    assert set(old) == set(new)
    for k, v in old.items():  # the fixture's epoch 1 was computed on another CPU
        torch.testing.assert_close(new[k].cpu(), v, rtol=1e-4, atol=1e-5)
