"""Test-set metrics of a trained model: the ELBO's terms, per-dimension KL and more.

Every number is averaged over images and given in nats per image (summed over pixels and
latent dimensions). The ELBO is always evaluated at beta = 1, so it is a true bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vaelab.data import Dataset, Split, load_dataset
from vaelab.errors import ConfigError
from vaelab.models import ConvVAE
from vaelab.objectives import (
    elbo_terms,
    importance_sampled_log_px,
)

if TYPE_CHECKING:
    from vaelab.checkpoint import Run


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


# --------------------------------------------------------------------------------------------
# Beyond the ELBO: log p(x), active units, latent geometry, CVAE samples judged by a classifier
# --------------------------------------------------------------------------------------------
def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _batches(
    split: Split, batch_size: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """The split in order, as float images [B, 1, H, W] in [0, 1] and int64 labels [B]."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    for i in range(0, len(split), batch_size):
        x = split.images[i : i + batch_size].to(device).unsqueeze(1).float().div_(255)
        yield x, split.labels[i : i + batch_size].to(device, torch.int64)


@torch.inference_mode()
def encode_split(
    model: ConvVAE, split: Split, *, batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """The posterior q(z|x[, c]) of every image of a split: ``(mu, logvar)``, each [N, D] float32.

    A CVAE is given each image's true label.
    """
    model.eval()
    device = _device_of(model, device)
    mus, logvars = [], []
    for x, y in _batches(split, batch_size, device):
        mu, logvar = model.encode(x, _labels(model, y))
        mus.append(mu.float())
        logvars.append(logvar.float())
    d = model.latent_dim
    if not mus:
        return torch.zeros(0, d, device=device), torch.zeros(0, d, device=device)
    return torch.cat(mus), torch.cat(logvars)


@torch.inference_mode()
def log_px_estimate(
    model: ConvVAE,
    split: Split,
    *,
    num_samples: int = 1000,
    chunk: int = 50,
    likelihood: str = "bernoulli",
    batch_size: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Importance-sampled log p(x) (Burda et al. 2015), averaged over the split's images.

        log p(x) ~= log (1/K) sum_k p(x|z_k) p(z) / q(z_k|x),   z_k ~ q(z|x),  K = num_samples

    ``batch_size`` images at a time, their K samples ``chunk`` at a time (the decoder sees
    ``batch_size * chunk`` latents per call). The same K samples also estimate the ELBO,
    (1/K) sum_k log w_k, so ``gap`` = log p(x) - ELBO = log mean w - mean log w >= 0 for every
    image (Jensen): the estimate is never below the ELBO, and the gap is what the bound loses.

    Returns means in nats per image: ``log_px``, ``neg_log_px``, ``elbo``, ``neg_elbo``, ``gap``,
    the standard error of log p(x) over images (``log_px_sem``), ``num_samples`` and ``n``.
    """
    if num_samples < 1:
        raise ConfigError(f"the number of importance samples must be >= 1, got {num_samples}")
    model.eval()
    device = _device_of(model, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    log_px_all, elbo_all = [], []
    bar = _progress_bar(progress, "log p(x)", len(split))
    with bar:
        task = bar.add_task("log p(x)", total=len(split)) if progress else None
        for x, y in _batches(split, batch_size, device):
            b = x.shape[0]
            labels = _labels(model, y)
            mu, logvar = model.encode(x, labels)
            mu, logvar = mu.float(), logvar.float()
            # k samples of all b images at a time: z is [k * b, D], sample-major
            log_px, elbo = importance_sampled_log_px(
                x, mu, logvar,
                lambda z, labels=labels, b=b: model.decode(
                    z, None if labels is None else labels.repeat(z.shape[0] // b)),
                num_samples=num_samples, chunk=chunk, likelihood=likelihood, generator=gen,
                return_elbo=True,
            )
            log_px_all.append(log_px.double())
            elbo_all.append(elbo)
            if task is not None:
                bar.advance(task, b)
    n = len(split)
    if n == 0:
        raise ConfigError("cannot estimate log p(x) on an empty split")
    lp, el = torch.cat(log_px_all), torch.cat(elbo_all)
    sem = float(lp.std() / math.sqrt(n)) if n > 1 else 0.0
    return {
        "log_px": float(lp.mean()), "neg_log_px": -float(lp.mean()), "log_px_sem": sem,
        "elbo": float(el.mean()), "neg_elbo": -float(el.mean()),
        "gap": float((lp - el).mean()), "num_samples": num_samples, "n": n,
    }


def _progress_bar(enabled: bool, label: str, total: int) -> Any:
    from contextlib import nullcontext

    if not enabled:
        return nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                    transient=True)


def active_units_from(mu: Tensor, threshold: float = 0.01) -> dict[str, Any]:
    """Active units from posterior means [N, D] (see ``active_units``)."""
    var = mu.double().var(0, unbiased=False) if mu.shape[0] else torch.zeros(mu.shape[1])
    mask = var > threshold
    return {"variances": var.tolist(), "active": mask.tolist(), "count": int(mask.sum()),
            "latent_dim": int(mu.shape[1]), "threshold": threshold}


def active_units(
    model: ConvVAE, split: Split, threshold: float = 0.01, *, batch_size: int = 1000
) -> dict[str, Any]:
    """Active latent units (Burda et al. 2015): A_j = Cov_x(E_q(z|x)[z_j]) = Var_x(mu_j).

    Unit j is active when A_j > ``threshold`` (0.01): a unit whose posterior mean does not move
    with x carries no information (its posterior has collapsed to the prior). Returns the
    per-dimension ``variances``, the ``active`` mask, their ``count`` and ``latent_dim``.
    """
    mu, _ = encode_split(model, split, batch_size=batch_size)
    return active_units_from(mu, threshold)


def knn_from(
    train_z: Tensor, train_y: Tensor, test_z: Tensor, test_y: Tensor, k: int = 5,
    chunk: int = 500, num_classes: int = 10,
) -> dict[str, Any]:
    """k-nearest-neighbour digit accuracy of latent codes (see ``knn_accuracy``)."""
    if k < 1 or k > train_z.shape[0]:
        raise ConfigError(f"k must be between 1 and the {train_z.shape[0]} training codes, got {k}")
    train_y = train_y.to(train_z.device)
    # one vote per neighbour, plus 2^-(rank+1) (less than 1 in total): among classes with as
    # many votes, the one holding the nearest neighbour wins
    ranks = torch.arange(k, device=train_z.device, dtype=torch.float64)
    weights = 1.0 + torch.pow(0.5, ranks + 1)
    preds = []
    for i in range(0, test_z.shape[0], chunk):
        d = torch.cdist(test_z[i : i + chunk].double(), train_z.double())
        idx = d.topk(k, dim=1, largest=False).indices  # sorted, nearest first
        votes = torch.zeros(idx.shape[0], num_classes, device=train_z.device, dtype=torch.float64)
        votes.scatter_add_(1, train_y[idx], weights.expand(idx.shape[0], k))
        preds.append(votes.argmax(1))
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
    test_y = test_y.to(pred.device)
    correct = (pred == test_y).double()
    per_class = []
    for c in range(num_classes):
        m = test_y == c
        per_class.append(float(correct[m].mean()) if m.any() else None)
    return {"accuracy": float(correct.mean()) if len(correct) else 0.0, "k": k,
            "per_class": per_class, "n_train": int(train_z.shape[0]), "n_test": int(len(pred))}


def knn_accuracy(
    model: ConvVAE, train_split: Split, test_split: Split, k: int = 5, *,
    batch_size: int = 1000, chunk: int = 500,
) -> dict[str, Any]:
    """How well the latent space separates digits: each test image's posterior mean gets the
    majority label of its ``k`` nearest training posterior means (Euclidean; a tie goes to the
    tied class holding the nearest neighbour). Distances are computed ``chunk`` test codes at a
    time.

    Returns ``accuracy``, ``per_class`` accuracy, ``k``, ``n_train`` and ``n_test``.
    """
    train_z, _ = encode_split(model, train_split, batch_size=batch_size)
    test_z, _ = encode_split(model, test_split, batch_size=batch_size)
    return knn_from(train_z, train_split.labels, test_z, test_split.labels, k, chunk,
                    _num_classes(model))


def _num_classes(model: nn.Module) -> int:
    spec = getattr(model, "spec", None)
    return int(getattr(spec, "num_classes", 10))


def _gaussian_kl_to_prior(mean: Tensor, cov: Tensor) -> float | None:
    """KL(N(m, S) || N(0, I)) = 1/2 (tr S + m^T m - D - log det S); None if S is singular."""
    d = mean.shape[0]
    sign, logdet = torch.linalg.slogdet(cov)
    if sign <= 0 or not torch.isfinite(logdet):
        return None
    return float(0.5 * (torch.trace(cov) + mean @ mean - d - logdet))


def aggregate_posterior_from(mu: Tensor, logvar: Tensor) -> dict[str, Any]:
    """Moments of the posterior means and of q(z) (see ``aggregate_posterior``)."""
    mu, var = mu.double(), logvar.double().exp()
    n, d = mu.shape
    if n == 0:
        raise ConfigError("cannot describe the aggregate posterior of an empty split")
    mean = mu.mean(0)
    centred = mu - mean
    cov_mu = centred.T @ centred / n
    cov_q = cov_mu + torch.diag(var.mean(0))
    return {
        "posterior_means": {"mean": mean.tolist(), "cov": cov_mu.tolist()},
        "aggregate": {"mean": mean.tolist(), "cov": cov_q.tolist(),
                      "kl_to_prior": _gaussian_kl_to_prior(mean, cov_q)},
        "prior": {"mean": [0.0] * d, "cov": torch.eye(d, dtype=torch.float64).tolist()},
        "mean_posterior_variance": var.mean(0).tolist(),
        "n": n,
    }


def aggregate_posterior(
    model: ConvVAE, split: Split, *, batch_size: int = 1000
) -> dict[str, Any]:
    """How well the codes fill the prior.

    The aggregate posterior q(z) = (1/N) sum_n q(z|x_n) is a mixture of Gaussians; its moments
    are mean = E[mu] and cov = Cov(mu) + E[diag sigma^2] (total variance: the spread of the
    means plus the average posterior width). For a perfect fit q(z) = p(z) = N(0, I).
    Returns ``posterior_means`` (mean, cov of mu), ``aggregate`` (mean, cov and the KL of the
    moment-matched Gaussian N(mean, cov) to the prior), ``prior`` and ``mean_posterior_variance``.
    """
    mu, logvar = encode_split(model, split, batch_size=batch_size)
    return aggregate_posterior_from(mu, logvar)


def closest_pairs_from(
    mu: Tensor, labels: Tensor, top: int = 3, num_classes: int = 10
) -> dict[str, Any]:
    """The closest digit pairs from posterior means and labels (see ``closest_digit_pairs``)."""
    labels = labels.to(mu.device)
    classes = [c for c in range(num_classes) if bool((labels == c).any())]
    if len(classes) < 2:
        raise ConfigError("closest digit pairs need at least two classes in the split")
    cent = torch.stack([mu[labels == c].double().mean(0) for c in classes])
    dist = torch.cdist(cent, cent)
    pairs = [
        {"a": a, "b": b, "distance": float(dist[i, j])}
        for i, a in enumerate(classes) for j, b in enumerate(classes) if i < j
    ]
    pairs.sort(key=lambda p: p["distance"])
    return {
        "classes": classes, "centroids": cent.tolist(), "distances": dist.tolist(),
        "pairs": pairs[:top],
    }


def closest_digit_pairs(
    model: ConvVAE, split: Split, top: int = 3, *, batch_size: int = 1000
) -> dict[str, Any]:
    """The ``top`` pairs of digits whose class centroids (mean of the posterior means of the
    class's images) lie closest in latent space: the digits the model finds most alike.

    Returns ``classes``, ``centroids`` [C, D], the ``distances`` matrix [C, C] and ``pairs``
    (closest first: ``{"a", "b", "distance"}`` with a < b).
    """
    mu, _ = encode_split(model, split, batch_size=batch_size)
    return closest_pairs_from(mu, split.labels, top, _num_classes(model))


@torch.inference_mode()
def cvae_class_accuracy(
    model: ConvVAE,
    classifier: nn.Module,
    *,
    per_class: int = 1000,
    seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Does the CVAE draw the digit it is asked for? For each class c, ``per_class`` samples
    z ~ N(0, I) are decoded under c, the Bernoulli means sigmoid(logits) taken as the images,
    and ``classifier`` (logits [B, C] from images [B, 1, H, W] in [0, 1]) labels them.

    Returns the overall ``accuracy``, ``per_class`` accuracies, the ``confusion`` counts
    (row: class asked for, column: class predicted) and ``per_class_n``.
    """
    if not getattr(model, "conditional", False):
        raise ConfigError("class accuracy of samples needs a CVAE (a model conditioned on c)")
    if per_class < 1:
        raise ConfigError(f"samples per class must be >= 1, got {per_class}")
    model.eval()
    classifier.eval()
    device = _device_of(model, device)
    cdev = next(classifier.parameters()).device
    num_classes = _num_classes(model)
    gen = torch.Generator().manual_seed(seed)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for c in range(num_classes):
        for i in range(0, per_class, batch_size):
            b = min(batch_size, per_class - i)
            z = torch.randn(b, model.latent_dim, generator=gen).to(device)
            y = torch.full((b,), c, dtype=torch.int64, device=device)
            images = torch.sigmoid(model.decode(z, y).float())
            pred = classifier(images.to(cdev)).argmax(1).cpu()
            confusion[c] += torch.bincount(pred, minlength=num_classes)[:num_classes]
    hits = confusion.diagonal().double()
    return {
        "accuracy": float(hits.sum() / confusion.sum()),
        "per_class": (hits / per_class).tolist(),
        "confusion": confusion.tolist(),
        "per_class_n": per_class,
    }


def dataset_for_run(run: Run) -> Dataset:
    """The data set a run was trained on, split as in training (its config's val_size, limit)."""
    cfg = run.config["config"]
    return load_dataset(cfg["dataset"], val_size=cfg["val_size"], limit=cfg.get("limit"))


def full_evaluation(
    run: Run,
    dataset: Dataset | None = None,
    *,
    num_samples: int = 1000,
    classifier: nn.Module | None = None,
    seed: int = 0,
    k: int = 5,
    per_class: int = 1000,
    progress: bool = False,
    logpx_images: int | None = None,
) -> dict[str, Any]:
    """Every test-set number of one run, as a JSON-ready dict.

    ``logpx_images`` limits the importance-sampled log p(x) to the first N test images (it
    costs ``num_samples`` decoder passes per image); None or 0: the whole test set.

    ``elbo`` (recon, KL, -ELBO, one z per image), ``log_px`` (importance sampled with
    ``num_samples`` draws per image; None if 0), ``active_units``, ``knn`` (test codes against
    the training codes), ``aggregate_posterior``, ``closest_pairs`` and, for a CVAE given a
    ``classifier``, ``cvae_class_accuracy``. ``dataset`` defaults to the run's own.
    """
    cfg = run.config["config"]
    dataset = dataset if dataset is not None else dataset_for_run(run)
    model = run.model.eval()
    likelihood = cfg.get("likelihood", "bernoulli")
    out: dict[str, Any] = {"model": model.spec.kind, "run": str(run.path), "seed": cfg.get("seed")}
    out["elbo"] = evaluate_elbo(model, dataset.test, likelihood=likelihood, seed=seed)
    logpx_split = dataset.test.subset(logpx_images) if logpx_images else dataset.test
    out["log_px"] = log_px_estimate(
        model, logpx_split, num_samples=num_samples, likelihood=likelihood, seed=seed,
        progress=progress,
    ) if num_samples > 0 else None
    test_mu, test_lv = encode_split(model, dataset.test)
    train_mu, _ = encode_split(model, dataset.train)
    nc = _num_classes(model)
    out["active_units"] = active_units_from(test_mu)
    out["knn"] = knn_from(train_mu, dataset.train.labels, test_mu, dataset.test.labels,
                          min(k, max(1, len(dataset.train))), num_classes=nc)
    out["aggregate_posterior"] = aggregate_posterior_from(test_mu, test_lv)
    out["closest_pairs"] = closest_pairs_from(test_mu, dataset.test.labels, 3, nc)
    out["cvae_class_accuracy"] = (
        cvae_class_accuracy(model, classifier, per_class=per_class, seed=seed)
        if classifier is not None and model.conditional else None
    )
    return out
