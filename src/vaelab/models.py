"""VAE and conditional VAE for 28x28 images, convolutional or MLP. No loss inside: see
objectives.

Inference network (encoder)  q_phi(z | x[, c]) = N(mu, diag sigma^2)
Generative network (decoder) p_theta(x | z[, c]) with logits eta = decoder(z[, c])
Prior                        p(z) = N(0, I), the same for every class
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.errors import CheckpointError, ConfigError
from vaelab.objectives import reparameterize

MODEL_KINDS = ("vae", "cvae")
ARCHS = ("conv", "mlp")
# How a CVAE sees the label. Its encoder always gets it as an extra input channel and its decoder
# as a one-hot beside z at the first layer: "input", the study's, is that alone; "film" adds a
# per-class scale and shift of every later decoder layer's features (FiLM: Perez et al. 2018),
# so each layer can specialise to the class; "film-both" does the same in the encoder too.
LABEL_CONDITIONINGS = ("input", "film", "film-both")
# The MLP of Davidson et al. 2018 (hyperspherical VAE): the issue does not give its sizes, so
# these are the authors' public example code's (s-vae-tf, examples/mnist.py, H_DIM = 128):
# encoder 784 -> 256 -> 128, decoder z -> 128 -> 256 -> 784, ReLU. (Their encoder gives a
# softplus standard deviation; vaelab's gives log sigma^2, the same family.)
MLP_HIDDEN = (256, 128)
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "gelu": nn.GELU}


class VAEOutput(NamedTuple):
    """What ``forward`` returns: the posterior's parameters, one sample and its decoding."""

    mu: Tensor  # [B, D]
    logvar: Tensor  # [B, D]  log sigma^2
    z: Tensor  # [B, D]  one sample z ~ q(z|x)  ([K, B, D]: K samples, given eps [K, B, D])
    logits: Tensor  # [B, 1, H, W]  decoder logits eta  ([K, B, 1, H, W] for K samples)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; saved beside its weights as JSON."""

    kind: str = "vae"
    latent_dim: int = 2
    channels: tuple[int, int] = (32, 64)
    enc_hidden: int = 512
    dec_hidden: int = 512
    activation: str = "relu"
    dec_mlp_layers: int = 1
    dec_refine: int = 0
    enc_mlp_layers: int = 1
    enc_refine: int = 0
    dec_full_channels: int = 0
    arch: str = "conv"  # "mlp": MLPEncoder / MLPDecoder with mlp_hidden (conv knobs unused)
    mlp_hidden: tuple[int, int] = MLP_HIDDEN  # encoder widths; the decoder mirrors them
    label_conditioning: str = "input"  # a CVAE's (LABEL_CONDITIONINGS)
    num_classes: int = 10
    image_size: int = 28

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "mlp_hidden", tuple(int(h) for h in self.mlp_hidden))
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown architecture {self.arch!r:.40}: choose conv or mlp")
        if len(self.mlp_hidden) != 2 or min(self.mlp_hidden) < 1:
            raise ConfigError(f"mlp_hidden must be two positive integers, got {self.mlp_hidden}")
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"unknown model '{self.kind}': choose vae or cvae")
        if self.label_conditioning not in LABEL_CONDITIONINGS:
            raise ConfigError(f"unknown label conditioning {self.label_conditioning!r:.40}: "
                              f"choose one of {', '.join(LABEL_CONDITIONINGS)}")
        if self.latent_dim < 1:
            raise ConfigError(f"latent size must be >= 1, got {self.latent_dim}")
        if len(self.channels) != 2 or min(self.channels) < 1:
            raise ConfigError(f"channels must be two positive integers, got {self.channels}")
        if min(self.enc_hidden, self.dec_hidden) < 1:
            raise ConfigError("hidden sizes must be >= 1")
        if min(self.dec_mlp_layers, self.enc_mlp_layers) < 1:
            raise ConfigError("dec_mlp_layers and enc_mlp_layers must be >= 1")
        if min(self.dec_refine, self.enc_refine, self.dec_full_channels) < 0:
            raise ConfigError("dec_refine, enc_refine and dec_full_channels must be >= 0")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation '{self.activation}': choose one of {', '.join(ACTIVATIONS)}"
            )
        if self.image_size % 4 != 0 or self.image_size < 4:
            raise ConfigError(f"image size must be a multiple of 4, got {self.image_size}")
        if self.num_classes < 1:
            raise ConfigError("num_classes must be >= 1")

    def parameter_count(self) -> int:
        """The number of weights and biases of the model, counted from the spec alone (exact,
        in Python integers: nothing is allocated, however large the sizes)."""
        c1, c2 = self.channels
        n = self.image_size
        s = n // 4
        cond = self.kind == "cvae"
        k = self.num_classes

        def linear(i: int, o: int) -> int:
            return i * o + o

        film = cond and self.label_conditioning in ("film", "film-both")
        enc_film = cond and self.label_conditioning == "film-both"
        if self.arch == "mlp":
            h1, h2 = self.mlp_hidden
            enc = linear((1 + cond) * n * n, h1) + linear(h1, h2) + linear(h2, 2 * self.latent_dim)
            dec = linear(self.latent_dim + (k if cond else 0), h2) + linear(h2, h1)
            films = 2 * k * (h2 + h1 + n * n) if film else 0
            films += 2 * k * (h1 + h2 + 2 * self.latent_dim) if enc_film else 0
            return enc + dec + linear(h1, n * n) + (k * n * n if cond else 0) + films

        def conv(i: int, o: int, size: int) -> int:
            return i * o * size * size + o

        enc = conv(1 + cond, c1, 4) + self.enc_refine * conv(c1, c1, 3) + conv(c1, c2, 4)
        enc += linear(c2 * s * s, self.enc_hidden)
        enc += (self.enc_mlp_layers - 1) * linear(self.enc_hidden, self.enc_hidden)
        enc += linear(self.enc_hidden, 2 * self.latent_dim)
        f = self.dec_full_channels
        dec = linear(self.latent_dim + (k if cond else 0), self.dec_hidden)
        dec += (self.dec_mlp_layers - 1) * linear(self.dec_hidden, self.dec_hidden)
        dec += linear(self.dec_hidden, c2 * s * s) + conv(c2, c1, 4)
        dec += self.dec_refine * conv(c1, c1, 3)
        dec += conv(c1, f, 4) + conv(f, 1, 3) if f else conv(c1, 1, 4)
        # the widths FiLM scales and shifts, summed as numbers (a list of the layers would be as
        # long as a hand-edited layer count)
        widths = self.dec_hidden * self.dec_mlp_layers + c2 * s * s + c1 * (1 + self.dec_refine)
        widths += f + 1 if f else 1
        films = 2 * k * widths if film else 0
        enc_widths = c1 * (1 + self.enc_refine) + c2 + self.enc_hidden * self.enc_mlp_layers
        films += 2 * k * (enc_widths + 2 * self.latent_dim) if enc_film else 0
        return enc + dec + (k * n * n if cond else 0) + films

    def activations_per_image(self, samples: int = 1) -> int:
        """About how many numbers one image's forward pass keeps for the backward pass: the
        output of every layer and activation, the decoder's for each of ``samples`` draws of z
        (an estimate for the memory check, not exact)."""
        c1, c2 = self.channels
        n = self.image_size
        cond = n * n if self.kind == "cvae" else 0
        if self.arch == "mlp":
            h = 2 * sum(self.mlp_hidden)
            return h + 2 * self.latent_dim + samples * (3 * self.latent_dim + h + n * n) \
                + cond + n * n
        half, quarter = c1 * (n // 2) ** 2, c2 * (n // 4) ** 2
        enc = 2 * half * (1 + self.enc_refine) + 2 * quarter
        enc += 2 * self.enc_hidden * self.enc_mlp_layers + 2 * self.latent_dim
        dec = 2 * self.dec_hidden * self.dec_mlp_layers + 2 * quarter
        dec += 2 * half * (1 + self.dec_refine)
        dec += (2 * self.dec_full_channels + 1) * n * n if self.dec_full_channels else n * n
        return enc + samples * (3 * self.latent_dim + dec) + cond + n * n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            names = [n if n.isidentifier() and len(n) <= 40 else repr(n)[:40]
                     for n in sorted(unknown)[:5]]
            raise CheckpointError(f"model spec has unknown fields: {', '.join(names)}")
        return cls(**d)

AFFINE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


class FiLMStack(nn.Module):
    """What every encoder and decoder shares: ``net``, a stack of layers, and with
    ``film_classes`` = K > 0 a per-class scale and shift (FiLM) of the output of each of its
    linear and conv layers: h <- h * (1 + gamma[c]) + beta[c], per feature (per channel for a
    feature map), both 0 at the start (the plain network)."""

    net: nn.Sequential

    def _add_film(self, film_classes: int) -> None:
        at = [i for i, m in enumerate(self.net) if isinstance(m, AFFINE)]
        self._film_at = frozenset(at)  # looked up once per layer and step
        widths = [m.out_features if isinstance(m, nn.Linear) else m.out_channels
                  for m in (self.net[i] for i in at)]
        self.film = nn.ModuleList(nn.Embedding(film_classes, 2 * w) for w in widths) \
            if film_classes else None
        for table in self.film or ():
            nn.init.zeros_(table.weight)

    def run(self, h: Tensor, y: Tensor | None = None) -> Tensor:
        """``net`` on ``h``, each layer modulated by the label ``y`` where it has FiLM."""
        if self.film is None:
            return self.net(h)
        if y is None:
            raise ConfigError("this network is conditioned on the label (FiLM): give y")
        tables = iter(self.film)
        for i, layer in enumerate(self.net):
            h = layer(h)
            if i in self._film_at:
                gamma, beta = next(tables)(y).to(h.dtype).chunk(2, dim=1)
                if h.dim() == 4:
                    gamma, beta = gamma[:, :, None, None], beta[:, :, None, None]
                h = torch.addcmul(h + beta, h, gamma)
        return h


class Encoder(FiLMStack):
    """x [B, C, H, W] (and the label, with FiLM) -> (mu, logvar) [B, D]."""

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mu, logvar = self.run(x, y).chunk(2, dim=1)
        return mu, logvar


class Decoder(FiLMStack):
    """z [B, D_in] (and the label, with FiLM) -> logits [B, 1, H, W]."""

    def forward(self, h: Tensor, y: Tensor | None = None) -> Tensor:
        return self.run(h, y)

    @torch.no_grad()
    def set_output_bias(self, pixel_mean: float) -> None:
        """Start the output at the data's mean intensity: bias = logit(mean)."""
        p = min(max(pixel_mean, 1e-3), 1 - 1e-3)
        last = [m for m in self.net if isinstance(m, AFFINE)][-1]
        last.bias.fill_(float(torch.logit(torch.tensor(p))))


class ConvEncoder(Encoder):
    """x [B, C, H, W] -> (mu, logvar) [B, D]: a stride-2 4x4 convolution to c1 x H/2 x W/2,
    ``enc_refine`` 3x3 convs at that resolution, a stride-2 4x4 convolution to c2 x H/4 x W/4,
    then an MLP with ``enc_mlp_layers`` hidden layers."""

    def __init__(self, in_channels: int, spec: ModelSpec, film_classes: int = 0) -> None:
        super().__init__()
        c1, c2 = spec.channels
        act = ACTIVATIONS[spec.activation]
        s = spec.image_size // 4
        refine: list[nn.Module] = []
        for _ in range(spec.enc_refine):
            refine += [nn.Conv2d(c1, c1, 3, 1, 1), act()]
        mlp: list[nn.Module] = [nn.Linear(c2 * s * s, spec.enc_hidden), act()]
        for _ in range(spec.enc_mlp_layers - 1):
            mlp += [nn.Linear(spec.enc_hidden, spec.enc_hidden), act()]
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c1, 4, 2, 1), act(),
            *refine,
            nn.Conv2d(c1, c2, 4, 2, 1), act(),
            nn.Flatten(),
            *mlp,
            nn.Linear(spec.enc_hidden, 2 * spec.latent_dim),
        )
        self._add_film(film_classes)


