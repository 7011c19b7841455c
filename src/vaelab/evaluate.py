"""Test-set metrics of a trained model: the ELBO's terms, per-dimension KL and more.

Every number is averaged over images and given in nats per image (summed over pixels and
latent dimensions). The ELBO is always evaluated at beta = 1, so it is a true bound.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vaelab.backends import fp32_on_model_device
from vaelab.config import check_seed
from vaelab.data import Dataset, Split, dataset_for_config
from vaelab.errors import ConfigError
from vaelab.io import atomic_write_bytes
from vaelab.models import ConvVAE
from vaelab.objectives import (
    QuadratureSums,
    elbo_terms,
    framed_rule,
    gauss_hermite_rule,
    importance_sampled_log_px,
    in_tiles,
    kl_normal_std,
    lattice_nodes,
    lattice_rule,
    log_likelihood_matrix,
    log_standard_normal,
)

if TYPE_CHECKING:
    from vaelab.checkpoint import Run


def _labels(model: ConvVAE, y: torch.Tensor) -> torch.Tensor | None:
    return y if model.conditional else None


def _device_of(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``, or where ``model``'s parameters are when it is None."""
    return torch.device(device) if device is not None else next(model.parameters()).device


def _pixels(images: Tensor, device: torch.device) -> Tensor:
    """uint8 images on ``device`` as float32 in [0, 1] (same shape)."""
    return images.to(device).float().div_(255)


