"""Every figure of the study: functions of (model or metrics, data) -> matplotlib ``Figure``.

One style for all of them (:data:`STYLE`, applied with ``matplotlib.rc_context`` inside each
function): a clean sans-serif paper style, black ink on white for images, 300 dpi on save.
Figures are built on the Agg canvas without pyplot, so nothing here touches global state or
needs a display.

Every image grid is decoded in ONE decoder call (never one forward pass per image), under
``torch.inference_mode`` with the model in eval mode (its previous mode is restored after).
Shown images are the decoder's Bernoulli means ``sigmoid(logits)``.

Latent dimensions are indexed from 0 in arguments (``dims=(0, 1)``) and labelled from 1 on the
axes (``z_1``, ``z_2``), as in Kingma & Welling's figures.

:data:`FIGURES` names every figure with a caption and the kind of model it applies to;
:func:`draw_all` draws those that apply to a run into a folder (``vaelab plot``).
"""

from __future__ import annotations

import functools
import io
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Ellipse
from matplotlib.ticker import MaxNLocator

from vaelab.data import Dataset, Split
from vaelab.errors import ConfigError
from vaelab.io import atomic_write_bytes, make_folder

if TYPE_CHECKING:
    from vaelab.checkpoint import Run
    from vaelab.evaluate import ExactLogPx, PosteriorPicture
    from vaelab.models import ConvVAE

__all__ = [
    "FIGURES",
    "SAVE_FORMATS",
    "STYLE",
    "FigureSpec",
    "cvae_label_interpolation",
    "draw_all",
    "interpolations",
    "latent_scatter",
    "prior_samples",
    "reconstructions",
    "samples_per_class",
    "save_figure",
    "select_figures",
    "style_transfer",
    "traversal_grid",
    "training_curves",
    "true_posterior",
]

STYLE: Mapping[str, Any] = MappingProxyType({
    "font.family": "sans-serif",
    "font.sans-serif": ("DejaVu Sans", "Arial", "Helvetica", "Liberation Sans"),
    "mathtext.fontset": "dejavusans",
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "figure.titlesize": 10,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "legend.frameon": False,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "0.2",
    "axes.labelcolor": "0.1",
    "xtick.color": "0.2",
    "ytick.color": "0.2",
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.4,
    "lines.linewidth": 1.2,
    "lines.markersize": 3,
    "image.cmap": "gray_r",
    "image.interpolation": "nearest",
    "figure.dpi": 100,
    "figure.facecolor": "white",
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "savefig.facecolor": "white",
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "vaelab",
})
"""The rc settings every figure is drawn and saved under, read-only (a ``MappingProxyType``
whose values are immutable too): each figure applies them in its own ``matplotlib.rc_context``,
so nothing changes matplotlib's global state or another caller's figures."""

SAVE_FORMATS = ("png", "pdf", "svg")
# Fixed metadata: the same figure gives the same bytes on every save.
_METADATA: dict[str, dict[str, Any]] = {
    "png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None},
}
SPLIT_COLORS = {"train": "#0072B2", "val": "#E69F00", "test": "#009E73"}
BETA_COLOR = "0.45"
N_DIGITS = 10
TILE = 28
PAD = 2  # pixels between tiles of a sample grid
PAD_VALUE = 0.12  # a faint grey line between tiles (0 = white paper, 1 = black ink)
TRAVERSAL_CLASS = 0  # the class a CVAE's traversal is drawn for by FIGURES / draw_all

F = TypeVar("F", bound=Callable[..., Figure])


# --------------------------------------------------------------------------------------------
# Helpers: style, inference, encoding, decoding, tiling
# --------------------------------------------------------------------------------------------
def _styled(fn: F) -> F:
    """Run ``fn`` under :data:`STYLE` (fonts and sizes are fixed when the artists are made)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _figure(width: float, height: float) -> Figure:
    """A new figure on the Agg canvas (no pyplot, no display), constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@contextmanager
def _inference(model: ConvVAE) -> Iterator[None]:
    """Eval mode and ``torch.inference_mode`` for the block; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: ConvVAE) -> torch.device:
    return next(model.parameters()).device


def _num_classes(model: ConvVAE) -> int:
    return int(getattr(model.spec, "num_classes", N_DIGITS))


def _kind(model: ConvVAE) -> str:
    return "cvae" if model.conditional else "vae"


def _require_cvae(model: ConvVAE, what: str) -> None:
    if not model.conditional:
        raise ConfigError(f"{what} needs a CVAE, but the model is a {_kind(model)}")


def _require_images(split: Split, what: str, n: int = 1) -> None:
    if len(split) < n:
        raise ConfigError(f"{what} needs at least {n} image(s), the split has {len(split)}")


def _class_label(model: ConvVAE, y: int | None, what: str) -> int | None:
    """Check the class argument ``y`` against the model: required by a CVAE, refused by a VAE."""
    if not model.conditional:
        if y is not None:
            raise ConfigError(f"{what}: a vae takes no class y (got y={y})")
        return None
    if y is None:
        raise ConfigError(f"{what} of a CVAE needs the class y (an int)")
    return _check_class(model, y)


def _check_class(model: ConvVAE, y: Any) -> int:
    c = _num_classes(model)
    if isinstance(y, bool) or not isinstance(y, (int, np.integer)) or not 0 <= int(y) < c:
        raise ConfigError(f"class y must be an int in 0..{c - 1}, got {y!r}")
    return int(y)


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if int(v) < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")


def _check_dims(dims: Sequence[int], latent_dim: int) -> tuple[int, int]:
    dims = tuple(int(d) for d in dims)
    if len(dims) != 2 or dims[0] == dims[1] or not all(0 <= d < latent_dim for d in dims):
        raise ConfigError(
            f"dims must be two different latent indices in 0..{latent_dim - 1}, got {dims}"
        )
    return dims  # type: ignore[return-value]


def _zlabel(d: int) -> str:
    return f"$z_{{{d + 1}}}$"


def _as_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 28, 28]`` in [0, 1] on ``device``."""
    return images.to(device).unsqueeze(1).float().div_(255)


