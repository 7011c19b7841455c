"""``vaelab table``: the grid, its refusals, the estimators, the cache, the standard errors and
the published rows.

The runs are the ``smoke`` preset for one epoch on a small synthetic IDX data set (192 train
images, 32 of them validation, 24 test), trained one after another in this process
(``--runner local``), latent sizes 2 (exact by quadrature) and 3 (importance sampling), both
architectures, one seed: four runs of a second or so each.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import cli
from synthetic import noisy_blobs, write_synthetic
from vaelab import literature
from vaelab.checkpoint import load_run
from vaelab.cli import main
from vaelab.errors import ConfigError, VaelabError
from vaelab.evaluate import dataset_for_run, exact_log_px_per_image, log_px_per_image
from vaelab.sweep import Outcome
from vaelab.table import (
    EVAL_FILE,
    EVAL_SEED,
    combine_seeds,
    estimators,
    mean_se,
    plan_table,
    run_table,
    train_cells,
)

IS_K, PAPER_K, TEST_IMAGES = 12, 6, 20
RUNS = ["arch=conv,latent_dim=2,seed=0", "arch=conv,latent_dim=3,seed=0",
        "arch=mlp,latent_dim=2,seed=0", "arch=mlp,latent_dim=3,seed=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("idx"), noisy_blobs, 192, 24, seed=0)


def table_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["table", "--out", str(out), "--preset", "smoke", "--dataset", f"idx:{data}",
            "--val-size", "32", "--latent-dims", "2", "3", "--is-k", str(IS_K), "--paper-k",
            str(PAPER_K), "--test-images", str(TEST_IMAGES), "--runner", "local", "--quiet",
            *extra]


@pytest.fixture(scope="module")
def table(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four runs, trained and evaluated by one ``vaelab table`` in this process."""
    out = tmp_path_factory.mktemp("table") / "t"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(table_args(data, out))
    assert code == 0, err.getvalue()
    return out


def result_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "table.json").read_text())


def cell(result: dict[str, Any], arch: str, d: int) -> dict[str, Any]:
    return next(c for c in result["cells"] if (c["arch"], c["latent_dim"]) == (arch, d))


# --------------------------------------------------------------------------------------------
# The plan and its refusals
# --------------------------------------------------------------------------------------------
def test_the_plan_is_every_arch_latent_and_seed_binarized(tmp_path: Path) -> None:
    plan = plan_table(tmp_path / "t", latent_dims=[2, 5], archs=["conv", "mlp"], seeds=[0, 1],
                      preset="smoke", options={"epochs": 2})
    assert [t.name for t in plan.sweep.trials] == [
        f"arch={a},latent_dim={d},seed={s}" for a in ("conv", "mlp") for d in (2, 5)
        for s in (0, 1)]
    for t in plan.sweep.trials:
        c = t.config
        assert (c.arch, c.latent_dim, c.seed) == (t.values["arch"], t.values["latent_dim"],
                                                  t.values["seed"])
        assert (c.binarize, c.model, c.epochs, c.preset) == ("dynamic", "vae", 2, "smoke")
    assert [(c.arch, c.latent_dim, [t.config.seed for t in c.trials]) for c in plan.cells] == [
        ("conv", 2, [0, 1]), ("conv", 5, [0, 1]), ("mlp", 2, [0, 1]), ("mlp", 5, [0, 1])]
    ests = [estimators(c, plan) for c in plan.cells[:2]]
    assert ests[0]["best"].method == "quadrature" and ests[0]["best"].tolerance == 0.1
    assert (ests[1]["best"].method, ests[1]["best"].k) == ("importance sampling", 5000)
    assert all((e["paper_k"].method, e["paper_k"].k) == ("importance sampling", 500)
               for e in ests)
    assert not (tmp_path / "t").exists()  # planning writes nothing


