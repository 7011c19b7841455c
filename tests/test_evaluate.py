"""Tests for the evaluation beyond the ELBO (vaelab.evaluate) and the digit classifier.

Small synthetic models and data only: a 1-D-latent model whose log p(x) is computed exactly by
quadrature, stub encoders with known geometry, and a stub classifier.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from synthetic import block_digits, write_synthetic
from vaelab.classifier import load_classifier, read_classifier_meta, train_classifier
from vaelab.data import Dataset, Split
from vaelab.errors import CheckpointError, ConfigError
from vaelab.evaluate import (
    SAME_IMAGES_KEYS,
    active_units,
    aggregate_posterior,
    closest_digit_pairs,
    cvae_class_accuracy,
    knn_accuracy,
    knn_from,
    log_px_estimate,
    normalise_evaluation,
)
from vaelab.models import ConvCVAE, ConvVAE, ModelSpec
from vaelab.objectives import elbo_terms, log_likelihood, log_standard_normal

SMALL = dict(channels=(4, 8), enc_hidden=16, dec_hidden=16)


def as_split(x01: torch.Tensor, labels: torch.Tensor | None = None) -> Split:
    """A Split from images in [0, 1] of shape [N, 28, 28]."""
    images = (x01 * 255).round().to(torch.uint8)
    if labels is None:
        labels = torch.zeros(images.shape[0], dtype=torch.int64)
    return Split(images, labels.to(torch.int64))


# --------------------------------------------------------------------------------------------
# log p(x): a model small enough to integrate exactly
# --------------------------------------------------------------------------------------------
GRID = torch.linspace(-10.0, 10.0, 8001, dtype=torch.float64)


class LineDecoderVAE(nn.Module):
    """1-D latent, logits = z w + b. ``encode`` is either the moment-matched true posterior
    (found by quadrature: a near-perfect q) or a fixed poor proposal N(0.3, 1.5^2)."""

    conditional = False
    latent_dim = 1

    def __init__(self, w: torch.Tensor, b: torch.Tensor, good_encoder: bool = True) -> None:
        super().__init__()
        self.w = nn.Parameter(w.view(-1))
        self.b = nn.Parameter(b.view(-1))
        self.good_encoder = good_encoder

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return (z[:, :1] * self.w + self.b).view(-1, 1, 28, 28)

    def log_joint_on_grid(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z) for every image [B] and grid point: [B, G] (float64)."""
        logits = GRID[:, None] * self.w.double() + self.b.double()  # [G, 784]
        xf = x.flatten(1).double()  # [B, 784]
        ll = xf @ logits.T - torch.nn.functional.softplus(logits).sum(1)  # Bernoulli, [B, G]
        return ll + log_standard_normal(GRID[:, None])[None, :]

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        dz = float(GRID[1] - GRID[0])
        return torch.logsumexp(self.log_joint_on_grid(x), dim=1) + math.log(dz)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        b = x.shape[0]
        if not self.good_encoder:
            return (torch.full((b, 1), 0.3), torch.full((b, 1), math.log(1.5**2)))
        post = torch.softmax(self.log_joint_on_grid(x), dim=1)
        mean = post @ GRID
        var = post @ GRID.pow(2) - mean.pow(2)
        return mean.float().view(b, 1), var.log().float().view(b, 1)


@pytest.fixture(scope="module")
def line_model_and_data() -> tuple[LineDecoderVAE, Split]:
    g = torch.Generator().manual_seed(0)
    w = 0.3 * torch.randn(784, generator=g)
    b = 0.5 * torch.randn(784, generator=g) - 1.0
    model = LineDecoderVAE(w, b)
    z = torch.randn(12, 1, generator=g)
    probs = torch.sigmoid(model.decode(z).detach()).view(12, 28, 28)
    x = torch.bernoulli(probs, generator=g)  # binary images: the Bernoulli is a true density
    return model, as_split(x)