def _encode_means(
    model: ConvVAE, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2000
) -> torch.Tensor:
    """Posterior means ``mu(x[, y])`` [N, D] on the CPU, encoded in large batches."""
    device = _device(model)
    out = []
    with _inference(model):
        for i in range(0, images.shape[0], batch_size):
            x = _as_input(images[i : i + batch_size], device)
            y = labels[i : i + batch_size].to(device) if model.conditional else None
            mu, _ = model.encode(x, y)
            out.append(mu.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.latent_dim)


def _decode_means(
    model: ConvVAE, z: torch.Tensor, y: int | torch.Tensor | None = None
) -> np.ndarray:
    """Decoder means ``sigmoid(logits)`` of every row of ``z`` in ONE decoder call.

    ``y`` is ignored by a VAE; a CVAE needs one class for all rows (int) or one per row.
    Returns float images ``[N, H, W]`` in [0, 1].
    """
    device = _device(model)
    z = z.to(device=device, dtype=torch.float32)
    labels = None
    if model.conditional:
        if y is None:
            raise ConfigError("decoding with a CVAE needs the class labels y")
        if isinstance(y, torch.Tensor):
            labels = y.to(device=device, dtype=torch.long).reshape(-1)
        else:
            labels = torch.full((z.shape[0],), _check_class(model, y), device=device,
                                dtype=torch.long)
    with _inference(model):
        logits = model.decode(z, labels)
    return torch.sigmoid(logits.float()).squeeze(1).cpu().numpy()


def _grid(
    images: np.ndarray, nrow: int, *, pad: int = PAD, pad_value: float = PAD_VALUE
) -> np.ndarray:
    """Tile ``images`` [N, H, W] into one 2-D array, ``nrow`` images per row (row-major).

    Tiles are ``pad`` pixels apart (filled with ``pad_value``); cells past the last image are
    blank (0).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise ValueError(f"_grid expects images [N, H, W], got shape {images.shape}")
    n, h, w = images.shape
    ncol = max(1, min(int(nrow), max(n, 1)))
    rows = max(1, math.ceil(n / ncol))
    out = np.full((rows * h + (rows - 1) * pad, ncol * w + (ncol - 1) * pad), pad_value,
                  dtype=np.float32)
    for r in range(rows):
        for c in range(ncol):
            i = r * ncol + c
            top, left = r * (h + pad), c * (w + pad)
            out[top : top + h, left : left + w] = images[i] if i < n else 0.0
    return out


def _tile_centers(count: int, size: int = TILE, pad: int = PAD) -> np.ndarray:
    """Pixel coordinates of the centres of ``count`` tiles along one axis of a grid."""
    return np.arange(count) * (size + pad) + (size - 1) / 2


def _show(ax: Any, grid: np.ndarray) -> Any:
    """Show an image grid in [0, 1] (ink = 1) on ``ax`` without ticks or spines."""
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    return im


def _seeded_normal(n: int, d: int, seed: int) -> torch.Tensor:
    """``n`` draws of z ~ N(0, I_d) from a CPU generator: the same on every device."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(int(seed)))


