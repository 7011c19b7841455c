"""Tests for ``vaelab reproduce`` (vaelab.report): one quick study on synthetic IDX data.

The study is run once per module (two one-epoch runs on a few hundred images, a one-epoch
classifier, 5 importance samples, PNG figures at a low resolution) and its folder is checked;
the CLI then re-runs it on a copy, which reuses the runs, the classifier and the figures.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from rich.console import Console

import vaelab
from synthetic import block_digits, write_synthetic
from vaelab import plots
from vaelab.cli import main
from vaelab.config import resolve_config
from vaelab.errors import CheckpointError, ConfigError
from vaelab.report import (
    KINDS,
    MARKER,
    STUDY,
    ablation_results,
    comparison_rows,
    ensure_evaluation,
    ensure_run,
    load_given_runs,
    reduction_pct,
    reproduce,
)


@pytest.fixture(scope="module")
def low_dpi():
    with pytest.MonkeyPatch.context() as mp:
        # the tests check files, not pixels (STYLE is read-only: the test swaps in a copy)
        mp.setattr(plots, "STYLE", MappingProxyType({**plots.STYLE, "savefig.dpi": 30}))
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("idx"), block_digits, 240, 60, seed=0)


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir, low_dpi) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study") / "report"
    results = reproduce(out, preset="smoke", dataset=f"idx:{data_dir}", num_samples=5,
                        progress=False, formats=("png",))
    return out, results


def test_reproduce_quick_writes_everything(study) -> None:
    out, results = study
    for name in (MARKER, "results.json", "README.md", "index.html"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    # every figure that applies to each model, as PNG
    for kind in ("vae", "cvae"):
        expected = {n for n, s in plots.FIGURES.items()
                    if s.applies_to in ("all", "latent2") or kind == "cvae"}  # a 2-D latent
        assert set(results["figures"][kind]) == expected
        for paths in results["figures"][kind].values():
            assert all((out / p).is_file() and p.endswith(".png") for p in paths)
    assert "samples-per-class" not in results["figures"]["vae"]
    # both runs evaluated with every measure; the CVAE's samples judged by the classifier
    for kind in ("vae", "cvae"):
        ev = results["evaluations"][kind]
        assert ev["model"] == kind and (out / "runs" / kind / "model.json").exists()
        assert ev["log_px"]["num_samples"] == 5 and ev["log_px"]["gap"] >= 0
        assert {"active_units", "knn", "aggregate_posterior", "closest_pairs"} <= set(ev)
    ca = results["evaluations"]["cvae"]["cvae_class_accuracy"]
    assert len(ca["per_class"]) == 10  # its values: test_the_cvae_class_accuracy_is_recomputed
    assert results["evaluations"]["vae"]["cvae_class_accuracy"] is None
    assert (out / "classifier" / "classifier.json").exists()
    assert results["ablations"] is None
    # each step's seconds and the load beside them (a timing on a busy machine says so); the
    # first run to finish training made the classifier meanwhile, in its own thread
    assert set(results["timings"]) == {"training", "classifier", "evaluation", "figures",
                                       "total", "beside_training_classifier"}
    assert results["timings"]["training"] >= results["timings"]["beside_training_classifier"]
    assert all(len(results["load_average"][k]) == 3 for k in ("start", "end"))


def test_the_cvae_class_accuracy_is_recomputed_from_its_samples(study, data_dir) -> None:
    """The report's class accuracy is what the saved CVAE and classifier give: the same
    z ~ N(0, I) (seed 0, class by class), decoded under each class, labelled by the CNN; and
    the classifier's test accuracy is its predictions' on the real test images."""
    from vaelab.checkpoint import load_run
    from vaelab.classifier import load_classifier
    from vaelab.data import load_dataset

    out, results = study
    ca = results["evaluations"]["cvae"]["cvae_class_accuracy"]
    n = ca["per_class_n"]
    assert 1 <= n <= 1000  # one batch per class, as drawn below
    model = load_run(out / "runs" / "cvae").model.eval()
    classifier = load_classifier(out / "classifier").eval()
    gen = torch.Generator().manual_seed(0)
    confusion = []
    with torch.inference_mode():
        for c in range(10):
            z = torch.randn(n, model.latent_dim, generator=gen)
            images = torch.sigmoid(model.decode(z, torch.full((n,), c)))
            confusion.append(torch.bincount(classifier(images).argmax(1), minlength=10).tolist())
    assert ca["confusion"] == confusion
    assert ca["per_class"] == [confusion[c][c] / n for c in range(10)]
    assert ca["accuracy"] == pytest.approx(sum(confusion[c][c] for c in range(10)) / (10 * n),
                                           abs=1e-12)

    test = load_dataset(f"idx:{data_dir}", val_size=32).test
    with torch.inference_mode():
        pred = classifier(test.images.unsqueeze(1).float() / 255).argmax(1)
    correct = (pred == test.labels).double().mean().item()
    assert results["classifier"]["test_accuracy"] == pytest.approx(correct, abs=1e-12)
    assert results["classifier"]["test_images"] == len(test)


def test_the_table_sets_ours_beside_the_study(study) -> None:
    out, results = study
    rows = {r["metric"]: r for r in results["comparison"]}
    assert list(rows) == ["recon", "kl", "neg_elbo", "neg_log_px"]
    vae, cvae = results["evaluations"]["vae"], results["evaluations"]["cvae"]
    assert rows["recon"]["vae"] == vae["elbo"]["recon"]
    # the exact value on every test image, with the IS estimate's bias on its own images
    exact = cvae["exact_log_px"]
    assert rows["neg_log_px"]["cvae"] == exact["neg_log_px"]
    assert exact["method"] == "quadrature" and exact["n"] == cvae["elbo"]["n"]
    assert exact["error_estimate"] <= exact["tolerance"]
    assert exact["gap"] == pytest.approx(exact["log_px"] + cvae["elbo"]["neg_elbo"])
    lp = cvae["log_px"]
    assert lp["bias"] == pytest.approx(lp["log_px"] - lp["exact_log_px_same_images"])
    # each estimate says its images: the IS ones the first logpx_images, the others all
    assert exact["images"] == cvae["elbo"]["images"] == f"test[:{exact['n']}]"
    assert lp["images"] == f"test[:{lp['n']}]"
    assert lp["neg_elbo_same_images"] == pytest.approx(-lp["elbo_same_images"])
    for key in ("recon", "kl", "neg_elbo"):
        r = rows[key]
        assert r["reduction_pct"] == pytest.approx(100 * (r["vae"] - r["cvae"]) / r["vae"])
        assert (r["study_vae"], r["study_cvae"]) == (STUDY["vae"][key], STUDY["cvae"][key])
    study_pct = [round(rows[k]["study_reduction_pct"], 1) for k in ("recon", "kl", "neg_elbo")]
    assert study_pct == [9.9, 27.2, 10.7]
    readme = (out / "README.md").read_text()
    assert "| -ELBO | " in readme and "144.59" in readme and "129.16" in readme
    assert "10.7%" in readme and f"{rows['neg_elbo']['vae']:.2f}" in readme
    assert "The study's VAE had 4/9, 3/8, 1/7 closest." in readme
    pairs = results["evaluations"]["vae"]["closest_pairs"]["pairs"]
    assert results["closest_pairs"]["vae"] == [[p["a"], p["b"]] for p in pairs]
    # each figure with its caption and the command that redraws it
    for kind, figs in results["figures"].items():
        for name, paths in figs.items():
            assert f"]({paths[0]})" in readme
            assert f"vaelab plot {out / 'runs' / kind} --figure {name}" in readme
            assert plots.FIGURES[name].caption in readme


def test_index_html_is_self_contained(study) -> None:
    out, results = study
    page = (out / "index.html").read_text()
    n_figures = sum(len(f) for f in results["figures"].values())
    assert page.count('src="data:image/png;base64,') == n_figures
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<script" not in page and "<link" not in page
    assert "reduction CVAE vs VAE" in page


def test_cli_reproduce_reuses_a_finished_study(study, data_dir, tmp_path, capsys) -> None:
    out, _ = study
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    code = main(["reproduce", "--preset", "smoke", "--out", str(copy), "--dataset",
                 f"idx:{data_dir}", "--samples", "3", "--format", "png"])
    text = capsys.readouterr().out
    assert code == 0
    assert "finished run found, reused" in text and "classifier found, reused" in text
    assert "figures up to date, reused" in text
    assert "evaluation of the same weights" not in text  # K changed: evaluated again
    assert "study VAE" in text and "138.00" in text  # the rich table
    results = json.loads((copy / "results.json").read_text())
    assert results["evaluations"]["cvae"]["log_px"]["num_samples"] == 3
    assert "--samples 3" in results["command"]


def test_reproduce_reuses_saved_evaluations_and_redoes_unreadable_ones(
        study, data_dir, tmp_path) -> None:
    out, first = study
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    (copy / "evaluations" / "cvae.json").write_text('{"key": {"model_sha2')  # cut short
    printed = io.StringIO()
    again = reproduce(copy, preset="smoke", dataset=f"idx:{data_dir}", num_samples=5,
                      progress=False, formats=("png",),
                      console=Console(file=printed, width=400, highlight=False))
    reused = [ln for ln in printed.getvalue().splitlines()
              if "evaluation of the same weights and settings found" in ln]
    assert len(reused) == 1 and "vae.json" in reused[0]  # the cut-short cvae.json is redone
    for name in ("vae", "cvae"):  # same weights, settings and seed: the same numbers
        assert again["evaluations"][name]["run"] == str(copy / "runs" / name)
        assert ({k: v for k, v in again["evaluations"][name].items() if k != "run"}
                == {k: v for k, v in first["evaluations"][name].items() if k != "run"})
    saved = json.loads((copy / "evaluations" / "cvae.json").read_text())
    assert saved["evaluation"]["elbo"] == first["evaluations"]["cvae"]["elbo"]


def test_ensure_evaluation_is_keyed_by_weights_and_settings(tmp_path) -> None:
    from types import SimpleNamespace

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = SimpleNamespace(path=run_dir)
    calls: list[int] = []

    def evaluate() -> dict:
        calls.append(1)
        return {"elbo": {"neg_elbo": 100.0 + len(calls)}}

    def ev(settings: dict, force: bool = False) -> dict:
        return ensure_evaluation(tmp_path / "ev" / "run.json", run, settings, evaluate,
                                 force=force, log=lambda _: None)

    (run_dir / "model.json").write_text(json.dumps({"sha256": "aa"}))
    assert ev({"num_samples": 5}) == {"elbo": {"neg_elbo": 101.0}}
    assert ev({"num_samples": 5}) == {"elbo": {"neg_elbo": 101.0}} and len(calls) == 1
    assert ev({"num_samples": 6})["elbo"]["neg_elbo"] == 102.0  # other settings
    (run_dir / "model.json").write_text(json.dumps({"sha256": "bb"}))
    assert ev({"num_samples": 6})["elbo"]["neg_elbo"] == 103.0  # other weights
    assert ev({"num_samples": 6}, force=True)["elbo"]["neg_elbo"] == 104.0
    import vaelab.report as report

    rules = report.EXACT_RULES  # the quadrature's rules changed: computed again, then reused
    try:
        report.EXACT_RULES = rules + 1
        assert ev({"num_samples": 6})["elbo"]["neg_elbo"] == 105.0
        assert ev({"num_samples": 6})["elbo"]["neg_elbo"] == 105.0
    finally:
        report.EXACT_RULES = rules
    calls.append(1)
    (run_dir / "model.json").unlink()  # weights that cannot be identified: never cached
    assert ev({"num_samples": 6})["elbo"]["neg_elbo"] == 107.0
    assert ev({"num_samples": 6})["elbo"]["neg_elbo"] == 108.0


def test_cli_reproduce_refuses_bad_runs_and_foreign_folders(tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["reproduce", "--preset", "smoke", "--out", str(out), "--runs",
                 str(tmp_path / "no-such-run")]) == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert main(["reproduce", "--preset", "smoke", "--out", str(foreign)]) == 2
    assert "not a vaelab report" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]


def test_given_runs_are_sorted_by_kind(study) -> None:
    out, _ = study
    given = load_given_runs([out / "runs" / "cvae", out / "runs" / "vae"])
    assert {k: r.path.name for k, r in given.items()} == {"cvae": "cvae", "vae": "vae"}
    with pytest.raises(ConfigError, match="two VAE runs"):
        load_given_runs([out / "runs" / "vae", out / "runs" / "vae"])
    with pytest.raises(CheckpointError):
        load_given_runs([out / "classifier"])


def test_reproduce_refuses_a_run_trained_otherwise(study, data_dir, tmp_path) -> None:
    out, _ = study
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    with pytest.raises(ConfigError, match="other settings"):
        reproduce(copy, preset="smoke", dataset=f"idx:{data_dir}", seeds=(7,), progress=False)
    with pytest.raises(ConfigError, match=r"other settings \(precision\)"):
        reproduce(copy, preset="smoke", dataset=f"idx:{data_dir}", precision="bf16", progress=False)


def test_a_run_that_differs_only_in_runtime_settings_is_reused(study, data_dir, tmp_path) -> None:
    """--device, --checkpoint-every and the evaluation batch say where and how often, not what
    is trained: such a run is reused; a changed recipe (the seed) is still refused."""
    out, _ = study
    copy = tmp_path / "run"
    shutil.copytree(out / "runs" / "vae", copy)
    meta = json.loads((copy / "config.json").read_text())
    meta["config"].update(device="cpu" if meta["config"]["device"] != "cpu" else "auto",
                          checkpoint_every=3, eval_batch_size=17, cuda_graphs=False)
    (copy / "config.json").write_text(json.dumps(meta))
    before = (copy / "model.safetensors").read_bytes()
    lines: list[str] = []
    cfg = resolve_config("smoke", model="vae", dataset=f"idx:{data_dir}", seed=0)
    run = ensure_run(copy, cfg, force=False, progress=False, log=lines.append,
                     device=torch.device("cpu"))
    assert lines == [f"{copy}: finished run found, reused"]
    assert run.path == copy and (copy / "model.safetensors").read_bytes() == before
    with pytest.raises(ConfigError, match=r"other settings \(seed\)"):
        ensure_run(copy, replace(cfg, seed=5), force=False, progress=False, log=lines.append,
                   device=torch.device("cpu"))


def test_a_run_written_before_a_setting_existed_is_reused(study, data_dir, tmp_path) -> None:
    """A config.json without ``weight_decay`` (written before it existed) is today's default,
    no decay: the run is reused, not refused as other settings."""
    out, _ = study
    copy = tmp_path / "run"
    shutil.copytree(out / "runs" / "vae", copy)
    meta = json.loads((copy / "config.json").read_text())
    del meta["config"]["weight_decay"]
    (copy / "config.json").write_text(json.dumps(meta))
    lines: list[str] = []
    cfg = resolve_config("smoke", model="vae", dataset=f"idx:{data_dir}", seed=0)
    ensure_run(copy, cfg, force=False, progress=False, log=lines.append,
               device=torch.device("cpu"))
    assert lines == [f"{copy}: finished run found, reused"]
    with pytest.raises(ConfigError, match=r"other settings \(weight_decay\)"):
        ensure_run(copy, replace(cfg, weight_decay=0.1), force=False, progress=False,
                   log=lines.append, device=torch.device("cpu"))


@pytest.mark.parametrize("threads", [1, 2])
def test_train_concurrently_on_a_cpu(data_dir, tmp_path, threads: int) -> None:
    """On a CPU with one torch thread the runs train one after the other; with a thread for
    each, side by side on one thread each (their lines tagged with the run). Either way each
    run computes exactly what ``train`` alone computes on the threads it had, and torch's
    thread count is as it was afterwards."""
    from helpers import one_thread
    from vaelab.training import train, train_concurrently

    cfgs = [resolve_config("smoke", model=k, dataset=f"idx:{data_dir}", device="cpu")
            for k in ("vae", "cvae")]
    lines: list[str] = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = train_concurrently([(c, tmp_path / c.model, {}) for c in cfgs],
                                     progress=False, log=lines.append)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    tagged = [line for line in lines if line.startswith(("[vae] ", "[cvae] "))]
    assert bool(tagged) == (threads == 2)
    timing = ("seconds", "images_per_s")
    for cfg, result in zip(cfgs, results, strict=True):
        with one_thread():
            alone = train(cfg, tmp_path / f"{cfg.model}-alone", progress=False)
        assert [{k: v for k, v in m.items() if k not in timing} for m in result.metrics] == \
            [{k: v for k, v in m.items() if k not in timing} for m in alone.metrics]
        assert torch.equal(result.model.decoder.net[0].weight, alone.model.decoder.net[0].weight)
    with pytest.raises(ConfigError, match="parallel must be >= 1"):
        train_concurrently([], parallel=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_train_concurrently_calls_after_once_each_run_has_trained(
        data_dir, tmp_path, threads: int) -> None:
    """``after(i)`` runs once per job, when job ``i`` has finished (its model.json written),
    on the threads the run had; side by side, in the run's own thread."""
    from vaelab.training import train_concurrently

    cfgs = [resolve_config("smoke", model=k, dataset=f"idx:{data_dir}", device="cpu")
            for k in ("vae", "cvae")]
    seen: list[tuple[int, bool, int, str]] = []

    def after(i: int) -> None:
        seen.append((i, (tmp_path / cfgs[i].model / "model.json").exists(),
                     torch.get_num_threads(), threading.current_thread().name))

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        train_concurrently([(c, tmp_path / c.model, {}) for c in cfgs], progress=False,
                           after=after)
    finally:
        torch.set_num_threads(before)
    assert sorted(i for i, *_ in seen) == [0, 1]
    assert all(trained and n == 1 for _, trained, n, _ in seen)
    names = {name for *_, name in seen}
    assert names == ({"vaelab-run-0", "vaelab-run-1"} if threads == 2 else
                     {threading.main_thread().name})


