"""The plain reference ``vaelab bench`` measures against: training written the way tutorials
write it. It is part of the package and imported as such: ``vaelab bench`` never runs a file
found in the current folder.

A ``Dataset`` returning one image tensor per ``__getitem__``, ``DataLoader(batch_size=128,
shuffle=True)``, fp32, eager, constant learning rate, the loss written inline and ``.item()``
every step.

For *throughput* the network is vaelab's own ``ConvVAE``/``ConvCVAE`` with vaelab's default
architecture (identical layers and initialisation), so the only differences measured are in how
the training is driven. For *time to quality* the reference is the whole tutorial recipe: the
loop above with the study's plain network, ``tutorial_spec``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from vaelab.data import Split
from vaelab.models import ConvVAE, ModelSpec


def tutorial_spec(kind: str) -> ModelSpec:
    """The study's network as tutorials write it. Encoder: Conv(4, stride 2) to 32 and to 64
    channels, Linear(3136, 512), Linear(512, 2 x latent). Decoder: Linear(latent, 512),
    Linear(512, 3136), ConvTranspose(stride 2) to 32 channels and to the logits."""
    return ModelSpec(kind=kind, channels=(32, 64), enc_hidden=512, dec_hidden=512,
                     dec_mlp_layers=1, dec_refine=0, enc_mlp_layers=1, enc_refine=0,
                     dec_full_channels=0)


class MNISTTensors(TorchDataset):
    """One (image, label) per index, as the tutorials' ``datasets.MNIST`` + ``ToTensor`` give."""

    def __init__(self, split: Split) -> None:
        self.images = split.images.cpu()
        self.labels = split.labels.cpu()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].unsqueeze(0).float() / 255.0, int(self.labels[i])


def loss_function(logits, x, mu, logvar, beta=1.0):
    """The tutorials' loss: BCE summed over pixels + beta * KL, averaged over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + beta * kld) / x.shape[0], bce / x.shape[0], kld / x.shape[0]


def train_reference(
    model: ConvVAE,
    split: Split,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup_epochs: float = 10.0,
    max_steps: int | None = None,
    on_epoch_end: Callable[[int, float], bool] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Train in the tutorial style; returns images/s and per-step losses read with ``.item()``.

    ``on_epoch_end(epoch, elapsed_s)`` may return True to stop (time-to-quality measurements).
    The tutorial seeds torch's generator and its DataLoader shuffles from it: that happens
    inside a fork of the process's random state, which is left as it was.
    """
    cuda = list(range(torch.cuda.device_count())) if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return _tutorial_loop(model, split, epochs=epochs, batch_size=batch_size, lr=lr,
                              warmup_epochs=warmup_epochs, max_steps=max_steps,
                              on_epoch_end=on_epoch_end, device=device)


def _tutorial_loop(model: ConvVAE, split: Split, *, epochs: int, batch_size: int, lr: float,
                   warmup_epochs: float, max_steps: int | None,
                   on_epoch_end: Callable[[int, float], bool] | None,
                   device: str | torch.device) -> dict:
    loader = DataLoader(MNISTTensors(split), batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(loader)
    warmup = max(1, round(warmup_epochs * steps_per_epoch))
    model.to(device).train()
    step, images, losses = 0, 0, []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            beta = min(1.0, step / warmup) if warmup_epochs > 0 else 1.0
            out = model(x, y if model.conditional else None)
            loss, bce, kld = loss_function(out.logits, x, out.mu, out.logvar, beta)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            images += x.shape[0]
            if max_steps is not None and step >= max_steps:
                break
        if max_steps is not None and step >= max_steps:
            break
        if on_epoch_end is not None and on_epoch_end(epoch, time.perf_counter() - t0):
            break
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": images, "images_per_s": images / seconds,
            "steps": step, "losses": losses, "finite": all(math.isfinite(v) for v in losses)}