def _pick_pairs(split: Split, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``pairs`` random index pairs (a, b) whose images show different digits."""
    labels = split.labels.cpu().numpy()
    if len(np.unique(labels)) < 2:
        raise ConfigError("interpolation needs images of at least two different digits")
    rng = np.random.default_rng(seed)
    a = rng.choice(len(labels), size=pairs, replace=pairs > len(labels))
    b = np.array([rng.choice(np.flatnonzero(labels != labels[i])) for i in a])
    return a, b


def _pick(split: Split, n: int, seed: int) -> np.ndarray:
    """``n`` random distinct indices of ``split`` (all of them, shuffled, if it is smaller)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(len(split))[:n]


def _lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Straight lines from ``a`` [P, D] to ``b`` [P, D] at ``t`` [S] -> [P, S, D]."""
    t = t.to(torch.float64)[None, :, None]
    return (1 - t) * a.double()[:, None] + t * b.double()[:, None]


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake; White 2016 for VAEs) of ``a``, ``b`` [P, D] at ``t``.

    Great-circle weights ``sin((1-t)w)/sin w`` and ``sin(tw)/sin w`` on the angle ``w`` between
    the two vectors; (near-)parallel pairs fall back to the straight line. -> [P, S, D]
    """
    a, b = a.double(), b.double()
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    omega = torch.acos((an * bn).sum(-1).clamp(-1.0, 1.0))[:, None]  # [P, 1]
    so = torch.sin(omega)
    t = t.to(torch.float64)[None, :]  # [1, S]
    small = so.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(so), so)
    wa = torch.where(small, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(small, t.expand_as(wa), torch.sin(t * omega) / safe)
    return wa[..., None] * a[:, None] + wb[..., None] * b[:, None]


def _images(split: Split, idx: np.ndarray) -> np.ndarray:
    """The split's images at ``idx`` as floats in [0, 1], [len(idx), 28, 28]."""
    return split.images[torch.as_tensor(idx, dtype=torch.long)].cpu().numpy() / 255.0


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
_CURVE_PANELS = (
    ("recon", "Reconstruction  $-\\log p(x\\,|\\,z)$"),
    ("kl", "KL$(q(z\\,|\\,x)\\,\\|\\,p(z))$"),
    ("neg_elbo", "$-$ELBO"),
)


@_styled
def training_curves(metrics: list[dict[str, Any]]) -> Figure:
    """Reconstruction, KL and -ELBO per epoch (train, val if present, test), beta on twinx.

    Three panels, each with a secondary y axis for the KL weight beta of the training loss,
    and one figure legend.
    Validation and test numbers are at beta = 1; train numbers are epoch averages.
    """
    if not metrics:
        raise ConfigError("no metrics to plot: the run has no finished epoch")
    epochs = np.array([m.get("epoch", i + 1) for i, m in enumerate(metrics)], dtype=float)
    betas = np.array([m.get("beta", np.nan) for m in metrics], dtype=float)
    fig = _figure(7.2, 2.5)
    axes = fig.subplots(1, 3)
    legend: dict[str, Any] = {}  # label -> the first line drawn with it
    for ax, (key, title) in zip(axes, _CURVE_PANELS, strict=True):
        handles = []
        for split in ("train", "val", "test"):
            k = f"{split}_{key}"
            if not any(k in m for m in metrics):
                continue
            values = np.array([m.get(k, np.nan) for m in metrics], dtype=float)
            handles += ax.plot(epochs, values, color=SPLIT_COLORS[split], marker="o",
                               markersize=2.5, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(True)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        twin = ax.twinx()
        twin.spines["right"].set_visible(True)
        if np.isfinite(betas).any():
            handles += twin.plot(epochs, betas, color=BETA_COLOR, linestyle="--", linewidth=1.0,
                                 label="$\\beta$ (KL weight)")
        top = np.nanmax(betas) if np.isfinite(betas).any() else 1.0
        twin.set_ylim(0.0, max(1.0, float(top)) * 1.05)
        twin.set_ylabel("$\\beta$", color=BETA_COLOR)
        twin.tick_params(axis="y", colors=BETA_COLOR)
        for h in handles:
            legend.setdefault(h.get_label(), h)
    # One legend for the three panels (they share splits and colours), below them.
    fig.legend(list(legend.values()), list(legend), loc="outside lower center",
               ncol=max(1, len(legend)))
    fig.suptitle("Training curves (val/test at $\\beta$ = 1; train averaged over each epoch)")
    return fig


def _free_corner(pic: PosteriorPicture, size: float) -> tuple[float, float, float, float]:
    """Axes-fraction bounds of the panel corner farthest from q's mean and p(z|x)'s mode, so
    the digit's inset hides neither."""
    span = [(float(a[0]), float(a[-1])) for a in (pic.z1, pic.z2)]
    mode = divmod(int(pic.density.argmax()), pic.density.shape[1])
    points = [tuple(pic.q_mu.tolist()), (float(pic.z1[mode[0]]), float(pic.z2[mode[1]]))]
    frac = [tuple((v - lo) / max(hi - lo, 1e-12) for v, (lo, hi) in zip(p, span, strict=True))
            for p in points]
    corners = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    best = max(corners, key=lambda c: min(math.dist(c, f) for f in frac))
    return (best[0] * (1 - size), best[1] * (1 - size), size, size)


@_styled
def true_posterior(pictures: dict[str, Sequence[PosteriorPicture]]) -> Figure:
    """The true posterior p(z|x) (filled contours) of each digit of ``evaluate.true_posteriors``
    under q(z|x)'s 1-, 2- and 3-sigma ellipses, one row for the largest gaps and one for the
    smallest; each title gives the digit and KL(q || p(z|x)) = log p(x) - ELBO in nats, and an
    inset shows the image."""
    rows = [(k, label) for k, label in (("largest", "largest gaps"),
                                         ("smallest", "smallest gaps")) if pictures.get(k)]
    if not rows:
        raise ConfigError("the true-posterior figure needs at least one picture")
    ncols = max(len(pictures[k]) for k, _ in rows)
    fig = _figure(1.75 * ncols, 1.85 * len(rows) + 0.3)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (key, label) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(pictures[key]):
                ax.axis("off")
                continue
            pic = pictures[key][c]
            ax.contourf(pic.z1.numpy(), pic.z2.numpy(), pic.density.T.numpy(), levels=10,
                        cmap="Blues")
            for k in (1, 2, 3):
                ax.add_patch(Ellipse(tuple(pic.q_mu.tolist()), 2 * k * float(pic.q_sd[0]),
                                     2 * k * float(pic.q_sd[1]), fill=False, ec="#D55E00",
                                     lw=0.7, ls="-" if k == 1 else "--"))
            inset = ax.inset_axes(_free_corner(pic, 0.28))
            inset.imshow(pic.image.numpy(), cmap="gray_r", vmin=0, vmax=1)
            inset.set_axis_off()
            ax.set_title(f"{pic.label}: KL(q || p) = {pic.gap:.2f}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("$z_1$" if r == len(rows) - 1 else "")
            ax.set_ylabel(f"{label}\n$z_2$" if c == 0 else "")
    fig.suptitle("True posterior p(z|x) (filled) and q(z|x), 1-3 sigma (orange)")
    return fig


@_styled
def latent_scatter(
    model: ConvVAE, split: Split, *, max_points: int = 10000, dims: Sequence[int] | None = None
) -> Figure:
    """Posterior means of ``split`` coloured by digit, with the prior's 1, 2, 3-sigma circles.

    At most ``max_points`` images (a seeded random subset when the split is larger). With more
    than two latent dimensions the two most active ones (largest variance of mu over the data)
    are shown unless ``dims`` (0-based) is given.
    """
    _check_positive(max_points=max_points)
    _require_images(split, "latent_scatter")
    idx = np.sort(_pick(split, max_points, seed=0)) if len(split) > max_points \
        else np.arange(len(split))
    t_idx = torch.as_tensor(idx, dtype=torch.long)
    mu = _encode_means(model, split.images[t_idx], split.labels[t_idx]).numpy()
    labels = split.labels[t_idx].cpu().numpy()
    d = mu.shape[1]
    note = ""
    if d == 1:
        if dims is not None and tuple(dims) not in ((0,), (0, 0)):
            raise ConfigError("the model has one latent dimension: dims must be (0,)")
        chosen: tuple[int, ...] = (0,)
    elif dims is not None:
        chosen = _check_dims(dims, d)
    elif d == 2:
        chosen = (0, 1)
    else:
        order = np.argsort(-mu.var(axis=0), kind="stable")[:2]
        chosen = (int(order[0]), int(order[1]))
        note = f"\nthe two most active of {d} dimensions (largest variance of $\\mu$)"

    fig = _figure(4.8, 4.0)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    x = mu[:, chosen[0]]
    if len(chosen) == 2:
        yv = mu[:, chosen[1]]
    else:  # one latent dimension: a strip per digit
        yv = labels + np.random.default_rng(0).uniform(-0.3, 0.3, size=len(labels))
    for c in range(N_DIGITS):
        m = labels == c
        ax.scatter(x[m], yv[m], s=2.0, color=cmap(c), alpha=0.6, linewidths=0, label=str(c),
                   rasterized=True)
    if len(chosen) == 2:
        for k in (1, 2, 3):
            ax.add_patch(Circle((0, 0), k, fill=False, linestyle=(0, (3, 2)), linewidth=0.7,
                                edgecolor="0.3", zorder=3))
            ax.annotate(f"{k}$\\sigma$", (k * 0.7071, k * 0.7071), xytext=(2, 2),
                        textcoords="offset points", fontsize=6, color="0.3")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_ylabel(_zlabel(chosen[1]))
    else:
        for k in (1, 2, 3):
            for s in (-1, 1):
                ax.axvline(s * k, color="0.3", linestyle=(0, (3, 2)), linewidth=0.7)
        ax.set_ylabel("digit")
        ax.set_yticks(range(N_DIGITS))
    ax.set_xlabel(_zlabel(chosen[0]))
    ax.legend(title="digit", markerscale=4, loc="center left", bbox_to_anchor=(1.01, 0.5),
              handletextpad=0.2)
    ax.set_title(f"Posterior means $\\mu(x)$ of {len(idx):,} images; prior "
                 f"$\\mathcal{{N}}(0, I)$ at 1, 2, 3$\\sigma${note}")
    return fig


@_styled
def traversal_grid(
    model: ConvVAE, *, n: int = 20, y: int | None = None, dims: Sequence[int] = (0, 1),
    span: float = 0.999,
) -> Figure:
    """The learned manifold: decoder means over a z_1 x z_2 grid that covers the prior evenly.

    Grid values are ``Normal(0, 1).icdf`` of ``n`` evenly spaced quantiles in
    ``[(1 - span) / 2, (1 + span) / 2]`` (Kingma & Welling's figure); z_1 grows to the right,
    z_2 upwards, other dimensions are 0. One ``n*28 x n*28`` image (one row for a 1-d latent),
    decoded in one call. A CVAE needs the class ``y``.
    """
    _check_positive(n=n)
    if not 0.0 < float(span) < 1.0:
        raise ConfigError(f"span must be in (0, 1), got {span}")
    label = _class_label(model, y, "traversal_grid")
    d = model.latent_dim
    chosen = _check_dims(dims, d) if d > 1 else (0,)
    lo, hi = (1 - span) / 2, (1 + span) / 2
    q = torch.linspace(lo, hi, n, dtype=torch.float64) if n > 1 \
        else torch.tensor([0.5], dtype=torch.float64)
    values = torch.distributions.Normal(0.0, 1.0).icdf(q)
    rows = n if d > 1 else 1
    z = torch.zeros(rows, n, d, dtype=torch.float64)
    z[:, :, chosen[0]] = values[None, :]
    if d > 1:
        z[:, :, chosen[1]] = values.flip(0)[:, None]  # top row: largest z_2
    images = _decode_means(model, z.reshape(-1, d), label)
    grid = _grid(images, n, pad=0)

    fig = _figure(6.0, 6.3 if d > 1 else 1.6)
    ax = fig.subplots()
    ax.imshow(grid, vmin=0.0, vmax=1.0, interpolation="nearest")
    ticks = np.unique(np.linspace(0, n - 1, min(n, 7)).round().astype(int))
    centers = _tile_centers(n, pad=0)
    ax.set_xticks(centers[ticks], [f"{values[i]:.2f}" for i in ticks])
    ax.set_xlabel(_zlabel(chosen[0]))
    if d > 1:
        ax.set_yticks(centers[ticks], [f"{values[n - 1 - i]:.2f}" for i in ticks])
        ax.set_ylabel(_zlabel(chosen[1]))
    else:
        ax.set_yticks([])
    what = f"{_zlabel(chosen[0])} $\\times$ {_zlabel(chosen[1])}" if d > 1 \
        else _zlabel(chosen[0])
    title = f"Decoded manifold over {what} at Gaussian quantiles (span {span:g})"
    extras = []
    if label is not None:
        extras.append(f"CVAE, class y = {label}")
    if d > len(chosen):
        extras.append(f"other {d - len(chosen)} dimensions at 0")
    if extras:
        title += "\n" + "; ".join(extras)
    ax.set_title(title)
    return fig


@_styled
def interpolations(
    model: ConvVAE, split: Split, *, pairs: int = 6, steps: int = 10, mode: str = "linear",
    seed: int = 0,
) -> Figure:
    """Decoded paths between the posterior means of random pairs of different digits.

    Rows are pairs: input a, ``steps`` decodings from t = 0 to 1, input b. ``mode`` is
    ``"linear"`` or ``"spherical"`` (slerp). A CVAE decodes with a's label for t < 0.5 and b's
    label after (z carries style, the label the digit).
    """
    if mode not in ("linear", "spherical"):
        raise ConfigError(f"unknown interpolation mode '{mode}': choose linear or spherical")
    _check_positive(pairs=pairs)
    if steps < 2:
        raise ConfigError(f"steps must be >= 2, got {steps}")
    _require_images(split, "interpolations", 2)
    a, b = _pick_pairs(split, pairs, seed)
    idx = torch.as_tensor(np.concatenate([a, b]), dtype=torch.long)
    mu = _encode_means(model, split.images[idx], split.labels[idx])
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    path = (_slerp if mode == "spherical" else _lerp)(mu[:pairs], mu[pairs:], t)  # [P, S, D]
    ya = split.labels[torch.as_tensor(a, dtype=torch.long)].cpu()
    yb = split.labels[torch.as_tensor(b, dtype=torch.long)].cpu()
    labels = torch.where(t[None, :] < 0.5, ya[:, None], yb[:, None]).reshape(-1) \
        if model.conditional else None
    decoded = _decode_means(model, path.reshape(-1, model.latent_dim), labels)
    decoded = decoded.reshape(pairs, steps, *decoded.shape[1:])
    tiles = np.concatenate([_images(split, a)[:, None], decoded, _images(split, b)[:, None]],
                           axis=1)
    grid = _grid(tiles.reshape(-1, *tiles.shape[2:]), steps + 2)

    fig = _figure(0.45 * (steps + 2) + 0.9, 0.45 * pairs + 0.9)
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_xticks(_tile_centers(steps + 2),
                  ["$x_a$", *(f"{v:.2f}" for v in t.tolist()), "$x_b$"])
    ax.set_xlabel("t (input a, decoded path, input b)")
    ax.set_yticks(_tile_centers(pairs),
                  [f"{int(i)} → {int(j)}" for i, j in zip(ya, yb, strict=True)])
    ax.set_ylabel("digits a → b")
    how = "Spherical (slerp)" if mode == "spherical" else "Linear"
    title = f"{how} interpolation between posterior means $\\mu(x_a)$, $\\mu(x_b)$"
    if model.conditional:
        title += "\nCVAE: decoded with label a for t < 0.5, label b after"
    ax.set_title(title)
    return fig


@_styled
def cvae_label_interpolation(
    model: ConvVAE, split: Split, *, labels: Sequence[int] = (1, 7), steps: int = 10,
    seed: int = 0,
) -> Figure:
    """One z path (linear, between two encoded test images) decoded under each of ``labels``.

    Rows are labels (the study's rows 1-2 with the default ``(1, 7)``); the two inputs whose
    posterior means are the path's ends are shown left and right.
    """
    _require_cvae(model, "cvae_label_interpolation")
    classes = [_check_class(model, c) for c in labels]
    if not classes:
        raise ConfigError("labels must name at least one class")
    if steps < 2:
        raise ConfigError(f"steps must be >= 2, got {steps}")
    _require_images(split, "cvae_label_interpolation", 2)
    a, b = _pick_pairs(split, 1, seed)
    idx = torch.as_tensor(np.concatenate([a, b]), dtype=torch.long)
    mu = _encode_means(model, split.images[idx], split.labels[idx])
    t = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    path = _lerp(mu[:1], mu[1:], t)[0]  # [S, D]
    n_rows = len(classes)
    z = path.repeat(n_rows, 1)
    y = torch.tensor(classes, dtype=torch.long).repeat_interleave(steps)
    decoded = _decode_means(model, z, y)
    grid = _grid(decoded, steps)

    fig = _figure(0.45 * (steps + 2) + 1.0, 0.45 * n_rows + 1.1)
    ax_a, ax, ax_b = fig.subplots(1, 3, width_ratios=[TILE, grid.shape[1], TILE])
    ya, yb = int(split.labels[a[0]]), int(split.labels[b[0]])
    for side, image, name, digit in ((ax_a, _images(split, a)[0], "a", ya),
                                     (ax_b, _images(split, b)[0], "b", yb)):
        _show(side, image)
        side.set_title(f"$x_{name}$ ({digit})", fontsize=7)
    _show(ax, grid)
    ax.set_xticks(_tile_centers(steps), [f"{v:.2f}" for v in t.tolist()])
    ax.set_xlabel("t along $(1-t)\\,\\mu(x_a) + t\\,\\mu(x_b)$")
    ax.set_yticks(_tile_centers(n_rows), [f"y = {c}" for c in classes])
    ax.set_title("CVAE: the same latent path decoded under each label")
    return fig


@_styled
def style_transfer(model: ConvVAE, split: Split, *, n_styles: int = 5, seed: int = 0) -> Figure:
    """Fixed styles z = mu(x, y) of a few test images decoded under every class.

    First column: the inputs; then one column per class 0..C-1 (the study's row 3, for several
    styles). All styles x classes are decoded in one call.
    """
    _require_cvae(model, "style_transfer")
    _check_positive(n_styles=n_styles)
    _require_images(split, "style_transfer")
    idx = _pick(split, n_styles, seed)
    t_idx = torch.as_tensor(idx, dtype=torch.long)
    mu = _encode_means(model, split.images[t_idx], split.labels[t_idx])
    rows, c = len(idx), _num_classes(model)
    z = mu.repeat_interleave(c, dim=0)
    y = torch.arange(c).repeat(rows)
    grid = _grid(_decode_means(model, z, y), c)
    inputs = _grid(_images(split, idx), 1)

    fig = _figure(0.42 * (c + 1) + 1.0, 0.42 * rows + 1.0)
    ax_in, ax = fig.subplots(1, 2, width_ratios=[inputs.shape[1], grid.shape[1]])
    _show(ax_in, inputs)
    ax_in.set_title("input", fontsize=7)
    ax_in.set_yticks(_tile_centers(rows), [str(int(v)) for v in split.labels[t_idx]])
    ax_in.set_ylabel("style from test image (its digit)")
    _show(ax, grid)
    ax.set_xticks(_tile_centers(c), [str(k) for k in range(c)])
    ax.set_xlabel("decoded under class y")
    ax.set_title("CVAE style transfer: $z = \\mu(x, y)$ of each input, decoded under every class")
    return fig


@_styled
def samples_per_class(model: ConvVAE, *, per_class: int = 10, seed: int = 0) -> Figure:
    """CVAE samples: independent z ~ N(0, I) decoded under each class, one row per class."""
    _require_cvae(model, "samples_per_class")
    _check_positive(per_class=per_class)
    c = _num_classes(model)
    z = _seeded_normal(c * per_class, model.latent_dim, seed)
    y = torch.arange(c).repeat_interleave(per_class)
    grid = _grid(_decode_means(model, z, y), per_class)

    fig = _figure(0.42 * per_class + 1.0, 0.42 * c + 0.9)
    ax = fig.subplots()
    _show(ax, grid)
    ax.set_yticks(_tile_centers(c), [str(k) for k in range(c)])
    ax.set_ylabel("class y")
    ax.set_xlabel(f"{per_class} independent draws $z \\sim \\mathcal{{N}}(0, I)$ per class")
    ax.set_title("CVAE samples per class (decoder means)")
    return fig


@_styled
def reconstructions(model: ConvVAE, split: Split, *, n: int = 16, seed: int = 0) -> Figure:
    """``n`` random inputs above their reconstructions, the decoder mean at z = mu(x).

    Up to 16 per row; a CVAE decodes with each image's true label.
    """
    _check_positive(n=n)
    _require_images(split, "reconstructions")
    idx = _pick(split, n, seed)
    t_idx = torch.as_tensor(idx, dtype=torch.long)
    labels = split.labels[t_idx]
    mu = _encode_means(model, split.images[t_idx], labels)
    recon = _decode_means(model, mu, labels.cpu() if model.conditional else None)
    ncol = min(len(idx), 16)
    top, bottom = _grid(_images(split, idx), ncol), _grid(recon, ncol)

    rows = math.ceil(len(idx) / ncol)
    fig = _figure(0.42 * ncol + 0.6, 2 * 0.42 * rows + 1.1)
    ax_in, ax_out = fig.subplots(2, 1)
    _show(ax_in, top)
    ax_in.set_title("input $x$", fontsize=8)
    _show(ax_out, bottom)
    how = " with the true label" if model.conditional else ""
    ax_out.set_title(f"reconstruction: decoder mean at the posterior mean $z = \\mu(x)${how}",
                     fontsize=8)
    fig.suptitle("Reconstructions (no sampling)")
    return fig


@_styled
def prior_samples(model: ConvVAE, *, n: int = 64, seed: int = 0, y: int | None = None) -> Figure:
    """Decoder means of ``n`` draws z ~ N(0, I), as one grid (one decoder call).

    A CVAE decodes every draw under class ``y``; without ``y`` it cycles through the classes,
    one class per column.
    """
    _check_positive(n=n)
    if model.conditional and y is None:
        c = _num_classes(model)
        labels: int | torch.Tensor | None = torch.arange(n) % c
        ncol = c
        note = f"\nCVAE: column k decoded under class k (0-{c - 1})"
    else:
        labels = _class_label(model, y, "prior_samples")
        ncol = max(1, math.ceil(math.sqrt(n)))
        note = f"\nCVAE, class y = {labels}" if labels is not None else ""
    z = _seeded_normal(n, model.latent_dim, seed)
    grid = _grid(_decode_means(model, z, labels), ncol)

    rows = math.ceil(n / ncol)
    fig = _figure(0.42 * ncol + 0.6, 0.42 * rows + 0.9)
    ax = fig.subplots()
    _show(ax, grid)
    if isinstance(labels, torch.Tensor):
        ax.set_xticks(_tile_centers(ncol), [str(k) for k in range(ncol)])
        ax.set_xlabel("class y")
    ax.set_title(f"Samples: decoder means of {n} draws $z \\sim \\mathcal{{N}}(0, I)${note}")
    return fig


# --------------------------------------------------------------------------------------------
# Saving, the registry, drawing a run's figures
# --------------------------------------------------------------------------------------------
def _close(fig: Figure) -> None:
    """Release ``fig``: from pyplot's registry if pyplot is in use (ours never are)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def _check_formats(formats: Iterable[str]) -> list[str]:
    chosen = list(dict.fromkeys(str(f).lower().lstrip(".") for f in formats))
    if not chosen:
        raise ConfigError("no figure format given: choose from " + ", ".join(SAVE_FORMATS))
    for f in chosen:
        if f not in SAVE_FORMATS:
            raise ConfigError(f"unknown figure format '{f}': choose from {', '.join(SAVE_FORMATS)}")
    return chosen


def save_figure(
    fig: Figure, stem: str | Path, formats: Iterable[str] = ("png", "pdf")
) -> list[Path]:
    """Write ``fig`` to ``<stem>.<format>`` for each format, atomically; close it.

    Every format is rendered to bytes first (at :data:`STYLE`'s 300 dpi), then each file is
    replaced atomically, so a failure leaves the previous files untouched. Returns the paths.
    """
    formats = _check_formats(formats)
    stem = Path(stem)
    try:
        rendered = []
        with matplotlib.rc_context(STYLE):
            for f in formats:
                buf = io.BytesIO()
                fig.savefig(buf, format=f, dpi=STYLE["savefig.dpi"], metadata=_METADATA[f])
                rendered.append((stem.with_name(f"{stem.name}.{f}"), buf.getvalue()))
        for path, data in rendered:
            atomic_write_bytes(path, data)
    finally:
        _close(fig)
    return [path for path, _ in rendered]


class FigureSpec(NamedTuple):
    """A figure of the registry: how to draw it for a run, its caption, what it applies to."""

    draw: Callable[..., Figure]  # (run, dataset), and the exact log p(x) where uses_exact
    caption: str
    applies_to: str  # "all", "cvae" or "latent2" (a 2-D latent)
    uses_exact: bool = False  # takes an evaluation's per-image exact log p(x), or None


FIGURES: dict[str, FigureSpec] = {
    "curves": FigureSpec(
        lambda run, ds: training_curves(run.metrics),
        "Training curves: reconstruction, KL and -ELBO (nats per image) per epoch for the "
        "training, validation and test sets, with the KL weight beta on the right axis. "
        "Validation and test values are at beta = 1.",
        "all"),
    "latent": FigureSpec(
        lambda run, ds: latent_scatter(run.model, ds.test),
        "Latent space: posterior means mu(x) of the test images coloured by digit, with the "
        "prior N(0, I)'s 1, 2 and 3-sigma circles (the two most active dimensions when the "
        "latent has more than two).",
        "all"),
    "traversal": FigureSpec(
        lambda run, ds: traversal_grid(
            run.model, y=TRAVERSAL_CLASS if run.model.conditional else None),
        "Learned manifold: decoder means over a 20 x 20 grid of z_1 x z_2 placed at the "
        "Gaussian quantiles of the prior (Kingma & Welling), other dimensions at 0; for a CVAE "
        f"drawn for class {TRAVERSAL_CLASS}.",
        "all"),
    "interpolation-linear": FigureSpec(
        lambda run, ds: interpolations(run.model, ds.test, mode="linear"),
        "Linear interpolation between the posterior means of random test pairs of different "
        "digits: each row shows input a, the decoded path from t = 0 to 1, and input b.",
        "all"),
    "interpolation-spherical": FigureSpec(
        lambda run, ds: interpolations(run.model, ds.test, mode="spherical"),
        "Spherical (slerp) interpolation between the posterior means of the same random test "
        "pairs: each row shows input a, the decoded great-circle path, and input b.",
        "all"),
    "reconstructions": FigureSpec(
        lambda run, ds: reconstructions(run.model, ds.test),
        "Reconstructions: random test inputs (top) and the decoder mean at their posterior "
        "mean z = mu(x) (bottom), without sampling.",
        "all"),
    "samples": FigureSpec(
        lambda run, ds: prior_samples(run.model, n=60 if run.model.conditional else 64),
        "Samples: decoder means of 64 draws z ~ N(0, I) from the prior (for a CVAE 60 draws, "
        "column k decoded under class k).",
        "all"),
    "cvae-interpolation": FigureSpec(
        lambda run, ds: cvae_label_interpolation(run.model, ds.test),
        "CVAE: one linear path between the posterior means of two test images, decoded under "
        "label 1 (top row) and label 7 (bottom row): the label sets the digit, z the style.",
        "cvae"),
    "style-transfer": FigureSpec(
        lambda run, ds: style_transfer(run.model, ds.test),
        "CVAE style transfer: the posterior mean z of each test image (left) decoded under "
        "every class 0-9.",
        "cvae"),
    "samples-per-class": FigureSpec(
        lambda run, ds: samples_per_class(run.model),
        "CVAE samples per class: independent draws z ~ N(0, I) decoded under each class 0-9 "
        "(one row per class).",
        "cvae"),
    "true-posterior": FigureSpec(
        lambda run, ds, exact: true_posterior(_true_posteriors(run, ds, exact)),
        "The true posterior p(z|x) (filled contours, by quadrature) under q(z|x)'s 1, 2 and "
        "3-sigma ellipses, for the five test digits of distinct classes with the largest gap "
        "KL(q || p(z|x)) = log p(x) - ELBO (top) and the five with the smallest (bottom), among "
        "the first 300 test images: what the Gaussian encoder misses.",
        "latent2", uses_exact=True),
}
"""Every figure of the study by name (the file stem ``draw_all`` writes)."""


def _applies(spec: FigureSpec, model: ConvVAE) -> bool:
    return (spec.applies_to == "all" or (spec.applies_to == "cvae" and model.conditional)
            or (spec.applies_to == "latent2" and model.latent_dim == 2))


def _true_posteriors(run: Run, ds: Dataset, exact: ExactLogPx | None
                     ) -> dict[str, list[PosteriorPicture]]:
    from vaelab.evaluate import true_posteriors

    return true_posteriors(run.model, ds.test, exact=exact,
                           likelihood=run.config["config"].get("likelihood", "bernoulli"))


def select_figures(run: Run, names: str | Iterable[str] = "all") -> list[str]:
    """The figure names to draw for ``run``: ``"all"`` expands to every one that applies.

    An unknown name, or a CVAE-only figure asked of a VAE, is a ConfigError.
    """
    names = [names] if isinstance(names, str) else list(names)
    chosen: list[str] = []
    for name in names:
        if name == "all":
            chosen += [k for k, s in FIGURES.items() if _applies(s, run.model)]
            continue
        spec = FIGURES.get(name)
        if spec is None:
            raise ConfigError(
                f"unknown figure '{name}': choose all or one of {', '.join(FIGURES)}"
            )
        if not _applies(spec, run.model):
            need = "a 2-D latent" if spec.applies_to == "latent2" else "a CVAE"
            have = (f"has a {run.model.latent_dim}-D latent" if spec.applies_to == "latent2"
                    else f"is a {_kind(run.model)}")
            raise ConfigError(f"figure '{name}' needs {need}, but run {run.path} {have}")
        chosen.append(name)
    return list(dict.fromkeys(chosen))


def draw_all(
    run: Run, dataset: Dataset, out_dir: str | Path, formats: Iterable[str] = ("png", "pdf"),
    *, names: str | Iterable[str] = "all", exact: ExactLogPx | None = None,
) -> dict[str, list[Path]]:
    """Draw every figure of ``names`` (default: all that apply to ``run``) into ``out_dir``.

    Files are ``<out_dir>/<name>.<format>``; returns name -> written paths. ``exact``: the
    test split's per-image exact log p(x) from an evaluation (``evaluate.ExactLogPx``), which
    the true-posterior figure then takes instead of a quadrature of its own.
    """
    chosen = select_figures(run, names)
    formats = _check_formats(formats)
    out = Path(out_dir)
    make_folder(out)

    def draw(spec: FigureSpec) -> Figure:
        return spec.draw(run, dataset, exact) if spec.uses_exact else spec.draw(run, dataset)

    return {name: save_figure(draw(FIGURES[name]), out / name, formats) for name in chosen}