class ConvDecoder(Decoder):
    """z [B, D_in] -> logits [B, 1, H, W]: an MLP (``dec_mlp_layers`` hidden layers) to a
    c2 x H/4 x W/4 map, a stride-2 transposed conv to c1 x H/2 x W/2, ``dec_refine`` 3x3 convs
    at that resolution, and a last stride-2 transposed conv to the logits. With
    ``dec_full_channels`` = F > 0 that last conv gives F x H x W features instead, and a 3x3 conv
    at full resolution turns them into the logits."""

    def __init__(self, in_features: int, spec: ModelSpec, film_classes: int = 0) -> None:
        super().__init__()
        c1, c2 = spec.channels
        act = ACTIVATIONS[spec.activation]
        s = spec.image_size // 4
        mlp: list[nn.Module] = [nn.Linear(in_features, spec.dec_hidden), act()]
        for _ in range(spec.dec_mlp_layers - 1):
            mlp += [nn.Linear(spec.dec_hidden, spec.dec_hidden), act()]
        refine: list[nn.Module] = []
        for _ in range(spec.dec_refine):
            refine += [nn.Conv2d(c1, c1, 3, 1, 1), act()]
        f = spec.dec_full_channels
        head: list[nn.Module] = (
            [nn.ConvTranspose2d(c1, f, 4, 2, 1), act(), nn.Conv2d(f, 1, 3, 1, 1)] if f
            else [nn.ConvTranspose2d(c1, 1, 4, 2, 1)]
        )
        self.net = nn.Sequential(
            *mlp,
            nn.Linear(spec.dec_hidden, c2 * s * s), act(),
            nn.Unflatten(1, (c2, s, s)),
            nn.ConvTranspose2d(c2, c1, 4, 2, 1), act(),
            *refine,
            *head,
        )
        self._add_film(film_classes)