def test_an_architecture_can_have_its_own_number_of_epochs(tmp_path: Path) -> None:
    plan = plan_table(tmp_path / "t", latent_dims=[2, 5], archs=["conv", "mlp"], seeds=[0],
                      preset="smoke", options={"epochs": 2}, arch_epochs={"mlp": 7})
    assert {(t.values["arch"], t.config.epochs) for t in plan.sweep.trials} == {
        ("conv", 2), ("mlp", 7)}
    assert plan.arch_epochs == {"mlp": 7}
    result = {"latent_dims": [2], "archs": ["conv", "mlp"], "seeds": [0],
              "evaluation": plan.evaluation(), "selection": "none", "plan": {"preset": "smoke"},
              "cells": [{"arch": a, "latent_dim": 2,
                         "budget": [{"epochs": e, "images_seen": 1000 * e}],
                         "best": {"mean": -1.0, "se": 0.1, "estimator": "quadrature",
                                  "per_seed": []},
                         "paper_k": {"mean": -2.0, "se": 0.1}} for a, e in (("conv", 2),
                                                                            ("mlp", 7))]}
    from vaelab.table import render_markdown

    assert ("vaelab conv 2 epoch(s), 2,000 training images seen per run; vaelab MLP 7 "
            "epoch(s), 7,000 training images seen per run") in render_markdown(result)


BAD = [
    (["--binarize", "none"], "binarize is always dynamic"),
    (["--latent-dim", "3"], "--latent-dims"),
    (["--seed", "1"], "--seeds"),
    (["--arch", "mlp"], "--archs"),
    (["--model", "cvae"], "must be vae"),
    (["--tolerance", "0"], "--tolerance"),
    (["--tolerance", "nan"], "--tolerance"),
    (["--is-k", "0"], "--is-k"),
    (["--paper-k", "-1"], "--paper-k"),
    (["--test-images", "-1"], "--test-images"),
    (["--archs", "resnet"], "--archs"),
    (["--latent-dims", "0"], "--latent-dims"),
    (["--latent-dims", "2", "2"], "listed twice"),
    (["--runner", "slurm"], "--runner"),
    (["--epochs", "0"], "--epochs"),
    (["--resume"], "--resume"),
    (["--arch-epochs", "mlp"], "ARCH=N"),
    (["--arch-epochs", "mlp=0"], "must be >= 1"),
    (["--arch-epochs", "resnet=5"], "not one of the table's --archs"),
    (["--archs", "conv", "--arch-epochs", "mlp=5"], "not one of the table's --archs"),
    (["--arch-epochs", "mlp=5", "mlp=7"], "gives 'mlp' twice"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_a_bad_option_exits_2_with_one_line_before_anything_is_written(
    extra: list[str], needle: str, data: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "t"
    code, err = cli(table_args(data, out, *extra), capsys)
    assert code == 2 and len(err) == 1, err
    assert needle in err[0]
    assert not out.exists()


def test_an_out_that_is_not_a_table_folder_is_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, err = cli(table_args(data, tmp_path), capsys)
    assert code == 2 and len(err) == 1 and "not a table's folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------------------------
# The estimators, their numbers and the budget
# --------------------------------------------------------------------------------------------
def test_d2_is_exact_by_quadrature_and_d3_importance_sampled_as_the_json_says(
    table: Path,
) -> None:
    result = result_of(table)
    assert result["status"] == "done" and len(result["cells"]) == 4
    for arch in ("conv", "mlp"):
        exact, sampled = cell(result, arch, 2), cell(result, arch, 3)
        assert (exact["best"]["estimator"], exact["best"]["K"]) == ("quadrature", None)
        assert exact["best"]["tolerance"] == 0.1
        assert (sampled["best"]["estimator"], sampled["best"]["K"]) == (
            "importance sampling", IS_K)
        for c in (exact, sampled):
            assert (c["paper_k"]["estimator"], c["paper_k"]["K"]) == (
                "importance sampling", PAPER_K)
    # the per-image values are what those estimators give on the binarized test images
    for name, d in (("arch=conv,latent_dim=2,seed=0", 2), ("arch=mlp,latent_dim=3,seed=0", 3)):
        run = load_run(table / name)
        split = dataset_for_run(run).test.subset(TEST_IMAGES)
        assert set(split.images.unique().tolist()) <= {0, 255}  # binarized
        entries = json.loads((table / name / EVAL_FILE).read_text())["entries"]
        best = next(e for e in entries.values() if e["K"] in (None, IS_K)
                    and e["estimator"] == ("quadrature" if d == 2 else "importance sampling"))
        if d == 2:
            want = exact_log_px_per_image(run.model, split, tolerance=0.1).log_px
        else:
            want, _ = log_px_per_image(run.model, split, num_samples=IS_K, seed=EVAL_SEED)
        assert torch.allclose(torch.tensor(best["per_image"], dtype=torch.float64), want,
                              atol=1e-9, rtol=0)


def test_each_cell_is_the_mean_and_standard_error_of_its_per_image_values(
    table: Path,
) -> None:
    result = result_of(table)
    for c in result["cells"]:
        (run,) = c["runs"]
        entries = json.loads((table / run / EVAL_FILE).read_text())["entries"]
        for role in ("best", "paper_k"):
            key = next(k for k, e in entries.items()
                       if (e["estimator"], e["K"]) == (c[role]["estimator"], c[role]["K"]))
            values = np.array(entries[key]["per_image"])
            assert len(values) == TEST_IMAGES
            assert c[role]["mean"] == pytest.approx(values.mean(), abs=1e-9)
            assert c[role]["se"] == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)),
                                                  abs=1e-9)
            assert c[role]["se_over"] == "images" and c[role]["n_images"] == TEST_IMAGES


