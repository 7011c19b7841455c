"""``--arch mlp``: the MLP encoder and decoder of Davidson et al. 2018 beside the conv network.

Shapes and layer sizes, the parameter count from the spec, old run folders (no ``arch``
field) still loading as conv, and a quick training through the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import one_thread as single_thread
from synthetic import noisy_blobs, synthetic_dataset
from vaelab.checkpoint import load_run
from vaelab.cli import main
from vaelab.config import TrainConfig, resolve_config, training_memory_bytes
from vaelab.errors import ConfigError
from vaelab.models import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, ModelSpec, build_model


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


def linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_the_default_mlp_is_784_256_128_and_its_mirror(kind: str) -> None:
    """Encoder 784 (+784 label map for a CVAE) -> 256 -> 128 -> 2D; decoder D (+10 one-hot)
    -> 128 -> 256 -> 784; outputs of the conv network's shapes; the spec's parameter count is
    the model's."""
    spec = ModelSpec(kind=kind, arch="mlp", latent_dim=5)
    model = build_model(spec)
    cond = kind == "cvae"
    assert isinstance(model.encoder, MLPEncoder) and isinstance(model.decoder, MLPDecoder)
    assert linears(model.encoder) == [(784 * (1 + cond), 256), (256, 128), (128, 10)]
    assert linears(model.decoder) == [(5 + 10 * cond, 128), (128, 256), (256, 784)]
    assert spec.parameter_count() == sum(p.numel() for p in model.parameters())
    x = torch.rand(3, 1, 28, 28)
    y = torch.tensor([0, 4, 9]) if cond else None
    out = model(x, y, generator=torch.Generator().manual_seed(0))
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3, 5)
    assert out.logits.shape == (3, 1, 28, 28)
    many = model(x, y, eps=torch.zeros(4, 3, 5))
    assert many.z.shape == (4, 3, 5) and many.logits.shape == (4, 3, 1, 28, 28)
    assert torch.allclose(many.logits[2], model.decode(out.mu, y), atol=1e-6)  # eps 0: z = mu


def test_mlp_hidden_sizes_are_options_and_checked() -> None:
    model = build_model(ModelSpec(arch="mlp", mlp_hidden=(40, 30), latent_dim=2))
    assert linears(model.encoder) == [(784, 40), (40, 30), (30, 4)]
    assert linears(model.decoder) == [(2, 30), (30, 40), (40, 784)]
    with pytest.raises(ConfigError, match="mlp_hidden must be two positive integers"):
        ModelSpec(arch="mlp", mlp_hidden=(0, 3))
    with pytest.raises(ConfigError, match="unknown architecture 'rnn': choose conv or mlp"):
        resolve_config("smoke", arch="rnn")


def test_the_output_bias_starts_at_the_data_mean() -> None:
    model = build_model(ModelSpec(arch="mlp", latent_dim=2))
    model.decoder.set_output_bias(0.2)
    with torch.no_grad():
        model.decoder.net[-2].weight.zero_()
        p = torch.sigmoid(model.decode(torch.randn(2, 2)))
    assert torch.allclose(p, torch.full_like(p, 0.2))


def test_old_specs_and_configs_without_the_arch_fields_are_conv() -> None:
    """model.json and config.json written before ``arch`` existed rebuild the conv network."""
    old_spec = {k: v for k, v in ModelSpec().to_dict().items() if k not in ("arch", "mlp_hidden")}
    assert ModelSpec.from_dict(old_spec) == ModelSpec()
    assert isinstance(build_model(ModelSpec.from_dict(old_spec)).encoder, ConvEncoder)
    old_cfg = {k: v for k, v in TrainConfig().to_dict().items()
               if k not in ("arch", "mlp_hidden", "objective", "k", "binarize")}
    cfg = TrainConfig.from_dict(old_cfg)
    assert (cfg.arch, cfg.objective, cfg.k, cfg.binarize) == ("conv", "elbo", 1, "none")


def test_an_old_run_folder_without_the_fields_still_loads(tmp_path: Path, monkeypatch) -> None:
    """A finished conv run whose config.json and model.json lack ``arch`` and ``mlp_hidden``
    (as every run before them): load_run gives the conv model with the same weights."""
    data = synthetic_dataset(noisy_blobs, 64, 16, 16, seed=0)
    monkeypatch.setattr("vaelab.training.loop.load_dataset", lambda *a, **k: data)
    run = tmp_path / "run"
    code = main(["train", "--preset", "smoke", "--device", "cpu", "--quiet", "--out", str(run)])
    assert code == 0
    before = load_run(run).model.state_dict()
    for name, key in (("config.json", "config"), ("model.json", "spec")):
        raw = json.loads((run / name).read_text())
        for field in ("arch", "mlp_hidden"):
            raw[key].pop(field)
        if name == "config.json":
            raw["model"].pop("arch"), raw["model"].pop("mlp_hidden")
            for field in ("objective", "k", "binarize"):
                raw[key].pop(field)
        (run / name).write_text(json.dumps(raw))
    model = load_run(run).model
    assert isinstance(model.decoder, ConvDecoder) and model.spec.arch == "conv"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_trains_an_mlp_run(tmp_path: Path, monkeypatch) -> None:
    """`vaelab train --arch mlp --mlp-hidden 32 16`: config.json and the saved model say mlp,
    the weights are the MLP's, the test -ELBO is finite and below the untrained start."""
    data = synthetic_dataset(noisy_blobs, 256, 16, 32, seed=0)
    monkeypatch.setattr("vaelab.training.loop.load_dataset", lambda *a, **k: data)
    run = tmp_path / "run"
    code = main(["train", "--preset", "smoke", "--device", "cpu", "--quiet", "--arch", "mlp",
                 "--mlp-hidden", "32", "16", "--epochs", "2", "--out", str(run)])
    assert code == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["arch"] == cfg["model"]["arch"] == "mlp"
    assert cfg["config"]["mlp_hidden"] == [32, 16]
    model = load_run(run).model
    assert linears(model.encoder) == [(784, 32), (32, 16), (16, 4)]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["test_neg_elbo"] < rows[0]["test_neg_elbo"]


def test_the_memory_estimate_counts_k_decoder_passes() -> None:
    """A training step decodes K samples: the estimate grows with K by at least the extra
    samples' logits and their gradients (784 floats each, per image of the batch)."""
    for arch in ("conv", "mlp"):
        one = resolve_config("smoke", arch=arch, objective="iwae", k=1)
        many = resolve_config("smoke", arch=arch, objective="iwae", k=50)
        extra = training_memory_bytes(many) - training_memory_bytes(one)
        assert extra >= 4 * 2 * one.batch_size * 49 * 784