class MLPEncoder(Encoder):
    """x [B, C, H, W] -> (mu, logvar) [B, D]: flatten, two hidden layers of ``mlp_hidden``
    (h1, h2) units, then a linear layer to (mu, logvar)."""

    def __init__(self, in_channels: int, spec: ModelSpec, film_classes: int = 0) -> None:
        super().__init__()
        act = ACTIVATIONS[spec.activation]
        h1, h2 = spec.mlp_hidden
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * spec.image_size**2, h1), act(),
            nn.Linear(h1, h2), act(),
            nn.Linear(h2, 2 * spec.latent_dim),
        )
        self._add_film(film_classes)


class MLPDecoder(Decoder):
    """z [B, D_in] -> logits [B, 1, H, W]: the encoder mirrored, hidden layers of h2 then h1
    units, then a linear layer to one logit per pixel."""

    def __init__(self, in_features: int, spec: ModelSpec, film_classes: int = 0) -> None:
        super().__init__()
        act = ACTIVATIONS[spec.activation]
        h1, h2 = spec.mlp_hidden
        n = spec.image_size
        self.net = nn.Sequential(
            nn.Linear(in_features, h2), act(),
            nn.Linear(h2, h1), act(),
            nn.Linear(h1, n * n),
            nn.Unflatten(1, (1, n, n)),
        )
        self._add_film(film_classes)



