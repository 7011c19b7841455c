"""Synthetic MNIST-shaped data for the tests: the four IDX files, and the images that fill them.

A *generator* here is a function ``(rng, n, ...) -> (images, labels)`` that makes one part
(train or test): ``n`` uint8 images of 28x28 and ``n`` uint8 labels 0-9. ``write_synthetic``
calls it for the train part and then the test part with one shared ``numpy`` generator, so each
test's data depends only on the generator, the two sizes and the seed.

The generators draw their random numbers in a fixed order; the tests' thresholds were tuned on
exactly these images, so change a generator only together with the tests that use it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vaelab.data import MNIST_FILES, Dataset, Split, write_idx

Part = tuple[np.ndarray, np.ndarray]
"""One part of a data set: images [n, 28, 28] and labels [n], both uint8."""


def write_idx_folder(folder: Path, train_images: np.ndarray, train_labels: np.ndarray,
                     test_images: np.ndarray, test_labels: np.ndarray) -> Path:
    """Write the four MNIST-named IDX files into ``folder`` (made if missing); return it."""
    assert len(train_images) == len(train_labels) and len(test_images) == len(test_labels)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / MNIST_FILES["train_images"], train_images)
    write_idx(folder / MNIST_FILES["train_labels"], train_labels)
    write_idx(folder / MNIST_FILES["test_images"], test_images)
    write_idx(folder / MNIST_FILES["test_labels"], test_labels)
    return folder


def write_synthetic(folder: Path, generator: Callable[..., Part], n_train: int, n_test: int,
                    *, seed: int, **options: object) -> Path:
    """Fill ``folder`` with ``generator``'s train part, then its test part, from one seed."""
    rng = np.random.default_rng(seed)
    train = generator(rng, n_train, **options)
    test = generator(rng, n_test, **options)
    return write_idx_folder(folder, *train, *test)


def synthetic_dataset(generator: Callable[..., Part], n_train: int, n_val: int, n_test: int,
                      *, seed: int, **options: object) -> Dataset:
    """The same parts as ``write_synthetic`` (then a validation part), in memory: no files."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        images, labels = generator(rng, n, **options)
        return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))

    train, test = split(n_train), split(n_test)
    return Dataset("synthetic", train, split(n_val), test)


def cyclic_labels(n: int) -> np.ndarray:
    """Labels 0, 1, ..., 9, 0, 1, ... (uint8): every class, evenly, in a known order."""
    return (np.arange(n) % 10).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------
def uniform_noise(rng: np.random.Generator, n: int) -> Part:
    """Uniform uint8 noise, nothing to learn; cyclic labels. For tests of plumbing, not fit."""
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), cyclic_labels(n)


def dark_noise(rng: np.random.Generator, n: int, power: float) -> Part:
    """Noise ``u ** power`` (u uniform in [0, 1)), mostly dark like MNIST; random labels.

    The images are drawn before the labels.
    """
    images = (rng.random((n, 28, 28)) ** power * 255).astype(np.uint8)
    return images, rng.integers(0, 10, n).astype(np.uint8)


def block_digits(rng: np.random.Generator, n: int) -> Part:
    """Digit c is a bright 8x5 block at a class-dependent place, plus 5% salt noise.

    A classifier learns these in a few epochs. Cyclic labels.
    """
    labels = cyclic_labels(n)
    images = (rng.random((n, 28, 28)) < 0.05).astype(np.uint8) * 255
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 5)
        images[i, 4 + 10 * r : 12 + 10 * r, 1 + 5 * col : 6 + 5 * col] = 255
    return images, labels


def ring_blobs(rng: np.random.Generator, n: int) -> Part:
    """One soft Gaussian blob per image, placed on a ring by its class; noise shifts and sizes it.

    The class sets where the blob is, so a CVAE learns the class quickly. Cyclic labels.
    """
    yy, xx = np.mgrid[0:28, 0:28]
    labels = np.arange(n) % 10
    angle = labels * 2 * np.pi / 10
    cx = 14 + 7 * np.cos(angle) + rng.uniform(-3, 3, n)
    cy = 14 + 7 * np.sin(angle) + rng.uniform(-3, 3, n)
    w = rng.uniform(1.5, 3.5, n)[:, None, None]
    d2 = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2
    return (255 * np.exp(-d2 / (2 * w**2))).astype(np.uint8), labels.astype(np.uint8)


def noisy_blobs(rng: np.random.Generator, n: int) -> Part:
    """One large blurry blob anywhere near the centre, plus Gaussian pixel noise; cyclic labels.

    Something for a VAE to learn that has nothing to do with the labels.
    """
    yy, xx = np.mgrid[0:28, 0:28]
    cy, cx = rng.uniform(8, 20, size=(2, n, 1, 1))
    r = rng.uniform(3, 7, size=(n, 1, 1))
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    images = np.clip(blob * 255 + rng.normal(0, 8, blob.shape), 0, 255).astype(np.uint8)
    return images, cyclic_labels(n)


def strokes(rng: np.random.Generator, n: int) -> Part:
    """A white vertical stroke crossed by a grey one, at a random place; cyclic labels."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for image in images:
        r, c = rng.integers(4, 24, size=2)
        image[r - 3 : r + 3, c - 1 : c + 1] = 255  # a vertical stroke
        image[r - 1 : r + 1, c - 3 : c + 3] = 180  # crossed by a grey one
    return images, cyclic_labels(n)


def blobs(n: int, seed: int = 0) -> torch.Tensor:
    """n synthetic images [n, 1, 28, 28] in [0, 1]: one or two Gaussian blobs each (torch)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.arange(28, dtype=torch.float32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    images = torch.zeros(n, 28, 28)
    for k in range(2):
        cx, cy = (torch.rand(2, n, 1, 1, generator=g) * 16 + 6)
        width = torch.rand(n, 1, 1, generator=g) * 2 + 2
        on = (torch.rand(n, 1, 1, generator=g) < (1.0 if k == 0 else 0.5)).float()
        images += on * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width**2))
    return images.clamp(0, 1).unsqueeze(1)


def seeded_blobs(rng: np.random.Generator, n: int) -> Part:
    """``blobs`` as uint8, seeded by one draw from ``rng``; then random labels from ``rng``."""
    images = (blobs(n, seed=int(rng.integers(1 << 30))).squeeze(1) * 255).round()
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    return images.numpy().astype(np.uint8), labels
