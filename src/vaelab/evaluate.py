"""Test-set metrics of a trained model: the ELBO's terms, per-dimension KL and more.

Every number is averaged over images and given in nats per image (summed over pixels and
latent dimensions). The ELBO is always evaluated at beta = 1, so it is a true bound.
"""

from __future__ import annotations

from typing import Any

import torch

from vaelab.data import Split
from vaelab.models import ConvVAE
from vaelab.objectives import elbo_terms


def _labels(model: ConvVAE, y: torch.Tensor) -> torch.Tensor | None:
    return y if model.conditional else None


@torch.inference_mode()
def evaluate_elbo(
    model: ConvVAE,
    split: Split,
    *,
    likelihood: str = "bernoulli",
    batch_size: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """-ELBO = recon + KL over a whole split, one z ~ q(z|x) per image from a seeded generator.

    Returns ``recon``, ``kl``, ``neg_elbo`` (means, nats per image), ``kl_per_dim`` (list) and
    ``n`` (images). The model is put in eval mode and left there.
    """
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    images = split.images.to(device)
    labels = split.labels.to(device)
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    kl_dim = torch.zeros(model.latent_dim, device=device, dtype=torch.float64)
    n = images.shape[0]
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size].unsqueeze(1).float().div_(255)
        y = labels[i : i + batch_size]
        out = model(x, _labels(model, y), generator=gen)
        t = elbo_terms(x, out.mu, out.logvar, out.logits.float(), likelihood)
        sums += torch.stack([t.recon.sum(), t.kl.sum(), t.neg_elbo.sum()]).double()
        kl_dim += t.kl_per_dim.sum(0).double()
    sums = (sums / max(n, 1)).tolist()
    return {
        "recon": sums[0], "kl": sums[1], "neg_elbo": sums[2],
        "kl_per_dim": (kl_dim / max(n, 1)).tolist(), "n": n,
    }