def test_the_json_records_the_training_budget_and_the_test_split(table: Path, data: Path,
                                                                  ) -> None:
    result = result_of(table)
    assert "no early stopping" in result["selection"]
    for c in result["cells"]:
        (budget,) = c["budget"]
        assert budget["epochs"] == 1 and budget["train_images"] == 192 - 32
        assert budget["images_seen"] == 160 and budget["val_images"] == 32
        recorded = json.loads((table / c["runs"][0] / "config.json").read_text())["data"]
        assert budget["test_sha256"] == recorded["test_sha256"]
    ev = result["evaluation"]
    assert (ev["is_k"], ev["paper_k"], ev["test_images"]) == (IS_K, PAPER_K, TEST_IMAGES)
    assert result["command"] == "vaelab " + shlex.join(table_args(data, table))
    cost = result["compute_seconds"]  # every run's training and every estimate of it
    runs = [json.loads((table / c["runs"][0] / "summary.json").read_text())["train_seconds"]
            for c in result["cells"]]
    assert cost["train"] == pytest.approx(sum(runs))
    estimates = [s["seconds"] for c in result["cells"] for role in ("best", "paper_k")
                 for s in c[role]["per_seed"]]
    assert cost["evaluate"] == pytest.approx(sum(estimates)) and cost["evaluate"] > 0
    assert cost["total"] == pytest.approx(cost["train"] + cost["evaluate"])


