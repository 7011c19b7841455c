"""A small CNN digit classifier: the judge of the CVAE's samples (does it draw the digit asked?).

Architecture (``ClassifierSpec``): conv 3x3 (32) - batch norm - ReLU - max-pool 2 - conv 3x3
(64) - batch norm - ReLU - max-pool 2 - dropout - fully connected 128 - ReLU - dropout - 10
logits. Trained with Adam (learning rate decayed to 0 on a cosine) on vaelab's on-device
``Batcher``; three epochs reach about 99% test accuracy on MNIST.

A classifier folder::

    classifier.safetensors   weights (data, never code)
    classifier.json          spec, SHA-256 of the weights, training settings, test accuracy

Loading verifies the checksum and every tensor's shape, as ``checkpoint.load_model`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.checkpoint import _verified_bytes, load_weights, weights_bytes
from vaelab.config import check_seed
from vaelab.data import Batcher, Dataset, Split, load_dataset
from vaelab.errors import CheckpointError, ConfigError, NumericalError
from vaelab.io import atomic_write_bytes, atomic_write_json
from vaelab.locks import FolderLock, is_lock_file

WEIGHTS = "classifier.safetensors"
META = "classifier.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything needed to rebuild a classifier; saved beside its weights as JSON."""

    channels: tuple[int, int] = (32, 64)
    hidden: int = 128
    dropout: float = 0.1  # before the hidden layer; twice this after it
    batch_norm: bool = True
    num_classes: int = 10
    image_size: int = 28

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != 2 or min(self.channels) < 1 or self.hidden < 1:
            raise ConfigError("classifier channels and hidden size must be positive")
        if not 0 <= self.dropout < 0.5:
            raise ConfigError(f"dropout must be in [0, 0.5), got {self.dropout}")
        if self.image_size % 4 != 0 or self.num_classes < 2:
            raise ConfigError("classifier image size must be a multiple of 4, classes >= 2")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointError(
                f"classifier spec has unknown fields: {', '.join(sorted(unknown))}"
            )
        return cls(**d)