def test_bernoulli_on_the_grid_matches_objectives(line_model_and_data) -> None:
    model, split = line_model_and_data
    x = split.images[:2].float().div(255).unsqueeze(1)
    z = torch.tensor([[0.7], [-1.2]])
    ours = log_likelihood(model.decode(z).detach(), x)
    grid = model.log_joint_on_grid(x) - log_standard_normal(GRID[:, None])[None, :]
    idx = [int(torch.argmin((GRID - v).abs())) for v in (0.7, -1.2)]
    ref = torch.stack([grid[0, idx[0]], grid[1, idx[1]]]).float()
    assert torch.allclose(ours, ref, atol=1e-2)


def test_log_px_matches_quadrature_with_a_good_proposal(line_model_and_data) -> None:
    model, split = line_model_and_data
    exact = model.exact_log_px(split.images.float().div(255).unsqueeze(1)).mean().item()
    for seed in (1, 2):
        est = log_px_estimate(model, split, num_samples=1000, chunk=250, batch_size=5,
                              seed=seed)
        assert est["n"] == len(split) and est["num_samples"] == 1000
        assert est["log_px"] == pytest.approx(exact, abs=0.02)
        assert est["neg_log_px"] == pytest.approx(-est["log_px"])
        assert est["gap"] >= 0
        assert est["gap"] == pytest.approx(est["log_px"] - est["elbo_same_images"])
        assert est["elbo_same_images"] <= exact + 0.02  # the ELBO is a lower bound
        assert est["gap"] < 0.05  # q is the (moment-matched) posterior: a tight bound


def test_log_px_is_never_below_the_elbo_and_tightens_with_k(line_model_and_data) -> None:
    model = LineDecoderVAE(line_model_and_data[0].w.detach(), line_model_and_data[0].b.detach(),
                           good_encoder=False)
    split = line_model_and_data[1]
    exact = model.exact_log_px(split.images.float().div(255).unsqueeze(1)).mean().item()
    estimates = {}
    for k in (1, 10, 2000):
        runs = [log_px_estimate(model, split, num_samples=k, chunk=500, seed=s)
                for s in range(3 if k < 2000 else 1)]
        estimates[k] = np.mean([r["log_px"] for r in runs])
        for r in runs:
            assert r["gap"] >= 0 and r["log_px"] >= r["elbo_same_images"]  # Jensen, by image
            if k == 1:
                assert r["gap"] == pytest.approx(0, abs=1e-4)  # one sample: log w both ways
    elbo = runs[0]["elbo_same_images"]
    assert elbo < exact - 1.0  # a poor proposal: a loose bound
    assert estimates[1] < estimates[10] < estimates[2000] <= exact + 0.05
    assert estimates[2000] == pytest.approx(exact, abs=0.25)


def test_log_px_rejects_zero_samples(line_model_and_data) -> None:
    model, split = line_model_and_data
    with pytest.raises(ConfigError):
        log_px_estimate(model, split, num_samples=0)


def test_cvae_log_px_decodes_each_image_under_its_own_label() -> None:
    torch.manual_seed(0)
    model = ConvCVAE(ModelSpec(kind="cvae", latent_dim=2, **SMALL))
    with torch.no_grad():
        last = model.encoder.net[-1]
        last.weight[2:].zero_()
        last.bias[2:].fill_(-20.0)  # logvar = -20: z = mu to 5e-5, the ELBO is log p(x|mu, c)
        model.decoder.net[0].weight[:, 2:] *= 300  # make the label matter
    x = torch.rand(7, 28, 28)
    labels = torch.tensor([0, 3, 9, 1, 1, 5, 7])
    split = as_split(x, labels)
    est = log_px_estimate(model, split, num_samples=400, chunk=150, batch_size=4)
    xs = split.images.float().div(255).unsqueeze(1)
    with torch.no_grad():
        mu, logvar = model.encode(xs, labels)
        ll = log_likelihood(model.decode(mu, labels), xs)
        wrong = log_likelihood(model.decode(mu, labels.roll(1)), xs)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)
    assert est["elbo_same_images"] == pytest.approx(float((ll - kl).mean()), abs=0.15)  # MC
    assert abs(float((wrong - kl).mean()) - est["elbo_same_images"]) > 3.0


