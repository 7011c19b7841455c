"""``--weight-decay``: AdamW's decoupled decay, on weight matrices and conv kernels only. With
a zero gradient Adam's step is zero, so each decayed tensor shrinks by exactly (1 - lr * wd)
per step and the rest stay put; 0 keeps the one parameter group every earlier checkpoint has;
a resumed run with decay ends bitwise where the uninterrupted one ends; a bad value is one
line."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import assert_same_run, cli, one_thread
from synthetic import noisy_blobs, synthetic_dataset
from vaelab.config import TrainConfig, resolve_config
from vaelab.errors import ConfigError
from vaelab.models import ModelSpec, build_model
from vaelab.training import Trainer, decay_groups, make_adam


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(kind="cvae", label_conditioning="film", channels=(4, 8),
                                 enc_hidden=16, dec_hidden=16))


def test_decay_shrinks_weights_by_the_closed_form_and_leaves_biases_and_film() -> None:
    model = _model()
    lr, wd, steps = 1e-2, 0.5, 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_adam(decay_groups(model, wd), lr)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    decayed = 0
    for name, p in model.named_parameters():
        if p.ndim >= 2 and ".film." not in f".{name}":
            want, decayed = before[name] * (1 - lr * wd) ** steps, decayed + 1
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.detach(), before[name]), name
    assert decayed >= 4
    assert any(".film." in f".{n}" for n, _ in model.named_parameters())


def test_no_decay_is_the_single_group_of_earlier_checkpoints() -> None:
    model = _model()
    groups = decay_groups(model, 0.0)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    assert make_adam(groups, 1e-3).state_dict()["param_groups"][0]["weight_decay"] == 0
    two = decay_groups(model, 0.1)
    assert sum(len(g["params"]) for g in two) == len(list(model.parameters()))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), 1e4])
def test_a_bad_weight_decay_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError, match="weight decay"):
        TrainConfig(weight_decay=bad, lr=1e-3).validate(check_memory=False)


def test_the_cli_refuses_a_negative_weight_decay_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli(["train", "--out", str(tmp_path / "r"), "--preset", "smoke",
                     "--weight-decay", "-1"], capsys)
    assert code == 2 and len(err) == 1 and "weight decay" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_run_with_decay_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    data = synthetic_dataset(noisy_blobs, 96, 32, 32, seed=3)

    def cfg(epochs: int) -> TrainConfig:
        return resolve_config("smoke", model="cvae", epochs=epochs, limit=None, val_size=32,
                              device="cpu", weight_decay=0.3, lr_schedule="constant")

    with one_thread():
        ref = Trainer(cfg(2), tmp_path / "ref", progress=False, dataset=data).fit()
        Trainer(cfg(1), tmp_path / "cut", progress=False, dataset=data).fit()
        Trainer(None, tmp_path / "cut", resume=True, progress=False, dataset=data,
                changes={"epochs": 2}).fit()
    assert_same_run(tmp_path / "cut", tmp_path / "ref")
    plain = Trainer(replace(cfg(2), weight_decay=0.0), tmp_path / "plain", progress=False,
                    dataset=data)
    with one_thread():
        plain.fit()
    w, w_plain = ref.model.state_dict(), plain.model.state_dict()
    assert any(not torch.equal(w[k], w_plain[k]) for k in w)  # the decay changed the run
