"""Tests for vaelab.objectives, the ELBO core: KL, reparameterisation, likelihoods, the training
loss, the beta schedules and the importance-sampled log-likelihood.

Monte Carlo checks use fixed seeds and state their sample size and tolerance; the tolerances are
about 4-5 standard errors of the estimate, so they are not flaky and still catch a wrong factor.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaelab.config import resolve_config
from vaelab.errors import ConfigError
from vaelab.objectives import (
    ConstantBeta,
    CyclicalBeta,
    ElboTerms,
    LinearWarmup,
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    continuous_bernoulli_log_norm,
    elbo_terms,
    importance_sampled_log_px,
    iw_log_mean_exp,
    kl_normal_std,
    log_likelihood,
    log_normal,
    log_standard_normal,
    make_beta_schedule,
    reparameterize,
    training_loss,
)

F64 = torch.float64
MU = torch.tensor([0.0, 1.5, -0.7, 0.2], dtype=F64)
SIGMA = torch.tensor([1.0, 0.5, 2.0, 0.1], dtype=F64)


# --------------------------------------------------------------------------------------------
# KL(N(mu, sigma^2) || N(0, 1))
# --------------------------------------------------------------------------------------------
def test_kl_matches_torch_distributions() -> None:
    kl = kl_normal_std(MU, 2 * SIGMA.log())
    ref = kl_divergence(Normal(MU, SIGMA), Normal(torch.zeros_like(MU), torch.ones_like(MU)))
    torch.testing.assert_close(kl, ref, rtol=1e-12, atol=1e-12)
    assert kl[0].item() == pytest.approx(0.0, abs=1e-15)  # q = p gives KL = 0
    assert (kl >= 0).all()


def test_kl_matches_monte_carlo_estimate() -> None:
    """KL = E_q[log q(z) - log p(z)]: 200k samples, tolerance 0.03 nats (about 5 SE)."""
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    logvar = 2 * SIGMA.log()
    z = reparameterize(MU.expand(n, -1), logvar.expand(n, -1), gen)
    # one latent dimension at a time: log densities of 1-D slices
    log_q = torch.stack([log_normal(z[:, j : j + 1], MU[j : j + 1], logvar[j : j + 1])
                         for j in range(len(MU))], -1)
    log_p = torch.stack([log_standard_normal(z[:, j : j + 1]) for j in range(len(MU))], -1)
    mc = (log_q - log_p).mean(0)
    torch.testing.assert_close(mc, kl_normal_std(MU, logvar), rtol=0, atol=0.03)


def test_kl_gradients_are_mu_and_sigma_minus_inverse_sigma() -> None:
    mu = MU.clone().requires_grad_()
    sigma = SIGMA.clone().requires_grad_()
    kl = kl_normal_std(mu, 2 * torch.log(sigma)).sum()
    d_mu, d_sigma = torch.autograd.grad(kl, (mu, sigma))
    torch.testing.assert_close(d_mu, MU, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_sigma, SIGMA - 1 / SIGMA, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The reparameterisation trick
# --------------------------------------------------------------------------------------------
def test_reparameterize_sample_statistics_and_generator() -> None:
    n = 100_000
    logvar = 2 * SIGMA.log()
    z = reparameterize(MU.expand(n, -1), logvar.expand(n, -1),
                       torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.mean(0), MU, rtol=0, atol=0.03)
    torch.testing.assert_close(z.std(0), SIGMA, rtol=0.02, atol=0)
    again = reparameterize(MU.expand(n, -1), logvar.expand(n, -1),
                           torch.Generator().manual_seed(1))
    assert torch.equal(z, again)


def test_reparameterize_with_given_noise_is_that_draw() -> None:
    """The trainer draws eps outside a CUDA graph: given the generator's own draw, the sample
    is the one the generator path makes, and a wrong shape is refused."""
    n = 64
    mu, logvar = MU.expand(n, -1).float(), (2 * SIGMA.log()).expand(n, -1).float()
    eps = torch.randn((n, MU.shape[0]), generator=torch.Generator().manual_seed(3))
    z = reparameterize(mu, logvar, eps=eps)
    assert torch.equal(z, reparameterize(mu, logvar, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(z, mu + torch.exp(0.5 * logvar) * eps)
    with pytest.raises(ConfigError, match="eps has shape"):
        reparameterize(mu, logvar, eps=eps[:1])


def test_reparameterised_gradient_of_quadratic_matches_analytic() -> None:
    """f(z) = sum_j a_j z_j^2 + b_j z_j, z ~ N(mu, sigma^2):
    E f = sum a (mu^2 + sigma^2) + b mu, so dE/dmu = 2 a mu + b and dE/dsigma = 2 a sigma.
    200k reparameterised samples; tolerance 0.06 (mu) and 0.12 (sigma), about 4 SE."""
    a = torch.tensor([0.5, -1.0, 2.0, 1.0], dtype=F64)
    b = torch.tensor([1.0, 0.3, -0.5, 0.0], dtype=F64)
    n = 200_000
    mu = MU.clone().requires_grad_()
    sigma = SIGMA.clone().requires_grad_()
    z = reparameterize(mu.expand(n, -1), (2 * torch.log(sigma)).expand(n, -1),
                       torch.Generator().manual_seed(2))
    f = (a * z.pow(2) + b * z).sum(-1).mean()
    d_mu, d_sigma = torch.autograd.grad(f, (mu, sigma))
    torch.testing.assert_close(d_mu, 2 * a * MU + b, rtol=0, atol=0.06)
    torch.testing.assert_close(d_sigma, 2 * a * SIGMA, rtol=0, atol=0.12)


def test_log_normal_matches_torch_distributions() -> None:
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    ref = Normal(MU, SIGMA).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal(z, MU, 2 * SIGMA.log()), ref)
    ref0 = Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(log_standard_normal(z), ref0)


# --------------------------------------------------------------------------------------------
# Likelihoods
# --------------------------------------------------------------------------------------------
def test_bernoulli_log_likelihood_equals_direct_formula() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(6, 1, 28, 28, generator=gen, dtype=F64)
    x = torch.rand(6, 1, 28, 28, generator=gen, dtype=F64)
    x[:3] = (x[:3] > 0.5).to(F64)  # binary images and grey images
    p = torch.sigmoid(logits).clamp(1e-12, 1 - 1e-12)
    direct = (x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(-1)
    ll = bernoulli_log_likelihood(logits, x)
    assert ll.shape == (6,)
    torch.testing.assert_close(ll, direct, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(log_likelihood(logits, x, "bernoulli"), ll)


def test_bernoulli_log_likelihood_is_finite_for_extreme_logits() -> None:
    logits = torch.tensor([[-200.0, 200.0, 0.0]])
    x = torch.tensor([[0.0, 1.0, 1.0]])
    ll = bernoulli_log_likelihood(logits, x)
    assert torch.isfinite(ll).all()
    assert ll.item() == pytest.approx(-math.log(2), abs=1e-6)


@pytest.mark.parametrize(
    "lam", [0.001, 0.01, 0.1, 0.3, 0.45, 0.499, 0.4999, 0.49999, 0.50001, 0.501, 0.6, 0.9, 0.999]
)
def test_continuous_bernoulli_log_norm_matches_closed_form(lam: float) -> None:
    """C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda); lambda near 1/2 uses the Taylor
    branch (|logit| < 1e-2), which must agree with the closed form there too."""
    u = 1 - 2 * lam
    closed = math.log(2 * math.atanh(u) / u)
    logit = torch.tensor([math.log(lam / (1 - lam))], dtype=F64)
    got = continuous_bernoulli_log_norm(logit).item()
    assert got == pytest.approx(closed, rel=1e-6, abs=1e-6)


def test_continuous_bernoulli_log_norm_at_one_half_and_branch_continuity() -> None:
    assert continuous_bernoulli_log_norm(torch.zeros(1)).item() == pytest.approx(math.log(2))
    eps = 1e-7
    edge = torch.tensor([1e-2 - eps, 1e-2 + eps, -1e-2 - eps, -1e-2 + eps], dtype=F64)
    v = continuous_bernoulli_log_norm(edge)
    assert abs(v[0] - v[1]) < 1e-6 and abs(v[2] - v[3]) < 1e-6


@pytest.mark.parametrize("lam", [0.02, 0.2, 0.5, 0.5001, 0.7, 0.97])
def test_continuous_bernoulli_density_integrates_to_one(lam: float) -> None:
    x = torch.linspace(0, 1, 4001, dtype=F64).unsqueeze(1)  # [N, 1]: N one-pixel "images"
    logit = torch.full_like(x, math.log(lam / (1 - lam)))
    density = continuous_bernoulli_log_likelihood(logit, x).exp()
    total = torch.trapezoid(density, x.squeeze(1)).item()
    assert total == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------------------
# The ELBO and the training loss
# --------------------------------------------------------------------------------------------
def _terms(seed: int = 5, b: int = 8, d: int = 4) -> ElboTerms:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 28, 28, generator=gen)
    mu = torch.randn(b, d, generator=gen)
    logvar = torch.randn(b, d, generator=gen) * 0.5
    logits = torch.randn(b, 1, 28, 28, generator=gen)
    return elbo_terms(x, mu, logvar, logits)


def test_elbo_terms_parts_add_up() -> None:
    t = _terms()
    assert t.recon.shape == t.kl.shape == t.neg_elbo.shape == (8,)
    assert t.kl_per_dim.shape == (8, 4)
    torch.testing.assert_close(t.kl, t.kl_per_dim.sum(-1))
    torch.testing.assert_close(t.neg_elbo, t.recon + t.kl)


def test_training_loss_with_beta_one_no_free_bits_is_mean_neg_elbo() -> None:
    t = _terms()
    torch.testing.assert_close(training_loss(t, beta=1.0, free_bits=0.0), t.neg_elbo.mean())
    torch.testing.assert_close(training_loss(t, beta=0.25),
                               t.recon.mean() + 0.25 * t.kl.mean())


def test_free_bits_clamps_each_dimension_average_kl() -> None:
    b = 16
    mu = torch.zeros(b, 3, requires_grad=True)
    with torch.no_grad():
        mu[:, 0] = 0.1  # KL_0 = 0.005 nats: below the floor
        mu[:, 1] = 2.0  # KL_1 = 2 nats: above it
    logvar = torch.zeros(b, 3)  # dimension 2: KL = 0
    x = torch.full((b, 5), 0.5)
    logits = torch.zeros(b, 5)
    t = elbo_terms(x, mu, logvar, logits)
    lam = 0.5
    loss = training_loss(t, beta=1.0, free_bits=lam)
    expected = t.recon.mean() + lam + 2.0 + lam
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, mu)
    assert torch.all(grad[:, 0] == 0)  # clamped: no push towards the prior
    assert torch.all(grad[:, 1] != 0)


# --------------------------------------------------------------------------------------------
# beta schedules
# --------------------------------------------------------------------------------------------
def test_linear_epoch_schedule_is_the_study_form() -> None:
    """The study's beta(e) = min(1, e / 10), held constant within epoch e = 0, 1, ..."""
    spe = 7
    s = make_beta_schedule("linear-epoch", steps_per_epoch=spe, warmup_epochs=10)
    for e in range(15):
        for k in (0, 3, spe - 1):
            assert s.value(e * spe + k) == pytest.approx(min(1.0, e / 10))


