"""The IWAE objective (Burda et al. 2016), ``objectives.iwae_*``, and ``--objective iwae``.

A fixed, untrained tiny MLP model on binary synthetic images: q(z|x) is far from the posterior
there, so the bound's gain with K is large and the checks have room.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext

import pytest
import torch

from helpers import one_thread as single_thread
from synthetic import blobs, noisy_blobs, synthetic_dataset
from vaelab.cli import main
from vaelab.config import resolve_config
from vaelab.errors import ConfigError
from vaelab.models import ModelSpec, build_model
from vaelab.objectives import (
    elbo_terms,
    iwae_bound,
    iwae_log_weights,
    iwae_loss,
    log_normal,
    log_standard_normal,
)
from vaelab.training import Trainer


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


def tiny(dtype: torch.dtype = torch.float32, latent: int = 2, kind: str = "vae"):
    torch.manual_seed(0)
    model = build_model(ModelSpec(kind=kind, arch="mlp", mlp_hidden=(16, 8),
                                  latent_dim=latent)).to(dtype)
    with torch.no_grad():  # a decoder that depends strongly on z: a posterior far from q
        model.decoder.net[0].weight *= 8
    return model.eval()


def binary_images(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.bernoulli(blobs(n, seed=2), generator=g).to(dtype)


def bound(model, x: torch.Tensor, eps: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    out = model(x, eps=eps)
    return iwae_bound(iwae_log_weights(x, out.z, out.mu, out.logvar, out.logits, beta=beta))


def test_k_equal_1_is_the_elbo_of_the_same_sample_exactly() -> None:
    """L_1 = log p(x|z) + log p(z) - log q(z|x) for the one z of eps: the ELBO with a sampled
    KL, equal bit for bit; over many eps its mean is the closed-form-KL ELBO (within 4 SE)."""
    model, x = tiny(), binary_images(6)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        eps = torch.randn(1, 6, 2, generator=g)
        l1 = bound(model, x, eps)
        one = model(x, eps=eps[0])
        terms = elbo_terms(x, one.mu, one.logvar, one.logits)
        sampled_kl = log_normal(one.z, one.mu, one.logvar) - log_standard_normal(one.z)
        assert torch.equal(l1, -terms.recon - sampled_kl)
        # in expectation, the ELBO vaelab trains (closed-form KL)
        draws = torch.stack([bound(model, x, torch.randn(1, 6, 2, generator=g))
                             for _ in range(400)])

        def elbo() -> torch.Tensor:
            out = model(x, eps=torch.randn(6, 2, generator=g))
            return -elbo_terms(x, out.mu, out.logvar, out.logits).neg_elbo

        elbo = torch.stack([elbo() for _ in range(400)])
    se = (draws.var(0) / 400 + elbo.var(0) / 400).sqrt()
    assert ((draws.mean(0) - elbo.mean(0)).abs() < 4 * se).all()


def test_the_bound_does_not_decrease_with_k_in_expectation() -> None:
    """E[L_K] over 300 seeded draws for K = 1, 2, 5, 20 on a fixed model: each mean at least
    the previous one's (within 3 standard errors of the difference), and L_20 above L_1 by
    far more than its error; all below the ELBO's upper end, log p(x) (never above 0 here)."""
    model, x = tiny(torch.float64), binary_images(4, torch.float64)
    g = torch.Generator().manual_seed(4)
    means, ses = [], []
    with torch.no_grad():
        for k in (1, 2, 5, 20):
            draws = torch.stack([bound(model, x, torch.randn(k, 4, 2, generator=g,
                                                             dtype=torch.float64)).mean()
                                 for _ in range(300)])
            means.append(float(draws.mean()))
            ses.append(float(draws.std() / math.sqrt(300)))
    for i in range(1, len(means)):
        assert means[i] >= means[i - 1] - 3 * math.hypot(ses[i], ses[i - 1])
    assert means[-1] - means[0] > 10 * math.hypot(ses[-1], ses[0])
    assert means[-1] < 0


def test_gradients_match_finite_differences() -> None:
    """d(-L_K)/d theta along three random directions of all the weights, float64, K = 3, a
    fixed eps: the autograd value equals the central difference (h = 1e-6) to 1e-6 relative."""
    model, x = tiny(torch.float64), binary_images(3, torch.float64)
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(3, 3, 2, generator=g, dtype=torch.float64)
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        out = model(x, eps=eps)
        return iwae_loss(iwae_log_weights(x, out.z, out.mu, out.logvar, out.logits, beta=0.7))

    grads = torch.autograd.grad(loss(), params)
    h = 1e-6
    for _ in range(3):
        v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        with torch.no_grad():
            for p, d in zip(params, v, strict=True):
                p += h * d
            up = float(loss())
            for p, d in zip(params, v, strict=True):
                p -= 2 * h * d
            down = float(loss())
            for p, d in zip(params, v, strict=True):
                p += h * d
        numeric = (up - down) / (2 * h)
        analytic = float(sum((gr * d).sum() for gr, d in zip(grads, v, strict=True)))
        assert analytic == pytest.approx(numeric, rel=1e-6)


def test_k_samples_of_a_cvae_decode_each_image_with_its_own_label() -> None:
    """K-sample forward of a CVAE: sample k of image b is decoded with image b's label, as
    the one-sample forward decodes it."""
    model, x = tiny(kind="cvae"), binary_images(4)
    y = torch.tensor([3, 1, 4, 1])
    eps = torch.randn(2, 4, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        many = model(x, y, eps=eps)
        for k in range(2):
            one = model(x, y, eps=eps[k])
            assert torch.allclose(many.logits[k], one.logits, atol=1e-6)
            assert torch.equal(many.z[k], one.z)
    assert many.logits.shape == (2, 4, 1, 28, 28)


def test_iwae_trains_a_quick_run_whose_loss_is_the_negative_bound() -> None:
    """A smoke-preset step with --objective iwae --k 4: finite, and the epoch's train_loss is
    the -L_4 of its batches, at most their -ELBO (-L_K <= -ELBO in expectation: K = 4 on an
    untrained model is far from equality)."""
    ds = synthetic_dataset(noisy_blobs, 128, 16, 16, seed=0)
    cfg = resolve_config("smoke", objective="iwae", k=4, beta_schedule="constant",
                         val_size=16, device="cpu", batch_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        result = Trainer(cfg, tmp + "/run", dataset=ds, progress=False).fit()
    row = result.metrics[-1]
    assert math.isfinite(row["train_loss"])
    assert row["train_loss"] < row["train_neg_elbo"]


@pytest.mark.parametrize("args, message", [
    (["--k", "5"], "--k 5 is for --objective iwae: the ELBO takes one sample of z"),
    (["--objective", "iwae", "--free-bits", "1"],
     "--free-bits is for --objective elbo: it clamps each dimension's KL, a term the IWAE "
     "bound does not have"),
    (["--objective", "iwae", "--k", "0"], "argument --k: must be >= 1, got 0"),
])
def test_bad_iwae_options_are_one_line_exit_2(
    args: list[str], message: str, tmp_path, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) if "argument" in message else nullcontext():
        code = main(["train", "--out", str(tmp_path / "run"), "--preset", "smoke", *args])
        assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(message)
    assert not (tmp_path / "run").exists()


def test_the_api_refuses_k_above_one_for_the_elbo() -> None:
    with pytest.raises(ConfigError, match="is for --objective iwae"):
        resolve_config("smoke", k=2)