def test_a_signal_during_after_stops_at_once_and_keeps_the_runs(data_dir, tmp_path) -> None:
    """SIGINT while an ``after`` is still working (a long evaluation, say), every run trained:
    ``Interrupted`` comes at once, without waiting for it, and both runs are kept finished."""
    from vaelab.training import Interrupted, train_concurrently

    cfgs = [resolve_config("smoke", model=k, dataset=f"idx:{data_dir}", device="cpu")
            for k in ("vae", "cvae")]
    working, both, release = threading.Event(), threading.Event(), threading.Event()
    calls: list[int] = []

    def after(i: int) -> None:
        calls.append(i)
        if len(calls) == 2:
            both.set()
        if len(calls) == 1:
            working.set()
            release.wait(60)  # the long work, abandoned by the signal

    def interrupt() -> None:
        both.wait(60)
        os.kill(os.getpid(), signal.SIGINT)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    sender = threading.Thread(target=interrupt)
    sender.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(Interrupted, match="stopped after every run had trained"):
            train_concurrently([(c, tmp_path / c.model, {}) for c in cfgs], progress=False,
                               after=after)
        waited = time.perf_counter() - t0
    finally:
        release.set()
        sender.join()
        torch.set_num_threads(before)
    assert working.is_set() and waited < 55  # not the 60 s the first after would take
    assert all((tmp_path / c.model / "model.json").exists() for c in cfgs)


