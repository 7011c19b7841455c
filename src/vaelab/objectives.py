"""The maths of the VAE, in one place: every loss term, bound and KL weight schedule.

Conventions: ``x`` holds pixel intensities in [0, 1]; the decoder returns *logits* ``eta`` with
Bernoulli mean ``lambda = sigmoid(eta)``; the encoder returns ``mu`` and ``logvar = log sigma^2``
of a diagonal Gaussian q(z|x). Every per-image quantity is in **nats per image, summed over
pixels and latent dimensions**. Nothing here knows about models or data: functions take tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vaelab.errors import ConfigError

LIKELIHOODS = ("bernoulli", "continuous-bernoulli")
LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# Sampling and densities
# --------------------------------------------------------------------------------------------
def reparameterize(
    mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """Draw z ~ N(mu, sigma^2) as a differentiable function of (mu, logvar).

        z = mu + sigma * eps,   sigma = exp(logvar / 2),   eps ~ N(0, I)

    The noise does not depend on the parameters, so dz/dmu = 1 and dz/dsigma = eps: gradients
    flow through the sample (the reparameterisation trick). ``eps`` given (same shape as ``mu``)
    is used as the noise: the trainer draws it outside a captured CUDA graph.
    """
    if eps is not None:
        if eps.shape != mu.shape:
            raise ConfigError(f"eps has shape {list(eps.shape)}, mu {list(mu.shape)}")
    elif generator is None:
        eps = torch.randn_like(mu)
    else:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag sigma^2), summed over the last dimension (nats).

        log N = -1/2 sum_j [ log(2 pi) + logvar_j + (z_j - mu_j)^2 / sigma_j^2 ]
    """
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension (nats): -1/2 sum_j [log(2 pi) + z_j^2]."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def kl_normal_std(mu: Tensor, logvar: Tensor) -> Tensor:
    """Closed-form KL(N(mu, sigma^2) || N(0, 1)) for each latent dimension (nats), shape of mu.

        KL_j = 1/2 (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)

    Its gradients are dKL/dmu = mu and dKL/dsigma = sigma - 1/sigma.
    """
    return 0.5 * (mu.pow(2) + torch.exp(logvar) - logvar - 1.0)


# --------------------------------------------------------------------------------------------
# Likelihoods p(x|z)
# --------------------------------------------------------------------------------------------
def bernoulli_log_likelihood(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x|z) under independent Bernoulli pixels, summed per image (nats), shape [B].

        log p(x|z) = sum_i [ x_i log lambda_i + (1 - x_i) log(1 - lambda_i) ] = -BCE(eta, x)

    computed from the logits eta (BCE-with-logits: stable for any eta). For grey x in (0, 1)
    this is the study's objective but not a normalised density; see the continuous Bernoulli.
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(-1)


def continuous_bernoulli_log_norm(logits: Tensor) -> Tensor:
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), elementwise.

        C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda),  C(1/2) = 2
                  = eta / tanh(eta / 2)   in terms of the logit eta

    Near eta = 0 the Taylor expansion 2 + eta^2 / 6 avoids 0/0.
    """
    eta = logits.float()
    small = eta.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(eta), eta)
    exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
    taylor = torch.log(2.0 + eta.pow(2) / 6.0)
    return torch.where(small, taylor, exact).to(logits.dtype)


def continuous_bernoulli_log_likelihood(logits: Tensor, x: Tensor) -> Tensor:
    """log p(x|z) under the continuous Bernoulli, a normalised density on [0, 1]^D (nats), [B].

        log p(x|z) = sum_i [ x_i log lambda_i + (1 - x_i) log(1 - lambda_i) + log C(lambda_i) ]
    """
    ll = bernoulli_log_likelihood(logits, x)
    return ll + continuous_bernoulli_log_norm(logits).flatten(1).sum(-1)


def log_likelihood(logits: Tensor, x: Tensor, kind: str = "bernoulli") -> Tensor:
    """Dispatch on the likelihood's name (``LIKELIHOODS``); per-image nats, shape [B]."""
    if kind == "bernoulli":
        return bernoulli_log_likelihood(logits, x)
    if kind == "continuous-bernoulli":
        return continuous_bernoulli_log_likelihood(logits, x)
    raise ConfigError(f"unknown likelihood '{kind}': choose one of {', '.join(LIKELIHOODS)}")


