"""The maths of the VAE, in one place: every loss term, bound and KL weight schedule.

Conventions: ``x`` holds pixel intensities in [0, 1]; the decoder returns *logits* ``eta`` with
Bernoulli mean ``lambda = sigmoid(eta)``; the encoder returns ``mu`` and ``logvar = log sigma^2``
of a diagonal Gaussian q(z|x). Every per-image quantity is in **nats per image, summed over
pixels and latent dimensions**. Nothing here knows about models or data: functions take tensors.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


PROPOSALS = ("q", "mixture", "student-t")
MIXTURE_WIDTH = 3.0  # the defensive component's sd, in units of q's
STUDENT_DOF = 3  # degrees of freedom of the Student-t proposal


def log_student_t(z: Tensor, mu: Tensor, logvar: Tensor, dof: int = STUDENT_DOF) -> Tensor:
    """log of a product of Student-t densities with ``dof`` degrees of freedom, centre mu and
    scale sigma = exp(logvar / 2), summed over the last dimension (nats):

        log t = sum_j [ lgamma((v + 1) / 2) - lgamma(v / 2) - log(v pi) / 2 - log sigma_j
                        - (v + 1) / 2 log(1 + ((z_j - mu_j) / sigma_j)^2 / v) ]
    """
    v = float(dof)
    u2 = (z - mu).pow(2) * torch.exp(-logvar)
    const = math.lgamma((v + 1) / 2) - math.lgamma(v / 2) - 0.5 * math.log(v * math.pi)
    return (const - 0.5 * logvar - (v + 1) / 2 * torch.log1p(u2 / v)).sum(-1)


def sample_proposal(
    mu: Tensor, logvar: Tensor, proposal: str, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw z [..., D] from an importance proposal built on q = N(mu, sigma^2) and return
    (z, log r(z)):

    - ``q``: q itself (Burda et al. 2015);
    - ``mixture``: the defensive mixture r = 1/2 q + 1/2 N(mu, (3 sigma)^2) (Hesterberg 1995),
      whose wide half keeps w = p / r bounded where q's tails are too light;
    - ``student-t``: independent Student-t with 3 degrees of freedom, centre mu, scale sigma.
    """
    if proposal not in PROPOSALS:
        raise ConfigError(f"unknown proposal '{proposal}': choose one of {', '.join(PROPOSALS)}")

    def normal(*shape: int) -> Tensor:
        return torch.randn(shape or mu.shape, generator=generator, device=mu.device,
                           dtype=mu.dtype)

    sd = torch.exp(0.5 * logvar)
    if proposal == "q":
        z = mu + sd * normal()
        return z, log_normal(z, mu, logvar)
    if proposal == "mixture":
        wide_lv = logvar + 2 * math.log(MIXTURE_WIDTH)
        pick = torch.rand(mu.shape[:-1], generator=generator, device=mu.device) < 0.5
        scale = torch.where(pick.unsqueeze(-1), sd * MIXTURE_WIDTH, sd)
        z = mu + scale * normal()
        log_r = torch.logaddexp(log_normal(z, mu, logvar), log_normal(z, mu, wide_lv))
        return z, log_r - math.log(2.0)
    chi2 = sum(normal().pow(2) for _ in range(STUDENT_DOF))
    z = mu + sd * normal() / torch.sqrt(chi2 / STUDENT_DOF)
    return z, log_student_t(z, mu, logvar)


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
    proposal: str = "q",
) -> Tensor | tuple[Tensor, Tensor]:
    """Estimate log p(x) per image (nats, [B]) with K = num_samples draws from a proposal r.

        log p(x) ~= log (1/K) sum_k w_k,   w_k = p(x|z_k) p(z_k) / r(z_k|x),   z_k ~ r(z|x)

    r is q(z|x) itself by default, or one of the heavier-tailed ``sample_proposal`` choices.
    ``decode`` maps z [N, D] to logits [N, ...]; the K samples go through it ``chunk`` at a time
    for all B images together, and the chunks are combined with a running logsumexp.
    With ``return_elbo`` (proposal q only) it also returns the same samples' ELBO estimate
    (1/K) sum_k log w_k ([B], float64), never above the log p(x) estimate (Jensen).
    """
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    if return_elbo and proposal != "q":
        raise ConfigError("the ELBO comes from samples of q: use proposal 'q' with return_elbo")
    b, d = mu.shape
    acc = torch.full((b,), -math.inf, device=mu.device, dtype=torch.float32)
    log_w_sum = torch.zeros(b, device=mu.device, dtype=torch.float64)
    done = 0
    while done < num_samples:
        k = min(chunk, num_samples - done)
        mu_k = mu.unsqueeze(0).expand(k, b, d)
        lv_k = logvar.unsqueeze(0).expand(k, b, d)
        if proposal == "q":  # the same draws as reparameterize: the training path's noise
            z = reparameterize(mu_k, lv_k, generator)  # [k, B, D]
            log_r = log_normal(z, mu_k, lv_k)
        else:
            z, log_r = sample_proposal(mu_k, lv_k, proposal, generator)
        logits = decode(z.reshape(k * b, d))
        xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
        ll = log_likelihood(logits.float(), xs, likelihood).view(k, b)
        log_w = (ll + log_standard_normal(z) - log_r).float()
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
    errors have opposite signs: (T + M) / 2 is far more accurate than either, and
    |log T - log M| / 2 is a conservative estimate of its error.

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


