"""Exact log p(x) by quadrature (objectives.LatticeRule, evaluate.exact_log_px_per_image).

Checked against closed forms: a linear-Gaussian model, whose marginal is N(x; b, W W^T + s^2 I),
and decoders that ignore z, whose marginal is p(x|z) itself; then against importance sampling,
which must approach the exact value from below as K grows.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vaelab.data import Split
from vaelab.errors import ConfigError
from vaelab.evaluate import exact_log_px, exact_log_px_per_image, log_px_estimate
from vaelab.models import ConvCVAE, ConvVAE, ModelSpec
from vaelab.objectives import (
    QuadratureSums,
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    framed_rule,
    lattice_rule,
    log_likelihood_matrix,
    log_standard_normal,
)

SMALL = dict(channels=(4, 8), enc_hidden=16, dec_hidden=16)


def _split(x01: torch.Tensor, labels: torch.Tensor | None = None) -> Split:
    images = (x01 * 255).round().to(torch.uint8)
    if labels is None:
        labels = torch.zeros(images.shape[0], dtype=torch.int64)
    return Split(images, labels)


def _gaussian_linear(d: int, p: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = 0.8 * torch.randn(p, d, generator=g, dtype=torch.float64)
    b = torch.randn(p, generator=g, dtype=torch.float64)
    s2 = 0.3
    z = torch.randn(5, d, generator=g, dtype=torch.float64)
    x = z @ w.T + b + math.sqrt(s2) * torch.randn(5, p, generator=g, dtype=torch.float64)
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + s2 * torch.eye(p, dtype=w.dtype))
    return w, b, s2, x, marginal.log_prob(x)


def _integrate_gaussian(w, b, s2, x, intervals: int, box: float = 7.0) -> QuadratureSums:
    d = w.shape[1]
    rule = lattice_rule(torch.full((d,), -box), torch.full((d,), box), intervals)
    mean = rule.z @ w.T + b  # [G, P]
    ll = (-0.5 * ((x[:, None, :] - mean[None]) ** 2 / s2 + math.log(2 * math.pi * s2))).sum(-1)
    sums = QuadratureSums(x.shape[0], d)
    sums.add(ll, rule.log_w, rule.z, rule.midpoint, rule.edge)
    return sums


@pytest.mark.parametrize("d", [1, 2])
def test_quadrature_matches_the_linear_gaussian_marginal(d: int) -> None:
    w, b, s2, x, exact = _gaussian_linear(d)
    intervals = 200 if d == 2 else 400
    sums = _integrate_gaussian(w, b, s2, x, intervals)
    assert torch.allclose(sums.log_px(), exact, atol=1e-3)
    assert float(sums.error(14.0 / intervals).max()) < 1e-3
    # the posterior's moments are the Gaussian posterior's
    prec = torch.eye(d, dtype=torch.float64) + w.T @ w / s2
    cov = torch.linalg.inv(prec)
    mean = (x - b) @ w @ cov.T / s2
    got_mean, got_cov = sums.posterior_moments()
    assert torch.allclose(got_mean, mean, atol=1e-4)
    assert torch.allclose(got_cov, cov.expand_as(got_cov), atol=1e-4)


def test_the_error_estimate_shrinks_as_the_rule_refines_and_bounds_the_error() -> None:
    w, b, s2, x, exact = _gaussian_linear(2, seed=3)
    errors, estimates = [], []
    for intervals in (12, 24, 48, 96):
        sums = _integrate_gaussian(w, b, s2, x, intervals)
        errors.append(float((sums.log_px() - exact).abs().max()))
        estimates.append(float(sums.error(14.0 / intervals).max()))
    # down to the float32 floor of the within-chunk sums (about 1e-6 nats)
    assert estimates[0] > estimates[1] > estimates[2] and estimates[3] < 1e-5
    assert all(e <= est + 1e-5 for e, est in zip(errors, estimates, strict=True))
    assert errors[0] > 1e-2  # the coarsest rule is visibly off, and says so


def test_a_box_that_cuts_the_posterior_says_so_in_its_error() -> None:
    w, b, s2, x, exact = _gaussian_linear(1, seed=1)
    tight = _integrate_gaussian(w, b, s2, x, intervals=400, box=0.5)
    assert float(tight.error(1.0 / 400).min()) > 0.01  # mass on the edge is counted as error


def test_the_likelihood_matrix_equals_the_per_image_likelihoods() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 28, 28, generator=g)
    logits = 3 * torch.randn(7, 1, 28, 28, generator=g)
    for kind, fn in (("bernoulli", bernoulli_log_likelihood),
                     ("continuous-bernoulli", continuous_bernoulli_log_likelihood)):
        m = log_likelihood_matrix(x.flatten(1), logits.flatten(1), kind)
        ref = torch.stack([fn(logits, xi.expand_as(logits)) for xi in x])
        assert torch.allclose(m, ref, atol=1e-3, rtol=1e-5)
        per = log_likelihood_matrix(x.flatten(1), logits.flatten(1).expand(4, 7, 784), kind)
        assert torch.allclose(per, m, atol=1e-3)
    with pytest.raises(ConfigError):
        log_likelihood_matrix(x.flatten(1), logits.flatten(1), "gaussian")


class _Constant(nn.Module):
    """Logits that do not depend on z (one set per class): p(x) = p(x | logits) exactly."""

    def __init__(self, logits: torch.Tensor, conditional: bool) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)  # [C, 784]
        self.conditional = conditional
        self.latent_dim = 2
        self.spec = ModelSpec(kind="cvae" if conditional else "vae", num_classes=len(logits))

    def encode(self, x, y=None):
        b = x.shape[0]
        return torch.full((b, 2), 0.2), torch.full((b, 2), math.log(0.3**2))

    def decode(self, z, y=None):
        rows = self.logits[y] if self.conditional else self.logits[0].expand(z.shape[0], -1)
        return rows.view(-1, 1, 28, 28)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_a_decoder_that_ignores_z_integrates_to_its_likelihood(likelihood: str) -> None:
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(1, 784, generator=g)
    x = torch.rand(6, 28, 28, generator=g)
    split = _split(x)
    model = _Constant(logits, conditional=False)
    res = exact_log_px_per_image(model, split, likelihood=likelihood, tolerance=1e-3)
    xs = split.images.float().div(255).unsqueeze(1)
    want = log_likelihood_matrix(xs.flatten(1), logits, likelihood)[:, 0].double()
    assert torch.allclose(res.log_px, want, atol=1e-3)
    assert float(res.error.mean()) <= 1e-3


def test_a_cvae_image_is_integrated_under_its_own_class() -> None:
    g = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(3, 784, generator=g)
    labels = torch.tensor([0, 2, 1, 2, 0])
    probs = torch.sigmoid(logits[labels]).view(5, 28, 28)
    x = torch.bernoulli(probs, generator=g)
    split = _split(x, labels)
    model = _Constant(logits, conditional=True)
    res = exact_log_px_per_image(model, split, tolerance=1e-3)
    xs = split.images.float().div(255).flatten(1)
    own = log_likelihood_matrix(xs, logits)[torch.arange(5), labels].double()
    assert torch.allclose(res.log_px, own, atol=1e-3)
    wrong = log_likelihood_matrix(xs, logits)[torch.arange(5), (labels + 1) % 3].double()
    assert (own - wrong).abs().min() > 10  # the check can tell the classes apart


@pytest.fixture(scope="module")
def small_vae_and_images():
    torch.manual_seed(0)
    model = ConvVAE(ModelSpec(kind="vae", latent_dim=2, **SMALL)).eval()
    with torch.no_grad():  # a decoder that depends on z strongly: a posterior far from q
        model.decoder.net[0].weight.mul_(4.0)
        model.decoder.net[-1].weight.mul_(3.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z = torch.randn(8, 2, generator=g)
        x = torch.bernoulli(torch.sigmoid(model.decode(z)).view(8, 28, 28), generator=g)
    return model, _split(x)


def test_the_exact_value_meets_its_tolerance_and_is_stable(small_vae_and_images) -> None:
    model, split = small_vae_and_images
    coarse = exact_log_px_per_image(model, split, tolerance=0.05)
    fine = exact_log_px_per_image(model, split, tolerance=1e-3)
    assert float(coarse.error.mean()) <= 0.05 and float(fine.error.mean()) <= 1e-3
    assert abs(float(coarse.log_px.mean() - fine.log_px.mean())) <= 0.05
    summary = exact_log_px(model, split, tolerance=0.05)
    assert summary["method"] == "quadrature" and summary["n"] == 8
    assert summary["neg_log_px"] == pytest.approx(-float(coarse.log_px.mean()), abs=1e-9)
    assert summary["over_tolerance"] == 0


def test_importance_sampling_approaches_the_exact_value_from_below(small_vae_and_images) -> None:
    model, split = small_vae_and_images
    exact = float(exact_log_px_per_image(model, split, tolerance=5e-3).log_px.mean())
    estimates = []
    for k in (1, 10, 100, 1000):
        runs = [log_px_estimate(model, split, num_samples=k, chunk=500, seed=s)["log_px"]
                for s in range(3)]
        estimates.append(sum(runs) / len(runs))
    assert all(e <= exact + 0.1 for e in estimates)  # a lower bound in expectation
    assert estimates == sorted(estimates)
    assert exact - estimates[0] > 3  # q is a poor proposal here: K = 1 is far below
    assert abs(exact - estimates[-1]) < 0.2


def test_a_latent_above_two_asks_for_importance_sampling() -> None:
    model = ConvVAE(ModelSpec(kind="vae", latent_dim=3, **SMALL))
    split = _split(torch.rand(2, 28, 28))
    with pytest.raises(ConfigError, match="latent size of 1 or 2.*importance"):
        exact_log_px_per_image(model, split)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_a_bad_tolerance_is_refused(small_vae_and_images, bad) -> None:
    model, split = small_vae_and_images
    with pytest.raises(ConfigError, match="tolerance"):
        exact_log_px_per_image(model, split, tolerance=bad)


def test_a_cvae_latent_of_one_works() -> None:
    torch.manual_seed(0)
    model = ConvCVAE(ModelSpec(kind="cvae", latent_dim=1, **SMALL)).eval()
    split = _split(torch.rand(4, 28, 28), torch.tensor([0, 1, 2, 3]))
    res = exact_log_px_per_image(model, split, tolerance=1e-3)
    assert torch.isfinite(res.log_px).all() and float(res.error.mean()) <= 1e-3


# --------------------------------------------------------------------------------------------
# Importance proposals that are harder to fool
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proposal", ["q", "mixture", "student-t"])
def test_each_proposal_draws_from_the_density_it_reports(proposal: str) -> None:
    from vaelab.objectives import sample_proposal

    mu, logvar = torch.tensor([[0.4, -1.0]]), torch.tensor([[math.log(0.25), math.log(4.0)]])
    g = torch.Generator().manual_seed(0)
    z, log_r = sample_proposal(mu.expand(200_000, 2), logvar.expand(200_000, 2), proposal, g)
    var_factor = {"q": 1.0, "mixture": 0.5 + 0.5 * 9.0, "student-t": 3.0}[proposal]
    sd = torch.exp(0.5 * logvar)
    assert torch.allclose(z.mean(0), mu[0], atol=0.02 * float(sd.max()) * 3)
    if proposal != "student-t":  # a t with 3 dof has an infinite fourth moment: no var check
        assert torch.allclose(z.var(0), var_factor * sd[0] ** 2, rtol=0.03)
    # the density of a 1-D proposal integrates to one
    mu1, lv1 = torch.tensor([[0.3]]), torch.tensor([[math.log(0.5**2)]])
    grid = torch.linspace(-80, 80, 400_001, dtype=torch.float64)[:, None]
    from vaelab.objectives import log_normal, log_student_t

    if proposal == "q":
        dens = log_normal(grid, mu1.double(), lv1.double())
    elif proposal == "mixture":
        dens = torch.logaddexp(log_normal(grid, mu1.double(), lv1.double()),
                               log_normal(grid, mu1.double(), lv1.double() + 2 * math.log(3.0)))
        dens = dens - math.log(2.0)
    else:
        dens = log_student_t(grid, mu1.double(), lv1.double())
        ref = torch.distributions.StudentT(3, 0.3, 0.5).log_prob(grid[:, 0])
        assert torch.allclose(dens, ref, atol=1e-9)
    mass = float(torch.exp(dens).sum() * (grid[1, 0] - grid[0, 0]))
    assert mass == pytest.approx(1.0, abs=2e-3)
    # and sample_proposal's log r is that density at its draws
    z1, log_r1 = sample_proposal(mu1.expand(5, 1), lv1.expand(5, 1), proposal, g)
    idx = torch.searchsorted(grid[:, 0].float().contiguous(), z1[:, 0].contiguous())
    assert torch.allclose(log_r1.double(), dens[idx.clamp(max=len(grid) - 1)], atol=1e-3)


class _NarrowEncoder(nn.Module):
    """The model's decoder with q(z|x) centred on the true posterior mean but 3x too narrow:
    the failure of a mode-seeking q that heavier-tailed proposals are for."""

    conditional = False
    latent_dim = 2

    def __init__(self, model: nn.Module, mean: torch.Tensor, sd: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.mean, self.sd = model, mean.float(), sd.float()

    def encode(self, x, y=None):
        idx = torch.arange(x.shape[0]) % len(self.mean)  # the images arrive in order, one batch
        return self.mean[idx], 2 * torch.log(self.sd[idx] / 3)

    def decode(self, z, y=None):
        return self.inner.decode(z)


def test_a_wider_proposal_lands_closer_to_the_exact_value(small_vae_and_images) -> None:
    model, split = small_vae_and_images
    res = exact_log_px_per_image(model, split, tolerance=5e-3)
    exact = float(res.log_px.mean())
    sd = torch.diagonal(res.posterior_cov, dim1=1, dim2=2).sqrt()
    narrow = _NarrowEncoder(model, res.posterior_mean, sd)
    est = {p: sum(log_px_estimate(narrow, split, num_samples=50, chunk=50, seed=s,
                                  batch_size=len(split), proposal=p)["log_px"]
                  for s in range(4)) / 4
           for p in ("q", "mixture", "student-t")}
    for p, v in est.items():
        assert v <= exact + 0.1, p
    assert exact - est["mixture"] < exact - est["q"]
    assert exact - est["student-t"] < exact - est["q"]


def test_an_unknown_proposal_is_refused(small_vae_and_images) -> None:
    model, split = small_vae_and_images
    with pytest.raises(ConfigError, match="proposal"):
        log_px_estimate(model, split, num_samples=5, proposal="uniform")


@pytest.fixture(scope="module")
def kinked_vae_and_images():
    """A ReLU decoder with steep first-layer units: log p(x|z) has kinks a few hundredths
    apart in z, as a trained decoder's does, so the rules converge as h^2 and T and M can
    agree by chance."""
    torch.manual_seed(0)
    model = ConvVAE(ModelSpec(kind="vae", latent_dim=2, channels=(4, 8), enc_hidden=16,
                              dec_hidden=512)).eval()
    with torch.no_grad():
        model.decoder.net[0].weight.mul_(20.0)
        g = torch.Generator().manual_seed(5)
        z = torch.randn(12, 2, generator=g)
        x = torch.bernoulli(torch.sigmoid(model.decode(z)).view(12, 28, 28), generator=g)
    return model, _split(x)


@pytest.mark.slow
def test_the_per_image_error_holds_where_the_decoder_has_kinks(
    kinked_vae_and_images, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, split = kinked_vae_and_images
    reference = exact_log_px_per_image(model, split, tolerance=0.01, shared_nodes=3000)
    result = exact_log_px_per_image(model, split, tolerance=0.05, shared_nodes=3000)
    miss = (result.log_px - reference.log_px).abs()
    assert bool((miss <= result.error + reference.error).all()), miss - result.error
    assert float(result.error.max()) <= 0.05
    # Without the change between successive rules, T and M alone understate the error here.
    spread_only = QuadratureSums.error
    monkeypatch.setattr(QuadratureSums, "error",
                        lambda self, spacing, narrowest=None, previous=None:
                        spread_only(self, spacing, narrowest))
    naive = exact_log_px_per_image(model, split, tolerance=0.05, shared_nodes=3000)
    assert bool(((naive.log_px - reference.log_px).abs() > naive.error + reference.error).any())


@pytest.mark.parametrize("seed", [2**64, -1, 1.5, True])
def test_the_evaluation_functions_range_check_their_seed(small_vae_and_images, seed) -> None:
    from vaelab.evaluate import evaluate_elbo

    model, split = small_vae_and_images
    with pytest.raises(ConfigError, match="seed must be a whole number"):
        evaluate_elbo(model, split, seed=seed)
    with pytest.raises(ConfigError, match="seed must be a whole number"):
        log_px_estimate(model, split, num_samples=2, seed=seed)


def test_a_budget_stops_the_work_and_the_summary_counts_what_is_left(
    small_vae_and_images,
) -> None:
    model, split = small_vae_and_images
    full = exact_log_px_per_image(model, split, tolerance=1e-3)
    capped = exact_log_px_per_image(model, split, tolerance=1e-3, shared_nodes=400,
                                    max_shared_nodes=2000)
    assert capped.nodes < full.nodes
    summary = capped.summary()
    assert summary["over_tolerance"] == int((capped.error > 1e-3).sum()) > 0
    # what is left keeps an honest estimate: within its error of the full computation
    assert bool(((capped.log_px - full.log_px).abs() <= capped.error + full.error).all())


def test_saved_exact_values_load_back_under_their_key_only(small_vae_and_images, tmp_path
                                                           ) -> None:
    """``ExactLogPx.save``/``load``: the same values back under the same key; another key, a
    cut-short or foreign file, or none at all give None (the caller computes them again)."""
    from vaelab.evaluate import ExactLogPx

    model, split = small_vae_and_images
    ex = exact_log_px_per_image(model, split, tolerance=0.1)
    path, key = tmp_path / "exact.safetensors", {"model_sha256": "ab", "tolerance": 0.1}
    ex.save(path, key)
    back = ExactLogPx.load(path, dict(key))
    assert back is not None and back.tolerance == ex.tolerance and back.nodes == ex.nodes
    for name in ("log_px", "error", "refined", "posterior_mean", "posterior_cov"):
        assert torch.equal(getattr(back, name), getattr(ex, name)), name
    assert back.summary() == ex.summary()
    assert ExactLogPx.load(path, {**key, "tolerance": 0.5}) is None
    assert ExactLogPx.load(tmp_path / "absent.safetensors", key) is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert ExactLogPx.load(path, key) is None
    path.write_bytes(b'{"not": "safetensors"}')
    assert ExactLogPx.load(path, key) is None
    part = ex.subset(3)
    assert part.log_px.shape == (3,) and torch.equal(part.posterior_cov, ex.posterior_cov[:3])


def _correlated_gaussian(along: float = 40.0):
    """A linear-Gaussian model whose two latent directions load almost equally on the pixels:
    the posterior is narrow along (1, 1) and wide along (1, -1), a tilted ridge such as a
    trained decoder gives, and q's axis-aligned (mean-field) boxes fit it badly."""
    g = torch.Generator().manual_seed(3)
    p = 8
    a = along * torch.randn(p, generator=g, dtype=torch.float64)
    c = 0.3 * torch.randn(p, generator=g, dtype=torch.float64)
    w = torch.stack([a + c, a - c], 1)
    b, s2 = torch.randn(p, generator=g, dtype=torch.float64), 0.5
    z = torch.randn(3, 2, generator=g, dtype=torch.float64)
    x = z @ w.T + b + math.sqrt(s2) * torch.randn(3, p, generator=g, dtype=torch.float64)
    precision = torch.eye(2, dtype=torch.float64) + w.T @ w / s2
    cov = torch.linalg.inv(precision)
    mean = (cov @ (w.T @ (x - b).T / s2)).T
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + s2 * torch.eye(p,
                                                                               dtype=w.dtype))
    return w, b, s2, x, mean, cov.expand(3, 2, 2), marginal.log_prob(x)