def test_mean_and_standard_error_of_known_values() -> None:
    got = mean_se([1.0, 2.0, 3.0, 4.0])
    assert got["mean"] == 2.5 and got["n"] == 4
    assert got["std"] == pytest.approx(math.sqrt(5 / 3))
    assert got["se"] == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_se([7.0]) == {"mean": 7.0, "std": None, "se": None, "n": 1}
    with pytest.raises(ConfigError):
        mean_se([])
    one = combine_seeds([{"mean": -90.0, "se": 0.4, "n": 100}])
    assert (one["mean"], one["se"], one["se_over"]) == (-90.0, 0.4, "images")
    two = combine_seeds([{"mean": -91.0, "se": 0.4, "n": 100}, {"mean": -89.0, "se": 0.5,
                                                                "n": 100}])
    # over seeds: std of (-91, -89) is sqrt(2), over sqrt(2) seeds: 1
    assert (two["mean"], two["se_over"], two["seeds"]) == (-90.0, "seeds", 2)
    assert two["se"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Re-runs: nothing trained, nothing computed; a new K computes only itself
# --------------------------------------------------------------------------------------------
def _stamps(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and p.name not in ("table.json", "table.md")}


def test_a_second_invocation_trains_nothing_and_computes_nothing(
    table: Path, data: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    before, cells = _stamps(table), result_of(table)["cells"]
    code, err = cli(table_args(data, table), capsys)
    assert (code, err) == (0, [])
    result = result_of(table)
    assert (result["trained"], result["computed"]) == (0, 0)
    assert _stamps(table) == before  # no run file, checkpoint or cache rewritten
    assert result["cells"] == cells
    assert result["compute_seconds"]["total"] > result["seconds"]  # the numbers' cost, kept


def test_a_new_is_k_computes_only_the_sampled_cells_it_changes(
    table: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "t"
    shutil.copytree(table, out)
    args = table_args(data, out)
    args[args.index("--is-k") + 1] = str(IS_K + 1)
    code, err = cli(args, capsys)
    assert (code, err) == (0, [])
    result = result_of(out)
    assert (result["trained"], result["computed"]) == (0, 2)  # the two d = 3 runs
    assert cell(result, "conv", 3)["best"]["K"] == IS_K + 1
    assert cell(result, "conv", 2)["best"] == cell(result_of(table), "conv", 2)["best"]


def test_exact_values_of_older_quadrature_rules_are_computed_again(
    table: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vaelab.evaluate as evaluate

    out = tmp_path / "t"
    shutil.copytree(table, out)
    monkeypatch.setattr(evaluate, "EXACT_RULES", evaluate.EXACT_RULES + 1)
    code, err = cli(table_args(data, out), capsys)
    assert (code, err) == (0, [])
    result = result_of(out)
    exact_runs = sum(len(cell(result, arch, 2)["runs"]) for arch in result["archs"])
    assert result["computed"] == exact_runs > 0  # the d = 2 runs, and only they
    code, err = cli(table_args(data, out), capsys)
    assert result_of(out)["computed"] == 0  # then kept under the new rules' key


# --------------------------------------------------------------------------------------------
# Where the runs train; a run that fails
# --------------------------------------------------------------------------------------------
def test_runs_train_through_the_sweep_where_ray_is_installed_and_in_turn_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vaelab.sweep
    import vaelab.table

    plan = plan_table(tmp_path / "t", latent_dims=[2, 3], archs=["conv"], preset="smoke")
    calls: dict[str, list[Any]] = {"ray": [], "local": []}

    def fake_train_trials(out: Path, trials: list[Any], res: Any, **kw: Any) -> Outcome:
        calls["ray"].append(([t.name for t in trials], kw["tolerance"]))
        return Outcome({t.name: {"trained": True} for t in reversed(trials)}, {}, None)

    def fake_run_trial(config: dict[str, Any], out: str, **kw: Any) -> dict[str, Any]:
        calls["local"].append(Path(out).name)
        return {"trained": True}

    monkeypatch.setattr(vaelab.sweep, "train_trials", fake_train_trials)
    monkeypatch.setattr(vaelab.sweep, "run_trial", fake_run_trial)
    monkeypatch.setattr(vaelab.table, "ray_installed", lambda: True)
    names = [t.name for t in plan.sweep.trials]
    assert train_cells(plan, runner="auto") == (names, {})  # in the plan's order
    assert calls == {"ray": [(names, 0.0)], "local": []}
    monkeypatch.setattr(vaelab.table, "ray_installed", lambda: False)
    monkeypatch.setattr(vaelab.sweep, "check_data", lambda trials: None)
    assert train_cells(plan, runner="auto") == (names, {})
    assert calls["local"] == names


def test_a_run_that_fails_leaves_its_cells_empty_and_the_command_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vaelab.sweep

    def failing(config: dict[str, Any], out: str, **kw: Any) -> dict[str, Any]:
        raise VaelabError("the loss became NaN at step 3")

    monkeypatch.setattr(vaelab.sweep, "run_trial", failing)
    monkeypatch.setattr(vaelab.sweep, "check_data", lambda trials: None)
    plan = plan_table(tmp_path / "t", latent_dims=[2], archs=["conv", "mlp"], preset="smoke")
    with pytest.raises(VaelabError, match="2 of 2 runs failed.*NaN at step 3"):
        run_table(plan, runner="local")
    result = result_of(tmp_path / "t")
    assert result["status"] == "failed"
    assert all(c["best"]["mean"] is None and c["failed"] for c in result["cells"])
    assert "| vaelab conv, exact (d ≤ 2) or IS, K = 5000 | — |" in (
        tmp_path / "t" / "table.md").read_text()


# --------------------------------------------------------------------------------------------
# The published rows
# --------------------------------------------------------------------------------------------
ISSUE_TABLE = {  # Davidson et al. 2018, Table 1, as the issue quotes it: d -> (N-VAE, S-VAE)
    2: ((-135.73, 0.83), (-132.50, 0.73)), 5: ((-110.21, 0.21), (-108.43, 0.09)),
    10: ((-93.84, 0.30), (-93.16, 0.31)), 20: ((-88.90, 0.26), (-89.02, 0.31)),
    40: ((-88.93, 0.30), (-90.87, 0.34))}


def test_the_published_numbers_are_the_papers_with_their_citations() -> None:
    assert {d: (literature.N_VAE.values[d], literature.S_VAE.values[d])
            for d in ISSUE_TABLE} == ISSUE_TABLE
    assert [(n["name"], n["value"]) for n in literature.BURDA_NOTES] == [
        ("VAE", 86.76), ("IWAE", 84.78)]
    assert literature.DAVIDSON_2018.short() == "Davidson et al. 2018, Table 1"
    assert literature.BURDA_2016.short() == "Burda et al. 2016, Table 1"


def test_the_markdown_has_vaelabs_rows_and_the_published_rows_with_citations(
    table: Path,
) -> None:
    md = (table / "table.md").read_text()
    result = result_of(table)
    lines = md.splitlines()
    assert "| log p(x), nats per image | d = 2 | d = 3 |" in lines
    conv = [cell(result, "conv", d)["best"] for d in (2, 3)]
    assert (f"| vaelab conv, exact (d ≤ 2) or IS, K = {IS_K} | "
            f"{conv[0]['mean']:.2f} ± {conv[0]['se']:.2f} | "
            f"{conv[1]['mean']:.2f} ± {conv[1]['se']:.2f} |") in lines
    mlp = [cell(result, "mlp", d)["paper_k"] for d in (2, 3)]
    assert (f"| vaelab MLP, IS, K = {PAPER_K} | {mlp[0]['mean']:.2f} ± {mlp[0]['se']:.2f} | "
            f"{mlp[1]['mean']:.2f} ± {mlp[1]['se']:.2f} |") in lines
    assert ("| N-VAE (Gaussian), Davidson et al. 2018, Table 1 (IS, K = 500) | "
            "-135.73 ± 0.83 | — |") in lines
    assert ("| S-VAE (von Mises-Fisher), Davidson et al. 2018, Table 1 (IS, K = 500) | "
            "-132.50 ± 0.73 | — |") in lines
    for text in ("Hyperspherical Variational Auto-Encoders", "UAI 2018", "arXiv:1804.00891",
                 "Importance Weighted Autoencoders", "ICLR 2016", "arXiv:1509.00519",
                 "86.76", "84.78", "standard error over the test images"):
        assert text in md
    assert result["published"]["rows"][0]["values"]["2"] == {"mean": -135.73, "spread": 0.83}


def test_other_settings_in_a_table_folder_are_refused_and_leave_its_table_alone(
    table: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "t"
    shutil.copytree(table, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = cli(table_args(data, out, "--epochs", "2"), capsys)
    assert code == 2 and len(err) == 1 and "other settings (epochs)" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_no_train_tabulates_the_finished_runs_and_leaves_the_rest_empty(
    table: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "t"
    shutil.copytree(table, out)
    missing = "arch=mlp,latent_dim=3,seed=0"
    shutil.rmtree(out / missing)
    before = {c["runs"][0]: c for c in result_of(table)["cells"]}
    code, err = cli(table_args(data, out, "--no-train"), capsys)
    assert (code, err) == (0, [])
    result = result_of(out)
    assert result["status"] == "partial" and result["untrained"] == [missing]
    assert result["trained"] == 0 and not (out / missing).exists()  # nothing trained
    for c in result["cells"]:
        if c["runs"] == [missing]:
            assert c["best"]["mean"] is None and c["paper_k"]["mean"] is None
        else:
            assert c["best"]["mean"] == before[c["runs"][0]]["best"]["mean"]
    assert f"not trained yet (1 of 4 runs: {missing})" in (out / "table.md").read_text()
    code, err = cli(table_args(data, out), capsys)  # without it: the missing run trained
    assert (code, err) == (0, [])
    assert result_of(out)["status"] == "done" and result_of(out)["trained"] == 1


def test_no_estimate_tabulates_the_cached_estimates_and_computes_none(
    table: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "t"
    shutil.copytree(table, out)
    run = "arch=conv,latent_dim=3,seed=0"
    cache = json.loads((out / run / EVAL_FILE).read_text())
    gone = next(k for k in cache["entries"] if f"K={IS_K}," in k)
    del cache["entries"][gone]
    (out / run / EVAL_FILE).write_text(json.dumps(cache))
    before = (out / run / EVAL_FILE).read_bytes()
    code, err = cli(table_args(data, out, "--no-estimate"), capsys)
    assert (code, err) == (0, [])
    result = result_of(out)
    assert result["status"] == "partial" and result["computed"] == 0
    assert result["unestimated"] == [f"{run}: IS, K = {IS_K}"]
    assert cell(result, "conv", 3)["best"]["mean"] is None
    assert cell(result, "conv", 3)["paper_k"]["mean"] is not None
    assert (out / run / EVAL_FILE).read_bytes() == before  # nothing computed or written
    assert f"not estimated yet ({run}: IS, K = {IS_K})" in (out / "table.md").read_text()
    code, err = cli(table_args(data, out), capsys)  # without it: the estimate computed
    assert (code, err) == (0, [])
    result = result_of(out)
    assert (result["status"], result["computed"], result["unestimated"]) == ("done", 1, [])
    assert cell(result, "conv", 3)["best"]["mean"] == cell(result_of(table), "conv", 3)[
        "best"]["mean"]


def test_images_left_over_tolerance_are_counted_with_their_error_bound(tmp_path: Path) -> None:
    from vaelab.table import render_markdown

    plan = plan_table(tmp_path / "t", latent_dims=[2], archs=["conv"], preset="smoke")
    exact = {"run": "arch=conv,latent_dim=2,seed=0", "n": 10000, "over_tolerance": 1704,
             "error_estimate_mean": 0.0966, "error_max": 6.67}
    result = {"latent_dims": [2], "archs": ["conv"], "seeds": [0],
              "evaluation": plan.evaluation(), "selection": "none", "plan": {"preset": "smoke"},
              "cells": [{"arch": "conv", "latent_dim": 2, "budget": [{"epochs": 2,
                                                                      "images_seen": 100}],
                         "best": {"mean": -127.6, "se": 0.42, "estimator": "quadrature",
                                  "per_seed": [exact]},
                         "paper_k": {"mean": -130.0, "se": 0.4}}]}
    md = render_markdown(result)
    assert ("images still above it when the work budget ran out: arch=conv,latent_dim=2,seed=0: "
            "1,704 of 10,000, error estimate 0.10 nats per image on average and 6.7 at most (by "
            "these estimates the cell's mean is within 0.10 of the exact value)") in md
    result["cells"][0]["best"]["per_seed"] = [{**exact, "over_tolerance": 0}]
    assert "work budget ran out" not in render_markdown(result)


def test_tables_of_parts_of_the_grid_merge_into_one(table: Path) -> None:
    """A table with two runs not trained, merged with a table of those two alone (as another
    machine would measure them), gives the whole table's cells, and nothing is left named as
    missing; tables measured differently are refused."""
    import copy

    from vaelab.table import compute_seconds, merge_tables, render_markdown

    whole = result_of(table)
    late = ["arch=conv,latent_dim=3,seed=0", "arch=mlp,latent_dim=3,seed=0"]
    base = copy.deepcopy(whole)
    base["untrained"] = late
    for c in base["cells"]:
        if c["runs"][0] in late:
            c["budget"] = [{**b, "train_seconds": None} for b in c["budget"]]
            for role in ("best", "paper_k"):
                c[role].update(mean=None, se=None, per_seed=[])
    extra = copy.deepcopy(whole)
    extra.update(latent_dims=[3], command="vaelab table --latent-dims 3", machine={"cpu": "B"},
                 cells=[c for c in whole["cells"] if c["runs"][0] in late])
    merged = merge_tables(base, extra)
    assert merged["cells"] == whole["cells"]
    assert (merged["untrained"], merged["unestimated"], merged["status"]) == ([], [], "done")
    assert merged["compute_seconds"] == compute_seconds(whole)
    assert [s["cells"] for s in merged["sources"]] == [
        [["conv", 2], ["mlp", 2]], [["conv", 3], ["mlp", 3]]]
    assert merged["sources"][1]["machine"] == {"cpu": "B"}
    # what each command did stays with it; the merged table's counts are the sums
    assert [s["command"] for s in merged["sources"]] == [base["command"], extra["command"]]
    assert merged["trained"] == base["trained"] + extra["trained"]
    assert merged["computed"] == base["computed"] + extra["computed"]
    assert merged["seconds"] == pytest.approx(base["seconds"] + extra["seconds"])
    assert merged["trained_runs"] == base["trained_runs"] + extra["trained_runs"]
    assert [s["trained"] for s in merged["sources"]] == [base["trained"], extra["trained"]]
    assert "not trained yet" in render_markdown(base)
    assert "not trained yet" not in render_markdown(merged)
    # the base alone keeps its missing cells; a later table whose runs are untrained replaces
    # nothing
    assert merge_tables(base, {**extra, "untrained": late})["cells"] == base["cells"]
    other_k = copy.deepcopy(extra)
    other_k["evaluation"]["paper_k"] += 1
    with pytest.raises(ConfigError, match="cannot merge tables measured differently"):
        merge_tables(base, other_k)
    with pytest.raises(ConfigError, match="measured differently"):
        merge_tables({**base, "arch_epochs": {"mlp": 200}}, extra)
    only_conv = {**extra, "archs": ["conv"], "cells": extra["cells"][:1]}
    assert merge_tables({**base, "arch_epochs": {"mlp": 200}}, only_conv)["status"] == "partial"


def test_the_table_keeps_the_network_it_was_measured_with(tmp_path: Path) -> None:
    """The table's runs are SiLU (``TABLE_NETWORK``) whatever vaelab's default network is, so
    its finished runs are reused, not refused; ``--activation`` overrides it; and a table
    whose plan predates the pin (no activation in its options) merges with one that has it."""
    import copy

    from vaelab.config import TrainConfig
    from vaelab.table import TABLE_NETWORK, merge_tables

    assert TrainConfig().activation != TABLE_NETWORK["activation"]
    plan = plan_table(tmp_path / "t", latent_dims=[2], archs=["conv"], preset="study")
    assert {t.config.activation for t in plan.sweep.trials} == {"silu"}
    assert plan.sweep.to_dict()["options"]["activation"] == "silu"
    other = plan_table(tmp_path / "t", latent_dims=[2], archs=["conv"], preset="study",
                       options={"activation": "gelu"})
    assert {t.config.activation for t in other.sweep.trials} == {"gelu"}
    cell = {"arch": "conv", "latent_dim": 2, "runs": ["r"], "seeds": [0], "budget": [],
            "best": {"per_seed": []}, "paper_k": {"per_seed": []}}
    new = {"plan": plan.sweep.to_dict(), "evaluation": plan.evaluation(), "selection": "none",
           "archs": ["conv"], "latent_dims": [2], "seeds": [0], "cells": [cell]}
    old = copy.deepcopy(new)
    del old["plan"]["options"]["activation"]
    assert merge_tables(old, new)["cells"] == [cell]
    gelu = {**new, "plan": other.sweep.to_dict()}
    with pytest.raises(ConfigError, match="measured differently"):
        merge_tables(old, gelu)


def test_a_table_with_patience_records_each_runs_epochs_and_sets_its_rows_beside(
    data: Path, table: Path, tmp_path: Path,
) -> None:
    """``--patience``: the selection says early stopping, each run's budget its epochs trained,
    best and most (from its summary.json), and a table trained so renders as rows of its own
    under another table's (``render_markdown(more=...)``), its labels suffixed."""
    from vaelab.table import render_markdown

    out = tmp_path / "t"
    code = main(["table", "--out", str(out), "--preset", "smoke", "--dataset", f"idx:{data}",
                 "--val-size", "32", "--latent-dims", "2", "--archs", "mlp", "--epochs", "4",
                 "--patience", "1", "--test-images", str(TEST_IMAGES),
                 "--runner", "local", "--quiet"])
    assert code == 0
    r = result_of(out)
    assert r["selection"].startswith("early stopping on the validation split")
    assert "1 epochs in a row" in r["selection"]
    run = out / "arch=mlp,latent_dim=2,seed=0"
    s = json.loads((run / "summary.json").read_text())
    budget = cell(r, "mlp", 2)["budget"][0]
    assert budget["epochs"] == s["epochs"] and budget["max_epochs"] == 4
    assert budget["best_epoch"] == s["early_stopping"]["best_epoch"]
    assert budget["images_seen"] == budget["train_images"] * s["epochs"]
    md = render_markdown(result_of(table), heading=False, more=[(", early-stopped", r)])
    rows = [line for line in md.splitlines() if line.startswith("| vaelab MLP, early-stopped")]
    assert len(rows) == 2 and "—" not in rows[0].split("|")[2]  # d = 2 has a value
    assert f"d = 2: {s['epochs']} (best {s['early_stopping']['best_epoch']})" in md
    assert "--patience 1" in md and "Rows ending \"early-stopped\"" in md


def test_a_signal_stops_the_whole_table_and_the_same_command_resumes_it(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGINT while the first of two runs trains (runner local): the table stops there,
    exit 130, the second run not started (before, the interrupted run was counted as failed
    and the next one trained); the same command again resumes the first and trains the
    second."""
    import os
    import signal

    from vaelab.training import Trainer

    out = tmp_path / "t"
    argv = ["table", "--out", str(out), "--preset", "smoke", "--dataset", f"idx:{data}",
            "--val-size", "32", "--latent-dims", "2", "3", "--archs", "mlp", "--epochs", "2",
            "--is-k", str(IS_K), "--paper-k", str(PAPER_K), "--test-images",
            str(TEST_IMAGES), "--runner", "local", "--quiet"]
    real_step = Trainer.train_step

    def step(self: Trainer, *a: Any) -> None:
        real_step(self, *a)
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", step)
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "the runs after it were not started" in err and "same `vaelab table`" in err
    assert not (out / "arch=mlp,latent_dim=3,seed=0").exists()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(argv) == 0
    r = result_of(out)
    assert r["status"] == "done" and not r.get("untrained")
    assert len(json.loads((out / "arch=mlp,latent_dim=2,seed=0" / "summary.json")
                          .read_text())["test"]) > 0