# --------------------------------------------------------------------------------------------
# Active units
# --------------------------------------------------------------------------------------------
def test_active_units_finds_an_ignored_dimension() -> None:
    torch.manual_seed(0)
    model = ConvVAE(ModelSpec(latent_dim=3, **SMALL))
    with torch.no_grad():
        last = model.encoder.net[-1]
        last.weight[1].zero_()
        last.bias[1] = 0.0  # mu_1(x) = 0 for every x: the unit carries nothing
        last.weight[[0, 2]] *= 50  # the others move with x
    split = as_split(torch.rand(40, 28, 28))
    au = active_units(model, split)
    assert au["active"] == [True, False, True]
    assert au["count"] == 2 and au["latent_dim"] == 3
    assert au["variances"][1] == 0.0
    assert min(au["variances"][0], au["variances"][2]) > 0.01
    assert active_units(model, split, threshold=1e9)["count"] == 0


# --------------------------------------------------------------------------------------------
# Stub encoders with a known latent geometry
# --------------------------------------------------------------------------------------------
class TableEncoder(nn.Module):
    """Reads the class from the image's mean intensity (class c is filled with c * 20 / 255)
    and returns ``table[c]`` (+ per-image jitter from the first pixel) as mu."""

    conditional = False

    def __init__(self, table: torch.Tensor, jitter: float = 0.0) -> None:
        super().__init__()
        self.table = nn.Parameter(table.float(), requires_grad=False)
        self.latent_dim = table.shape[1]
        self.jitter = jitter

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None):
        c = (x[:, 0, 1:, :].mean((1, 2)) * 255 / 20).round().long()
        mu = self.table[c] + self.jitter * (x[:, 0, 0, :2] - 0.5)
        return mu, torch.zeros_like(mu)


def class_images(labels: torch.Tensor, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = (labels.float() * 20 / 255).view(-1, 1, 1).expand(-1, 28, 28).clone()
    x[:, 0, :2] = torch.rand(len(labels), 2, generator=g)  # the jitter's source
    images = (x * 255).round().to(torch.uint8)
    return Split(images, labels)


def test_knn_on_separable_codes() -> None:
    table = torch.stack([torch.arange(10.0), torch.zeros(10)], 1)  # one point per class
    model = TableEncoder(table, jitter=0.3)
    train = class_images(torch.arange(200) % 10, seed=1)
    test = class_images(torch.arange(50) % 10, seed=2)
    res = knn_accuracy(model, train, test, k=5, chunk=7)
    assert res["accuracy"] == 1.0
    assert res["per_class"] == [1.0] * 10
    assert (res["n_train"], res["n_test"], res["k"]) == (200, 50, 5)
    # a model that maps every class to the same place cannot beat chance by much
    blind = TableEncoder(torch.zeros(10, 2), jitter=0.3)
    assert knn_accuracy(blind, train, test, k=5)["accuracy"] < 0.5


def test_knn_majority_vote_and_tie_break() -> None:
    train_z = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4]])
    train_y = torch.tensor([2, 1, 1, 2, 1])
    test_z = torch.tensor([[0.0], [0.05]])
    res = knn_from(train_z, train_y, test_z, torch.tensor([1, 2]), k=5)
    assert res["accuracy"] == 0.5  # both predicted 1 (three votes to two)
    # a 2-2 tie goes to the class with the closer neighbours
    res = knn_from(train_z[:4], train_y[:4], torch.tensor([[-0.1]]), torch.tensor([2]), k=4)
    assert res["accuracy"] == 1.0
    with pytest.raises(ConfigError):
        knn_from(train_z, train_y, test_z, torch.tensor([1, 2]), k=6)


def test_closest_digit_pairs() -> None:
    table = torch.stack([10.0 * torch.arange(10.0), torch.zeros(10)], 1)
    table[9] = torch.tensor([40.0, 0.1])  # 4/9 closest
    table[8] = torch.tensor([30.0, 0.2])  # then 3/8
    table[7] = torch.tensor([10.0, 0.3])  # then 1/7
    model = TableEncoder(table)
    res = closest_digit_pairs(model, class_images(torch.arange(60) % 10), top=3)
    assert [(p["a"], p["b"]) for p in res["pairs"]] == [(4, 9), (3, 8), (1, 7)]
    assert [p["distance"] for p in res["pairs"]] == pytest.approx([0.1, 0.2, 0.3], abs=1e-5)
    assert res["classes"] == list(range(10))
    assert np.allclose(res["centroids"], table.numpy(), atol=1e-5)