def test_linear_per_step_schedule() -> None:
    s = make_beta_schedule("linear-step", steps_per_epoch=5, warmup_epochs=10)  # W = 50 steps
    for t, want in [(0, 0.0), (1, 0.02), (25, 0.5), (49, 0.98), (50, 1.0), (500, 1.0)]:
        assert s.value(t) == pytest.approx(want)
    assert s.beta == 0.0
    for _ in range(10):
        s.step()
    assert s.beta == pytest.approx(0.2)
    assert LinearWarmup(0).value(0) == 1.0  # no warm-up: beta_max from the start
    assert LinearWarmup(10, beta_max=0.5).value(20) == 0.5


def test_constant_schedule() -> None:
    s = make_beta_schedule("constant", steps_per_epoch=3, beta=4.0)
    assert isinstance(s, ConstantBeta)
    assert [s.value(t) for t in (0, 1, 1000)] == [4.0, 4.0, 4.0]


def test_cyclical_schedule() -> None:
    # 8 epochs x 5 steps, 4 cycles: T = 10 steps, rising over the first 5 of each.
    s = make_beta_schedule("cyclical", steps_per_epoch=5, total_epochs=8, cycles=4)
    assert isinstance(s, CyclicalBeta) and s.cycle_steps == 10
    want = {0: 0.0, 2: 0.4, 5: 1.0, 9: 1.0, 10: 0.0, 13: 0.6, 39: 1.0}
    for t, v in want.items():
        assert s.value(t) == pytest.approx(v)
    with pytest.raises(ConfigError):
        CyclicalBeta(0)
    with pytest.raises(ConfigError):
        CyclicalBeta(10, ratio=0.0)