class ConvVAE(nn.Module):
    """The study's VAE: encoder -> (mu, log sigma^2), decoder -> logits. The networks are
    convolutional (ConvEncoder, ConvDecoder) or, with ``spec.arch == "mlp"``, MLPs."""

    conditional = False

    def __init__(self, spec: ModelSpec | None = None, **kwargs: Any) -> None:
        super().__init__()
        spec = spec or ModelSpec(kind="vae", **kwargs)
        self.spec = spec
        self.latent_dim = spec.latent_dim
        mlp = spec.arch == "mlp"
        film = spec.label_conditioning if self.conditional else "input"
        self.encoder = (MLPEncoder if mlp else ConvEncoder)(
            1 + self._extra_channels(), spec, spec.num_classes if film == "film-both" else 0)
        self.decoder = (MLPDecoder if mlp else ConvDecoder)(
            spec.latent_dim + self._extra_features(), spec,
            spec.num_classes if film in ("film", "film-both") else 0)

    def _extra_channels(self) -> int:
        return 0

    def _extra_features(self) -> int:
        return 0

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """q(z|x): the posterior's mean and log-variance, each [B, D]."""
        return self.encoder(x)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """p(x|z): Bernoulli logits [B, 1, H, W]."""
        return self.decoder(z)

    def forward(
        self, x: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None,
        eps: Tensor | None = None,
    ) -> VAEOutput:
        """Encode, draw z (from ``eps`` when given, else from ``generator``), decode.

        ``eps`` of shape [K, B, D] draws K samples of z per image, all decoded in one pass:
        z [K, B, D] and logits [K, B, 1, H, W] (what an importance-weighted bound needs).
        """
        mu, logvar = self.encode(x, y)
        if eps is not None and eps.dim() == 3:
            k, b, d = eps.shape
            z = reparameterize(mu.expand(k, -1, -1), logvar.expand(k, -1, -1), eps=eps)
            logits = self.decode(z.reshape(k * b, d), None if y is None else y.repeat(k))
            return VAEOutput(mu, logvar, z, logits.unflatten(0, (k, b)))
        z = reparameterize(mu, logvar, generator, eps)
        return VAEOutput(mu, logvar, z, self.decode(z, y))


