"""The quick look, ``vaelab reproduce --quick``, on real MNIST shows something.

It trains the ``quick`` preset (a small MLP VAE and CVAE on the first 10,000 images), its
one-epoch classifier, evaluates both and draws every figure, as a user's first command would,
then checks what a reader of the report looks for: a latent space with two active units whose
codes cluster by digit (5-NN accuracy), a CVAE whose samples the trained classifier reads as the
class asked for, decoded samples that are digits and not one grey blur, and a report that says
its numbers are a first look. It holds at either training precision (``auto`` is bf16 on a CPU
with AVX512-BF16 or AMX; the margins were checked at fp32 too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from vaelab.checkpoint import load_run
from vaelab.data import MNIST_FILES, data_root
from vaelab.report import reproduce


def _have_mnist() -> bool:
    folder = data_root() / "mnist"
    return all(os.path.exists(folder / name) for name in MNIST_FILES.values())


# .ci/run fetches MNIST first: under CI=true its absence is a failure, never a skip
if os.environ.get("CI") == "true" and not _have_mnist():
    raise RuntimeError("CI=true but real MNIST is not in data_root()/mnist: .ci/run fetches it")


def prior_sample_means(folder: Path, n: int = 100, seed: int = 0) -> torch.Tensor:
    """Decoder means sigmoid(logits) of ``n`` draws z ~ N(0, I) of the run in ``folder`` (a
    CVAE's under the classes 0, 1, ..., 9 in turn): [n, H * W] in [0, 1]."""
    model = load_run(folder, "cpu").model.eval()
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(n) % 10 if model.conditional else None
    with torch.inference_mode():
        logits = model.decode(z, y)
    return torch.sigmoid(logits.float()).flatten(1)


@pytest.mark.mnist
@pytest.mark.slow
@pytest.mark.skipif(not _have_mnist(), reason="real MNIST not in data_root()/mnist")
def test_the_quick_look_shows_digits_clusters_and_the_class_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    results = reproduce(out, quick=True, formats=("png",), progress=False)
    ev = results["evaluations"]
    assert results["settings"]["preset"] == "quick"

    # the VAE's latent space: both units used, codes that cluster by digit
    assert ev["vae"]["active_units"]["count"] >= 2
    assert ev["vae"]["knn"]["k"] == 5 and ev["vae"]["knn"]["n_test"] == 1000
    assert ev["vae"]["knn"]["accuracy"] >= 0.60
    # the CVAE draws the digit asked for, as read by the classifier the report trained
    assert results["classifier"]["test_accuracy"] >= 0.90
    ca = ev["cvae"]["cvae_class_accuracy"]
    assert ca["per_class_n"] == 100 and ca["accuracy"] >= 0.80

    # samples are digits, not a grey blur: ink and background within each image (MNIST's
    # pixel std is about 0.31; the old quick preset's blank panels had 0.005 and 0.003), and
    # images that differ from draw to draw
    for kind in ("vae", "cvae"):
        means = prior_sample_means(out / "runs" / kind)
        within = means.std(dim=1).mean().item()
        across = means.std(dim=0).mean().item()
        assert within > 0.12, (kind, within)
        assert across > 0.05, (kind, across)

    # the report says what these numbers are
    readme = (out / "README.md").read_text()
    assert "A first look, not the study (preset `quick`)" in readme
    assert "10,000 training images for 6 epochs" in readme
    assert "the numbers below are on the first 1,000 test images" in readme
    assert "-ELBO = reconstruction + KL at beta = 1 on the first 1,000 test images" in readme
    assert "vaelab reproduce --out" in readme and "--quick" in results["command"]
    assert json.loads((out / "results.json").read_text())["settings"]["quick"] is True
    assert {"vae", "cvae"} <= set(results["figures"])
    assert (out / "figures" / "vae" / "latent.png").stat().st_size > 10_000
