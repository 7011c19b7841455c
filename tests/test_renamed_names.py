"""Issue 19: names that say what they are. The preset ``seed`` is now ``study`` and the beta
schedule ``linear`` is now ``linear-step``; the old names still work (a DeprecationWarning from
the API, one line on stderr from the CLI), and a run folder whose config.json says ``seed`` or
``linear`` loads, compares and resumes as the same settings, bit for bit."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import assert_same_run, cli, one_thread, train_in_process
from synthetic import noisy_blobs, write_synthetic
from vaelab.checkpoint import list_checkpoints, read_config
from vaelab.cli import build_parser, train_request
from vaelab.config import (
    PRESET_ALIASES,
    PRESETS,
    TrainConfig,
    canonical_preset,
    resolve_config,
    resume_config,
)
from vaelab.objectives import (
    BETA_SCHEDULE_ALIASES,
    BETA_SCHEDULES,
    LinearWarmup,
    make_beta_schedule,
)

PRESET_NOTICE = "preset 'seed' is now called 'study'; 'seed' will be removed"
SCHEDULE_NOTICE = ("beta schedule 'linear' is now called 'linear-step'; 'linear' will be "
                   "removed")


ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def no_warnings() -> Iterator[None]:
    """A block in which any warning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------
def test_the_new_names_are_the_canonical_ones_and_the_old_ones_aliases() -> None:
    assert list(PRESETS) == ["study", "quick", "smoke"] and sorted(PRESETS)[-1] == "study"
    assert PRESET_ALIASES == {"seed": "study"}
    assert "seed" in PRESETS and PRESETS["seed"] is PRESETS["study"]
    assert PRESETS.get("seed") is PRESETS["study"] and PRESETS.get("huge") is None
    assert BETA_SCHEDULES[0] == "linear-step" and "linear" not in BETA_SCHEDULES
    assert BETA_SCHEDULE_ALIASES == {"linear": "linear-step"}
    assert PRESETS["study"]["beta_schedule"] == "linear-step"
    assert TrainConfig().beta_schedule == "linear-step"


def test_the_new_names_give_no_warning() -> None:
    with no_warnings():
        cfg = resolve_config("study")
        resolve_config("smoke", beta_schedule="linear-step")
        make_beta_schedule("linear-step", steps_per_epoch=3)
        TrainConfig.from_dict(cfg.to_dict())
    assert (cfg.preset, cfg.beta_schedule) == ("study", "linear-step")


def test_preset_seed_is_study_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match=PRESET_NOTICE) as caught:
        old = resolve_config("seed", model="cvae")
    assert caught[0].filename == __file__  # the warning names the caller's line
    assert old == resolve_config("study", model="cvae")
    assert old.preset == "study"  # what config.json records
    with pytest.warns(DeprecationWarning, match=PRESET_NOTICE):
        assert canonical_preset("seed") == "study"
    assert canonical_preset("quick") == "quick"


def test_beta_schedule_linear_is_linear_step_with_a_deprecation_warning() -> None:
    new = resolve_config("smoke", beta_schedule="linear-step")
    with pytest.warns(DeprecationWarning, match=SCHEDULE_NOTICE) as caught:
        old = resolve_config("smoke", beta_schedule="linear")
    assert caught[0].filename == __file__
    assert old == new and old.beta_schedule == "linear-step"
    with pytest.warns(DeprecationWarning, match=SCHEDULE_NOTICE):
        assert replace(new, beta_schedule="linear") == new
    with pytest.warns(DeprecationWarning, match=SCHEDULE_NOTICE):
        assert TrainConfig(beta_schedule="linear").beta_schedule == "linear-step"
    set_later = replace(new)
    set_later.beta_schedule = "linear"
    with pytest.warns(DeprecationWarning, match=SCHEDULE_NOTICE):
        assert set_later.validate() == new


def test_the_linear_schedule_builds_the_per_step_warm_up() -> None:
    kw = dict(steps_per_epoch=5, warmup_epochs=10, beta=0.7)
    new = make_beta_schedule("linear-step", **kw)
    with pytest.warns(DeprecationWarning, match=SCHEDULE_NOTICE):
        old = make_beta_schedule("linear", **kw)
    assert isinstance(old, LinearWarmup) and old.per_step and new.per_step
    assert [old.value(t) for t in range(80)] == [new.value(t) for t in range(80)]
    # a checkpoint's schedule state, written before the rename, restores the new schedule
    for _ in range(9):
        old.step()
    assert old.state_dict() == {"name": "linear", "t": 9}
    new.load_state_dict(old.state_dict())
    assert new.t == 9 and new.beta == old.beta