def test_aggregate_posterior_moments() -> None:
    table = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    model = TableEncoder(torch.cat([table, torch.zeros(6, 2)]))
    res = aggregate_posterior(model, class_images(torch.arange(40) % 4))
    assert res["posterior_means"]["mean"] == pytest.approx([0.0, 0.0], abs=1e-6)
    # Cov(mu) = diag(0.5, 2); posterior variances are 1 (logvar 0), so Cov q(z) = diag(1.5, 3)
    assert np.allclose(res["posterior_means"]["cov"], [[0.5, 0], [0, 2.0]], atol=1e-6)
    assert np.allclose(res["aggregate"]["cov"], [[1.5, 0], [0, 3.0]], atol=1e-6)
    kl = 0.5 * (1.5 + 3.0 - 2 - math.log(1.5 * 3.0))
    assert res["aggregate"]["kl_to_prior"] == pytest.approx(kl, abs=1e-6)
    assert res["prior"] == {"mean": [0.0, 0.0], "cov": [[1.0, 0.0], [0.0, 1.0]]}


# --------------------------------------------------------------------------------------------
# CVAE samples judged by a classifier
# --------------------------------------------------------------------------------------------
class AlwaysThree(nn.Module):
    """A classifier that says 3 whatever it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1
        logits = self.bias.expand(x.shape[0], 10).clone()
        logits[:, 3] = 1.0
        return logits


def test_cvae_class_accuracy_with_a_stub_classifier() -> None:
    torch.manual_seed(0)
    model = ConvCVAE(ModelSpec(kind="cvae", latent_dim=2, **SMALL))
    res = cvae_class_accuracy(model, AlwaysThree(), per_class=30, batch_size=16, seed=0)
    assert res["accuracy"] == pytest.approx(0.1)
    assert res["per_class"] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert res["per_class_n"] == 30
    confusion = np.array(res["confusion"])
    assert confusion.sum() == 300 and (confusion[:, 3] == 30).all()
    with pytest.raises(ConfigError):
        cvae_class_accuracy(ConvVAE(ModelSpec(**SMALL)), AlwaysThree(), per_class=2)


# --------------------------------------------------------------------------------------------
# The digit classifier
# --------------------------------------------------------------------------------------------
def test_classifier_trains_saves_and_verifies(tmp_path: Path) -> None:
    data = write_synthetic(tmp_path / "data", block_digits, 120, 40, seed=0)
    out = tmp_path / "clf"
    meta = train_classifier(f"idx:{data}", out, epochs=4, seed=0, batch_size=16, lr=3e-3,
                            device="cpu")
    assert meta["test_accuracy"] >= 0.9
    assert (out / "classifier.safetensors").exists() and (out / "classifier.json").exists()
    assert read_classifier_meta(out)["epochs"] == 4
    model = load_classifier(out)
    x = torch.rand(5, 1, 28, 28)
    again = load_classifier(out / "classifier.json")
    assert torch.equal(model(x), again(x))
    # the folder is not overwritten without force; a foreign folder never is
    with pytest.raises(ConfigError):
        train_classifier(f"idx:{data}", out, epochs=1, device="cpu")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError):
        train_classifier(f"idx:{data}", foreign, epochs=1, device="cpu", force=True)
    # a flipped byte in the weights is caught by the checksum
    raw = bytearray((out / "classifier.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (out / "classifier.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_classifier(out)
    with pytest.raises(CheckpointError):
        load_classifier(tmp_path / "nowhere")


def test_classifier_accepts_a_dataset_object(tmp_path: Path) -> None:
    labels = torch.arange(20) % 10
    split = class_images(labels)
    ds = Dataset("synthetic", split, split.subset(0), split)
    meta = train_classifier(ds, tmp_path / "c", epochs=1, device="cpu")
    assert meta["dataset"] == "synthetic" and meta["train_images"] == 20


def test_an_estimate_names_the_elbo_of_its_own_images(line_model_and_data) -> None:
    """The importance-sampled estimate's ELBO is of its own images and samples, not the whole
    split's ``elbo``: ``neg_elbo_same_images``, and no key of the whole split's name."""
    model, split = line_model_and_data
    est = log_px_estimate(model, split, num_samples=20, chunk=20, seed=0)
    assert est["neg_elbo_same_images"] == pytest.approx(-est["elbo_same_images"])
    assert "elbo" not in est and "neg_elbo" not in est
    t = log_px_estimate(model, split, num_samples=20, chunk=20, seed=0, proposal="student-t")
    assert t["elbo_same_images"] is None and t["neg_elbo_same_images"] is None
    assert t["gap"] is None


def test_an_evaluation_written_with_the_old_keys_reads_with_the_new_ones() -> None:
    """A report's evaluation from before the keys said their images (results/*.json): the
    importance-sampled estimates' ELBO and exact value of the same images under their new
    names, and each estimate's images from its n; the old keys and the input untouched."""
    old = {"model": "vae",
           "elbo": {"recon": 120.0, "kl": 16.0, "neg_elbo": 136.0, "kl_per_dim": [8.0, 8.0],
                    "n": 10000},
           "exact_log_px": {"method": "quadrature", "log_px": -131.0, "neg_log_px": 131.0,
                            "gap": 5.0, "n": 10000},
           "log_px": {"log_px": -133.5, "neg_log_px": 133.5, "elbo": -135.8, "neg_elbo": 135.8,
                      "gap": 2.3, "exact_log_px": -131.4, "bias": -2.1, "num_samples": 1000,
                      "proposal": "q", "n": 1000},
           "log_px_student_t": {"log_px": -132.4, "neg_log_px": 132.4, "elbo": None,
                                "neg_elbo": None, "gap": None, "exact_log_px": -131.4,
                                "bias": -1.0, "num_samples": 1000, "proposal": "student-t",
                                "n": 1000},
           "active_units": {"count": 2}}
    before = repr(old)
    ev = normalise_evaluation(old)
    assert repr(old) == before
    assert ev["elbo"]["neg_elbo"] == 136.0 and ev["elbo"]["images"] == "test[:10000]"
    assert ev["exact_log_px"]["images"] == "test[:10000]"
    lp, lt = ev["log_px"], ev["log_px_student_t"]
    assert lp["neg_elbo_same_images"] == 135.8 and lp["elbo_same_images"] == -135.8
    assert lp["exact_log_px_same_images"] == -131.4 and lp["images"] == "test[:1000]"
    assert lt["neg_elbo_same_images"] is None and lt["exact_log_px_same_images"] == -131.4
    for new, oldname in SAME_IMAGES_KEYS.items():
        assert lp[oldname] == lp[new]
    assert ev["active_units"] == old["active_units"]
    assert normalise_evaluation(ev) == ev  # a present evaluation reads as it is


