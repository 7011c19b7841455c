"""Writes tests/data/pre_refactor_run: a run folder by vaelab as it was before the training
package (commit cc1184a, ``vaelab.train``), killed after its first epoch, and the weights the
uninterrupted run ended with. Run once with that version on the path:

    git worktree add /tmp/old cc1184a
    PYTHONPATH=/tmp/old/src:tests python3 tests/data/make_pre_refactor_run.py

``test_refactor_compat.py`` resumes it with today's code.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from vaelab.train import train

from synthetic import noisy_blobs, write_synthetic
from vaelab.config import resolve_config
from vaelab.data import load_dataset

HERE = Path(__file__).parent / "pre_refactor_run"

torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    idx = write_synthetic(Path(tmp) / "idx", noisy_blobs, 256, 64, seed=0)
    data = load_dataset(f"idx:{idx}", val_size=32)
    cfg = resolve_config("smoke", dataset="idx:synthetic", epochs=2, val_size=32)
    run = Path(tmp) / "run"
    result = train(cfg, run, progress=False, dataset=data)
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
              str(HERE / "uninterrupted-final.safetensors"))
    # as killed after epoch 1: its first checkpoint, config.json, and epoch 1's metrics row
    ckpts = sorted((run / "checkpoints").iterdir())
    shutil.copytree(ckpts[0], HERE / "run" / "checkpoints" / ckpts[0].name)
    shutil.copy(run / "config.json", HERE / "run" / "config.json")
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (HERE / "run" / "metrics.jsonl").write_text(rows[0])
    print(ckpts[0].name, [p.name for p in ckpts])