class DigitCNN(nn.Module):
    """Images [B, 1, H, W] in [0, 1] -> class logits [B, num_classes]."""

    def __init__(self, spec: ClassifierSpec | None = None) -> None:
        super().__init__()
        self.spec = spec = spec or ClassifierSpec()
        c1, c2 = spec.channels
        s = spec.image_size // 4

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if spec.batch_norm else nn.Identity()

        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), norm(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), norm(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(spec.dropout), nn.Flatten(),
            nn.Linear(c2 * s * s, spec.hidden), nn.ReLU(), nn.Dropout(2 * spec.dropout),
            nn.Linear(spec.hidden, spec.num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@torch.inference_mode()
def classifier_accuracy(model: nn.Module, split: Split, batch_size: int = 1000) -> dict[str, Any]:
    """Accuracy of ``model`` on a split: overall and per class (None for an absent class)."""
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for i in range(0, len(split), batch_size):
        x = split.images[i : i + batch_size].to(device).unsqueeze(1).float().div_(255)
        preds.append(model(x).argmax(1).cpu())
    if not preds:
        return {"accuracy": 0.0, "per_class": [], "n": 0}
    pred = torch.cat(preds)
    labels = split.labels.cpu()
    correct = (pred == labels).double()
    per_class = [float(correct[labels == c].mean()) if bool((labels == c).any()) else None
                 for c in range(getattr(model, "spec", ClassifierSpec()).num_classes)]
    return {"accuracy": float(correct.mean()), "per_class": per_class, "n": len(pred)}


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.exists() and any(not is_lock_file(p) for p in out.iterdir()):
        ours = (out / META).exists() or (out / WEIGHTS).exists()
        if not force:
            what = "a classifier" if ours else "other files"
            raise ConfigError(f"output folder {out} already holds {what}: use --force to "
                              "replace it")
        if not ours:
            raise ConfigError(f"--force replaces only classifier folders; {out} holds other "
                              "files")
    out.mkdir(parents=True, exist_ok=True)


def train_classifier(
    dataset: str | Dataset = "mnist",
    out: str | os.PathLike = "classifier",
    *,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    limit: int | None = None,
    spec: ClassifierSpec | None = None,
    device: str = "auto",
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train a ``DigitCNN`` on all training images of ``dataset`` (a name or a ``Dataset``; a
    name is loaded with no validation split) and save it into folder ``out``.

    Returns the saved metadata: ``test_accuracy``, ``test_per_class``, ``epochs``, ``seed``,
    ``seconds``, ``dataset``, ``spec``, ``sha256`` and ``path``.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    seed = check_seed(seed)
    # seeded weights and dropout, inside a fork: the process's random state stays as it was
    cuda = list(range(torch.cuda.device_count())) if str(device) != "cpu" else []
    with FolderLock(out) as lock, torch.random.fork_rng(devices=cuda):  # one writer per folder
        meta = _train_classifier(dataset, Path(out), epochs=epochs, seed=seed,
                                 batch_size=batch_size, lr=lr, limit=limit, spec=spec,
                                 device=device, force=force, log=log or (lambda s: None))
        lock.keep()
    return meta


def _train_classifier(
    dataset: str | Dataset, out: Path, *, epochs: int, seed: int, batch_size: int, lr: float,
    limit: int | None, spec: ClassifierSpec | None, device: str, force: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    _prepare_out(out, force)
    if isinstance(dataset, str):
        data = load_dataset(dataset, val_size=0, limit=limit)
    else:
        data = dataset
    from vaelab.training import learning_rate, pick_device, set_learning_rate

    device = pick_device(str(device))
    torch.manual_seed(seed)  # inside train_classifier's fork of the RNG
    spec = spec or ClassifierSpec(num_classes=data.num_classes)
    model = DigitCNN(spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batcher = Batcher(data.train, batch_size, device=device, seed=seed)
    total_steps = max(1, epochs * len(batcher))
    t0 = time.perf_counter()
    history = []
    for epoch in range(epochs):
        model.train()
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = 0
        for i, (x, y) in enumerate(batcher.epoch(epoch)):
            step = epoch * len(batcher) + i  # cosine decay of the learning rate to 0
            set_learning_rate(optimizer, learning_rate("cosine", lr, step, total_steps))
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().double() * x.shape[0]  # summed on the device: no sync
            count += x.shape[0]
        if not torch.isfinite(total):
            raise NumericalError(f"the classifier's loss became NaN/Inf in epoch {epoch + 1}")
        train_loss = float(total) / max(count, 1)
        test = classifier_accuracy(model, data.test)
        history.append({"epoch": epoch + 1, "train_loss": train_loss,
                        "test_accuracy": test["accuracy"]})
        log(f"classifier epoch {epoch + 1}/{epochs}  loss {train_loss:.4f}  "
            f"test accuracy {100 * test['accuracy']:.2f}%")
    seconds = time.perf_counter() - t0
    test = classifier_accuracy(model, data.test)
    data_bytes = weights_bytes(model, spec)
    atomic_write_bytes(out / WEIGHTS, data_bytes)
    meta = {
        "format": FORMAT_VERSION, "spec": spec.to_dict(),
        "sha256": hashlib.sha256(data_bytes).hexdigest(),
        "dataset": data.name if not isinstance(dataset, str) else dataset,
        "epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr, "limit": limit,
        "train_images": len(data.train), "test_images": len(data.test),
        "test_accuracy": test["accuracy"], "test_per_class": test["per_class"],
        "history": history, "seconds": seconds,
    }
    atomic_write_json(out / META, meta)
    return {**meta, "path": str(out)}


def read_classifier_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``classifier.json`` of a classifier folder (or the file itself)."""
    folder = Path(path)
    if folder.name == META:
        folder = folder.parent
    try:
        meta = json.loads((folder / META).read_text())
        ClassifierSpec.from_dict(meta["spec"])
        meta["sha256"]  # noqa: B018 - presence check
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {META} (not a classifier folder)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/{META} is corrupted ({e})") from None
    return meta


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> DigitCNN:
    """Load a classifier folder (weights checked against their SHA-256); eval mode."""
    folder = Path(path)
    if folder.name == META:
        folder = folder.parent
    meta = read_classifier_meta(folder)
    spec = ClassifierSpec.from_dict(meta["spec"])
    data = _verified_bytes(folder / WEIGHTS, meta["sha256"], folder)
    model = DigitCNN(spec)
    load_weights(model, data, folder)
    return model.to(device).eval()