def _gaussian_ll(w, b, s2, x, z):
    """log N(x_r; W z + b, s2 I) at each image's own nodes z [R, G, d]: [R, G]."""
    mean = z @ w.T + b
    return (-0.5 * ((x[:, None, :] - mean) ** 2 / s2 + math.log(2 * math.pi * s2))).sum(-1)


def test_a_rule_in_the_posteriors_frame_resolves_a_narrow_tilted_peak() -> None:
    from vaelab.evaluate import _frame

    w, b, s2, x, mean, cov, want = _correlated_gaussian()
    sd = torch.linalg.eigvalsh(cov[0]).sqrt()
    assert sd[0] < 0.02 * sd[1]  # a ridge: 50x narrower across than along
    rule, z = framed_rule(mean, _frame(cov), 6.0, 16)
    sums = QuadratureSums(3, 2)
    sums.add(_gaussian_ll(w, b, s2, x, z), rule.log_w, rule.z, rule.midpoint, rule.edge)
    assert torch.allclose(sums.log_px(), want, atol=1e-6)
    mean_u, cov_u = sums.posterior_moments()  # in the frame: a round, centred peak
    assert torch.allclose(mean_u, torch.zeros_like(mean_u), atol=1e-6)
    assert torch.allclose(cov_u, torch.eye(2, dtype=torch.float64).expand(3, 2, 2), atol=1e-5)
    # The same number of nodes on each posterior's axis-aligned box (+-6 marginal sd) misses.
    half = 6 * torch.diagonal(cov, dim1=1, dim2=2).sqrt()
    flat = lattice_rule(mean - half, mean + half, 16)
    plain = QuadratureSums(3, 2)
    plain.add(_gaussian_ll(w, b, s2, x, flat.z), flat.log_w, flat.z, flat.midpoint, flat.edge)
    assert bool(((plain.log_px() - want).abs() > 1e-2).all())