@pytest.mark.parametrize("name", ["linear-step", "linear-epoch", "constant", "cyclical"])
def test_schedule_restored_from_state_dict_continues_exactly(name: str) -> None:
    kw = dict(steps_per_epoch=4, warmup_epochs=3, total_epochs=6, cycles=2, beta=0.7)
    a = make_beta_schedule(name, **kw)
    for _ in range(9):
        a.step()
    b = make_beta_schedule(name, **kw)
    b.load_state_dict(a.state_dict())
    seq_a, seq_b = [], []
    for _ in range(20):
        seq_a.append(a.beta)
        seq_b.append(b.beta)
        a.step()
        b.step()
    assert seq_a == seq_b and b.t == a.t == 29


def test_schedule_state_of_another_kind_is_refused() -> None:
    with pytest.raises(ConfigError):
        ConstantBeta().load_state_dict(CyclicalBeta(5).state_dict())


def test_unknown_schedule_and_likelihood_names_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown beta schedule"):
        make_beta_schedule("exponential", steps_per_epoch=1)
    with pytest.raises(ConfigError, match="unknown likelihood"):
        log_likelihood(torch.zeros(1, 3), torch.zeros(1, 3), "gaussian")
    with pytest.raises(ConfigError, match="unknown likelihood"):
        elbo_terms(torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 3),
                   "gaussian")
    with pytest.raises(ConfigError):
        resolve_config("smoke", beta_schedule="exponential")
    with pytest.raises(ConfigError):
        resolve_config("smoke", likelihood="gaussian")