def test_reproduce_makes_each_thing_once_with_force(tmp_path, data_dir, low_dpi) -> None:
    """With --force the classifier made in a run's thread is not made a second time by the
    step after training (it reuses it), and each run is evaluated once."""
    out = tmp_path / "report"
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    reproduce(out, preset="smoke", dataset=f"idx:{data_dir}", num_samples=5, progress=True,
              formats=("png",), force=True, console=console)
    text = buf.getvalue()
    assert text.count("training the digit classifier") == 1
    for kind in KINDS:
        assert text.count(f"evaluating {kind} (") == 1, kind
    assert "classifier found, reused" in text


def fake_eval(recon: float, kl: float, active: int, seed: int) -> dict:
    return {"seed": seed, "elbo": {"recon": recon, "kl": kl, "neg_elbo": recon + kl},
            "log_px": {"neg_log_px": recon + kl - 1.0},
            "active_units": {"count": active, "latent_dim": 2}}


def test_ablations_are_summarised_from_the_numbers() -> None:
    evaluations = {
        "vae": fake_eval(140.0, 6.0, 2, 0), "vae-seed1": fake_eval(142.0, 5.0, 2, 1),
        "vae-no-warmup": fake_eval(150.0, 2.0, 1, 0),
        "cvae": fake_eval(125.0, 5.0, 2, 0), "cvae-seed1": fake_eval(127.0, 5.0, 2, 1),
        "cvae-no-warmup": fake_eval(124.0, 5.5, 2, 0),
    }
    seed_runs = {"vae": ["vae", "vae-seed1"], "cvae": ["cvae", "cvae-seed1"]}
    annealing = {k: {"warmup": k, "no_warmup": f"{k}-no-warmup"} for k in ("vae", "cvae")}
    ab = ablation_results(evaluations, seed_runs, annealing)
    vae_text = ab["kl_annealing"]["vae"]["text"]
    assert "test KL 2.00 nats without the warm-up vs 6.00 with it (lower without, -4.00)" \
        in vae_text
    assert "-ELBO 152.00 nats without the warm-up vs 146.00 with it (higher without" in vae_text
    assert "active units 1 of 2 without vs 2 of 2 with it (fewer without)" in vae_text
    assert ("for scale, the warm-up run's -ELBO varies with the seed by 0.71 nats "
            "(std over seeds 0, 1)") in vae_text
    cvae_text = ab["kl_annealing"]["cvae"]["text"]
    assert "(higher without, +0.50)" in cvae_text and "(lower without, -0.50)" in cvae_text
    s = ab["seeds"]["vae"]
    assert s["recon"]["mean"] == pytest.approx(141.0)
    assert s["recon"]["std"] == pytest.approx(np.std([140.0, 142.0], ddof=1))
    rows = {r["metric"]: r for r in comparison_rows(evaluations, seed_runs)}
    assert rows["recon"]["vae"] == pytest.approx(141.0)
    assert rows["recon"]["vae_values"] == [140.0, 142.0]
    assert rows["recon"]["reduction_pct"] == pytest.approx(reduction_pct(141.0, 126.0))