class ConvCVAE(ConvVAE):
    """The study's conditional VAE.

    Encoder q(z|x, c): the label is embedded to a 1 x H x W map and concatenated to the image as
    an extra channel. Decoder p(x|z, c): z is concatenated with the one-hot label; with
    ``label_conditioning="film"`` the label also scales and shifts every later layer, and with
    ``"film-both"`` every encoder layer too. The prior
    p(z) = N(0, I) does not depend on c, so z is free to carry style and c carries the class.
    """

    conditional = True

    def __init__(self, spec: ModelSpec | None = None, **kwargs: Any) -> None:
        spec = spec or ModelSpec(kind="cvae", **kwargs)
        super().__init__(spec)
        n = spec.image_size
        self.label_map = nn.Embedding(spec.num_classes, n * n)

    def _extra_channels(self) -> int:
        return 1

    def _extra_features(self) -> int:
        return self.spec.num_classes

    def _check_labels(self, y: Tensor | None, batch: int) -> Tensor:
        if y is None:
            raise ConfigError("a CVAE needs the class labels y")
        if y.shape != (batch,):
            raise ConfigError(f"labels must have shape [{batch}], got {list(y.shape)}")
        return y

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y = self._check_labels(y, x.shape[0])
        n = self.spec.image_size
        c = self.label_map(y).view(-1, 1, n, n).to(x.dtype)
        return self.encoder(torch.cat([x, c.contiguous(memory_format=_memory_format(x))], 1), y)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        y = self._check_labels(y, z.shape[0])
        onehot = F.one_hot(y, self.spec.num_classes).to(z.dtype)
        return self.decoder(torch.cat([z, onehot], 1), y)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def build_model(spec: ModelSpec) -> ConvVAE:
    """A fresh model for ``spec`` (``ConvVAE`` or ``ConvCVAE``, conv or MLP networks)."""
    return ConvCVAE(spec) if spec.kind == "cvae" else ConvVAE(spec)
