"""``--patience N``: early stopping on the validation split.

A run stops once N epochs in a row bring no better validation -ELBO, and its model is the best
epoch's weights (that epoch's checkpoint, kept from pruning until the run ends). The
validation numbers are scripted here (``scripted``: the real row, with ``val_neg_elbo`` set
per epoch), so that when the run stops is known in advance; the training itself is real
(smoke preset, synthetic IDX data, one thread), so the kept weights can be checked bit for bit
against a run trained for exactly the best epoch's number of epochs.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from helpers import assert_same_run, cli
from helpers import one_thread as single_thread
from synthetic import seeded_blobs, write_synthetic
from vaelab.checkpoint import checkpoint_name, list_checkpoints, read_metrics
from vaelab.cli import main
from vaelab.config import resolve_config
from vaelab.errors import ConfigError
from vaelab.training import Trainer
from vaelab.training.loop import best_epoch_row

# validation -ELBO by (1-based) epoch: best at epoch 2, then three epochs no better
SCRIPT = {1: 10.0, 2: 8.0, 3: 9.0, 4: 8.0, 5: 9.5, 6: 7.0, 7: 6.0}
PATIENCE = 3
STOP = 5  # epoch 2 + PATIENCE: the last epoch trained


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(autouse=True)
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Trainer._epoch_metrics

    def epoch_metrics(self: Trainer) -> dict[str, Any]:
        row = real(self)
        row["val_neg_elbo"] = SCRIPT[self.epoch + 1]
        return row

    monkeypatch.setattr(Trainer, "_epoch_metrics", epoch_metrics)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("data"), seeded_blobs, 256, 64, seed=0)


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "smoke", "--dataset", f"idx:{data}", "--val-size", "32",
            "--device", "cpu", "--out", str(out), "--quiet", *extra]


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def stopped(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of at most 7 epochs with patience 3: it stops after epoch 5."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.MonkeyPatch.context() as mp, single_thread():
        real = Trainer._epoch_metrics
        mp.setattr(Trainer, "_epoch_metrics", lambda self: {
            **real(self), "val_neg_elbo": SCRIPT[self.epoch + 1]})
        assert main(args(data, out, "--epochs", "7", "--patience", str(PATIENCE))) == 0
    return out


def test_the_run_stops_once_patience_epochs_bring_no_better_validation_elbo(
    stopped: Path,
) -> None:
    rows = read_metrics(stopped)
    assert [r["epoch"] for r in rows] == list(range(1, STOP + 1))
    s = summary(stopped)
    assert s["epochs"] == STOP
    assert s["early_stopping"] == {
        "patience": PATIENCE, "best_epoch": 2, "best_step": rows[1]["step"],
        "epochs_trained": STOP, "max_epochs": 7, "stopped_early": True,
        "rule": "the weights of the epoch with the lowest validation -ELBO"}
    # the summary's numbers are the kept epoch's, not the last one's
    assert s["val"]["neg_elbo"] == 8.0
    assert s["test"]["neg_elbo"] == rows[1]["test_neg_elbo"] != rows[-1]["test_neg_elbo"]


def test_the_model_is_the_best_epochs_weights_bit_for_bit(
    stopped: Path, data: Path, tmp_path: Path,
) -> None:
    """A run trained for exactly 2 epochs (no patience) ends with the weights the stopped run
    kept (the schedules of the smoke preset do not depend on the run's length)."""
    two = tmp_path / "two"
    assert main(args(data, two, "--epochs", "2")) == 0
    kept, want = load_file(stopped / "model.safetensors"), load_file(two / "model.safetensors")
    assert kept.keys() == want.keys()
    assert all((kept[k] == want[k]).all() for k in want)
    assert "early_stopping" not in summary(two)  # without --patience: the last epoch


def test_the_best_epochs_checkpoint_outlives_pruning_until_the_run_ends(stopped: Path) -> None:
    rows = read_metrics(stopped)
    names = sorted(p.name for p in list_checkpoints(stopped))
    # the newest two (epochs 4 and 5) and the best epoch's; epochs 1 and 3 are gone
    assert names == sorted(checkpoint_name(rows[e - 1]["step"]) for e in (2, 4, 5))


def test_a_run_killed_after_its_best_epoch_resumes_to_the_same_model(
    stopped: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGINT in the middle of epoch 4 (two epochs after the best), then --resume: the same
    weights, metrics and early-stopping record as the run never interrupted."""
    rows = read_metrics(stopped)
    at = rows[2]["step"] + 2  # within epoch 4
    real_step = Trainer.train_step

    def step(self: Trainer, *a: Any) -> None:
        real_step(self, *a)
        if self.global_step == at:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    monkeypatch.setattr(Trainer, "train_step", step)
    assert main(args(data, run, "--epochs", "7", "--patience", str(PATIENCE))) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    assert_same_run(run, stopped)
    assert summary(run)["early_stopping"] == summary(stopped)["early_stopping"]
    capsys.readouterr()


def test_a_run_that_never_runs_out_of_patience_keeps_its_best_epoch(
    data: Path, tmp_path: Path,
) -> None:
    """Patience 3 over 4 epochs whose best is epoch 2: all 4 train, epoch 2's weights stay."""
    run = tmp_path / "run"
    assert main(args(data, run, "--epochs", "4", "--patience", str(PATIENCE))) == 0
    s = summary(run)
    assert s["epochs"] == 4
    assert s["early_stopping"]["best_epoch"] == 2
    assert s["early_stopping"]["stopped_early"] is False


def test_the_best_row_is_the_first_of_equal_lowest_validation_elbos() -> None:
    rows = [{"epoch": 1, "val_neg_elbo": 3.0}, {"epoch": 2, "val_neg_elbo": 2.0},
            {"epoch": 3, "val_neg_elbo": 2.0}, {"epoch": 4}]
    assert best_epoch_row(rows)["epoch"] == 2
    assert best_epoch_row([{"epoch": 1}]) is None


def test_patience_without_a_validation_split_or_below_zero_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ConfigError, match="validation split"):
        resolve_config("smoke", patience=3, val_size=0)
    with pytest.raises(ConfigError, match="patience must be >= 0"):
        resolve_config("smoke", patience=-1)
    code, err = cli(["train", "--preset", "smoke", "--dataset", f"idx:{data}", "--val-size",
                     "0", "--patience", "2", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and "--patience needs a validation split" in err[0]
    assert not (tmp_path / "r").exists()
    code, err = cli(["train", "--patience", "-1", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "--patience" in err[-1]
