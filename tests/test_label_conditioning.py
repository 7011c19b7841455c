"""``label_conditioning``: how a CVAE sees the label. ``input`` is the study's (an extra input
channel of the encoder, a one-hot beside z at the decoder's first layer); ``film`` also scales
and shifts every later decoder layer's features per class, and ``film-both`` every encoder
layer's too. FiLM starts as the plain network, the label then reaches every layer, the spec
counts its weights, and run folders from before the field load as ``input``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import one_thread
from synthetic import noisy_blobs, synthetic_dataset
from vaelab.checkpoint import load_run
from vaelab.config import TrainConfig, resolve_config
from vaelab.errors import CheckpointError, ConfigError
from vaelab.models import AFFINE, ModelSpec, build_model
from vaelab.training import Trainer

ARCH = dict(dec_mlp_layers=2, dec_refine=2, enc_refine=1, enc_mlp_layers=2)


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_film_starts_as_the_plain_network_and_counts_its_weights(arch: str) -> None:
    plain = build_model(ModelSpec(kind="cvae", arch=arch, **ARCH))
    spec = ModelSpec(kind="cvae", arch=arch, label_conditioning="film", **ARCH)
    film = build_model(spec)
    assert spec.parameter_count() == sum(p.numel() for p in film.parameters())
    missing, unexpected = film.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("decoder.film.") for k in missing)
    affine = [m for m in film.decoder.net if isinstance(m, AFFINE)]
    assert len(film.decoder.film) == len(affine)  # one scale-and-shift table per layer
    z, y = torch.randn(5, 2, generator=torch.Generator().manual_seed(1)), torch.arange(5)
    assert torch.equal(film.decode(z, y), plain.decode(z, y))


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_with_film_the_label_reaches_every_layer(arch: str) -> None:
    """With the first layer's one-hot weights zeroed, a plain decoder ignores the label; a
    FiLM decoder still answers to it, and each of its tables gets a gradient."""
    torch.manual_seed(0)
    spec = ModelSpec(kind="cvae", arch=arch, label_conditioning="film", **ARCH)
    film = build_model(spec)
    plain = build_model(ModelSpec(kind="cvae", arch=arch, **ARCH))
    with torch.no_grad():
        for model in (film, plain):
            model.decoder.net[0].weight[:, 2:] = 0  # the one-hot's columns
        for table in film.decoder.film:
            table.weight.normal_(0, 0.1)
    z = torch.randn(1, 2).expand(10, 2)
    y = torch.arange(10)
    assert torch.allclose(plain.decode(z, y), plain.decode(z, y)[:1].expand(10, -1, -1, -1))
    out = film.decode(z, y)
    assert (out[1:] - out[:1]).abs().amax() > 1e-3
    out.square().mean().backward()
    assert all(t.weight.grad is not None and t.weight.grad.abs().sum() > 0
               for t in film.decoder.film)
    with pytest.raises(ConfigError, match="give y"):
        film.decoder(torch.cat([z, torch.zeros(10, 10)], 1))


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_film_both_starts_as_film_and_counts_its_weights(arch: str) -> None:
    """``film-both`` is ``film`` plus one zero-initialised table per encoder layer: loaded
    with a ``film`` model's weights it encodes and decodes exactly as that model does."""
    film = build_model(ModelSpec(kind="cvae", arch=arch, label_conditioning="film", **ARCH))
    spec = ModelSpec(kind="cvae", arch=arch, label_conditioning="film-both", **ARCH)
    both = build_model(spec)
    assert spec.parameter_count() == sum(p.numel() for p in both.parameters())
    missing, unexpected = both.load_state_dict(film.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("encoder.film.") for k in missing)
    affine = [m for m in both.encoder.net if isinstance(m, AFFINE)]
    assert len(both.encoder.film) == len(affine)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.arange(5)
    for a, b in zip(both.encode(x, y), film.encode(x, y), strict=True):
        assert torch.equal(a, b)
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(both.decode(z, y), film.decode(z, y))


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_with_film_both_the_label_reaches_every_encoder_layer(arch: str) -> None:
    """With the label's input channel zeroed, a ``film`` encoder ignores the label; a
    ``film-both`` encoder still answers to it, each of its tables gets a gradient, and it
    refuses to run without the label."""
    torch.manual_seed(0)
    both = build_model(ModelSpec(kind="cvae", arch=arch, label_conditioning="film-both",
                                 **ARCH))
    film = build_model(ModelSpec(kind="cvae", arch=arch, label_conditioning="film", **ARCH))
    with torch.no_grad():
        for model in (both, film):
            model.label_map.weight.zero_()
        for table in both.encoder.film:
            table.weight.normal_(0, 0.1)
    x = torch.rand(1, 1, 28, 28).expand(10, -1, -1, -1)
    y = torch.arange(10)
    mu, _ = film.encode(x, y)
    assert torch.allclose(mu, mu[:1].expand(10, -1))
    mu, logvar = both.encode(x, y)
    assert (mu[1:] - mu[:1]).abs().amax() > 1e-3
    (mu.square().sum() + logvar.square().sum()).backward()
    assert all(t.weight.grad is not None and t.weight.grad.abs().sum() > 0
               for t in both.encoder.film)
    with pytest.raises(ConfigError, match="give y"):
        both.encoder(torch.cat([x, torch.zeros_like(x)], 1))


