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
