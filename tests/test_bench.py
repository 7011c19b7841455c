"""Speed work keeps the numbers honest: bf16 close to fp32, the reference computes vaelab's loss,
and the benchmark runs end to end (its figures live in BENCHMARKS.md, not in asserts)."""

from __future__ import annotations

import pytest
import torch

from synthetic import dark_noise, write_synthetic
from vaelab.bench import load_reference, markdown, run_bench
from vaelab.config import resolve_config
from vaelab.models import ModelSpec, build_model
from vaelab.objectives import elbo_terms, training_loss
from vaelab.train import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("bench-data"), dark_noise, 384, 64, seed=0,
                           power=4)


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_reference_loss_equals_vaelab_loss(kind):
    ref = load_reference()
    torch.manual_seed(0)
    model = build_model(ModelSpec(kind=kind, channels=(8, 16), enc_hidden=32, dec_hidden=32))
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    gen = torch.Generator().manual_seed(3)
    out = model(x, y if model.conditional else None, generator=gen)
    for beta in (0.0, 0.3, 1.0):
        theirs, bce, kld = ref.loss_function(out.logits, x, out.mu, out.logvar, beta)
        terms = elbo_terms(x, out.mu, out.logvar, out.logits)
        ours = training_loss(terms, beta)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(terms.recon.mean(), bce, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(terms.kl.mean(), kld, rtol=1e-5, atol=1e-4)


def test_bf16_training_steps_are_finite_and_close_to_fp32(data_dir, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve_config("quick", dataset=f"idx:{data_dir}", val_size=32,
                             precision=precision, device="cpu")
        trainer = Trainer(cfg, tmp_path / precision, progress=False)
        x, y = next(iter(trainer.batcher.epoch(0)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                             enabled=precision == "bf16"):
            out = trainer.model(x, None, generator=torch.Generator().manual_seed(0))
        terms = elbo_terms(x, out.mu.float(), out.logvar.float(), out.logits.float())
        losses[precision] = float(terms.neg_elbo.mean())
        for _ in range(3):
            trainer.train_step(x, y)
        assert torch.isfinite(trainer.sums["terms"]).all()
        assert int(trainer.sums["bad_step"]) == -1
    # the same weights and batch: bf16 rounding moves the per-image -ELBO by well under 1%
    assert abs(losses["bf16"] - losses["fp32"]) < 0.01 * losses["fp32"]


def test_bench_runs_end_to_end_and_writes_the_report(data_dir, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    results = run_bench(models=("vae",), rounds=1, steps=2, device="cpu", num_samples=2,
                        dataset=f"idx:{data_dir}", out=out, log=lambda s: None,
                        rss_limit=64, val_size=32)
    t = results["models"]["vae"]["throughput"]
    assert t["vaelab"] > 0 and t["reference"] > 0 and t["ratio"] > 0
    assert results["peak_rss_mb"] > 0
    text = out.read_text()
    assert "| vae |" in text and "Peak RSS" in text
    assert text == markdown(results)
    assert out.with_suffix(".json").exists()


@pytest.mark.parametrize("target,reached", [(float("inf"), True), (float("-inf"), False)])
def test_time_to_quality_stops_at_the_target(data_dir, target, reached):
    from vaelab.bench import time_to_quality
    from vaelab.data import load_dataset

    ds = load_dataset(f"idx:{data_dir}", val_size=32)
    lines: list[str] = []
    q = time_to_quality(ds, "vae", device="cpu", max_epochs=2, target=target, log=lines.append)
    for side in ("vaelab", "reference"):
        assert q[side]["reached"] is reached and q[side]["seconds"] > 0
        assert q[side]["epoch"] == (1 if reached else None)
    # reached: each side stops after its first epoch; not reached: both run all max_epochs
    assert len(lines) == (2 if reached else 4)
    assert (q["ratio"] is not None) is reached


def test_training_flops_are_counted_from_the_network():
    """The counted work per image grows with the network, and is about 3x the forward pass
    (backward = two products per forward product), as for any conv/linear network."""
    from torch.utils.flop_counter import FlopCounterMode

    from vaelab.bench import roofline, training_flops_per_image

    flops = training_flops_per_image("vae", batch_size=8)
    net = build_model(resolve_config("seed", model="vae").model_spec())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.rand(8, 1, 28, 28))
    forward = counter.get_total_flops() / 8
    assert 2.5 * forward < flops <= 3.0 * forward
    assert training_flops_per_image("cvae", batch_size=8) > flops  # one more input channel
    r = roofline({"vaelab": 1000.0, "reference": 500.0}, flops, peak_gflops=100.0)
    assert r["vaelab_gflops"] == pytest.approx(1000 * flops / 1e9)
    assert r["twice_reference_of_peak"] == pytest.approx(r["vaelab_of_peak"])
