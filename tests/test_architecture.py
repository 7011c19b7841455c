"""The architecture knobs: each one changes the network it says it changes, travels through
``vaelab train``'s flags into config.json, and comes back with ``load_run``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from synthetic import synthetic_dataset, uniform_noise
from vaelab.checkpoint import load_run
from vaelab.cli import main
from vaelab.errors import ConfigError
from vaelab.models import ModelSpec, build_model

SMALL = dict(channels=(4, 8), enc_hidden=16, dec_hidden=16)


def count(module: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_layer_counts_follow_the_spec(kind: str) -> None:
    base = build_model(ModelSpec(kind=kind, **SMALL))
    assert count(base.encoder, nn.Conv2d) == 2 and count(base.encoder, nn.Linear) == 2
    assert count(base.decoder, nn.Linear) == 2 and count(base.decoder, nn.Conv2d) == 0
    deep = build_model(ModelSpec(kind=kind, enc_refine=2, enc_mlp_layers=3, dec_refine=1,
                                 dec_mlp_layers=2, **SMALL))
    assert count(deep.encoder, nn.Conv2d) == 4 and count(deep.encoder, nn.Linear) == 4
    assert count(deep.decoder, nn.Linear) == 3 and count(deep.decoder, nn.Conv2d) == 1
    b = 3
    x = torch.rand(b, 1, 28, 28)
    y = torch.arange(b) if kind == "cvae" else None
    out = deep(x, y)
    assert out.mu.shape == (b, 2) and out.logits.shape == (b, 1, 28, 28)


def test_full_resolution_head() -> None:
    """dec_full_channels = F: the last transposed conv gives F maps at 28x28 and a 3x3 conv
    the logits; the output bias (the data's mean intensity) sits on that conv."""
    model = build_model(ModelSpec(dec_full_channels=5, **SMALL))
    last_t = [m for m in model.decoder.modules() if isinstance(m, nn.ConvTranspose2d)][-1]
    assert last_t.out_channels == 5
    head = model.decoder.net[-1]
    assert isinstance(head, nn.Conv2d) and (head.in_channels, head.out_channels) == (5, 1)
    model.decoder.set_output_bias(0.25)
    assert head.bias.item() == pytest.approx(torch.logit(torch.tensor(0.25)).item())
    assert model.decode(torch.zeros(2, 2)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("field", ["enc_refine", "dec_refine", "dec_full_channels"])
def test_negative_refine_is_refused(field: str) -> None:
    with pytest.raises(ConfigError, match=">= 0"):
        ModelSpec(**{field: -1})


@pytest.mark.parametrize("field", ["enc_mlp_layers", "dec_mlp_layers"])
def test_mlp_needs_a_layer(field: str) -> None:
    with pytest.raises(ConfigError, match=">= 1"):
        ModelSpec(**{field: 0})


def test_old_specs_without_the_encoder_knobs_still_load() -> None:
    """Runs written before enc_refine/enc_mlp_layers existed rebuild the same network."""
    old = {k: v for k, v in ModelSpec(**SMALL).to_dict().items()
           if k not in ("enc_refine", "enc_mlp_layers", "dec_full_channels")}
    assert ModelSpec.from_dict(old) == ModelSpec(**SMALL)


def test_cli_architecture_flags_reach_the_run(tmp_path: Path, monkeypatch) -> None:
    data = synthetic_dataset(uniform_noise, 64, 16, 16, seed=0)
    monkeypatch.setattr("vaelab.training.loop.load_dataset", lambda *a, **k: data)
    run = tmp_path / "run"
    code = main(["train", "--preset", "smoke", "--model", "cvae", "--device", "cpu", "--quiet",
                 "--channels", "4", "6", "--enc-hidden", "12", "--dec-hidden", "10",
                 "--activation", "elu", "--enc-refine", "1", "--enc-mlp-layers", "2",
                 "--dec-refine", "2", "--dec-mlp-layers", "3", "--dec-full-channels", "3",
                 "--out", str(run)])
    assert code == 0
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert (cfg["channels"], cfg["enc_hidden"], cfg["dec_hidden"], cfg["activation"]) == (
        [4, 6], 12, 10, "elu")
    assert (cfg["enc_refine"], cfg["enc_mlp_layers"], cfg["dec_refine"],
            cfg["dec_mlp_layers"], cfg["dec_full_channels"]) == (1, 2, 2, 3, 3)
    model = load_run(run).model
    assert model.spec.enc_refine == 1 and model.spec.dec_mlp_layers == 3
    assert count(model.encoder, nn.ELU) == 1 + 1 + 1 + 2  # conv, refine, conv, 2 MLP layers
    assert count(model.decoder, nn.Conv2d) == 3  # two refine convs and the full-res head


def test_a_config_that_predates_a_knob_resumes_without_that_layer() -> None:
    """config.json written before a knob existed: the knob takes ModelSpec's default (the layer
    absent), not TrainConfig's current architecture, so --resume rebuilds the saved network."""
    from vaelab.config import ARCHITECTURE_KNOBS, TrainConfig

    current = TrainConfig().to_dict()
    old = {k: v for k, v in current.items()
           if k not in ("enc_refine", "enc_mlp_layers", "dec_full_channels", "dec_refine",
                        "dec_mlp_layers")}
    spec = TrainConfig.from_dict(old).model_spec()
    assert spec == ModelSpec(**{k: current[k] for k in ("channels", "enc_hidden", "dec_hidden",
                                                        "activation", "label_conditioning")})
    assert set(ARCHITECTURE_KNOBS) <= set(current) and set(ARCHITECTURE_KNOBS) <= set(
        ModelSpec().to_dict())
    # a field that is present wins
    assert TrainConfig.from_dict({**old, "enc_refine": 3}).enc_refine == 3
