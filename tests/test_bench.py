"""Speed work keeps the numbers honest: bf16 close to fp32, the reference computes vaelab's loss,
each rate is the images each contender counted over its own seconds, the peak RSS is the
training process's own, and nothing in the current folder is run (the figures themselves live
in BENCHMARKS.md, not in asserts)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synthetic import dark_noise, write_synthetic
from vaelab import bench_reference as ref
from vaelab.bench import markdown, report_paths, run_bench
from vaelab.config import resolve_config
from vaelab.errors import ConfigError
from vaelab.models import ModelSpec, build_model
from vaelab.objectives import elbo_terms, training_loss
from vaelab.training import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("bench-data"), dark_noise, 384, 64, seed=0,
                           power=4)


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_reference_loss_equals_vaelab_loss(kind):
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
        cfg = resolve_config("smoke", dataset=f"idx:{data_dir}", val_size=32,
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


@pytest.fixture(scope="module")
def full_batches_dir(tmp_path_factory):
    """288 training images, 32 kept for validation: 256 = two full batches of 128 an epoch."""
    return write_synthetic(tmp_path_factory.mktemp("bench-full"), dark_noise, 288, 64, seed=1,
                           power=4)


HOSTILE = "from pathlib import Path; Path({marker!r}).write_text('ran'); raise SystemExit(0)\n"


def test_bench_counts_what_it_times_and_runs_nothing_from_the_current_folder(
    full_batches_dir, tmp_path, monkeypatch
):
    """The current folder holds a ``benchmarks/reference.py`` and a ``vaelab`` package that
    would leave a marker if run; the bench runs neither, and writes only where it is told."""
    here = tmp_path / "cwd"
    marker = tmp_path / "MARKER"
    for name in ("benchmarks/reference.py", "vaelab/__init__.py", "vaelab/__main__.py"):
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        (here / name).write_text(HOSTILE.format(marker=str(marker)))
    monkeypatch.chdir(here)
    # a child that touched ~2 GiB: the largest child so far, which RUSAGE_CHILDREN would report
    # (a training process of the seed network peaks near 1 GB: the child must stand out)
    subprocess.run([sys.executable, "-c", "b = b'x' * (2 << 30)"], check=True)

    out = tmp_path / "report" / "bench.md"
    results = run_bench(models=("vae",), rounds=2, steps=2, device="cpu", num_samples=2,
                        dataset=f"idx:{full_batches_dir}", out=out, log=lambda s: None,
                        rss_limit=64, val_size=32)
    assert not marker.exists()

    t = results["models"]["vae"]["throughput"]
    assert len(t["per_round"]) == 2
    for r in t["per_round"]:  # every step a full batch: both counted 2 x 128 images a round
        assert r["vaelab_images"] == r["reference_images"] == 2 * 128
        assert r["vaelab_seconds"] > 0 and r["reference_seconds"] > 0
    assert t["vaelab"] == statistics.median(
        r["vaelab_images"] / r["vaelab_seconds"] for r in t["per_round"])
    assert t["reference"] == statistics.median(
        r["reference_images"] / r["reference_seconds"] for r in t["per_round"])
    assert t["ratio"] == t["vaelab"] / t["reference"]
    f = results["models"]["vae"]["roofline"]
    assert f["vaelab_gflops"] == pytest.approx(t["vaelab"] * f["flops_per_image"] / 1e9)

    # the training process's own peak: torch is loaded (> 100 MB), the 2 GiB child is not it
    assert 100 < results["peak_rss_mb"] < 1800, results["peak_rss_mb"]

    assert out.read_text() == markdown(results)
    assert json.loads(out.with_suffix(".json").read_text()) == results
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                  if p.is_file() and "cwd" not in p.parts) == ["report/bench.json",
                                                                "report/bench.md"]


def test_bench_writes_into_the_current_folder_unless_told(tmp_path, monkeypatch):
    from vaelab.cli import build_parser

    args = build_parser().parse_args(["bench"])
    assert args.out == Path("bench.md")  # relative: the current folder, not the docs
    assert report_paths(Path("x/bench.json")) == (Path("x/bench.md"), Path("x/bench.json"))
    assert report_paths(Path("r.md")) == (Path("r.md"), Path("r.json"))


@pytest.mark.parametrize("case", ["folder", "under_a_file"])
def test_bench_refuses_an_out_it_cannot_write_before_measuring(tmp_path, case):
    given = tmp_path / "f"
    if case == "folder":
        given.mkdir()
        out, why = given, "is a folder: name a file"
    else:
        given.write_text("x")
        out, why = given / "bench.md", f"{given} is a file, not a folder"
    with pytest.raises(ConfigError, match=why):
        run_bench(out=out, dataset="idx:/nonexistent", log=lambda s: None)


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

    before = torch.random.get_rng_state()
    flops = training_flops_per_image("vae", batch_size=8)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator untouched
    net = build_model(resolve_config("study", model="vae").model_spec())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.rand(8, 1, 28, 28))
    forward = counter.get_total_flops() / 8
    assert 2.5 * forward < flops <= 3.0 * forward
    assert training_flops_per_image("cvae", batch_size=8) > flops  # one more input channel
    r = roofline({"vaelab": 1000.0, "reference": 500.0}, flops, peak_gflops=100.0)
    assert r["vaelab_gflops"] == pytest.approx(1000 * flops / 1e9)
    assert r["twice_reference_of_peak"] == pytest.approx(r["vaelab_of_peak"])


def test_bench_times_the_exact_log_px_of_a_trained_run(data_dir, tmp_path):
    from vaelab.bench import exact_speed
    from vaelab.checkpoint import load_run
    from vaelab.cli import main
    from vaelab.evaluate import dataset_for_run, exact_log_px_per_image

    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--dataset", f"idx:{data_dir}", "--val-size",
                 "32", "--epochs", "1", "--out", str(run), "--quiet"]) == 0
    timed = exact_speed(run, tolerance=0.5)
    loaded = load_run(run)
    direct = exact_log_px_per_image(loaded.model, dataset_for_run(loaded).test, tolerance=0.5)
    assert timed["n"] == 64 and timed["seconds"] > 0 and timed["nodes"] == direct.nodes
    assert timed["neg_log_px"] == pytest.approx(-float(direct.log_px.mean()), abs=1e-9)
    text = markdown({"machine": {"cpu": "x", "cores": 2, "torch_threads": 1, "torch": "t",
                                 "python": "p"}, "device": "cpu", "command": "vaelab bench",
                     "models": {}, "peak_rss_mb": 1.0, "exact": [timed]})
    assert f"{timed['nodes']:,}" in text and f"{timed['neg_log_px']:.2f}" in text


def test_bench_refuses_a_bad_exact_run_before_measuring(tmp_path, capsys):
    from vaelab.cli import main

    code = main(["bench", "--exact", str(tmp_path / "missing"), "--out",
                 str(tmp_path / "b.md")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "b.md").exists()


# --------------------------------------------------------------------------------------------
# pythae's TrainingPipeline as a contender (vaelab.bench_pythae)
# --------------------------------------------------------------------------------------------
def _shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in module.parameters())


@pytest.mark.parametrize("kind", ["vae", "cvae"])
def test_pythae_trains_vaelabs_network_and_counts_its_images(full_batches_dir, kind):
    import pythae  # noqa: F401 - in the [test] extra: a missing pythae fails, never skips

    from helpers import one_thread
    from vaelab.bench_pythae import PythaeContender
    from vaelab.data import load_dataset

    ds = load_dataset(f"idx:{full_batches_dir}", val_size=32)
    spec = resolve_config("study", model=kind).model_spec()
    torch.manual_seed(0)
    net = build_model(spec)
    torch.manual_seed(0)
    twin = build_model(spec)  # net's initial weights, to see that pythae trains those
    with one_thread():
        c = PythaeContender(net, ds.train, steps=2, batch_size=128)
        try:
            # the same network: every parameter of vaelab's model, once, and nothing more
            assert _shapes(c.model) == _shapes(twin)
            assert sum(p.numel() for p in c.model.parameters()) == \
                sum(p.numel() for p in twin.parameters())
            ids = {id(p) for p in c.model.parameters()}
            assert ids == {id(p) for p in net.parameters()}
            # its networks compute vaelab's: the encoder's (mu, logvar), the decoder's
            # sigmoid(logits), for the CVAE given the labels
            x = ds.train.images[:8].float().div(255).unsqueeze(1)
            y = ds.train.labels[:8].long()
            yy = y if net.conditional else None
            with torch.no_grad():
                enc = c.model.encoder(x, yy)
                mu, logvar = net.encode(x, yy)
                torch.testing.assert_close(enc.embedding, mu)
                torch.testing.assert_close(enc.log_covariance, logvar)
                torch.testing.assert_close(c.model.decoder(mu, yy).reconstruction,
                                           torch.sigmoid(net.decode(mu, yy)))
            # one round: 2 steps of 128 images, each counted, and the weights move
            before = [p.detach().clone() for p in net.parameters()]
            r = c.round()
            assert r["images"] == 2 * 128 and r["seconds"] > 0
            assert torch.isfinite(torch.tensor(r["loss"]))
            assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(),
                                                                 strict=True))
        finally:
            c.close()


def test_pythae_leaves_the_global_generators_as_they_were(full_batches_dir):
    """pythae's trainer seeds random, numpy and torch: the contender puts them back."""
    import random

    import numpy as np
    import pythae  # noqa: F401 - in the [test] extra: a missing pythae fails, never skips

    from helpers import one_thread
    from vaelab.bench_pythae import PythaeContender
    from vaelab.data import load_dataset

    ds = load_dataset(f"idx:{full_batches_dir}", val_size=32)
    net = build_model(resolve_config("study", model="vae").model_spec())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expect = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    with one_thread():
        c = PythaeContender(net, ds.train, steps=1, batch_size=128)
        c.round()
        c.close()
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expect