def old_config(**changes: object) -> dict:
    """A config.json's ``config`` as vaelab wrote it before the rename."""
    d = resolve_config("study").to_dict()
    return {**d, "preset": "seed", "beta_schedule": "linear", **changes}


def test_a_config_json_with_the_old_names_loads_as_the_new_ones_silently() -> None:
    with no_warnings():
        cfg = TrainConfig.from_dict(old_config())
    assert cfg == resolve_config("study")
    assert (cfg.preset, cfg.beta_schedule) == ("study", "linear-step")


def test_resuming_an_old_config_with_either_name_is_no_change() -> None:
    saved = TrainConfig.from_dict(old_config())
    for changes in ({}, {"beta_schedule": "linear-step", "preset": "study"}):
        assert resume_config(saved, changes, run="r") == saved
    with pytest.warns(DeprecationWarning):
        assert resume_config(saved, {"beta_schedule": "linear", "preset": "seed"},
                             run="r") == saved
    with pytest.raises(Exception, match=r"--beta-schedule cyclical \(run has linear-step\)"):
        resume_config(saved, {"beta_schedule": "cyclical"}, run="r")


def test_a_sweep_trial_written_with_the_old_names_is_the_same_trial(tmp_path: Path) -> None:
    from vaelab.sweep import plan_sweep, trial_state

    with pytest.warns(DeprecationWarning, match=PRESET_NOTICE):
        plan = plan_sweep(tmp_path / "s", preset="seed", grid={"seed": [0]},
                          options={"epochs": 2})
    assert plan.preset == "study" and plan.to_dict()["preset"] == "study"
    (trial,) = plan.trials
    assert trial.config == resolve_config("study", epochs=2, seed=0)
    folder = tmp_path / "s" / trial.name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": old_config(epochs=2)}))
    assert trial_state(folder, trial.config) == "unfinished"
    (folder / "summary.json").write_text("{}")
    assert trial_state(folder, trial.config) == "done"