def _batches(
    split: Split, batch_size: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """The split in order, as float images [B, 1, H, W] in [0, 1] and int64 labels [B]."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    for i in range(0, len(split), batch_size):
        x = _pixels(split.images[i : i + batch_size], device).unsqueeze(1)
        yield x, split.labels[i : i + batch_size].to(device, torch.int64)


def _slices(n: int, device: torch.device, chunk: int | None = None) -> list[slice]:
    """``n`` rows in slices of ``decode_batch(device, chunk)`` (``chunk`` None: ``n``; on a
    CPU at most ``CPU_DECODE_BATCH``, where a pass at 1,000 images runs about 1.5x slower per
    image; elsewhere ``chunk``)."""
    step = max(1, decode_batch(device, n if chunk is None else chunk))
    return [slice(i, i + step) for i in range(0, n, step)]


@torch.inference_mode()
@fp32_on_model_device
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
    device = _device_of(model, device)
    gen = torch.Generator(device=device).manual_seed(check_seed(seed))
    sums = torch.zeros(3, device=device, dtype=torch.float64)
    kl_dim = torch.zeros(model.latent_dim, device=device, dtype=torch.float64)
    n = len(split)
    for x, y in _batches(split, batch_size, device):
        # the batch's noise as the model draws it from ``gen``, then the batch in the slices a
        # CPU runs fastest (``decode_batch``): the same numbers as one pass of the batch
        eps = torch.randn((x.shape[0], model.latent_dim), generator=gen, device=device)
        labels = _labels(model, y)
        for s in _slices(x.shape[0], device):
            out = model(x[s], None if labels is None else labels[s], eps=eps[s])
            t = elbo_terms(x[s], out.mu, out.logvar, out.logits.float(), likelihood)
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
@torch.inference_mode()
@fp32_on_model_device
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
        labels = _labels(model, y)
        for s in _slices(x.shape[0], device):
            mu, logvar = model.encode(x[s], None if labels is None else labels[s])
            mus.append(mu.float())
            logvars.append(logvar.float())
    d = model.latent_dim
    if not mus:
        return torch.zeros(0, d, device=device), torch.zeros(0, d, device=device)
    return torch.cat(mus), torch.cat(logvars)


@torch.inference_mode()
@fp32_on_model_device
def log_px_per_image(
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
    proposal: str = "q",
) -> tuple[Tensor, Tensor | None]:
    """Importance-sampled log p(x) of every image of a split (``log_px_estimate`` has the
    equation and the options): ``(log_px, elbo)``, each [N] float64 on the CPU, ``elbo`` the
    same samples' ELBO (None for another ``proposal`` than q)."""
    if num_samples < 1:
        raise ConfigError(f"the number of importance samples must be >= 1, got {num_samples}")
    model.eval()
    device = _device_of(model, device)
    gen = torch.Generator(device=device).manual_seed(check_seed(seed))
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
            est = importance_sampled_log_px(
                x, mu, logvar,
                lambda z, labels=labels, b=b: decode_sliced(
                    model, z, None if labels is None else labels.repeat(z.shape[0] // b),
                    len(z)),
                num_samples=num_samples, chunk=chunk, likelihood=likelihood, generator=gen,
                return_elbo=proposal == "q", proposal=proposal,
            )
            log_px, elbo = est if proposal == "q" else (est, None)
            log_px_all.append(log_px.double().cpu())
            elbo_all.append(None if elbo is None else elbo.double().cpu())
            if task is not None:
                bar.advance(task, b)
    if len(split) == 0:
        raise ConfigError("cannot estimate log p(x) on an empty split")
    lp = torch.cat(log_px_all)
    return lp, (torch.cat(elbo_all) if proposal == "q" else None)


@fp32_on_model_device
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
    proposal: str = "q",
) -> dict[str, Any]:
    """Importance-sampled log p(x) (Burda et al. 2015), averaged over the split's images.

        log p(x) ~= log (1/K) sum_k p(x|z_k) p(z) / q(z_k|x),   z_k ~ q(z|x),  K = num_samples

    ``batch_size`` images at a time, their K samples ``chunk`` at a time (the decoder sees
    ``batch_size * chunk`` latents per call). The same K samples also estimate the ELBO,
    (1/K) sum_k log w_k, so ``gap`` = log p(x) - ELBO = log mean w - mean log w >= 0 for every
    image (Jensen): the estimate is never below the ELBO, and the gap is what the bound loses.

    Returns means in nats per image: ``log_px``, ``neg_log_px``, the ELBO of the same images
    and samples (``elbo_same_images``, ``neg_elbo_same_images``), ``gap``, the standard error
    of log p(x) over images (``log_px_sem``), ``num_samples``, ``proposal`` and ``n`` (images).
    With another ``proposal`` than q (``objectives.sample_proposal``) there is no ELBO from the
    same samples: the ELBO keys and ``gap`` are None. ``log_px_per_image`` gives the per-image
    values.
    """
    lp, el = log_px_per_image(model, split, num_samples=num_samples, chunk=chunk,
                              likelihood=likelihood, batch_size=batch_size, seed=seed,
                              device=device, progress=progress, proposal=proposal)
    n = len(split)
    sem = float(lp.std() / math.sqrt(n)) if n > 1 else 0.0
    out = {"log_px": float(lp.mean()), "neg_log_px": -float(lp.mean()), "log_px_sem": sem,
           "elbo_same_images": None, "neg_elbo_same_images": None, "gap": None,
           "num_samples": num_samples, "proposal": proposal, "n": n}
    if el is not None:
        out.update(elbo_same_images=float(el.mean()), neg_elbo_same_images=-float(el.mean()),
                   gap=float((lp - el).mean()))
    return out


# --------------------------------------------------------------------------------------------
# Result keys: which estimator, on which images
# --------------------------------------------------------------------------------------------
# An evaluation's estimates (``full_evaluation``), each a dict with ``n``, the number of
# images it covers, and ``images``, which ones (``first_test_images``): ``elbo`` (one z per
# image) and ``exact_log_px`` on the whole test split, the importance-sampled ``log_px`` and
# ``log_px_student_t`` on its first ``n`` images (``logpx_images``)
ESTIMATES = ("elbo", "exact_log_px", "log_px", "log_px_student_t")
IMPORTANCE_SAMPLED = ("log_px", "log_px_student_t")
# in an importance-sampled estimate, the numbers of the same images by another estimator:
# {key: its old name}. Files written before held them under the old names only (``neg_elbo``
# beside the whole split's ``elbo.neg_elbo``); ``normalise_evaluation`` reads those.
SAME_IMAGES_KEYS = {"elbo_same_images": "elbo", "neg_elbo_same_images": "neg_elbo",
                    "exact_log_px_same_images": "exact_log_px"}


def first_test_images(n: int) -> str:
    """``images`` of an estimate on ``n`` images: ``"test[:n]"``, the first ``n`` of the test
    split (an evaluation's image sets are all such prefixes, the whole split included)."""
    return f"test[:{n}]"


def normalise_evaluation(ev: dict[str, Any]) -> dict[str, Any]:
    """An evaluation (``full_evaluation``'s dict, as written now or by an earlier vaelab, or
    ``vaelab evaluate --json``'s), with the present keys: in each importance-sampled estimate
    the ``SAME_IMAGES_KEYS`` (from their old names where a file has only those), and in each
    estimate ``images`` (from its ``n``). A copy; ``ev`` is left as it is. Every reader of a
    saved evaluation goes through this, so old files still read."""
    out = dict(ev)
    for key in ESTIMATES:
        est = out.get(key)
        if not isinstance(est, dict):
            continue
        est = dict(est)
        if key in IMPORTANCE_SAMPLED:
            for new, old in SAME_IMAGES_KEYS.items():
                if new not in est and old in est:
                    est[new] = est[old]
        if "images" not in est and isinstance(est.get("n"), int):
            est["images"] = first_test_images(est["n"])
        out[key] = est
    return out


# --------------------------------------------------------------------------------------------
# Exact log p(x) for a latent of size 1 or 2 (see objectives.LatticeRule)
# --------------------------------------------------------------------------------------------
EXACT_MAX_LATENT = 2
EXACT_BOX_LIMIT = 10.0  # |z_j| beyond 10 has prior density below e^-50: never in the box
DEFAULT_TOLERANCE = 0.1  # nats, for every image
# The quadrature's version, in every cache key of its values (a table's, a report's): bumped
# whenever the rules change what they compute, so that values of older rules are computed again.
# 2: rules in each posterior's own frame (``_framed_rules``); 3: a framed value below the shared
# rules' by more than both errors is not taken (a mode outside the frame).
EXACT_RULES = 3


@dataclass
class ExactLogPx:
    """Per-image results of ``exact_log_px_per_image`` (tensors [N], float64, CPU)."""

    log_px: Tensor
    error: Tensor  # estimated error of log_px, nats
    refined: Tensor  # bool: the image needed a rule of its own
    posterior_mean: Tensor  # [N, d] of p(z|x)
    posterior_cov: Tensor  # [N, d, d]
    tolerance: float
    nodes: int  # decoder evaluations

    def summary(self) -> dict[str, Any]:
        """Means over images (nats per image), JSON-ready."""
        n = int(self.log_px.numel())
        if n == 0:
            raise ConfigError("cannot compute log p(x) on an empty split")
        lp = self.log_px
        return {
            "method": "quadrature", "log_px": float(lp.mean()), "neg_log_px": -float(lp.mean()),
            "log_px_sem": float(lp.std() / math.sqrt(n)) if n > 1 else 0.0,
            "error_estimate": float(self.error.mean()), "error_max": float(self.error.max()),
            "tolerance": self.tolerance,
            "over_tolerance": int((self.error > self.tolerance).sum()),
            "refined": int(self.refined.sum()), "nodes": self.nodes, "n": n,
        }

    def subset(self, n: int) -> ExactLogPx:
        """The first ``n`` images' values (``nodes`` stays the whole computation's)."""
        return ExactLogPx(self.log_px[:n], self.error[:n], self.refined[:n],
                          self.posterior_mean[:n], self.posterior_cov[:n], self.tolerance,
                          self.nodes)

    _TENSORS = ("log_px", "error", "refined", "posterior_mean", "posterior_cov")

    def save(self, path: str | os.PathLike, key: dict[str, Any]) -> None:
        """Write the per-image values to ``path`` (safetensors, atomically), with ``key`` (any
        JSON) saying whose they are, for ``load``."""
        from safetensors.torch import save

        tensors = {k: getattr(self, k).detach().cpu().contiguous() for k in self._TENSORS}
        meta = {"key": json.dumps(key, sort_keys=True), "tolerance": repr(self.tolerance),
                "nodes": str(self.nodes)}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, key: dict[str, Any]) -> ExactLogPx | None:
        """The values ``save`` wrote to ``path`` under the same ``key``; None when the file is
        absent, unreadable, inconsistent or another key's (the caller computes them again)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != json.dumps(key, sort_keys=True):
                    return None
                t = {k: f.get_tensor(k) for k in cls._TENSORS}
            n = t["log_px"].shape[0]
            if t["log_px"].dim() != 1 or any(t[k].shape[:1] != (n,) for k in cls._TENSORS):
                return None
            return cls(**t, tolerance=float(meta["tolerance"]), nodes=int(meta["nodes"]))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError):
            return None


def _check_exact_latent(model: nn.Module) -> int:
    d = int(model.latent_dim)
    if d > EXACT_MAX_LATENT:
        raise ConfigError(
            f"exact log p(x) by quadrature needs a latent size of 1 or 2, this model has {d}: "
            "use the importance-sampled estimate (--samples K)")
    return d


def auto_spacing(mu: Tensor, logvar: Tensor, nodes: int) -> float:
    """The shared rule's node spacing: the box that holds every q(z|x) to 8 sigma, cut into
    enough intervals per axis that both rules together have about ``nodes`` nodes."""
    lo, hi = _shared_box(mu, logvar)
    per_axis = max(2.0, (nodes / 2) ** (1 / mu.shape[1]))
    return (hi - lo) / per_axis


PRIOR_BOX = 6.0  # the prior N(0, 1) has mass 2e-9 beyond 6 on each axis


def _shared_box(mu: Tensor, logvar: Tensor) -> tuple[float, float]:
    """The prior's [-6, 6] on every axis, wider where some q(z|x) reaches out of it (to 8 sigma,
    at most to +-10)."""
    sd = torch.exp(0.5 * logvar.double())
    lo = float((mu.double() - 8 * sd).amin().clamp(min=-EXACT_BOX_LIMIT, max=-PRIOR_BOX))
    hi = float((mu.double() + 8 * sd).amax().clamp(min=PRIOR_BOX, max=EXACT_BOX_LIMIT))
    return lo, hi


# On a CPU the decoder runs fastest on a few hundred latents at a time, its feature maps then
# fitting in a core's cache: ``benchmarks/decode_batch.py`` measures it (decodes per second by
# batch size, ``benchmarks/decode-batch-cpu.json``). Elsewhere the caller's chunk is kept.
CPU_DECODE_BATCH = 256


def decode_batch(device: torch.device, chunk: int) -> int:
    """Latents per decoder call: ``chunk``, or at most ``CPU_DECODE_BATCH`` on a CPU."""
    return min(chunk, CPU_DECODE_BATCH) if device.type == "cpu" else chunk


def decode_sliced(model: nn.Module, z: Tensor, labels: Tensor | None, chunk: int) -> Tensor:
    """``model.decode(z, labels)`` in slices of ``decode_batch(z.device, chunk)`` latents:
    the same logits, computed in the batch size the device runs fastest."""
    slices = _slices(z.shape[0], z.device, chunk)
    if len(slices) <= 1:
        return model.decode(z, labels)
    return torch.cat([model.decode(z[s], None if labels is None else labels[s])
                      for s in slices])


class _Decoder:
    """Decodes latent nodes in chunks under one class (or none), counting the evaluations."""

    def __init__(self, model: nn.Module, device: torch.device, chunk: int) -> None:
        self.model, self.device, self.count = model, device, 0
        self.chunk = decode_batch(device, chunk)

    def __call__(self, z: Tensor, labels: Tensor | None) -> Tensor:
        out = []
        for i in range(0, z.shape[0], self.chunk):
            zc = z[i : i + self.chunk].to(self.device, torch.float32)
            yc = None if labels is None else labels[i : i + self.chunk].to(self.device)
            out.append(self.model.decode(zc, yc).float().flatten(1))
        self.count += int(z.shape[0])
        return torch.cat(out) if out else torch.zeros(0, device=self.device)


def _shared_rule_pass(
    decode: _Decoder, x: Tensor, label: int | None, box: tuple[float, float],
    support: Tensor | None, *, likelihood: str, spacing: float, node_chunk: int,
    image_chunk: int, advance: Callable, tile_side: int = 8, budget: int | None = None,
) -> QuadratureSums | None:
    """One lattice rule over the square ``box`` (every axis), its nodes in tiles
    (``objectives.in_tiles``). Only the tiles that meet some image's ``support`` box ([N, 2, d],
    from a coarser rule; None: everywhere) are decoded, once each, in chunks of whole tiles of
    about ``node_chunk`` nodes; a chunk is applied to every image whose support meets one of
    its tiles. None, having decoded nothing, if that would take more than ``budget`` nodes."""
    n, d = x.shape[0], decode.model.latent_dim
    lo, hi = torch.full((d,), box[0]), torch.full((d,), box[1])
    intervals = max(2, math.ceil((box[1] - box[0]) / spacing))
    rule, tile = in_tiles(lattice_rule(lo, hi, intervals), lo, hi, intervals, side=tile_side)
    sums = QuadratureSums(n, d, x.device)
    starts = torch.searchsorted(tile, tile.unique()).tolist() + [len(tile)]
    tiles = list(zip(starts, starts[1:], strict=False))
    meets = _tiles_met(rule.z, tile, support)  # [tiles, N] bool, or None
    needed = range(len(tiles)) if meets is None else meets.any(1).nonzero().squeeze(1).tolist()
    if budget is not None and sum(tiles[t][1] - tiles[t][0] for t in needed) > budget:
        return None
    chunks: list[list[int]] = []
    for t in needed:  # whole tiles, about node_chunk nodes
        a, b = tiles[t]
        if chunks and b - a + sum(tiles[u][1] - tiles[u][0] for u in chunks[-1]) <= node_chunk:
            chunks[-1].append(t)
        else:
            chunks.append([t])
    for chunk in chunks:
        at = torch.cat([torch.arange(*tiles[t]) for t in chunk])
        rows = (torch.arange(n, device=x.device) if meets is None
                else meets[chunk].any(0).nonzero().squeeze(1))
        z = rule.z[at]
        labels = None if label is None else torch.full((len(z),), label, dtype=torch.int64)
        logits = decode(z, labels)
        args = [t.to(x.device) for t in (rule.log_w[at], z, rule.midpoint[at], rule.edge[at])]
        for i in range(0, len(rows), image_chunk):
            r = rows[i : i + image_chunk]
            sums.add(log_likelihood_matrix(x[r], logits, likelihood), *args, rows=r)
        advance(len(z))
    return sums


def _tiles_met(z: Tensor, tile: Tensor, support: Tensor | None) -> Tensor | None:
    """[tiles, N] bool: which images' support boxes ([N, 2, d]) meet the bounding box of each
    tile's nodes (``z`` [G, d], ``tile`` [G] their non-decreasing tile numbers)."""
    if support is None:
        return None
    _, which = torch.unique_consecutive(tile, return_inverse=True)
    at = which[:, None].expand_as(z)
    t, d = int(which[-1]) + 1, z.shape[1]
    low = z.new_full((t, d), math.inf).scatter_reduce(0, at, z, "amin")
    high = z.new_full((t, d), -math.inf).scatter_reduce(0, at, z, "amax")
    low, high = low.to(support), high.to(support)
    return ((support[None, :, 0] <= high[:, None]) & (support[None, :, 1] >= low[:, None])).all(-1)


