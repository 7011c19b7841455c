"""``--tensorboard``: the run folder gets event files with every epoch's scalars and image grids
of reconstructions and prior samples, readable by TensorBoard's own event reader."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import (  # the [test] extra
    EventAccumulator,
)

from synthetic import block_digits, synthetic_dataset
from vaelab.cli import main
from vaelab.config import resolve_config
from vaelab.training import Trainer


def read_events(run: Path) -> EventAccumulator:
    folder = run / "tensorboard"
    assert folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_tensorboard_events_hold_scalars_and_images(tmp_path: Path, kind: str) -> None:
    cfg = resolve_config("smoke", model=kind, epochs=2, device="cpu")
    data = synthetic_dataset(block_digits, 128, 16, 32, seed=0)
    result = Trainer(cfg, tmp_path / "run", dataset=data, progress=False,
                     tensorboard=True).fit()
    acc = read_events(tmp_path / "run")
    tags = acc.Tags()
    for tag in ("train/neg_elbo", "train/recon", "train/kl", "test/neg_elbo", "test/kl", "beta"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
    # the logged values are the run's metrics, not something computed on the side
    for row, event in zip(result.metrics, acc.Scalars("test/neg_elbo"), strict=True):
        assert event.value == pytest.approx(row["test_neg_elbo"], rel=1e-6)
    assert set(tags["images"]) >= {"reconstructions", "samples"}
    for tag in ("reconstructions", "samples"):
        events = acc.Images(tag)
        assert [e.step for e in events] == [1, 2]
        assert all(e.width > 28 and e.height > 28 for e in events)  # a grid, not one image


def test_cli_tensorboard_flag_writes_events(tmp_path: Path, monkeypatch) -> None:
    data = synthetic_dataset(block_digits, 128, 16, 32, seed=0)
    monkeypatch.setattr("vaelab.training.loop.load_dataset", lambda *a, **k: data)
    code = main(["train", "--preset", "smoke", "--epochs", "1", "--device", "cpu", "--quiet",
                 "--tensorboard", "--out", str(tmp_path / "run")])
    assert code == 0
    acc = read_events(tmp_path / "run")
    assert [e.step for e in acc.Scalars("test/neg_elbo")] == [1]