def test_the_table_renders_an_old_table_json_with_the_new_preset_name() -> None:
    from vaelab.table import render_markdown

    old = json.loads((ROOT / "results" / "binarized-table.json").read_text())
    assert old["plan"]["preset"] == "seed"
    with no_warnings():
        text = render_markdown(old)
    assert "dynamically binarized MNIST, preset study, " in text and "preset seed" not in text


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------
def test_help_lists_the_new_names_and_says_the_old_ones_are_aliases(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in ("train", "reproduce", "sweep", "table"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--preset {quick,smoke,study}" in text, command
        assert "seed: the old name of study" in text, command
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--beta-schedule {linear-step,linear-epoch,constant,cyclical}" in text
    assert "linear: the old name of linear-step" in text


def test_the_old_names_on_the_command_line_print_one_line_each_and_mean_the_new(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from vaelab.cli import _rename_old_names

    args = build_parser().parse_args(["train", "--out", "r", "--preset", "seed",
                                      "--beta-schedule", "linear"])
    capsys.readouterr()
    _rename_old_names(args)
    assert capsys.readouterr().err.splitlines() == [f"vaelab: {PRESET_NOTICE}",
                                                    f"vaelab: {SCHEDULE_NOTICE}"]
    assert (args.preset, args.beta_schedule) == ("study", "linear-step")
    with no_warnings():
        config, _ = train_request(args)
    assert config == resolve_config("study", beta_schedule="linear-step")
    new = build_parser().parse_args(["train", "--out", "r", "--preset", "study"])
    _rename_old_names(new)
    assert capsys.readouterr().err == ""


def test_reproduce_quick_with_the_old_preset_name_is_the_notice_and_one_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = cli(["reproduce", "--quick", "--preset", "seed", "--out", str(tmp_path / "r")],
                    capsys)
    assert code == 2
    assert err == [f"vaelab: {PRESET_NOTICE}", "vaelab: error: --quick is --preset quick: give "
                   "one of them, not --preset study"]
    assert not (tmp_path / "r").exists()


def test_the_report_knows_the_study_preset_by_either_name(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """``reproduce``'s default is the study (``study``); ``seed`` is read as ``study`` with a
    DeprecationWarning; a results.json written with ``seed`` is still the study's (no
    first-look paragraph); the CLI passes ``--preset`` through."""
    import vaelab.report
    from vaelab.cli import main
    from vaelab.report import first_look_blocks, report_preset, report_recipe

    assert report_preset(None, quick=False) == report_preset("study", quick=False) == "study"
    with pytest.warns(DeprecationWarning, match="now called 'study'"):
        assert report_preset("seed", quick=False) == "study"
    assert report_recipe("study")["classifier_epochs"] == 3
    for old_or_new in ("seed", "study"):
        assert first_look_blocks({"settings": {"preset": old_or_new}}) == []
    seen: list[object] = []
    monkeypatch.setattr(vaelab.report, "reproduce", lambda out, **kw: seen.append(kw["preset"]))
    for preset in ("study", "seed", "smoke"):
        assert main(["reproduce", "--preset", preset, "--out", str(tmp_path / "r")]) == 0
    assert seen == ["study", "study", "smoke"]


# --------------------------------------------------------------------------------------------
# An old run folder resumes bit for bit
# --------------------------------------------------------------------------------------------
def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--preset", "smoke", "--dataset", f"idx:{data}",
            "--val-size", "32", "--epochs", "2", "--checkpoint-every", "3", "--quiet", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, an uninterrupted run of the per-step warm-up, trained with the new name)."""
    data = write_synthetic(tmp_path_factory.mktemp("idx"), noisy_blobs, 512, 64, seed=0)
    out = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(train_args(data, out, "--beta-schedule", "linear-step"))
    return data, out


def old_unfinished_copy(reference: Path, folder: Path) -> Path:
    """The reference run as vaelab wrote it before the rename (config.json says preset "seed"
    and beta schedule "linear"), killed before its newest checkpoint and its final files."""
    run = Path(shutil.copytree(reference, folder))
    raw = json.loads((run / "config.json").read_text())
    assert raw["config"]["beta_schedule"] == "linear-step"  # a new run records the new name
    raw["config"].update(preset="seed", beta_schedule="linear")
    (run / "config.json").write_text(json.dumps(raw))
    shutil.rmtree(list_checkpoints(run)[0])
    for name in ("model.safetensors", "model.json", "summary.json"):
        (run / name).unlink()
    return run


@pytest.mark.parametrize("extra", [(), ("--beta-schedule", "linear", "--preset", "seed"),
                                   ("--beta-schedule", "linear-step", "--preset", "study")])
def test_an_old_run_resumes_bit_for_bit_with_either_name(
    reference: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
) -> None:
    data, ref = reference
    run = old_unfinished_copy(ref, tmp_path / "run")
    assert read_config(run)[1].beta_schedule == "linear-step"
    with one_thread():
        code, err = cli(["train", "--resume", "--out", str(run), "--quiet", *extra], capsys)
    notices = [f"vaelab: {PRESET_NOTICE}", f"vaelab: {SCHEDULE_NOTICE}"]
    assert (code, err) == (0, notices if "seed" in extra else []), err
    assert_same_run(run, ref)
    raw = json.loads((run / "config.json").read_text())
    assert "resumes" not in raw  # nothing changed: config.json keeps the name it was written with
    assert raw["config"]["beta_schedule"] == "linear"


def test_a_sweep_spec_with_the_old_names_prints_each_notice_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vaelab.sweep
    from vaelab.errors import VaelabError

    planned: list[object] = []

    def stop(plan: object, **kw: object) -> None:
        planned.append(plan)
        raise VaelabError("stopped before training")

    monkeypatch.setattr(vaelab.sweep, "run_sweep", stop)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"preset": "seed", "options": {"epochs": 2},
                                "grid": {"beta_schedule": ["linear", "constant"],
                                         "seed": [0, 1]}}))
    code, err = cli(["sweep", "--out", str(tmp_path / "s"), "--spec", str(spec)], capsys)
    assert code == 2
    assert err == [f"vaelab: {PRESET_NOTICE}", f"vaelab: {SCHEDULE_NOTICE}",
                   "vaelab: error: stopped before training"]
    (plan,) = planned
    assert plan.preset == "study"
    # a trial keeps the name its grid value gives it, so an old sweep's folders are found again
    assert [t.name for t in plan.trials][:2] == ["beta_schedule=linear,seed=0",
                                                 "beta_schedule=linear,seed=1"]
    assert plan.trials[0].config.beta_schedule == "linear-step"