def test_a_framed_rule_refuses_a_frame_of_the_wrong_shape() -> None:
    with pytest.raises(ConfigError, match="frame"):
        framed_rule(torch.zeros(3, 2), torch.eye(2).expand(2, 2, 2), 6.0, 8)
    with pytest.raises(ConfigError, match="half"):
        framed_rule(torch.zeros(1, 2), torch.eye(2)[None], 0.0, 8)


class _Tilted(nn.Module):
    """Bernoulli pixels whose logits are linear in z, both latent directions loading almost
    equally on every pixel: tilted, narrow posteriors, with q(z|x) centred on the latent the
    image was drawn from and mean-field wide (sd 0.02 on each axis)."""

    conditional = False
    latent_dim = 2

    def __init__(self, n: int = 6, along: float = 3.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        a, c = along * torch.randn(784, generator=g), 0.05 * torch.randn(784, generator=g)
        self.w = nn.Parameter(torch.stack([a + c, a - c], 1), requires_grad=False)
        self.b = 0.5 * torch.randn(784, generator=g)
        self.z = 0.7 * torch.randn(n, 2, generator=g)
        self.x = torch.bernoulli(torch.sigmoid(self.decode(self.z).flatten(1)), generator=g)

    def encode(self, x, y=None):
        idx = torch.arange(x.shape[0]) % len(self.z)  # the images arrive in order, one batch
        return self.z[idx], torch.full((x.shape[0], 2), 2 * math.log(0.02))

    def decode(self, z, y=None):
        return (z.float() @ self.w.T + self.b).view(-1, 1, 28, 28)


def test_framed_rules_bring_tilted_posteriors_within_tolerance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vaelab.evaluate as evaluate
    from vaelab.evaluate import _frame

    model = _Tilted()
    split = _split(model.x.view(-1, 28, 28))
    budget = dict(shared_nodes=3000, max_shared_nodes=20_000)
    res = exact_log_px_per_image(model, split, **budget)
    assert float(res.error.max()) <= 0.1 and bool(res.refined.all())
    # a reference: 128 intervals per axis, in a frame 3x as wide as the posterior's
    rule, z = framed_rule(res.posterior_mean, 3 * _frame(res.posterior_cov), 6.0, 128)
    x = split.images.float().div(255).flatten(1)
    ll = log_likelihood_matrix(x, model.decode(z.reshape(-1, 2)).flatten(1).view(6, -1, 784))
    ref = QuadratureSums(6, 2)
    ref.add(ll, rule.log_w, rule.z, rule.midpoint, rule.edge)
    assert bool(((res.log_px - ref.log_px()).abs() <= res.error + 1e-3).all())
    # Without them, the axis-aligned rules cannot, within the same budget.
    monkeypatch.setattr(evaluate, "_framed_rules",
                        lambda decode, est, *a, **k: torch.zeros(len(est.err), dtype=torch.bool))
    plain = exact_log_px_per_image(model, split, **budget)
    assert int((plain.error > 0.1).sum()) >= 3


def test_a_framed_value_that_misses_a_mode_the_shared_rules_saw_is_not_taken() -> None:
    from vaelab.evaluate import _Estimates

    # p(x|z) p(z) = an equal mixture of two narrow Gaussians: p(x) = 1 exactly; a frame around
    # one of them integrates to 1/2 with a tiny error of its own
    modes, sd = torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64), 0.05
    centre, frame = modes[:1], sd * torch.eye(2, dtype=torch.float64)[None]
    rule, z = framed_rule(centre, frame, 6.0, 16)
    log_mix = torch.logsumexp(torch.stack([
        torch.distributions.MultivariateNormal(m, sd**2 * torch.eye(2, dtype=torch.float64))
        .log_prob(z) for m in modes]), 0) - math.log(2)
    sums = QuadratureSums(1, 2)
    sums.add(log_mix - log_standard_normal(z), rule.log_w, rule.z, rule.midpoint, rule.edge)
    assert float(sums.log_px()) == pytest.approx(-math.log(2), abs=1e-6)
    half = sums.log_px()

    def keep(shared: float, err: float) -> float:
        est = _Estimates(1, 2, torch.full((1, 2), sd, dtype=torch.float64))
        est.log_px[:], est.err[:] = shared, err
        est.keep_framed(torch.tensor([0]), sums, 12 / 16, centre, frame, previous=half,
                        floor=est.log_px - est.err)
        return float(est.log_px[0])

    assert keep(0.0, 0.2) == 0.0  # below the shared value beyond both errors: a missed mode
    assert keep(-0.6, 0.2) == pytest.approx(-math.log(2), abs=1e-6)  # within them: taken
    assert keep(-3.0, 0.2) == pytest.approx(-math.log(2), abs=1e-6)  # above: the shared missed