# --------------------------------------------------------------------------------------------
# The ELBO
# --------------------------------------------------------------------------------------------
@dataclass
class ElboTerms:
    """The ELBO's parts for each image of a batch, in nats per image.

    ``recon`` = -E_q[log p(x|z)] (one-sample estimate), ``kl_per_dim`` = KL_j of each latent
    dimension, ``kl`` = sum_j KL_j, ``neg_elbo`` = recon + kl (the beta = 1 bound on -log p(x)).
    """

    recon: Tensor  # [B]
    kl_per_dim: Tensor  # [B, D]
    kl: Tensor  # [B]
    neg_elbo: Tensor  # [B]


def elbo_terms(
    x: Tensor, mu: Tensor, logvar: Tensor, logits: Tensor, likelihood: str = "bernoulli"
) -> ElboTerms:
    """-ELBO = -E_q(z|x)[log p(x|z)] + KL(q(z|x) || p(z)), each part per image.

        ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)) <= log p(x)

    ``logits`` are the decoder's output for one z ~ q(z|x); the KL is exact (closed form).
    """
    recon = -log_likelihood(logits, x, likelihood)
    kl_per_dim = kl_normal_std(mu, logvar)
    kl = kl_per_dim.sum(-1)
    return ElboTerms(recon=recon, kl_per_dim=kl_per_dim, kl=kl, neg_elbo=recon + kl)


def training_loss(terms: ElboTerms, beta: float | Tensor = 1.0, free_bits: float = 0.0) -> Tensor:
    """The minimised objective, averaged over the batch (nats per image).

        loss = mean_b recon_b + beta * sum_j max(lambda, mean_b KL_bj)

    With beta = 1 and lambda = 0 it is the -ELBO. beta < 1 (annealing) is not a bound. Free bits
    (Kingma et al. 2016) stop pushing dimension j's average KL below lambda nats.
    """
    kl_dim = terms.kl_per_dim.mean(0)
    if free_bits > 0:
        kl_dim = torch.clamp(kl_dim, min=free_bits)
    return terms.recon.mean() + beta * kl_dim.sum()


# --------------------------------------------------------------------------------------------
# Importance-sampled log-likelihood (Burda et al. 2015)
# --------------------------------------------------------------------------------------------
def log_importance_weights(
    x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, logits: Tensor, likelihood: str = "bernoulli"
) -> Tensor:
    """log w = log p(x|z) + log p(z) - log q(z|x), per (image, sample); shapes [..., D] for z."""
    log_px_z = log_likelihood(logits, x, likelihood)
    return log_px_z + log_standard_normal(z) - log_normal(z, mu, logvar)