def in_tiles(rule: LatticeRule, lo: Tensor, hi: Tensor, intervals: int, side: int = 16,
             ) -> tuple[LatticeRule, Tensor]:
    """The shared rule's nodes reordered into square tiles of ``side`` intervals per axis, and
    each node's tile number [G] (non-decreasing): a chunk of consecutive nodes then covers a
    small region of the latent space, so the images whose posteriors lie elsewhere can skip
    it."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    u = (rule.z - lo) / (hi - lo) * intervals  # node coordinates in intervals
    per_axis = math.ceil(intervals / side) + 1
    cell = (u / side).floor().clamp(0, per_axis - 1).long()
    tile = torch.zeros(len(u), dtype=torch.long)
    for j in range(u.shape[1]):
        tile = tile * per_axis + cell[:, j]
    order = torch.argsort(tile, stable=True)
    return LatticeRule(z=rule.z[order], log_w=rule.log_w[order], midpoint=rule.midpoint[order],
                       edge=rule.edge[order], spacing=rule.spacing), tile[order]


def _unit_rules(d: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both rules of ``LatticeRule`` on the unit box [0, 1]^d with n intervals per axis: node
    coordinates u [G, d], log of each node's weight in units of h^d (the trapezoid's halved
    ends), and the ``midpoint`` and ``edge`` masks [G]."""
    if n < 1:
        raise ConfigError(f"a quadrature rule needs >= 1 interval per axis, got {n}")
    if d not in (1, 2):
        raise ConfigError(f"quadrature rules here are for 1 or 2 latent dimensions, got {d}")
    k = torch.arange(n + 1, dtype=torch.float64)
    end = torch.ones(n + 1, dtype=torch.float64)
    end[0] = end[-1] = 0.5
    u_t = torch.cartesian_prod(*[k / n] * d).view(-1, d)
    u_m = torch.cartesian_prod(*[(k[:-1] + 0.5) / n] * d).view(-1, d)
    c_t = torch.cartesian_prod(*[end] * d).view(-1, d).log().sum(-1)
    edge_t = torch.cartesian_prod(*[(end < 1).to(torch.float64)] * d).view(-1, d).amax(-1) > 0
    u = torch.cat([u_t, u_m])
    log_c = torch.cat([c_t, torch.zeros(len(u_m), dtype=torch.float64)])
    midpoint = torch.cat([torch.zeros(len(u_t), dtype=torch.bool),
                          torch.ones(len(u_m), dtype=torch.bool)])
    edge = torch.cat([edge_t, torch.zeros(len(u_m), dtype=torch.bool)])
    return u, log_c, midpoint, edge


def lattice_nodes(intervals: int | Tensor, d: int) -> int | Tensor:
    """How many nodes the trapezoid and midpoint rules of ``lattice_rule`` have together, with
    ``intervals`` per axis in ``d`` dimensions (an int, or a tensor of them)."""
    return (intervals + 1) ** d + intervals**d