def _per_image_pass(
    decode: _Decoder, x: Tensor, labels: Tensor | None, rules: Callable[[slice], tuple], *,
    d: int, intervals: int, likelihood: str, node_budget: int, advance: Callable,
    log_joint: list[Tensor] | None = None,
) -> QuadratureSums:
    """Rules of each image's own, ``intervals`` per axis of a ``d``-dimensional box (g nodes
    each), in batches of about ``node_budget`` nodes: ``rules(sl)`` gives the LatticeRule of
    images ``sl`` (in the variable the sums are in) and its latent nodes z [b, g, d]. Given a
    list ``log_joint``, each batch's log p(x|z) + log p(z) at its nodes [b, g] is appended."""
    r, g = len(x), lattice_nodes(intervals, d)
    per_batch = max(1, node_budget // g)
    out = QuadratureSums(r, d, x.device)
    for i in range(0, r, per_batch):
        sl = slice(i, i + per_batch)
        rule, z = rules(sl)
        b = z.shape[0]
        ys = None if labels is None else labels[sl].repeat_interleave(g)
        logits = decode(z.reshape(b * g, d), ys).view(b, g, -1)
        ll = log_likelihood_matrix(x[sl], logits, likelihood)
        if log_joint is not None:
            log_joint.append((ll.double() + log_standard_normal(z.to(x.device))).cpu())
        part = QuadratureSums(b, d, x.device)
        part.add(ll, rule.log_w.to(x.device), rule.z.to(x.device), rule.midpoint.to(x.device),
                 rule.edge.to(x.device))
        out.take(part, sl)
        advance(b * g)
    return out


def _own_rules_pass(
    decode: _Decoder, x: Tensor, labels: Tensor | None, centre: Tensor, half: Tensor, *,
    likelihood: str, intervals: int, node_budget: int, advance: Callable,
    log_joint: list[Tensor] | None = None,
) -> QuadratureSums:
    """A lattice rule of its own for each image: the box centre +- half ([R, d] each). Given a
    list ``log_joint``, each batch's log p(x|z) + log p(z) at its nodes [b, G] is appended."""
    def rules(sl: slice) -> tuple:
        rule = lattice_rule(centre[sl] - half[sl], centre[sl] + half[sl], intervals)
        return rule, rule.z

    return _per_image_pass(decode, x, labels, rules, d=centre.shape[1], intervals=intervals,
                           likelihood=likelihood, node_budget=node_budget, advance=advance,
                           log_joint=log_joint)


def _framed_pass(
    decode: _Decoder, x: Tensor, labels: Tensor | None, centre: Tensor, frame: Tensor, *,
    half: float, intervals: int, likelihood: str, node_budget: int, advance: Callable,
) -> QuadratureSums:
    """A rule in each image's own frame (``objectives.framed_rule``: z = centre + F u, u in
    [-half, half]^d); the sums it returns are in u."""
    return _per_image_pass(decode, x, labels,
                           lambda sl: framed_rule(centre[sl], frame[sl], half, intervals),
                           d=centre.shape[1], intervals=intervals, likelihood=likelihood,
                           node_budget=node_budget, advance=advance)


@torch.inference_mode()
@fp32_on_model_device
def exact_log_px_per_image(
    model: ConvVAE,
    split: Split,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    likelihood: str = "bernoulli",
    shared_nodes: int = 12_000,
    max_shared_nodes: int = 1_000_000,
    spacing: float | None = None,
    node_chunk: int = 2048,
    image_chunk: int = 2048,
    node_budget: int = 32768,
    max_rounds: int = 3,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ExactLogPx:
    """log p(x) = int p(x|z) p(z) dz for every image of a split, by quadrature (latent 1 or 2).

    1. A shared lattice rule (trapezoid and midpoint, ``objectives.LatticeRule``) over a box
       that holds every image's q(z|x) to 8 sigma, with about ``shared_nodes`` nodes; then
       rules of half the spacing (4x the nodes) for the images whose error estimate is still
       above ``tolerance`` (nats per image), each integrated only over its support (its
       posterior's and q's mean +- 10 sd). The error estimate needs two rules
       (``QuadratureSums.error``: it counts 4x the change from the coarser one), so every
       image gets at least two. This goes on until every image is within tolerance, or the
       next rule would decode more than ``max_shared_nodes`` nodes (a given node ``spacing``:
       one rule of twice that spacing, then that one). The nodes come in small tiles: a tile
       is decoded once, if any image still needs it, and the log-likelihood of every such
       image at its nodes is one matrix product (``log_likelihood_matrix``). A CVAE gets its
       rules class by class, each image integrated under its own class's decoder.
    2. Images still above tolerance, largest error first, as many as ``2 * max_shared_nodes``
       decoder calls allow, get rules in a frame of their own (``objectives.framed_rule``):
       z = centre + F u over u in [-6, 6]^2, F the square root of the posterior's covariance
       plus q's, so that a narrow ridge tilted against the axes (a trained decoder's, which
       q's mean-field boxes fit badly) is a round peak in u; 10, 20 and 40 intervals per axis,
       the frame growing by what each rule saw, while the image stays above tolerance. Their
       error is judged in u, with q's width there as the narrowest peak to resolve.
    3. Images still above tolerance get a rule of their own over their posterior's mean +- 6
       sd (q's sd where larger), with a spacing of q's sd (16 to 128 intervals per axis),
       twice as fine each further round (``max_rounds``), smallest first while this step has
       decoded fewer than ``max_shared_nodes / 4`` nodes. An image that is still above tolerance
       keeps its best estimate and its error (``ExactLogPx.summary`` counts them).

    Memory is bounded by ``node_chunk`` x ``image_chunk`` (shared rule) and ``node_budget``
    (own rules) floats.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ConfigError(f"the tolerance must be a number > 0 (nats per image), got {tolerance}")
    if spacing is not None and not (math.isfinite(spacing) and spacing > 0):
        raise ConfigError(f"the node spacing must be > 0, got {spacing}")
    d = _check_exact_latent(model)
    model.eval()
    device = _device_of(model, device)
    n = len(split)
    mu, logvar = encode_split(model, split, batch_size=batch_size, device=device)
    x = _pixels(split.images, device).flatten(1)
    labels = split.labels.to(device, torch.int64)
    q_sd = torch.exp(0.5 * logvar.double())
    est = _Estimates(n, d, q_sd)
    decode = _Decoder(model, device, node_chunk)
    groups = ([(c, (labels == c).nonzero().squeeze(1)) for c in range(_num_classes(model))]
              if model.conditional else [(None, torch.arange(n, device=device))])
    with _progress_bar(progress, "exact log p(x)", 0) as bar:
        task = bar.add_task("exact log p(x), decoder calls", total=None) if progress else None

        def advance(k: int) -> None:
            if task is not None:
                bar.advance(task, k)

        for c, idx in groups:
            if len(idx) == 0:
                continue
            _shared_levels(decode, est, x, idx, c, mu, logvar, tolerance=tolerance,
                           likelihood=likelihood, shared_nodes=shared_nodes,
                           max_shared_nodes=max_shared_nodes, spacing=spacing,
                           node_chunk=node_chunk, image_chunk=image_chunk, advance=advance)
        own_labels = labels if model.conditional else None
        framed = _framed_rules(decode, est, x, own_labels, tolerance=tolerance,
                               likelihood=likelihood, node_budget=node_budget,
                               max_nodes=2 * max_shared_nodes, advance=advance)
        own = _own_rules(decode, est, x, own_labels, tolerance=tolerance,
                         likelihood=likelihood, max_rounds=max_rounds, node_budget=node_budget,
                         max_nodes=max_shared_nodes // 4, advance=advance)
        refined = framed | own
    cpu = lambda t: t.detach().cpu()  # noqa: E731
    return ExactLogPx(
        log_px=cpu(est.log_px), error=cpu(est.err), refined=cpu(refined),
        posterior_mean=cpu(est.mean), posterior_cov=cpu(est.cov), tolerance=float(tolerance),
        nodes=decode.count)


class _Estimates:
    """Each image's best value so far: log p(x), its error estimate, the posterior's moments
    and the spacing of the rule they came from."""

    def __init__(self, n: int, d: int, q_sd: Tensor) -> None:
        f64 = dict(dtype=torch.float64, device=q_sd.device)
        self.q_sd = q_sd
        self.log_px = torch.full((n,), -math.inf, **f64)
        self.err = torch.full((n,), math.inf, **f64)
        self.mean, self.cov = torch.zeros(n, d, **f64), torch.zeros(n, d, d, **f64)
        self.h_used = torch.zeros(n, **f64)

    def keep(self, idx: Tensor, sums: QuadratureSums, h: Tensor, only_better: bool = False,
             ) -> None:
        """Take ``sums``' values for images ``idx`` (rule spacing ``h``), or with
        ``only_better`` only where its error estimate is smaller."""
        e = sums.error(h, narrowest=self.q_sd[idx], previous=self.log_px[idx])
        ok = e < self.err[idx] if only_better else torch.ones_like(e, dtype=torch.bool)
        m, cv = sums.posterior_moments()
        sel = idx[ok]
        self.log_px[sel], self.err[sel] = sums.log_px()[ok], e[ok]
        self.mean[sel], self.cov[sel] = m[ok], cv[ok]
        self.h_used[sel] = h.expand_as(e)[ok]

    def keep_framed(self, idx: Tensor, sums: QuadratureSums, h: float, centre: Tensor,
                    frame: Tensor, previous: Tensor, floor: Tensor,
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Take a framed rule's values (``_framed_pass``, spacing ``h`` in u) for images
        ``idx`` where its error is smaller than theirs so far. Its error is judged in u, against
        the ``previous`` estimate (the rule of twice the spacing), with q(z|x) in u as the
        narrowest peak to resolve. A framed rule integrates over its frame only: a mode outside
        it is mass it cannot see, and no error term of its own says so. So a value below
        ``floor`` [len(idx)] (the shared rules' estimate less its error, for the whole box)
        by more than its own error is not taken. Returns this rule's log p(x), and p(z|x)'s
        mean and covariance in z."""
        inv = torch.linalg.inv(frame)
        q_u = inv @ torch.diag_embed(self.q_sd[idx].pow(2)) @ inv.transpose(-1, -2)
        q_sd_u = torch.diagonal(q_u, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        spacing = torch.full((len(idx),), h, dtype=torch.float64, device=centre.device)
        e = sums.error(spacing, narrowest=q_sd_u, previous=previous)
        mean_u, cov_u = sums.posterior_moments()
        mean = centre + (frame @ mean_u.unsqueeze(-1)).squeeze(-1)
        cov = frame @ cov_u @ frame.transpose(-1, -2)
        ok = (e < self.err[idx]) & ~(sums.log_px() < floor - e)
        sel = idx[ok]
        self.log_px[sel], self.err[sel] = sums.log_px()[ok], e[ok]
        self.mean[sel], self.cov[sel] = mean[ok], cov[ok]
        self.h_used[sel] = (h * torch.linalg.matrix_norm(frame, ord=2))[ok]
        return sums.log_px(), mean, cov


def _shared_levels(
    decode: _Decoder, est: _Estimates, x: Tensor, idx: Tensor, label: int | None, mu: Tensor,
    logvar: Tensor, *, tolerance: float, likelihood: str, shared_nodes: int,
    max_shared_nodes: int, spacing: float | None, node_chunk: int, image_chunk: int,
    advance: Callable,
) -> None:
    """Step 1 of ``exact_log_px_per_image`` for the images ``idx`` (one class of a CVAE):
    shared rules of half the spacing each level, for the images not yet within tolerance."""
    box = _shared_box(mu[idx], logvar[idx])
    nodes, active, support = shared_nodes, idx, None
    for level in range(MAX_LEVELS):
        h = auto_spacing(mu[idx], logvar[idx], nodes) if spacing is None else (
            spacing * 2.0 ** (level == 0))  # a given spacing: after one rule of twice that
        sums = _shared_rule_pass(decode, x[active], label, box, support,
                                 likelihood=likelihood, spacing=h, node_chunk=node_chunk,
                                 image_chunk=image_chunk, advance=advance,
                                 budget=max_shared_nodes if level else None)
        if sums is None:  # the rest get rules of their own
            break
        est.keep(active, sums, torch.tensor(h, dtype=torch.float64, device=x.device))
        nodes *= 4
        active = active[est.err[active] > tolerance]
        if len(active) == 0 or (spacing is not None and level == 1):
            break
        support = _support(est.mean[active], est.cov[active], mu[active], est.q_sd[active], h)


MAX_LEVELS = 8  # shared rules per class: the finest has 4^7 = 16,000 x the first's density


FRAMED_HALF = 6.0  # a framed rule covers the frame's +-6 (sd, where the frame is a posterior's)
FRAMED_INTERVALS = (10, 20, 40)  # per axis, round by round: each halves the spacing


def _frame(cov: Tensor) -> Tensor:
    """[R, d, d] square roots F of covariances ``cov`` (F F^T = cov): the principal axes, each
    scaled by its sd, the smallest floored at 1e-4 of the largest."""
    val, vec = torch.linalg.eigh(cov)
    val = torch.maximum(val, 1e-8 * val.amax(-1, keepdim=True)).clamp_min(1e-30)
    return vec * val.sqrt().unsqueeze(-2)


def _framed_rules(
    decode: _Decoder, est: _Estimates, x: Tensor, labels: Tensor | None, *, tolerance: float,
    likelihood: str, node_budget: int, max_nodes: int, advance: Callable,
) -> Tensor:
    """Step 2 of ``exact_log_px_per_image``: for images above tolerance, largest error first,
    as many as ``max_nodes`` decodes allow (two rules each, a third where it still fits), rules
    in a frame of their own
    (``objectives.framed_rule``), ``FRAMED_INTERVALS`` round by round while an image stays
    above tolerance. The first frame is the square root of the posterior's covariance so far
    plus q's (q alone can be narrower than the posterior, or off its mass); each next one
    grows by the posterior's second moment about the centre that the last rule saw (a frame
    that only grows cannot lose a mode the last one held). Returns which images got one."""
    refined = torch.zeros(len(est.err), dtype=torch.bool, device=x.device)
    d = est.mean.shape[1]
    nodes = [lattice_nodes(k, d) for k in FRAMED_INTERVALS]
    todo = (est.err > tolerance).nonzero().squeeze(1)
    todo = todo[torch.argsort(est.err[todo], descending=True, stable=True)]
    todo = todo[: max(0, max_nodes // sum(nodes[:2]))]  # two rules each: the error needs both
    if len(todo) == 0:
        return refined
    refined[todo] = True
    centre = est.mean[todo].clone()
    cov = est.cov[todo] + torch.diag_embed(est.q_sd[todo].pow(2))
    previous = est.log_px[todo].clone()
    floor = est.log_px[todo] - est.err[todo]  # the shared rules' value, over the whole box
    left = max_nodes
    for k, g in zip(FRAMED_INTERVALS, nodes, strict=True):
        keep = torch.arange(len(todo), device=x.device) < left // g  # largest errors first
        todo, centre, cov, previous, floor = (t[keep] for t in (todo, centre, cov, previous,
                                                                 floor))
        if len(todo) == 0:
            break
        left -= g * len(todo)
        frame = _frame(cov)
        sums = _framed_pass(decode, x[todo], None if labels is None else labels[todo], centre,
                            frame, half=FRAMED_HALF, intervals=k, likelihood=likelihood,
                            node_budget=node_budget, advance=advance)
        previous, mean, post = est.keep_framed(todo, sums, 2 * FRAMED_HALF / k, centre, frame,
                                               previous, floor)
        off = mean - centre
        cov = frame @ frame.transpose(-1, -2) + post + off.unsqueeze(-1) * off.unsqueeze(-2)
        above = est.err[todo] > tolerance
        order = above.nonzero().squeeze(1)
        order = order[torch.argsort(est.err[todo[order]], descending=True, stable=True)]
        todo, centre, cov, previous, floor = (t[order] for t in (todo, centre, cov, previous,
                                                                  floor))
        if len(todo) == 0:
            break
    return refined


def _own_rules(
    decode: _Decoder, est: _Estimates, x: Tensor, labels: Tensor | None, *, tolerance: float,
    likelihood: str, max_rounds: int, node_budget: int, max_nodes: int, advance: Callable,
) -> Tensor:
    """Step 3 of ``exact_log_px_per_image``: a rule of its own for each image still above
    tolerance, finer each round, smallest rules first while the step has decoded fewer than
    ``max_nodes`` nodes (the rest keep their estimate and its error). Returns which images got
    one [N] (bool)."""
    refined = torch.zeros(len(est.err), dtype=torch.bool, device=x.device)
    left, d = max_nodes, est.mean.shape[1]
    for round_ in range(max_rounds):
        todo = (est.err > tolerance).nonzero().squeeze(1)
        q_sd = est.q_sd[todo]
        post_sd = torch.diagonal(est.cov[todo], dim1=1, dim2=2).clamp_min(0).sqrt()
        half = 6 * torch.maximum(q_sd, post_sd) + est.h_used[todo, None] / 2
        want = (2 * half / q_sd).amax(1) * 2**round_  # a spacing of q's sd
        intervals = (2 ** torch.log2(want.clamp(16, OWN_RULE_MAX)).ceil()).long()  # a power of 2
        order = torch.argsort(intervals, stable=True)
        fits = lattice_nodes(intervals, d)[order].cumsum(0) <= left
        todo, half, intervals = todo[order][fits], half[order][fits], intervals[order][fits]
        if len(todo) == 0:
            break
        refined[todo] = True
        for k in intervals.unique().tolist():
            pick = todo[intervals == k]
            start = decode.count
            sums = _own_rules_pass(
                decode, x[pick], None if labels is None else labels[pick], est.mean[pick],
                half[intervals == k], likelihood=likelihood, intervals=int(k),
                node_budget=node_budget, advance=advance)
            left -= decode.count - start
            est.keep(pick, sums, (2 * half[intervals == k] / k).amin(1), only_better=True)
    return refined


SUPPORT_SD = 10.0  # the posterior's mass beyond 10 sd of its mean is taken as nil
OWN_RULE_MAX = 128  # intervals per axis of an image's own rule: 33,000 nodes in 2-D


def _support(mean: Tensor, cov: Tensor, mu: Tensor, q_sd: Tensor, spacing: float) -> Tensor:
    """[N, 2, d]: where a finer rule integrates each image: p(z|x)'s mean +- 10 of its sd, as
    a rule of ``spacing`` saw it, and q's mean +- 10 of q's sd, one spacing wider."""
    sd = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0).sqrt()
    lo = torch.minimum(mean - SUPPORT_SD * sd, mu - SUPPORT_SD * q_sd) - spacing
    hi = torch.maximum(mean + SUPPORT_SD * sd, mu + SUPPORT_SD * q_sd) + spacing
    return torch.stack([lo, hi], 1)


@fp32_on_model_device
def exact_log_px(model: ConvVAE, split: Split, **options: Any) -> dict[str, Any]:
    """``exact_log_px_per_image(model, split, **options).summary()``: means over the split."""
    t0 = time.perf_counter()
    out = exact_log_px_per_image(model, split, **options).summary()
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------
# The true posterior p(z|x) of a few digits, beside q(z|x)
# --------------------------------------------------------------------------------------------
@torch.inference_mode()
@fp32_on_model_device
def gauss_hermite_elbo(
    model: ConvVAE, split: Split, *, order: int = 8, likelihood: str = "bernoulli",
    batch_size: int = 100, device: str | torch.device | None = None,
) -> Tensor:
    """ELBO(x) = E_q[log p(x|z)] - KL(q || p(z)) per image [N] (float64, CPU), the expectation
    by an ``order``^d Gauss-Hermite rule under q (``objectives.gauss_hermite_rule``): no
    sampling noise, so per-image gaps log p(x) - ELBO can be ranked."""
    model.eval()
    device = _device_of(model, device)
    out = []
    for x, y in _batches(split, batch_size, device):
        labels = _labels(model, y)
        mu, logvar = model.encode(x, labels)
        z, log_w = gauss_hermite_rule(mu.float(), logvar.float(), order)
        b, g, d = z.shape
        ys = None if labels is None else labels.repeat_interleave(g)
        logits = decode_sliced(model, z.reshape(b * g, d).float(), ys, b * g)
        logits = logits.float().view(b, g, -1)
        ll = log_likelihood_matrix(x.flatten(1), logits, likelihood).double()
        kl = kl_normal_std(mu.double(), logvar.double()).sum(1)
        out.append(((ll * log_w.exp()).sum(1) - kl).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class PosteriorPicture:
    """p(z|x) of one image on a grid, with q(z|x) and the numbers a panel's title needs."""

    index: int  # in the split
    label: int
    image: Tensor  # [28, 28] in [0, 1]
    z1: Tensor  # [n + 1] grid coordinates
    z2: Tensor  # [n + 1]
    density: Tensor  # [n + 1, n + 1] p(z|x), density[i, j] at (z1[i], z2[j])
    q_mu: Tensor  # [2]
    q_sd: Tensor  # [2]
    log_px: float
    log_px_error: float
    elbo: float

    @property
    def gap(self) -> float:
        """KL(q(z|x) || p(z|x)) = log p(x) - ELBO, nats."""
        return self.log_px - self.elbo


def pick_by_gap(gap: Tensor, labels: Tensor, per_row: int) -> tuple[list[int], list[int]]:
    """The rule of the posterior figure: the images with the largest gaps, then those with the
    smallest, each list at most one image per class."""
    def first_distinct(order: Tensor) -> list[int]:
        chosen: list[int] = []
        seen: set[int] = set()
        for i in order.tolist():
            if int(labels[i]) not in seen and math.isfinite(float(gap[i])):
                chosen.append(i)
                seen.add(int(labels[i]))
            if len(chosen) == per_row:
                break
        return chosen

    return (first_distinct(torch.argsort(gap, descending=True)),
            first_distinct(torch.argsort(gap)))


@torch.inference_mode()
@fp32_on_model_device
def true_posteriors(
    model: ConvVAE, split: Split, *, candidates: int = 300, per_row: int = 5,
    intervals: int = 64, likelihood: str = "bernoulli", progress: bool = False,
    exact: ExactLogPx | None = None,
) -> dict[str, list[PosteriorPicture]]:
    """p(z|x) for the test digits with the largest and the smallest gaps (``pick_by_gap``)
    among the first ``candidates`` images of a 2-D model: ``{"largest": [...], "smallest":
    [...]}``. Gaps are ranked from a coarse exact log p(x) (tolerance 0.5 nats) and the
    Gauss-Hermite ELBO; each chosen image then gets a lattice rule of its own, ``intervals``
    per axis over its posterior's mean +- 4 sd (and q's), whose trapezoid nodes are the picture
    and give log p(x) with its error estimate. ``exact``, the split's per-image values from an
    evaluation (``exact_log_px_per_image``, covering at least the candidates), stands in for
    the coarse pass: the report passes its own, so this costs no second quadrature."""
    if model.latent_dim != 2:
        raise ConfigError(f"the true-posterior figure needs a 2-D latent, this model has "
                          f"{model.latent_dim}")
    part = split.subset(min(candidates, len(split)))
    if len(part) == 0:
        raise ConfigError("the true-posterior figure needs at least one image")
    coarse = (exact.subset(len(part)) if exact is not None and len(exact.log_px) >= len(part)
              else exact_log_px_per_image(model, part, tolerance=0.5, likelihood=likelihood,
                                          progress=progress))
    gap = coarse.log_px - gauss_hermite_elbo(model, part, likelihood=likelihood)
    largest, smallest = pick_by_gap(gap, part.labels, per_row)
    pictures = posterior_pictures(model, part, largest + smallest, coarse,
                                  intervals=intervals, likelihood=likelihood)
    return {"largest": pictures[: len(largest)], "smallest": pictures[len(largest):]}


@torch.inference_mode()
@fp32_on_model_device
def posterior_pictures(
    model: ConvVAE, split: Split, chosen: list[int], coarse: ExactLogPx | None = None, *,
    intervals: int = 64, likelihood: str = "bernoulli",
) -> list[PosteriorPicture]:
    """p(z|x) of the images ``chosen`` (indices into ``split``) of a 2-D model, each on a
    lattice rule of its own (``intervals`` per axis) over its posterior's mean +- 4 sd and q's,
    the posterior's moments taken from ``coarse`` (``exact_log_px_per_image`` of ``split`` at
    a loose tolerance; computed when None)."""
    if model.latent_dim != 2:
        raise ConfigError(f"a picture of p(z|x) needs a 2-D latent, this model has "
                          f"{model.latent_dim}")
    if coarse is None:
        coarse = exact_log_px_per_image(model, split, tolerance=0.5, likelihood=likelihood)
    part = split  # the images ``chosen`` indexes
    device = _device_of(model, None)
    mu, logvar = encode_split(model, part)
    mu, logvar = mu[chosen].double(), logvar[chosen].double()
    q_sd = torch.exp(0.5 * logvar)
    p_mean, p_cov = coarse.posterior_mean[chosen], coarse.posterior_cov[chosen]
    p_sd = torch.diagonal(p_cov, dim1=1, dim2=2).clamp_min(0).sqrt()
    lo = torch.minimum(p_mean - 4 * p_sd, mu.cpu() - 4 * q_sd.cpu())
    hi = torch.maximum(p_mean + 4 * p_sd, mu.cpu() + 4 * q_sd.cpu())
    x = _pixels(part.images[chosen], device).flatten(1)
    labels = part.labels[chosen].to(device, torch.int64)
    joint: list[Tensor] = []
    sums = _own_rules_pass(
        _Decoder(model, device, 4096), x, labels if model.conditional else None,
        ((lo + hi) / 2).to(device), ((hi - lo) / 2).to(device), likelihood=likelihood,
        intervals=intervals, node_budget=65536, advance=lambda k: None, log_joint=joint)
    log_joints = torch.cat(joint)  # [R, G]
    log_px, err = sums.log_px().cpu(), sums.error((hi - lo).amin(1) / intervals).cpu()
    elbo = gauss_hermite_elbo(model, Split(part.images[chosen], part.labels[chosen]),
                              likelihood=likelihood)
    pictures = []
    for r, i in enumerate(chosen):
        rule = lattice_rule(lo[r], hi[r], intervals)
        t = ~rule.midpoint
        log_density = log_joints[r][t] - float(log_px[r])  # log p(x, z) - log p(x) = log p(z|x)
        n1 = intervals + 1
        pictures.append(PosteriorPicture(
            index=i, label=int(part.labels[i]), image=part.images[i].float() / 255,
            z1=rule.z[t][::n1, 0].float(), z2=rule.z[t][:n1, 1].float(),
            density=log_density.exp().view(n1, n1).float(), q_mu=mu[r].cpu().float(),
            q_sd=q_sd[r].cpu().float(), log_px=float(log_px[r]), log_px_error=float(err[r]),
            elbo=float(elbo[r])))
    return pictures


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


@fp32_on_model_device
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


@fp32_on_model_device
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


@fp32_on_model_device
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


@fp32_on_model_device
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
@fp32_on_model_device
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
    cdev = _device_of(classifier, None)
    num_classes = _num_classes(model)
    gen = torch.Generator().manual_seed(check_seed(seed))
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
    """The data set a run was trained on, split as in training (its config's val_size, limit)
    and, for a binarized run, its val and test splits binarized as recorded in config.json."""
    return dataset_for_config(run.config["config"], run.config.get("data"), where=str(run.path))


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
    tolerance: float | None = DEFAULT_TOLERANCE,
    exact: ExactLogPx | None = None,
) -> dict[str, Any]:
    """Every test-set number of one run, as a JSON-ready dict.

    For a latent of size 1 or 2, ``exact_log_px`` is log p(x) by quadrature on every test
    image (``exact_log_px``, within ``tolerance`` nats per image; None skips it), with ``gap``
    = exact log p(x) - ELBO over the same images. ``logpx_images`` limits the importance-sampled
    log p(x) to the first N test images (it costs ``num_samples`` decoder passes per image;
    None or 0: the whole test set), once with q(z|x) as the proposal (``log_px``) and once with
    a Student-t around it (``log_px_student_t``); with the exact value known, each also holds
    the exact value on those same images (``exact_log_px_same_images``) and the estimate's
    ``bias`` against it. ``exact``: those per-image values, computed already
    (``exact_log_px_per_image`` of ``dataset.test``).

    ``elbo`` (recon, KL, -ELBO, one z per image), ``log_px`` (importance sampled with
    ``num_samples`` draws per image; None if 0), ``active_units``, ``knn`` (test codes against
    the training codes), ``aggregate_posterior``, ``closest_pairs`` and, for a CVAE given a
    ``classifier``, ``cvae_class_accuracy``. ``dataset`` defaults to the run's own. Each
    estimate (``ESTIMATES``) says its images: ``n`` and ``images`` (``first_test_images``).
    """
    cfg = run.config["config"]
    dataset = dataset if dataset is not None else dataset_for_run(run)
    model = run.model.eval()
    likelihood = cfg.get("likelihood", "bernoulli")
    out: dict[str, Any] = {"model": model.spec.kind, "run": str(run.path), "seed": cfg.get("seed")}
    out["elbo"] = evaluate_elbo(model, dataset.test, likelihood=likelihood, seed=seed)
    out["elbo"]["images"] = first_test_images(out["elbo"]["n"])
    per_image = None
    if exact is not None and len(exact.log_px) != len(dataset.test):
        raise ConfigError(f"the exact log p(x) given covers {len(exact.log_px)} images, the "
                          f"test split has {len(dataset.test)}")
    if exact is not None:
        per_image = exact
    elif tolerance is not None and model.latent_dim <= EXACT_MAX_LATENT:
        per_image = exact_log_px_per_image(model, dataset.test, likelihood=likelihood,
                                           tolerance=tolerance, progress=progress)
    if per_image is not None:
        out["exact_log_px"] = per_image.summary()
        out["exact_log_px"]["images"] = first_test_images(out["exact_log_px"]["n"])
        out["exact_log_px"]["gap"] = out["exact_log_px"]["log_px"] + out["elbo"]["neg_elbo"]
    logpx_split = dataset.test.subset(logpx_images) if logpx_images else dataset.test
    for key, proposal in (("log_px", "q"), ("log_px_student_t", "student-t")):
        est = log_px_estimate(
            model, logpx_split, num_samples=num_samples, likelihood=likelihood, seed=seed,
            progress=progress, proposal=proposal,
        ) if num_samples > 0 else None
        if est is not None:
            est["images"] = first_test_images(est["n"])
        if est is not None and per_image is not None:
            same = per_image.log_px[: est["n"]]
            est["exact_log_px_same_images"] = float(same.mean())
            est["bias"] = est["log_px"] - float(same.mean())
        out[key] = est
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
