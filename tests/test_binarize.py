"""``--binarize dynamic``: binarized MNIST as the VAE literature uses it.

The val and test splits are binarized once with pinned seeds (the same bytes on every machine:
a pinned SHA-256 checks it), each training batch is drawn afresh from a generator a checkpoint
saves (a resumed run equals an uninterrupted one bit for bit: smoke preset, synthetic IDX
data, one thread, as in test_reliability.py), and evaluate, the explorer and ``data info``
read the binarized test split a run recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import assert_same_run, train_in_process
from helpers import one_thread as single_thread
from synthetic import noisy_blobs, synthetic_dataset, write_synthetic
from vaelab.checkpoint import list_checkpoints, load_run
from vaelab.cli import main
from vaelab.config import resolve_config
from vaelab.data import (
    BINARIZE_SEEDS,
    Batcher,
    Split,
    binarize_dataset,
    binarize_images,
    binarized_record,
    images_sha256,
    load_dataset,
)
from vaelab.errors import DataError
from vaelab.evaluate import dataset_for_run, evaluate_elbo
from vaelab.training import Trainer, TrainingStep, train


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


def ramp(n: int) -> torch.Tensor:
    """n uint8 images whose pixels run through 0..255 in order."""
    return torch.from_numpy((np.arange(n * 784) % 256).astype(np.uint8).reshape(n, 28, 28))


# --------------------------------------------------------------------------------------------
# The one binarization of val and test
# --------------------------------------------------------------------------------------------
def test_binarized_images_are_the_same_bytes_on_every_machine() -> None:
    """The ramp binarized with the test split's seed has the SHA-256 measured when the seeds
    were pinned: a machine, numpy or torch that drew other bits fails here."""
    b = binarize_images(ramp(10), BINARIZE_SEEDS["test"])
    assert images_sha256(Split(b, torch.zeros(10, dtype=torch.long))) == \
        "2b5bd7c62267bb763caab0376e2c55fbf06011b1762434ef7485697b487b14a3"
    assert BINARIZE_SEEDS == {"val": 20180401, "test": 20180402}


def test_a_pixel_is_white_with_probability_its_intensity() -> None:
    """Values 0 and 255 only; 0 stays 0 and 255 stays 255; each grey level v is white in a
    share v / 255 of 4000 draws (within 4.5 standard errors, every level); the first n images
    binarize the same whether the split was cut first or not."""
    images = ramp(4000 // 784 * 256 + 256)  # every level about 4000 times
    b = binarize_images(images, 7)
    assert set(b.unique().tolist()) <= {0, 255}
    v = images.flatten().long()
    white = (b.flatten() == 255).double()
    share = torch.zeros(256, dtype=torch.float64).index_add_(0, v, white)
    count = torch.bincount(v, minlength=256).double()
    p = torch.arange(256, dtype=torch.float64) / 255
    se = (p * (1 - p) / count).sqrt().clamp_min(1e-12)
    assert share[0] == 0 and share[255] == count[255]
    assert ((share / count - p).abs() <= 4.5 * se).all()
    assert torch.equal(binarize_images(images[:3], 7), b[:3])
    assert not torch.equal(binarize_images(images, 8), b)


def test_load_dataset_binarizes_val_and_test_once_and_keeps_train_grey(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path / "idx", noisy_blobs, 96, 40, seed=0)
    grey = load_dataset(f"idx:{folder}", val_size=16)
    ds = load_dataset(f"idx:{folder}", val_size=16, binarize="dynamic")
    assert ds.binarize == "dynamic" and grey.binarize == "none"
    assert torch.equal(ds.train.images, grey.train.images)
    for part in ("val", "test"):
        assert set(getattr(ds, part).images.unique().tolist()) <= {0, 255}
        assert torch.equal(getattr(ds, part).labels, getattr(grey, part).labels)
    again = load_dataset(f"idx:{folder}", val_size=16, binarize="dynamic")
    assert binarized_record(again) == binarized_record(ds)
    # a limit keeps the first images of the same binarization
    cut = load_dataset(f"idx:{folder}", val_size=16, binarize="dynamic", limit=8)
    assert torch.equal(cut.test.images, ds.test.images[:8])
    assert binarize_dataset(ds) is ds
    with pytest.raises(DataError, match="unknown binarization 'static': choose none or dynamic"):
        load_dataset(f"idx:{folder}", val_size=16, binarize="static")


# --------------------------------------------------------------------------------------------
# Training: fresh draws per batch, resumed exactly
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("idx"), noisy_blobs, 512, 64, seed=0)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--preset", "smoke", "--dataset", f"idx:{data}",
            "--val-size", "32", "--epochs", "3", "--checkpoint-every", "3", "--quiet",
            "--binarize", "dynamic", "--objective", "iwae", "--k", "2", *extra]


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted binarized IWAE run (one thread): what a resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(train_args(data, out))
    return out


def test_sigint_mid_epoch_then_resume_equals_the_uninterrupted_run(
    data: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C at step 10 (mid-epoch, between checkpoints): the checkpoint holds the
    binarizing generator's state, and the resumed run's weights and metrics are the
    uninterrupted run's, bit for bit."""
    run = tmp_path / "run"
    real_step = Trainer.train_step

    def step(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        real_step(self, x, y)
        if self.global_step == 10:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(train_args(data, run)) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(train_args(data, run, "--resume")) == 0
    assert_same_run(run, reference)
    capsys.readouterr()


def test_resume_from_an_older_checkpoint_equals_the_uninterrupted_run(
    reference: Path, tmp_path: Path,
) -> None:
    """The finished run with its newest checkpoint and final files gone resumes from step 21
    (mid-epoch 3) and ends with the same weights and metrics."""
    run = Path(shutil.copytree(reference, tmp_path / "run"))
    shutil.rmtree(list_checkpoints(run)[0])
    for name in ("model.safetensors", "model.json", "summary.json"):
        (run / name).unlink()
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    assert_same_run(run, reference)


def test_each_batch_is_drawn_afresh_as_bernoulli_of_the_intensity(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the training steps see: pixels 0 or 1 only; over the run their mean is the grey
    images' mean (within 4 standard errors); and an image met in epoch 1 and epoch 2 is drawn
    anew (most of its grey pixels differ)."""
    seen: list[torch.Tensor] = []
    real_body = TrainingStep.body

    def body(self: TrainingStep, x: torch.Tensor, *rest: Any) -> None:
        seen.append(x.clone())
        real_body(self, x, *rest)

    monkeypatch.setattr(TrainingStep, "body", body)
    args = train_args(data, tmp_path / "run")
    args[args.index("--epochs") + 1] = "2"
    assert main(args) == 0
    binary = torch.cat(seen)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    grey = load_dataset(f"idx:{data}", val_size=32, limit=512).train
    batcher = Batcher(grey, 64, seed=0)  # the run's order of the images
    n = batcher.num_images()
    assert len(binary) == 2 * n
    first = {int(i): binary[j] for j, i in enumerate(batcher.indices(0))}
    second = {int(i): binary[n + j] for j, i in enumerate(batcher.indices(1))}
    g = grey.images.double() / 255
    assert abs(float(binary.mean()) - float(g.mean())) < 4 * float(
        (g * (1 - g)).mean().sqrt() / binary.numel() ** 0.5)
    differ = [float((first[i] != second[i]).float().mean()) for i in first]
    assert np.median(differ) > 0.1


def test_the_run_records_its_binarized_splits_and_evaluate_uses_them(
    reference: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """config.json's ``data`` holds the SHA-256 of the val and test images the run evaluated
    on; `vaelab evaluate` reads that same binarized split (its -ELBO with the run's seed is
    the summary's, and not the grey split's); `vaelab data info --binarize dynamic` shows the
    same hashes; a record that no longer matches is refused in one line."""
    record = json.loads((reference / "config.json").read_text())["data"]
    ds = load_dataset(f"idx:{data}", val_size=32, limit=512, binarize="dynamic")
    assert record == binarized_record(ds)
    assert record["test_images"] == 64 and record["val_images"] == 32
    capsys.readouterr()
    assert main(["evaluate", str(reference), "--json", "--samples", "0", "--tolerance", "0"]) == 0
    ev = json.loads(capsys.readouterr().out)
    summary = json.loads((reference / "summary.json").read_text())
    assert ev["neg_elbo"] == summary["test"]["neg_elbo"] and ev["n"] == 64
    grey = load_dataset(f"idx:{data}", val_size=32, limit=512).test
    assert evaluate_elbo(load_run(reference).model, grey, seed=0)["neg_elbo"] != ev["neg_elbo"]
    assert torch.equal(dataset_for_run(load_run(reference)).test.images, ds.test.images)

    assert main(["data", "info", f"idx:{data}", "--val-size", "32", "--binarize", "dynamic",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["binarize"] == "dynamic"
    assert info["splits"]["test"]["sha256"] == record["test_sha256"]
    assert info["splits"]["val"]["sha256"] == record["val_sha256"]
    assert "sha256" not in info["splits"]["train"]

    run = Path(shutil.copytree(reference, tmp_path / "run"))
    raw = json.loads((run / "config.json").read_text())
    raw["data"]["test_sha256"] = "0" * 64
    (run / "config.json").write_text(json.dumps(raw))
    assert main(["evaluate", str(run), "--samples", "0", "--tolerance", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the binarized test split is not the one the run recorded" in err[0]


def test_resume_refuses_a_run_whose_binarized_splits_changed(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """An unfinished copy of the run whose recorded val SHA-256 no longer matches: `--resume`
    exits 2 with one line and leaves its checkpoints and metrics as they were."""
    run = Path(shutil.copytree(reference, tmp_path / "run"))
    shutil.rmtree(list_checkpoints(run)[0])
    (run / "summary.json").unlink()
    raw = json.loads((run / "config.json").read_text())
    raw["data"]["val_sha256"] = "f" * 64
    (run / "config.json").write_text(json.dumps(raw))
    before = {p.name for p in list_checkpoints(run)}, (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the binarized val split is not the one the run recorded" in err[0]
    assert ({p.name for p in list_checkpoints(run)}, (run / "metrics.jsonl").read_bytes()) == \
        before


def test_the_explorer_shows_a_binarized_runs_binarized_test_split(
    reference: Path, data: Path,
) -> None:
    from vaelab.explore.server import _load_test_split

    cfg = json.loads((reference / "config.json").read_text())["config"]
    images, labels, error = _load_test_split(cfg, {})
    assert error is None and set(images.unique().tolist()) <= {0, 255}
    ds = load_dataset(f"idx:{data}", val_size=32, limit=512, binarize="dynamic")
    assert torch.equal(images, ds.test.images)


def test_the_same_seed_binarizes_the_same_and_another_seed_does_not(tmp_path: Path) -> None:
    """Two runs of the same config train on the same draws; another seed draws others (the
    binarizing generator follows the run's seed)."""
    ds = synthetic_dataset(noisy_blobs, 128, 16, 16, seed=0)

    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        cfg = resolve_config("smoke", binarize="dynamic", val_size=16, device="cpu", seed=seed)
        return train(cfg, tmp_path / name, dataset=ds, progress=False).model.state_dict()

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