def test_the_committed_reports_read_with_the_new_keys() -> None:
    """Every evaluation in results/reproduce-*.json reads with the new keys, equal to the old
    where it was written with them (and as it is where it was written with the new)."""
    for path in sorted((Path(__file__).resolve().parent.parent / "results").glob(
            "reproduce-*.json")):
        for name, raw in json.loads(path.read_text())["evaluations"].items():
            ev = normalise_evaluation(raw)
            for key in ("log_px", "log_px_student_t"):
                if raw.get(key):
                    written = raw[key]["neg_elbo" if "neg_elbo" in raw[key]
                                        else "neg_elbo_same_images"]
                    assert ev[key]["neg_elbo_same_images"] == written, (path, name)
                    assert ev[key]["images"] == f"test[:{raw[key]['n']}]"
            assert ev["elbo"] == {**raw["elbo"], "images": f"test[:{raw['elbo']['n']}]"}


# --------------------------------------------------------------------------------------------
# Decoding in slices (the CPU's fastest batch)
# --------------------------------------------------------------------------------------------
def test_the_decoder_runs_in_slices_on_a_cpu_with_the_same_numbers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU every evaluation decodes at most ``CPU_DECODE_BATCH`` latents per call, each
    under its own label, and the estimates equal those of one call for everything."""
    from vaelab import evaluate

    torch.manual_seed(0)
    model = ConvCVAE(ModelSpec(kind="cvae", latent_dim=2, label_conditioning="film", **SMALL))
    with torch.no_grad():
        for table in model.decoder.film:
            table.weight.normal_(0, 0.5)  # the label matters at every layer
    z = torch.randn(300, 2)
    y = torch.arange(300) % 10
    sizes: list[int] = []
    plain = model.decode
    monkeypatch.setattr(model, "decode", lambda z, y=None: sizes.append(len(z)) or plain(z, y))
    monkeypatch.setattr(evaluate, "CPU_DECODE_BATCH", 64)
    with torch.no_grad():
        assert torch.allclose(evaluate.decode_sliced(model, z, y, 10**6), plain(z, y),
                              atol=1e-6)
    assert sizes and max(sizes) == 64 and sum(sizes) == 300
    split = as_split(torch.rand(12, 28, 28), torch.arange(12) % 10)
    sizes.clear()
    sliced = log_px_estimate(model, split, num_samples=40, chunk=20, batch_size=6)
    exact = evaluate.exact_log_px_per_image(model, split, tolerance=0.5)
    gh = evaluate.gauss_hermite_elbo(model, split)
    assert max(sizes) <= 64
    monkeypatch.setattr(evaluate, "CPU_DECODE_BATCH", 10**9)
    sizes.clear()
    whole = log_px_estimate(model, split, num_samples=40, chunk=20, batch_size=6)
    assert max(sizes) > 64
    assert sliced["log_px"] == pytest.approx(whole["log_px"], abs=1e-4)
    assert sliced["elbo_same_images"] == pytest.approx(whole["elbo_same_images"], abs=1e-4)
    again = evaluate.exact_log_px_per_image(model, split, tolerance=0.5)
    assert torch.allclose(exact.log_px, again.log_px, atol=1e-4)
    assert torch.allclose(gh, evaluate.gauss_hermite_elbo(model, split), atol=1e-4)
    assert evaluate.decode_batch(torch.device("cuda"), 5000) == 5000  # elsewhere, untouched


def test_the_elbo_and_the_encodings_run_in_slices_on_a_cpu_with_the_same_numbers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The held-out -ELBO (every epoch's val and test numbers) and the encodings pass a batch
    through the network ``CPU_DECODE_BATCH`` images at a time on a CPU, with the same noise
    as one pass: the numbers equal the whole batch's."""
    from vaelab import evaluate

    torch.manual_seed(0)
    model = ConvCVAE(ModelSpec(kind="cvae", latent_dim=2, label_conditioning="film", **SMALL))
    split = as_split(torch.rand(50, 28, 28), torch.arange(50) % 10)
    sizes: list[int] = []
    plain = model.encode
    monkeypatch.setattr(model, "encode", lambda x, y=None: sizes.append(len(x)) or plain(x, y))
    monkeypatch.setattr(evaluate, "CPU_DECODE_BATCH", 8)
    sliced = evaluate.evaluate_elbo(model, split, batch_size=20, seed=3)
    mu, logvar = evaluate.encode_split(model, split, batch_size=20)
    assert sizes and max(sizes) == 8 and sum(sizes) == 100
    monkeypatch.setattr(evaluate, "CPU_DECODE_BATCH", 10**9)
    whole = evaluate.evaluate_elbo(model, split, batch_size=20, seed=3)
    mu1, logvar1 = evaluate.encode_split(model, split, batch_size=20)
    assert max(sizes[-2:]) == 20
    for key in ("recon", "kl", "neg_elbo"):
        assert sliced[key] == pytest.approx(whole[key], abs=1e-4)
    assert sliced["kl_per_dim"] == pytest.approx(whole["kl_per_dim"], abs=1e-4)
    assert torch.allclose(mu, mu1, atol=1e-5) and torch.allclose(logvar, logvar1, atol=1e-5)
    # the noise is the one a single pass draws from the seeded generator
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        x = split.images[:20].float().div(255).unsqueeze(1)
        out = model(x, split.labels[:20], generator=gen)
    first = evaluate.evaluate_elbo(model, split.subset(20), batch_size=20, seed=3)
    assert first["neg_elbo"] == pytest.approx(
        float(elbo_terms(x, out.mu, out.logvar, out.logits, "bernoulli").neg_elbo.mean()),
        abs=1e-4)