# --------------------------------------------------------------------------------------------
# Importance-sampled log p(x)
# --------------------------------------------------------------------------------------------
P, D = 12, 2
_g = torch.Generator().manual_seed(6)
W_DEC = torch.randn(P, D, generator=_g, dtype=F64) * 1.5
B_DEC = torch.randn(P, generator=_g, dtype=F64) * 0.5
X_BIN = (torch.rand(1, P, generator=_g, dtype=F64) > 0.5).to(F64)
MU_Q = torch.tensor([[0.3, -0.4]], dtype=F64)
LOGVAR_Q = torch.log(torch.tensor([[0.3, 0.5]], dtype=F64))


def _decode(z: torch.Tensor) -> torch.Tensor:
    """A tiny Bernoulli decoder: logits = W z + b, [N, P]."""
    return z @ W_DEC.T + B_DEC


def _replicas(r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return X_BIN.expand(r, P), MU_Q.expand(r, D), LOGVAR_Q.expand(r, D)


def test_importance_sampled_with_k_equal_one_averages_to_the_elbo() -> None:
    """E[L_1] = ELBO: the mean of 160k independent single-sample estimates (SE 0.011 nats) vs
    an ELBO from 1M samples of E_q[log p(x|z)] (SE 0.003) and the exact KL; tolerance 0.05."""
    r = 160_000
    x, mu, logvar = _replicas(r)
    l1 = importance_sampled_log_px(x, mu, logvar, _decode, num_samples=1,
                                   generator=torch.Generator().manual_seed(7))
    assert l1.shape == (r,)
    n = 1_000_000
    z = reparameterize(MU_Q.expand(n, D), LOGVAR_Q.expand(n, D),
                       torch.Generator().manual_seed(8))
    expected_ll = bernoulli_log_likelihood(_decode(z), X_BIN.expand(n, P)).mean()
    elbo = expected_ll - kl_normal_std(MU_Q, LOGVAR_Q).sum()
    assert l1.double().mean().item() == pytest.approx(elbo.item(), abs=0.05)


def test_importance_sampled_estimate_is_monotone_in_k_on_average() -> None:
    r = 400
    x, mu, logvar = _replicas(r)
    means = []
    for k in (1, 5, 50, 500):
        est = importance_sampled_log_px(x, mu, logvar, _decode, num_samples=k, chunk=50,
                                        generator=torch.Generator().manual_seed(9 + k))
        means.append(est.double().mean().item())
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means


def test_importance_sampled_equals_log_mean_exp_of_the_weights() -> None:
    """One chunk of K = 60 draws, recomputed from the same generator state by hand."""
    x, mu, logvar = _replicas(3)
    one = importance_sampled_log_px(x, mu, logvar, _decode, num_samples=60, chunk=60,
                                    generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    z = reparameterize(mu.unsqueeze(0).expand(60, 3, D), logvar.unsqueeze(0).expand(60, 3, D),
                       gen)
    ll = bernoulli_log_likelihood(_decode(z.reshape(-1, D)), x.repeat(60, 1)).view(60, 3)
    log_w = ll + log_standard_normal(z) - log_normal(z, mu, logvar)
    torch.testing.assert_close(one, iw_log_mean_exp(log_w).float(), rtol=1e-5, atol=1e-5)
    both = importance_sampled_log_px(x, mu, logvar, _decode, num_samples=60, chunk=60,
                                     generator=torch.Generator().manual_seed(1),
                                     return_elbo=True)
    torch.testing.assert_close(both[0], one)
    torch.testing.assert_close(both[1], log_w.mean(0))  # the same draws' ELBO, (1/K) sum log w
    assert (both[0].double() >= both[1] - 1e-5).all()  # Jensen, image by image
    with pytest.raises(ConfigError):
        importance_sampled_log_px(x, mu, logvar, _decode, num_samples=0)


def test_iw_log_mean_exp_is_stable() -> None:
    log_w = torch.tensor([[-1000.0], [-1000.0 + math.log(3.0)]], dtype=F64)
    assert iw_log_mean_exp(log_w).item() == pytest.approx(-1000.0 + math.log(2.0))