def iw_log_mean_exp(log_w: Tensor, dim: int = 0) -> Tensor:
    """log (1/K) sum_k w_k, computed with logsumexp (stable for any scale of log w).

    For w_k = p(x, z_k) / q(z_k|x) with z_k ~ q this is the K-sample bound L_K:
    E[L_1] = ELBO <= E[L_K] <= E[L_{K+1}] -> log p(x) as K -> infinity.
    """
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def importance_sampled_log_px(
    x: Tensor,
    mu: Tensor,
    logvar: Tensor,
    decode: Callable[[Tensor], Tensor],
    num_samples: int = 1000,
    chunk: int = 100,
    likelihood: str = "bernoulli",
    generator: torch.Generator | None = None,
    return_elbo: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Estimate log p(x) per image (nats, [B]) with K = num_samples draws from q(z|x).

        log p(x) ~= log (1/K) sum_k w_k,   w_k = p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x)

    ``decode`` maps z [N, D] to logits [N, ...]; the K samples go through it ``chunk`` at a time
    for all B images together, and the chunks are combined with a running logsumexp.
    With ``return_elbo`` it also returns the same samples' ELBO estimate (1/K) sum_k log w_k
    ([B], float64), which by Jensen is never above the log p(x) estimate, image by image.
    """
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    b, d = mu.shape
    acc = torch.full((b,), -math.inf, device=mu.device, dtype=torch.float32)
    log_w_sum = torch.zeros(b, device=mu.device, dtype=torch.float64)
    done = 0
    while done < num_samples:
        k = min(chunk, num_samples - done)
        mu_k = mu.unsqueeze(0).expand(k, b, d)
        lv_k = logvar.unsqueeze(0).expand(k, b, d)
        z = reparameterize(mu_k, lv_k, generator)  # [k, B, D]
        logits = decode(z.reshape(k * b, d))
        xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        ll = log_likelihood(logits.float(), xs, likelihood).view(k, b)
        log_w = (ll + log_standard_normal(z) - log_normal(z, mu_k, lv_k)).float()
        acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
        log_w_sum += log_w.double().sum(0)
        done += k
    log_px = acc - math.log(num_samples)
    return (log_px, log_w_sum / num_samples) if return_elbo else log_px


# --------------------------------------------------------------------------------------------
# Exact log p(x) for a latent of size 1 or 2: product quadrature rules
# --------------------------------------------------------------------------------------------
def log_likelihood_matrix(x: Tensor, logits: Tensor, kind: str = "bernoulli") -> Tensor:
    """log p(x_n | z_g) of every image against every decoded node (nats).

        log p(x|z) = sum_i [ x_i eta_i - softplus(eta_i) ]  (+ sum_i log C(eta_i), continuous)

    since x log sigmoid(eta) + (1 - x) log sigmoid(-eta) = x eta - softplus(eta): the part that
    depends on x is one matrix product. ``x`` is [N, P] (flattened images) and ``logits`` either
    [G, P] (nodes shared by every image: result [N, G]) or [N, G, P] (each image its own nodes).
    """
    if kind not in LIKELIHOODS:
        raise ConfigError(f"unknown likelihood '{kind}': choose one of {', '.join(LIKELIHOODS)}")
    logits = logits.float()
    norm = F.softplus(logits).sum(-1)
    if kind == "continuous-bernoulli":
        norm = norm - continuous_bernoulli_log_norm(logits).sum(-1)
    x = x.float()
    if logits.dim() == 2:
        return x @ logits.T - norm
    return torch.einsum("np,ngp->ng", x, logits) - norm


@dataclass
class LatticeRule:
    """Two product rules over the same box [lo, hi] (per image, or one box for all), n intervals
    of width h = (hi - lo) / n on each axis:

        trapezoid  T = sum_k w_k f(lo + k h),          k = 0..n,  w = h^d (halved per end node)
        midpoint   M = sum_k h^d f(lo + (k + 1/2) h),  k = 0..n-1

    The weights here include the prior, log w_g + log p(z_g), so that sum_g exp(ll_g + log_w_g)
    approximates p(x) = int p(x|z) p(z) dz. For an integrand that is smooth and negligible at
    the box's edges both rules converge faster than any power of h, and their leading (aliasing)
    errors have opposite signs: (T + M) / 2 is far more accurate than either, and |log T - log M|
    is a conservative estimate of its error.

    ``z`` [..., G, d] nodes, ``log_w`` [..., G], ``midpoint`` [G] (which rule each node belongs
    to), ``edge`` [G] (trapezoid nodes on the box's boundary).
    """

    z: Tensor
    log_w: Tensor
    midpoint: Tensor
    edge: Tensor
    spacing: Tensor  # [..., d]

    def __len__(self) -> int:
        return int(self.z.shape[-2])


def lattice_rule(lo: Tensor, hi: Tensor, intervals: int) -> LatticeRule:
    """The trapezoid and midpoint rules (see ``LatticeRule``) with ``intervals`` per axis on the
    box [lo, hi]: ``lo``, ``hi`` are [d] (one box) or [R, d] (one box per image), float64."""
    if intervals < 1:
        raise ConfigError(f"a quadrature rule needs >= 1 interval per axis, got {intervals}")
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    d = lo.shape[-1]
    if d not in (1, 2):
        raise ConfigError(f"quadrature rules here are for 1 or 2 latent dimensions, got {d}")
    if bool((hi <= lo).any()):
        raise ConfigError("a quadrature box needs hi > lo on every axis")
    n = intervals
    k = torch.arange(n + 1, dtype=torch.float64)
    axes_t = [k / n] * d
    axes_m = [(k[:-1] + 0.5) / n] * d
    end = torch.ones(n + 1, dtype=torch.float64)
    end[0] = end[-1] = 0.5
    u_t = torch.cartesian_prod(*axes_t).view(-1, d)
    u_m = torch.cartesian_prod(*axes_m).view(-1, d)
    c_t = torch.cartesian_prod(*[end] * d).view(-1, d).log().sum(-1)
    edge_t = torch.cartesian_prod(*[(end < 1).to(torch.float64)] * d).view(-1, d).amax(-1) > 0
    u = torch.cat([u_t, u_m])  # [G, d] in the unit box
    log_c = torch.cat([c_t, torch.zeros(len(u_m), dtype=torch.float64)])
    midpoint = torch.cat([torch.zeros(len(u_t), dtype=torch.bool),
                          torch.ones(len(u_m), dtype=torch.bool)])
    edge = torch.cat([edge_t, torch.zeros(len(u_m), dtype=torch.bool)])
    h = (hi - lo) / n  # [..., d]
    z = lo.unsqueeze(-2) + u * (hi - lo).unsqueeze(-2)  # [..., G, d]
    log_w = log_c + h.log().sum(-1, keepdim=True) + log_standard_normal(z)
    return LatticeRule(z=z, log_w=log_w, midpoint=midpoint, edge=edge, spacing=h)


class QuadratureSums:
    """Running sums of a lattice rule over chunks of nodes, for N images (float64).

    For each image it keeps log T, log M and the log mass on the box's edge (see
    ``LatticeRule``), and the first two moments of the posterior on the nodes,
    p(z|x) ~ p(x|z) p(z), with weights rescaled as the running maximum grows (streaming
    logsumexp), so memory is one chunk of nodes at a time.
    """

    SUPPORT_NATS = 30.0  # nodes this far below the peak hold < e^-30 of the mass each

    def __init__(self, n: int, d: int, device: torch.device | str = "cpu") -> None:
        def full(*shape: int) -> Tensor:
            return torch.full(shape, -math.inf, dtype=torch.float64, device=device)

        self.log_t, self.log_m, self.log_edge = full(n), full(n), full(n)
        # E_q[log p(x|z)] and the mass of q on each rule (1 when the nodes resolve q)
        self.eq_ll = torch.zeros(2, n, dtype=torch.float64, device=device)
        self.q_mass = torch.zeros(2, n, dtype=torch.float64, device=device)
        self.peak = full(n)  # running max of ll + log w, the scale of the moment sums
        self.s0 = torch.zeros(n, dtype=torch.float64, device=device)
        self.s1 = torch.zeros(n, d, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(n, d, d, dtype=torch.float64, device=device)
        # the box around the nodes within SUPPORT_NATS of the peak: where p(z|x) has its mass
        self.support_lo = torch.full((n, d), math.inf, dtype=torch.float64, device=device)
        self.support_hi = torch.full((n, d), -math.inf, dtype=torch.float64, device=device)

    def add(
        self, ll: Tensor, log_w: Tensor, z: Tensor, midpoint: Tensor, edge: Tensor,
        q: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """One chunk: ``ll`` [N, g] = log p(x|z_g); ``log_w`` [g] or [N, g]; ``z`` [g, d] or
        [N, g, d]; ``midpoint``, ``edge`` [g] masks of the rule each node belongs to. With
        ``q`` = (mu, logvar) [N, d] it also integrates E_q[log p(x|z)], the ELBO's first term."""
        a = ll.double() + log_w.double()
        if q is not None:
            zq = z.double() if z.dim() == 3 else z.double().unsqueeze(0)
            mu, logvar = (t.double().unsqueeze(1) for t in q)
            log_qw = log_normal(zq, mu, logvar) + log_w.double() - log_standard_normal(zq)
            qw = torch.exp(log_qw)  # q(z_g|x) times the rule's weight
            for r, mask in enumerate((~midpoint, midpoint)):
                self.q_mass[r] += (qw * mask).sum(1)
                self.eq_ll[r] += (qw * mask * ll.double()).sum(1)
        minus_inf = torch.tensor(-math.inf, dtype=torch.float64, device=a.device)
        for target, mask in ((self.log_t, ~midpoint), (self.log_m, midpoint),
                             (self.log_edge, edge)):
            if bool(mask.any()):
                part = torch.logsumexp(torch.where(mask, a, minus_inf), dim=1)
                target.copy_(torch.logaddexp(target, part))
        peak = torch.maximum(self.peak, a.amax(1))
        scale = torch.exp(self.peak - peak).nan_to_num(0.0)  # -inf - -inf: nothing summed yet
        p = torch.exp(a - peak[:, None])  # [N, g], both rules together
        z = z.double()
        if z.dim() == 2:
            s1, s2 = p @ z, torch.einsum("ng,gi,gj->nij", p, z, z)
        else:
            s1, s2 = torch.einsum("ng,ngi->ni", p, z), torch.einsum("ng,ngi,ngj->nij", p, z, z)
        self._update_support(a, z, peak)
        self.s0 = self.s0 * scale + p.sum(1)
        self.s1 = self.s1 * scale[:, None] + s1
        self.s2 = self.s2 * scale[:, None, None] + s2
        self.peak = peak

    def _update_support(self, a: Tensor, z: Tensor, peak: Tensor) -> None:
        threshold = peak - self.SUPPORT_NATS
        inside = (a > threshold[:, None]).unsqueeze(-1)  # [N, g, 1]
        zz = z if z.dim() == 3 else z.unsqueeze(0)
        inf = torch.tensor(math.inf, dtype=torch.float64, device=a.device)
        lo = torch.where(inside, zz, inf).amin(1)
        hi = torch.where(inside, zz, -inf).amax(1)
        stale = (self.peak < threshold)[:, None]  # the old support is below the new threshold
        self.support_lo = torch.where(stale, lo, torch.minimum(self.support_lo, lo))
        self.support_hi = torch.where(stale, hi, torch.maximum(self.support_hi, hi))

    def log_px(self) -> Tensor:
        """log p(x) by (T + M) / 2, per image [N]."""
        return torch.logaddexp(self.log_t, self.log_m) - math.log(2.0)

    def error(self, spacing: Tensor | float) -> Tensor:
        """Estimated error of ``log_px`` in nats, per image: |log T - log M| (the spread of the
        two rules, each much less accurate than their mean) plus what the box may cut off: the
        share of the mass on its edge nodes times (posterior sd) / ``spacing``, the mass of a
        tail that decays over one sd beyond the edge."""
        return (self.log_t - self.log_m).abs() + self.cut_off(spacing)

    def cut_off(self, spacing: Tensor | float) -> Tensor:
        """The part of ``error`` that estimates the mass beyond the box, per image [N]."""
        edge = torch.exp(self.log_edge - self.log_t).nan_to_num(0.0)
        _, cov = self.posterior_moments()
        sd = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt().amax(-1)
        spacing = torch.as_tensor(spacing, dtype=torch.float64, device=sd.device)
        return edge * torch.clamp(sd / spacing, min=1.0)

    def expected_log_likelihood(self) -> tuple[Tensor, Tensor]:
        """E_q[log p(x|z)] by (T + M) / 2 and its error estimate |T - M| plus the share of q's
        mass that the nodes miss, per image [N] (nats; needs ``q`` in ``add``)."""
        value = self.eq_ll.mean(0)
        miss = (1.0 - self.q_mass.mean(0)).abs()
        return value, (self.eq_ll[0] - self.eq_ll[1]).abs() + miss * value.abs()

    def posterior_moments(self) -> tuple[Tensor, Tensor]:
        """Mean [N, d] and covariance [N, d, d] of p(z|x) on the nodes."""
        s0 = self.s0.clamp_min(1e-300)
        mean = self.s1 / s0[:, None]
        cov = self.s2 / s0[:, None, None] - mean[:, :, None] * mean[:, None, :]
        return mean, cov