def lattice_rule(lo: Tensor, hi: Tensor, intervals: int) -> LatticeRule:
    """The trapezoid and midpoint rules (see ``LatticeRule``) with ``intervals`` per axis on the
    box [lo, hi]: ``lo``, ``hi`` are [d] (one box) or [R, d] (one box per image), float64."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float64), torch.as_tensor(hi, dtype=torch.float64)
    u, log_c, midpoint, edge = _unit_rules(lo.shape[-1], intervals)
    if bool((hi <= lo).any()):
        raise ConfigError("a quadrature box needs hi > lo on every axis")
    h = (hi - lo) / intervals  # [..., d]
    z = lo.unsqueeze(-2) + u * (hi - lo).unsqueeze(-2)  # [..., G, d]
    log_w = log_c + h.log().sum(-1, keepdim=True) + log_standard_normal(z)
    return LatticeRule(z=z, log_w=log_w, midpoint=midpoint, edge=edge, spacing=h)


def framed_rule(centre: Tensor, frame: Tensor, half: float, intervals: int,
                ) -> tuple[LatticeRule, Tensor]:
    """The rules of ``LatticeRule`` in a frame of each image's own: z = centre + F u, with u on
    the box [-half, half]^d cut into ``intervals`` per axis. ``centre`` [R, d], ``frame`` F
    [R, d, d] (invertible; its columns the axes, typically a posterior's principal axes
    scaled by their sd, so that a narrow, tilted peak in z is a round one in u).

    The integral is taken in u, dz = |det F| du: the rule returned is in u (its ``z`` the u
    nodes [R, G, d], ``spacing`` that of u), with log_w [R, G] = log (h^d c) + log |det F|
    + log p(z), so that ``QuadratureSums`` reports the moments and the error in u. The second
    tensor is the z nodes [R, G, d], where the decoder is evaluated."""
    centre, frame = centre.to(torch.float64), frame.to(torch.float64)
    r, d = centre.shape
    if frame.shape != (r, d, d):
        raise ConfigError(f"a frame per image needs shape {(r, d, d)}, got {tuple(frame.shape)}")
    if not (math.isfinite(half) and half > 0):
        raise ConfigError(f"a framed rule needs half > 0, got {half}")
    unit, log_c, midpoint, edge = _unit_rules(d, intervals)
    h = 2 * half / intervals
    u = (unit * 2 * half - half).expand(r, -1, -1)  # [R, G, d]
    z = centre.unsqueeze(-2) + u @ frame.transpose(-1, -2)
    log_det = torch.linalg.slogdet(frame).logabsdet  # [R]
    log_w = log_c + d * math.log(h) + log_det[:, None] + log_standard_normal(z)
    spacing = torch.full((r, d), h, dtype=torch.float64)
    return LatticeRule(z=u, log_w=log_w, midpoint=midpoint, edge=edge, spacing=spacing), z


def gauss_hermite_rule(mu: Tensor, logvar: Tensor, order: int = 8) -> tuple[Tensor, Tensor]:
    """Nodes and log weights of the order^d Gauss-Hermite rule for expectations under
    q = N(mu, diag sigma^2): E_q[f] ~= sum_g exp(log_w_g) f(z_g), exact for polynomials of
    degree < 2 order in each coordinate.

        z = mu + sqrt(2) sigma t_i,   w = prod_j w_ij / sqrt(pi)   (t, w: the Hermite rule)

    ``mu``, ``logvar`` [B, d] give z [B, order^d, d] and log_w [order^d] (weights sum to 1).
    """
    if order < 1:
        raise ConfigError(f"a Gauss-Hermite rule needs order >= 1, got {order}")
    import numpy as np

    t, w = np.polynomial.hermite.hermgauss(order)
    d = mu.shape[-1]
    t = torch.as_tensor(t, dtype=torch.float64, device=mu.device)
    log_w1 = torch.as_tensor(np.log(w) - 0.5 * math.log(math.pi), dtype=torch.float64,
                             device=mu.device)
    nodes = torch.cartesian_prod(*[t] * d).view(-1, d)
    log_w = torch.cartesian_prod(*[log_w1] * d).view(-1, d).sum(-1)
    sd = torch.exp(0.5 * logvar.double())
    z = mu.double().unsqueeze(-2) + math.sqrt(2.0) * sd.unsqueeze(-2) * nodes
    return z, log_w


def aliasing_error(sd: Tensor, spacing: Tensor | float) -> Tensor:
    """The relative error of the mean (T + M) / 2 of the two rules of a ``LatticeRule`` with
    node spacing h on a Gaussian peak of standard deviation sd_j along each axis (nats, per
    image [N]). The two rules together form a lattice whose shortest dual vectors have length
    4 pi / h (d = 1) or 2 sqrt(2) pi / h (d = 2, the four diagonals (+-1, +-1) 2 pi / h); the
    error is the peak's Fourier transform there (Poisson summation):

        d = 1:  2 exp(-8 pi^2 sd^2 / h^2)
        d = 2:  4 exp(-2 pi^2 (sd_1^2 + sd_2^2) / h^2)

    Of order one when the peak is narrower than the spacing: such a peak is not resolved, and
    T and M may agree by chance.
    """
    h = torch.as_tensor(spacing, dtype=sd.dtype, device=sd.device)
    h2 = (h.unsqueeze(-1) if h.dim() == 1 else h).pow(2)
    if sd.shape[-1] == 1:
        return 2 * torch.exp(-8 * math.pi**2 * sd.pow(2) / h2).sum(-1)
    return 4 * torch.exp(-2 * math.pi**2 * (sd.pow(2) / h2).sum(-1))


AGREEMENT = 4.0  # error <= 4 x the change from the rule of twice the spacing; see error()


class QuadratureSums:
    """Running sums of a lattice rule over chunks of nodes, for N images.

    Per image it keeps T, M (see ``LatticeRule``), the mass on the box's edge and the first two
    moments of the posterior on the nodes, p(z|x) ~ p(x|z) p(z), all relative to a running
    peak (streaming logsumexp in float64 across chunks). Within a chunk every sum is one matrix
    product of the weights exp(a - max a) [N, g] with a node-feature matrix [g, k] (rule
    masks, z, z z^T), in float32: four passes over the chunk, memory one chunk.
    """

    def __init__(self, n: int, d: int, device: torch.device | str = "cpu") -> None:
        self.d = d
        self.peak = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        self.sums = torch.zeros(n, 3 + d + d * (d + 1) // 2, dtype=torch.float64, device=device)

    @staticmethod
    def features(z: Tensor, midpoint: Tensor, edge: Tensor) -> Tensor:
        """[..., g, k]: trapezoid mask, midpoint mask, edge mask, z_i, then z_i z_j (i <= j)."""
        i, j = torch.triu_indices(z.shape[-1], z.shape[-1])
        masks = torch.stack([~midpoint, midpoint, edge], -1).to(z.dtype)
        masks = masks.expand(*z.shape[:-1], 3)
        return torch.cat([masks, z, z[..., i] * z[..., j]], -1)

    def add(
        self, ll: Tensor, log_w: Tensor, z: Tensor, midpoint: Tensor, edge: Tensor,
        rows: Tensor | None = None,
    ) -> None:
        """One chunk: ``ll`` [N, g] = log p(x|z_g); ``log_w`` [g] or [N, g]; ``z`` [g, d] or
        [N, g, d] (nodes shared by all images, or each image's own); ``midpoint``, ``edge``
        [g] masks of the rule each node belongs to. ``rows``: which images ``ll``'s rows are
        (default all)."""
        a = ll.float() + log_w.float()
        m = a.amax(1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(a - m[:, None])
        f = self.features(z.float(), midpoint, edge)
        chunk = (w @ f if f.dim() == 2 else torch.einsum("ng,ngk->nk", w, f)).double()
        m = m.double()
        if rows is None:
            rows = torch.arange(len(self.peak), device=self.peak.device)
        before = self.peak[rows]
        peak = torch.maximum(before, m)
        old = torch.exp(before - peak).nan_to_num(0.0)  # -inf - -inf: nothing summed yet
        self.sums[rows] = self.sums[rows] * old[:, None] + chunk * torch.exp(m - peak)[:, None]
        self.peak[rows] = peak

    def _log(self, col: int) -> Tensor:
        return self.peak + torch.log(self.sums[:, col])

    @property
    def log_t(self) -> Tensor:
        return self._log(0)

    @property
    def log_m(self) -> Tensor:
        return self._log(1)

    def log_px(self) -> Tensor:
        """log p(x) by (T + M) / 2, per image [N]."""
        return torch.logaddexp(self.log_t, self.log_m) - math.log(2.0)

    def error(self, spacing: Tensor | float, narrowest: Tensor | None = None,
              previous: Tensor | None = None) -> Tensor:
        """Estimated error of ``log_px`` in nats, per image: |log T - log M| / 2, plus what the
        box may cut off (``cut_off``), plus the aliasing error of a peak of the given
        ``narrowest`` sd per axis [N, d] (``aliasing_error``; default: the posterior's sd on
        the nodes), plus, given the ``previous`` estimate [N] of a coarser rule (twice the
        spacing), ``AGREEMENT`` times the change from it (no previous estimate: infinite).

        The first three terms describe a smooth integrand: the rules' leading errors have
        opposite signs, and a peak narrower than the spacing can slip between both rules'
        nodes, which only the aliasing term sees. A ReLU decoder's logits are piecewise linear
        in z, so p(x|z) has kinks a few hundredths apart: the rules then converge as h^2, not
        faster than any power, and T and M can agree by chance. The change between successive
        rules measures that h^2 term (about 3x the finer rule's error once it is resolved)."""
        spread = (self.log_t - self.log_m).abs() / 2
        _, cov = self.posterior_moments()
        sd = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        if narrowest is not None:
            sd = torch.minimum(sd, narrowest.to(sd))
        spread = torch.where(torch.isfinite(spread), spread, math.inf)
        out = spread + self.cut_off(spacing) + aliasing_error(sd, spacing)
        if previous is not None:
            change = (self.log_px() - previous.to(out)).abs()
            out = out + AGREEMENT * torch.where(torch.isfinite(change), change, math.inf)
        return out

    def cut_off(self, spacing: Tensor | float) -> Tensor:
        """The mass beyond the box, estimated per image [N] as the share of the mass on its
        edge nodes times (posterior sd) / ``spacing``: a tail that decays over one sd."""
        edge = (self.sums[:, 2] / self.sums[:, 0]).nan_to_num(0.0)
        _, cov = self.posterior_moments()
        sd = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(0).sqrt().amax(-1)
        spacing = torch.as_tensor(spacing, dtype=torch.float64, device=sd.device)
        return edge * torch.clamp(sd / spacing, min=1.0)

    def posterior_moments(self) -> tuple[Tensor, Tensor]:
        """Mean [N, d] and covariance [N, d, d] of p(z|x) on the nodes (both rules)."""
        d = self.d
        s0 = (self.sums[:, 0] + self.sums[:, 1]).clamp_min(1e-300)
        mean = self.sums[:, 3 : 3 + d] / s0[:, None]
        second = torch.zeros(len(s0), d, d, dtype=torch.float64, device=s0.device)
        i, j = torch.triu_indices(d, d)
        second[:, i, j] = self.sums[:, 3 + d :] / s0[:, None]
        second[:, j, i] = second[:, i, j]
        return mean, second - mean[:, :, None] * mean[:, None, :]

    def take(self, other: QuadratureSums, rows: slice | Tensor) -> None:
        """Copy ``other``'s sums into rows ``rows`` of this one."""
        self.peak[rows], self.sums[rows] = other.peak, other.sums


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

    # the checkpoint's state tag of both forms (``linear-step`` and ``linear-epoch``), as
    # checkpoints have always written it: not a schedule's name (``BETA_SCHEDULES``)
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


BETA_SCHEDULES = ("linear-step", "linear-epoch", "constant", "cyclical")
# old name -> its name now (issue 19): still accepted, with a deprecation notice
BETA_SCHEDULE_ALIASES = {"linear": "linear-step"}


def renamed_notice(what: str, old: str, new: str) -> str:
    """The one line that says an old name is deprecated, e.g. "preset 'seed' is now called
    'study'; 'seed' will be removed"."""
    return f"{what} '{old}' is now called '{new}'; '{old}' will be removed"


def _vaelab_file(name: str) -> str:
    return str(Path(__file__).with_name(name))


# frames that only pass a caller's name on: a deprecation warning names the frame above them
_PASSING_ON = {_vaelab_file(n) for n in ("objectives.py", "config.py", "sweep.py", "table.py")}
_PASSING_ON |= {dataclasses.__file__, "<string>"}  # TrainConfig's generated __init__, replace


def warn_renamed(what: str, old: str, new: str) -> None:
    """A ``DeprecationWarning`` (``renamed_notice``) for the first caller outside vaelab's
    config, objectives, sweep and table code and the dataclass machinery."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename in _PASSING_ON:
        frame, level = frame.f_back, level + 1
    warnings.warn(renamed_notice(what, old, new), DeprecationWarning, stacklevel=level)


def canonical_beta_schedule(name: Any, *, warn: bool = True) -> Any:
    """``name``, or the name an old one is now (``BETA_SCHEDULE_ALIASES``), with a
    ``DeprecationWarning`` when ``warn``. Anything else is returned as it is."""
    if isinstance(name, str) and name in BETA_SCHEDULE_ALIASES:
        new = BETA_SCHEDULE_ALIASES[name]
        if warn:
            warn_renamed("beta schedule", name, new)
        return new
    return name


def make_beta_schedule(
    name: str, *, steps_per_epoch: int, warmup_epochs: float = 10.0, beta: float = 1.0,
    cycles: int = 4, total_epochs: int = 30,
) -> BetaSchedule:
    """Build a schedule by name: ``linear-step`` (per step), ``linear-epoch`` (the study's
    per-epoch steps), ``constant`` (beta-VAE) or ``cyclical`` (``cycles`` cycles over the run).
    ``linear``, the old name of ``linear-step``, builds it too, with a DeprecationWarning."""
    name = canonical_beta_schedule(name)
    if name == "linear-step":
        return LinearWarmup(round(warmup_epochs * steps_per_epoch), steps_per_epoch, True, beta)
    if name == "linear-epoch":
        return LinearWarmup(round(warmup_epochs * steps_per_epoch), steps_per_epoch, False, beta)
    if name == "constant":
        return ConstantBeta(beta)
    if name == "cyclical":
        total = max(1, total_epochs * steps_per_epoch)
        return CyclicalBeta(max(1, total // max(1, cycles)), 0.5, beta)
    raise ConfigError(f"unknown beta schedule '{name}': choose one of {', '.join(BETA_SCHEDULES)}")


# --------------------------------------------------------------------------------------------
# The importance-weighted bound as a training objective (Burda, Grosse & Salakhutdinov 2016)
# --------------------------------------------------------------------------------------------
OBJECTIVES = ("elbo", "iwae")


def iwae_log_weights(
    x: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, logits: Tensor,
    likelihood: str = "bernoulli", beta: float | Tensor = 1.0,
) -> Tensor:
    """log w_k of K samples per image, [K, B] (nats), for ``z`` [K, B, D] drawn from
    q = N(mu, sigma^2) (``mu``, ``logvar`` [B, D]) and their ``logits`` [K, B, ...]:

        log w_k = log p(x|z_k) + beta [log p(z_k) - log q(z_k|x)]

    beta = 1 gives the importance weights p(x, z_k) / q(z_k|x). beta < 1 is the KL warm-up's
    weight carried over: for K = 1 the expectation of log w is the beta-ELBO,
    E_q[log p(x|z)] - beta KL(q || p); for beta != 1 no bound on log p(x).
    """
    k, b = z.shape[:2]
    xs = x.unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
    ll = log_likelihood(logits.reshape(k * b, *logits.shape[2:]), xs, likelihood).view(k, b)
    return ll + beta * (log_standard_normal(z) - log_normal(z, mu, logvar))


def iwae_bound(log_w: Tensor) -> Tensor:
    """The K-sample bound L_K per image, [B] (nats), from log weights [K, B]:

        L_K(x) = log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x)

    by logsumexp. E[L_1] = ELBO <= E[L_K] <= E[L_{K+1}] <= log p(x).
    """
    return iw_log_mean_exp(log_w, dim=0)


def iwae_loss(log_w: Tensor) -> Tensor:
    """The minimised IWAE objective, -L_K averaged over the batch (nats per image)."""
    return -iwae_bound(log_w).mean()