def test_bench_ratios_are_computed_from_the_rounds(full_batches_dir, monkeypatch):
    """vaelab, reference and pythae alternate, each rate is the median of its own per-round
    images over seconds, and the ratios are those medians'; fake rounds with known numbers
    stand in for the timing (the real ones are checked above)."""
    from vaelab import bench, bench_pythae
    from vaelab.data import load_dataset

    order: list[str] = []
    vaelab_times = iter([2.0, 1.0, 4.0])
    ref_times = iter([4.0, 8.0, 2.0])
    pythae_times = iter([8.0, 16.0, 4.0])

    def fake_vaelab(trainer, steps):  # the warm-ups are 5 steps, the rounds 4
        order.append("vaelab" if trainer.precision == "bf16" else "fp32")
        if steps == 5 or trainer.precision != "bf16":
            return 10.0, steps * 128
        return next(vaelab_times), steps * 128

    def fake_reference(model, split, *, max_steps, **kw):
        order.append("reference")
        return {"images": max_steps * 128,
                "seconds": 1.0 if max_steps == 5 else next(ref_times)}

    class FakePythae:
        def __init__(self, net, split, *, steps, batch_size, device):
            self.steps = steps

        def round(self):
            order.append("pythae")
            return {"images": self.steps * 128, "seconds": next(pythae_times), "loss": 1.0}

        def close(self):
            pass

    monkeypatch.setattr(bench, "_time_vaelab_steps", fake_vaelab)
    monkeypatch.setattr(bench.ref, "train_reference", fake_reference)
    monkeypatch.setattr(bench_pythae, "pythae_missing", lambda: None)
    monkeypatch.setattr(bench_pythae, "pythae_version", lambda: "0.1.2")
    monkeypatch.setattr(bench_pythae, "PythaeContender", FakePythae)
    ds = load_dataset(f"idx:{full_batches_dir}", val_size=32)
    t = bench.throughput(ds, "vae", rounds=3, steps=4, device="cpu", precision="bf16",
                         fp32_too=True)
    # warm-ups (vaelab, fp32, reference), then rounds of vaelab, reference, pythae, fp32
    assert order == ["vaelab", "fp32", "reference"] + \
        ["vaelab", "reference", "pythae", "fp32"] * 3
    n = 4 * 128
    assert t["vaelab"] == statistics.median([n / 2.0, n / 1.0, n / 4.0]) == n / 2.0
    assert t["reference"] == n / 4.0 and t["pythae"] == n / 8.0 and t["vaelab_fp32"] == n / 10
    assert t["ratio"] == t["vaelab"] / t["reference"] == 2.0
    assert t["pythae_ratio"] == t["vaelab"] / t["pythae"] == 4.0
    assert t["bf16_gain"] == 5.0 and t["precision"] == "bf16"
    assert [r["pythae_seconds"] for r in t["per_round"]] == [8.0, 16.0, 4.0]
    assert all(r["pythae_images"] == n for r in t["per_round"])
    table = "\n".join(bench.throughput_table({"vae": {"throughput": t}}))
    assert "vaelab / pythae" in table and "| 4.00x |" in table and "(bf16)" in table


def test_a_missing_pythae_is_said_in_one_line_and_the_rest_is_measured(
    full_batches_dir, tmp_path, monkeypatch
):
    import builtins

    from helpers import one_thread
    from vaelab.bench_pythae import pythae_missing

    real_import = builtins.__import__

    def no_pythae(name, *args, **kwargs):
        if name == "pythae" or name.startswith("pythae."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pythae)
    line = pythae_missing()
    assert line is not None and "\n" not in line and "pythae is not installed" in line

    out = tmp_path / "b.md"
    logged: list[str] = []
    with one_thread():
        results = run_bench(models=("vae",), rounds=1, steps=1, device="cpu", num_samples=0,
                            dataset=f"idx:{full_batches_dir}", out=out, log=logged.append,
                            rss_limit=64, val_size=32)
    assert logged.count(line) == 1  # said once as it starts
    assert results == json.loads(out.with_suffix(".json").read_text())
    t = results["models"]["vae"]["throughput"]
    assert t["pythae_missing"] == line and "pythae" not in t and "pythae_ratio" not in t
    assert t["vaelab"] > 0 and t["reference"] > 0 and len(t["per_round"]) == 1
    assert out.read_text().count(line) == 1
    assert len(results["load_average"]["start"]) == 3