def test_cli_evaluate_samples_and_full(study, capsys) -> None:
    out, _ = study
    run = str(out / "runs" / "cvae")
    assert main(["evaluate", run, "--samples", "4", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["log_px"]["num_samples"] == 4 and ev["log_px"]["gap"] >= 0
    # the whole test split, for the ELBO and the importance-sampled estimate alike
    assert ev["images"] == ev["log_px"]["images"] == f"test[:{ev['n']}]"
    assert ev["log_px"]["n"] == ev["n"]
    assert "active_units" not in ev
    assert main(["evaluate", run, "--samples", "0", "--json"]) == 0
    assert "log_px" not in json.loads(capsys.readouterr().out)
    assert main(["evaluate", run, "--samples", "3", "--full"]) == 0
    text = capsys.readouterr().out
    for heading in ("-log p(x)", "Active units", "k-nearest-neighbour", "Aggregate posterior",
                    "Closest digit pairs"):
        assert heading in text
    assert main(["evaluate", run, "--samples", "-1"]) == 2


def test_reproduce_with_ablations(study, data_dir, tmp_path, monkeypatch) -> None:
    """The four new runs train through the sweep (a local Ray) on this CPU; the two main runs
    are reused."""
    import vaelab.sweep

    out, _ = study
    copy = tmp_path / "ablations"
    shutil.copytree(out, copy)
    swept = []
    real = vaelab.sweep.train_trials

    def spy(folder, trials, *args, **kwargs):
        swept.append(sorted(t.name for t in trials))
        outcome = real(folder, trials, *args, **kwargs)
        swept.append(sorted(n for n, r in outcome.records.items() if r["trained"]))
        return outcome

    monkeypatch.setattr(vaelab.sweep, "train_trials", spy)
    results = reproduce(copy, preset="smoke", ablations=True, seeds=(0, 1), num_samples=3,
                        dataset=f"idx:{data_dir}", progress=False, formats=("png",))
    new = ["cvae-no-warmup", "cvae-seed1", "vae-no-warmup", "vae-seed1"]
    assert swept == [new, new]
    assert set(results["runs"]) == {"vae", "cvae", "vae-seed1", "cvae-seed1", "vae-no-warmup",
                                    "cvae-no-warmup"}
    assert results["runs"]["vae-no-warmup"]["path"].endswith("no-warmup")
    cfg = results["evaluations"]["vae-no-warmup"]["config"]
    assert (cfg["beta_schedule"], cfg["beta"]) == ("constant", 1.0)
    assert results["evaluations"]["cvae-seed1"]["config"]["seed"] == 1
    ab = results["ablations"]
    for kind in ("vae", "cvae"):
        arms = {"warmup": kind, "no_warmup": f"{kind}-no-warmup"}
        assert ab["kl_annealing"][kind]["runs"] == arms
        assert ab["kl_annealing"][kind]["text"].startswith(kind.upper() + ": test KL")
        assert ab["seeds"][kind]["seeds"] == [0, 1]
    row = {r["metric"]: r for r in results["comparison"]}["neg_elbo"]
    assert len(row["vae_values"]) == 2 and row["vae_std"] is not None
    readme = (copy / "README.md").read_text()
    assert "KL annealing" in readme and " ± " in readme
    assert ab["kl_annealing"]["vae"]["text"] in readme


def test_tables_written_to_a_file_or_pipe_are_not_cut() -> None:
    from vaelab.io import console
    from vaelab.report import render_terminal

    wide = ["reconstruction error (nats per image)", "classifier accuracy on samples"] * 3
    row = ["123.456789 ± 0.000001", "100.00 % of 10,000 samples"] * 3
    blocks = [("h1", "A report heading"), ("table", wide, [row]),
              ("p", "a paragraph " * 30)]
    buffer = io.StringIO()
    render_terminal(blocks, console(file=buffer))
    text = buffer.getvalue()
    assert "…" not in text
    for cell in wide + row:
        assert cell in text
    assert "== A report heading ==" in text and ("a paragraph " * 30).strip() in text


def test_a_first_look_says_so_and_the_study_does_not(study) -> None:
    """A report of any preset but the study's opens with a paragraph that says its numbers are
    a first look, with the runs' images, epochs and network; the study's report has none."""
    from vaelab.report import first_look_blocks

    out, results = study
    readme = (out / "README.md").read_text()
    text = ("A first look, not the study (preset `smoke`): each model here trained on "
            f"{results['evaluations']['vae']['knn']['n_train']:,} training images for 1 epoch "
            "through a convolutional network (batch 64, learning rate 0.001), and the numbers "
            f"below are on all {results['evaluations']['vae']['knn']['n_test']:,} test images.")
    assert text in readme and text in (out / "index.html").read_text()
    assert results["settings"]["preset"] == "smoke" and results["settings"]["quick"] is False
    assert results["command"].startswith(f"vaelab reproduce --out {out} --preset smoke ")
    seed = {**results, "settings": {**results["settings"], "preset": "seed"}}
    assert first_look_blocks(seed) == []
    mlp = json.loads(json.dumps(results))
    mlp["settings"]["preset"] = "quick"
    mlp["evaluations"]["vae"]["config"].update(arch="mlp", mlp_hidden=[512, 256], epochs=6)
    text = first_look_blocks(mlp)[0][1]
    assert "for 6 epochs through an MLP of 512 and 256 hidden units (batch" in text


def test_the_presets_of_a_study_and_their_report_settings() -> None:
    """--quick is --preset quick (given with another preset: refused); each preset's report
    settings (K, images, tolerance) are left out of the command line that remakes it, and any
    other value is written there."""
    from vaelab.report import REPORT_RECIPES, report_preset, reproduce_command

    assert report_preset(None, False) == "study" and report_preset(None, True) == "quick"
    assert report_preset("quick", True) == "quick" and report_preset("smoke", False) == "smoke"
    with pytest.raises(ConfigError, match="--quick is --preset quick: give one of them"):
        report_preset("smoke", True)
    with pytest.raises(ConfigError, match="unknown preset 'fast': choose one of study, quick"):
        report_preset("fast", False)
    assert set(REPORT_RECIPES) == {"study", "quick", "smoke"}
    common = dict(runs=[], ablations=False, seeds=[0], dataset="mnist")
    for preset, flag in (("study", ""), ("quick", " --quick"), ("smoke", " --preset smoke")):
        r = REPORT_RECIPES[preset]
        assert reproduce_command(Path("o"), preset=preset, num_samples=r["num_samples"],
                                 logpx_images=r["logpx_images"], tolerance=r["tolerance"],
                                 **common) == f"vaelab reproduce --out o{flag}"
    assert reproduce_command(Path("o"), preset="quick", num_samples=1000, logpx_images=1000,
                             tolerance=0.1, **common) == (
        "vaelab reproduce --out o --quick --samples 1000 --logpx-images 1000 --tolerance 0.1")


def test_reproduce_quick_with_another_preset_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reproduce", "--quick", "--preset", "study", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vaelab: error: --quick is --preset quick: give one of them, not --preset study"]
    assert not (tmp_path / "r").exists()


def test_the_exact_table_gives_the_elbo_as_log_px_plus_the_gap() -> None:
    """gap = log p(x) - ELBO >= 0, so -ELBO = -log p(x) + gap (the table once showed - gap)."""
    from vaelab.report import EXACT_COLUMNS, exact_row

    ex = {"neg_log_px": 127.25, "error_estimate": 0.1, "gap": 6.0, "log_px_sem": 0.4,
          "refined": 3, "n": 10}
    row = dict(zip(EXACT_COLUMNS, exact_row("vae", ex), strict=True))
    assert float(row["-ELBO"]) == 133.25 and float(row["-log p(x)"]) == 127.25


def test_the_exact_quadrature_runs_once_per_run_and_is_kept(study, data_dir, tmp_path,
                                                            monkeypatch) -> None:
    """The evaluation's per-image exact log p(x) is kept beside it (evaluations/KIND-exact
    .safetensors) and the true-posterior figure takes it: a report computes the quadrature once
    per run, and a report that redoes its evaluations (here: a new K) and figures, none."""
    import vaelab.evaluate as ev

    out, first = study
    for kind in ("vae", "cvae"):
        assert ev.ExactLogPx.load(out / "evaluations" / f"{kind}-exact.safetensors",
                                  {"model_sha256": _sha(out, kind), "tolerance": 0.1,
                                   "test_images": 60, "vaelab": vaelab.__version__,
                                   "exact_rules": ev.EXACT_RULES}) is not None
    calls = []
    real = ev.exact_log_px_per_image
    monkeypatch.setattr(ev, "exact_log_px_per_image",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fresh = tmp_path / "fresh"  # the same runs, nothing else
    fresh.mkdir()
    shutil.copytree(out / "runs", fresh / "runs")
    shutil.copytree(out / "classifier", fresh / "classifier")
    shutil.copy(out / MARKER, fresh / MARKER)
    again = reproduce(fresh, preset="smoke", dataset=f"idx:{data_dir}", num_samples=5,
                      progress=False, formats=("png",))
    assert len(calls) == 2  # one per run: the figures reused the evaluations' values
    for kind in ("vae", "cvae"):
        assert (again["evaluations"][kind]["exact_log_px"]
                == first["evaluations"][kind]["exact_log_px"])
    calls.clear()
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "figures")
    reproduce(copy, preset="smoke", dataset=f"idx:{data_dir}", num_samples=3, progress=False,
              formats=("png",))
    assert calls == []  # a new K: evaluated again, without a second quadrature


def _sha(out: Path, kind: str) -> str:
    return json.loads((out / "runs" / kind / "model.json").read_text())["sha256"]