# --------------------------------------------------------------------------------------------
# KL weight (beta) schedules: small objects whose state a checkpoint saves
# --------------------------------------------------------------------------------------------
class BetaSchedule:
    """beta as a function of the optimisation step t; ``step()`` advances t by one.

    ``state_dict()`` / ``load_state_dict()`` save and restore t, so a resumed run continues
    exactly where it stopped.
    """

    name = "base"

    def __init__(self) -> None:
        self.t = 0

    def value(self, t: int | None = None) -> float:
        raise NotImplementedError

    @property
    def beta(self) -> float:
        return self.value(self.t)

    def step(self) -> None:
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(f"schedule state is for '{state.get('name')}', not '{self.name}'")
        self.t = int(state["t"])


class ConstantBeta(BetaSchedule):
    """beta(t) = b for every t (b = 1: the plain VAE; b > 1: beta-VAE, Higgins et al. 2017)."""

    name = "constant"

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.b = float(beta)

    def value(self, t: int | None = None) -> float:
        return self.b


class LinearWarmup(BetaSchedule):
    """beta(t) = min(1, t / W) * beta_max.

    ``per_step=True`` counts t in optimisation steps (beta rises smoothly);
    ``per_step=False`` holds beta constant within an epoch, beta = min(1, epoch / W_epochs),
    the study's form: beta(epoch e) = min(1, e / 10) with e = 0, 1, ...
    """

    name = "linear"

    def __init__(
        self, warmup_steps: int, steps_per_epoch: int = 1, per_step: bool = True,
        beta_max: float = 1.0,
    ) -> None:
        super().__init__()
        self.warmup_steps = max(0, int(warmup_steps))
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.per_step = per_step
        self.beta_max = float(beta_max)

    def value(self, t: int | None = None) -> float:
        t = self.t if t is None else t
        if self.warmup_steps == 0:
            return self.beta_max
        if not self.per_step:
            t = (t // self.steps_per_epoch) * self.steps_per_epoch
        return self.beta_max * min(1.0, t / self.warmup_steps)


class CyclicalBeta(BetaSchedule):
    """Cyclical annealing (Fu et al. 2019): in each cycle of length T, beta rises linearly from 0
    to beta_max over the first ``ratio`` * T steps and stays there for the rest.

        beta(t) = beta_max * min(1, (t mod T) / (ratio * T))
    """

    name = "cyclical"

    def __init__(self, cycle_steps: int, ratio: float = 0.5, beta_max: float = 1.0) -> None:
        super().__init__()
        if cycle_steps < 1 or not 0 < ratio <= 1:
            raise ConfigError("cyclical schedule needs cycle_steps >= 1 and 0 < ratio <= 1")
        self.cycle_steps = int(cycle_steps)
        self.ratio = float(ratio)
        self.beta_max = float(beta_max)

    def value(self, t: int | None = None) -> float:
        t = self.t if t is None else t
        phase = (t % self.cycle_steps) / (self.ratio * self.cycle_steps)
        return self.beta_max * min(1.0, phase)


BETA_SCHEDULES = ("linear", "linear-epoch", "constant", "cyclical")


def make_beta_schedule(
    name: str, *, steps_per_epoch: int, warmup_epochs: float = 10.0, beta: float = 1.0,
    cycles: int = 4, total_epochs: int = 30,
) -> BetaSchedule:
    """Build a schedule by name: ``linear`` (per step), ``linear-epoch`` (the study's per-epoch
    steps), ``constant`` (beta-VAE) or ``cyclical`` (``cycles`` cycles over the run)."""
    if name == "linear":
        return LinearWarmup(round(warmup_epochs * steps_per_epoch), steps_per_epoch, True, beta)
    if name == "linear-epoch":
        return LinearWarmup(round(warmup_epochs * steps_per_epoch), steps_per_epoch, False, beta)
    if name == "constant":
        return ConstantBeta(beta)
    if name == "cyclical":
        total = max(1, total_epochs * steps_per_epoch)
        return CyclicalBeta(max(1, total // max(1, cycles)), 0.5, beta)
    raise ConfigError(f"unknown beta schedule '{name}': choose one of {', '.join(BETA_SCHEDULES)}")