def test_film_both_trains_and_reloads(tmp_path: Path) -> None:
    ds = synthetic_dataset(noisy_blobs, 96, 32, 32, seed=3)
    cfg = resolve_config("smoke", model="cvae", label_conditioning="film-both", limit=None,
                         val_size=32)
    with one_thread():
        result = Trainer(cfg, tmp_path / "run", progress=False, dataset=ds).fit()
    run = load_run(tmp_path / "run")
    assert run.model.spec.label_conditioning == "film-both"
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    for a, b in zip(run.model.encode(x, y), result.model.encode(x, y), strict=True):
        assert torch.equal(a, b)
    assert all(t.weight.abs().sum() > 0 for t in run.model.encoder.film)


def test_a_vae_ignores_it_and_a_bad_value_is_refused() -> None:
    for conditioning in ("film", "film-both"):
        vae = build_model(ModelSpec(kind="vae", label_conditioning=conditioning))
        assert vae.decoder.film is None and vae.encoder.film is None
    with pytest.raises(ConfigError, match="unknown label conditioning 'x'"):
        ModelSpec(kind="cvae", label_conditioning="x")
    with pytest.raises(ConfigError, match="label conditioning"):
        resolve_config("smoke", model="cvae", label_conditioning="films")


def test_old_folders_load_as_input_and_film_trains_and_reloads(tmp_path: Path) -> None:
    ds = synthetic_dataset(noisy_blobs, 96, 32, 32, seed=3)
    cfg = resolve_config("smoke", model="cvae", label_conditioning="film", limit=None,
                         val_size=32)
    with one_thread():
        result = Trainer(cfg, tmp_path / "film", progress=False, dataset=ds).fit()
    run = load_run(tmp_path / "film")
    assert run.model.spec.label_conditioning == "film"
    z, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    assert torch.equal(run.model.decode(z, y), result.model.decode(z, y))
    trained = [t.weight.abs().sum() for t in run.model.decoder.film]
    assert all(w > 0 for w in trained)  # the tables moved from their zero start
    # a folder written before the field: its config and spec lack it, and it loads as input
    with one_thread():
        Trainer(resolve_config("smoke", model="cvae", label_conditioning="input", limit=None,
                               val_size=32), tmp_path / "old", progress=False, dataset=ds).fit()
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    del raw["config"]["label_conditioning"], raw["model"]["label_conditioning"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    assert TrainConfig.from_dict(raw["config"]).label_conditioning == "input"
    old = load_run(tmp_path / "old").model
    assert old.decoder.film is None
    assert not any(isinstance(m, nn.Embedding) for m in old.decoder.modules())
    # a folder whose weights do not match its config is refused, naming the field
    raw["model"]["label_conditioning"] = raw["config"]["label_conditioning"] = "film"
    (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="label_conditioning input, not film"):
        load_run(tmp_path / "old")


def test_the_count_of_a_hand_edited_layer_count_is_arithmetic() -> None:
    """A config.json may say 2^62 layers: the spec counts FiLM's weights without listing them
    (the memory check refuses it afterwards, allocating nothing)."""
    spec = ModelSpec(kind="cvae", label_conditioning="film", dec_mlp_layers=2**62)
    plain = ModelSpec(kind="cvae", label_conditioning="input", dec_mlp_layers=2**62)
    assert spec.parameter_count() - plain.parameter_count() > 2 * 10 * 512 * 2**62
