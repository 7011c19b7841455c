"""Nobody in: bad input through the CLI (issue part 4).

Every bad input gets exit code 2, exactly one line on stderr, nothing on stdout, and nothing
written: the output folder is not created, or is left byte-for-byte as it was. Most cases run
``vaelab.cli.main`` in-process; two run ``python -m vaelab`` for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import train_in_process
from synthetic import uniform_noise, write_synthetic
from vaelab.cli import main


def snapshot(folder: Path) -> dict[str, str] | None:
    """Every file under ``folder`` with its SHA-256 (None: the folder does not exist)."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    """``vaelab ARGS`` in-process: (exit code, stderr lines, stdout)."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


def assert_refused(code: int, err: list[str], out: str, *expected: str) -> None:
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("vaelab") and ": error: " in err[0]
    assert out == ""
    for text in expected:
        assert text in err[0], err[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("idx"), uniform_noise, 512, 64, seed=1)


@pytest.fixture(scope="module")
def truncated_data(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(shutil.copytree(data, tmp_path_factory.mktemp("bad") / "idx"))
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-1000])
    return folder


def train_args(data: Path | str, out: Path, *extra: str) -> list[str]:
    dataset = data if isinstance(data, str) else f"idx:{data}"
    return ["train", "--out", str(out), "--preset", "smoke", "--dataset", dataset,
            "--val-size", "32", "--epochs", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(train_args(data, out))
    return out


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


# --------------------------------------------------------------------------------------------
# vaelab train: bad values
# --------------------------------------------------------------------------------------------
BAD_TRAIN = [
    # (extra arguments, text the one line must hold)
    (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["--latent-dim", "0"], "argument --latent-dim: must be >= 1, got 0"),
    (["--enc-refine", "-1"], "argument --enc-refine: must be >= 0, got -1"),
    (["--channels", "32", "0"], "argument --channels: must be >= 1, got 0"),
    (["--lr", "0"], "learning rate must be > 0, got 0.0"),
    (["--lr", "-1"], "learning rate must be > 0, got -1.0"),
    (["--lr=-1"], "learning rate must be > 0, got -1.0"),
    (["--lr", "nan"], "learning rate must be > 0, got nan"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--warmup-epochs", "-1"], "warm-up epochs must be >= 0"),
    (["--checkpoint-every", "-3"], "checkpoint-every must be >= 0"),
    (["--val-size", "100000"], "val_size 100000 is out of range"),
    # argparse's own checks: same exit code, one line too
    (["--model", "gan"], "argument --model: invalid choice: 'gan'"),
    (["--lr-schedule", "warp"], "argument --lr-schedule: invalid choice: 'warp'"),
    (["--beta-schedule", "sometimes"], "argument --beta-schedule: invalid choice: 'sometimes'"),
    (["--likelihood", "gauss"], "argument --likelihood: invalid choice: 'gauss'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--epochs", "two"], "expected a whole number, got 'two'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
]


@pytest.mark.parametrize("extra, why", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_value_exits_2_with_one_line_and_writes_nothing(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], why: str
) -> None:
    out = tmp_path / "run"
    assert_refused(*cli(train_args(data, out, *extra), capsys), why)
    assert not out.exists()


@pytest.mark.parametrize("argv, why", [
    (["bench", "--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    (["bench", "--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    (["classifier", "train", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
])
def test_bad_counts_elsewhere_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], why: str
) -> None:
    out = tmp_path / "out"
    assert_refused(*cli([*argv, "--out", str(out)], capsys), why)
    assert not out.exists()


def test_the_api_checks_the_same_ranges() -> None:
    """The CLI refuses these before parsing further; the API refuses them with a typed error."""
    from vaelab.bench import run_bench
    from vaelab.config import TrainConfig
    from vaelab.errors import ConfigError
    from vaelab.models import ModelSpec

    with pytest.raises(ConfigError, match="epochs must be >= 1, got 0"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(ConfigError, match="batch size must be >= 1, got 0"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="latent size must be >= 1, got 0"):
        ModelSpec(latent_dim=0)
    with pytest.raises(ConfigError, match="rounds must be >= 1, got 0"):
        run_bench(rounds=0)


def test_unknown_dataset_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert_refused(*cli(train_args("cifar10", out), capsys),
                   "unknown dataset 'cifar10': choose mnist or idx:DIR")
    assert not out.exists()


def test_missing_dataset_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert_refused(*cli(train_args(f"idx:{tmp_path / 'nowhere'}", out), capsys),
                   f"{tmp_path / 'nowhere'}: no such folder")
    assert not out.exists()


def test_truncated_data_file(
    truncated_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert_refused(*cli(train_args(truncated_data, out), capsys),
                   str(truncated_data / "train-images-idx3-ubyte"), "truncated IDX file")
    assert not out.exists()


def test_missing_out_option(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args(data, Path("x"))
    del args[1:3]
    assert_refused(*cli(args, capsys), "the following arguments are required: --out")


def test_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert_refused(*cli([], capsys), "required: COMMAND")


# --------------------------------------------------------------------------------------------
# vaelab train: an output folder that already holds something
# --------------------------------------------------------------------------------------------
def test_output_folder_holding_a_different_run_is_refused_without_force(
    data: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(run_copy)
    assert_refused(*cli(train_args(data, run_copy, "--seed", "7"), capsys),
                   f"output folder {run_copy} already holds a run", "--resume", "--force")
    assert snapshot(run_copy) == before


def test_force_with_bad_input_keeps_the_old_run(
    data: Path, truncated_data: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(run_copy)
    assert_refused(*cli(train_args(truncated_data, run_copy, "--force"), capsys),
                   "truncated IDX file")
    assert snapshot(run_copy) == before
    assert_refused(*cli(train_args(data, run_copy, "--force", "--latent-dim", "0"), capsys),
                   "argument --latent-dim: must be >= 1")
    assert snapshot(run_copy) == before


def test_output_folder_holding_a_different_run_is_replaced_with_force(
    data: Path, run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = json.loads((run_copy / "config.json").read_text())["config"]
    assert old["seed"] == 0 and old["latent_dim"] == 2
    stale = run_copy / "checkpoints" / "step-99999999"
    stale.mkdir()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err, _ = cli(train_args(data, run_copy, "--force", "--seed", "7",
                                      "--latent-dim", "3"), capsys)
    finally:
        torch.set_num_threads(before)
    assert code == 0 and err == []
    new = json.loads((run_copy / "config.json").read_text())["config"]
    assert new["seed"] == 7 and new["latent_dim"] == 3
    assert not stale.exists()  # nothing of the old run is left
    assert json.loads((run_copy / "model.json").read_text())["spec"]["latent_dim"] == 3


def test_output_folder_holding_other_files_is_refused_even_with_force(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    before = snapshot(out)
    assert_refused(*cli(train_args(data, out), capsys), "already holds other files")
    assert_refused(*cli(train_args(data, out, "--force"), capsys),
                   "--force replaces only run folders")
    assert snapshot(out) == before


def test_output_path_that_is_a_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "file"
    out.write_text("precious")
    assert_refused(*cli(train_args(data, out, "--force"), capsys), str(out))
    assert out.read_text() == "precious"


def test_resume_of_a_folder_holding_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "empty"
    assert_refused(*cli(["train", "--resume", "--out", str(out)], capsys),
                   f"cannot resume: {out} holds no run")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# vaelab evaluate: missing or incomplete run folders
# --------------------------------------------------------------------------------------------
def test_evaluate_a_finished_run_works(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(finished)
    code, err, out = cli(["evaluate", str(finished), "--json", "--samples", "0"], capsys)
    assert code == 0 and err == []
    assert json.loads(out)["n"] == 64
    assert snapshot(finished) == before


def _no_model_json(run: Path) -> None:  # killed before it finished
    for name in ("model.json", "model.safetensors", "summary.json"):
        (run / name).unlink()


def _truncated_weights(run: Path) -> None:
    w = run / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])


def _bad_config(run: Path) -> None:
    (run / "config.json").write_text("{not json")


def _bad_model_json(run: Path) -> None:
    (run / "model.json").write_text('{"spec": {"kind": "vae", "latent_dim": 2, "colour": 1}}')


def _bad_metrics(run: Path) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "trunc')


def _no_config(run: Path) -> None:
    (run / "config.json").unlink()


INCOMPLETE = [
    (_no_model_json, "no model.json: the run has not finished"),
    (_truncated_weights, "model.safetensors fails its checksum"),
    (_bad_config, "config.json is corrupted"),
    (_bad_model_json, "model.json is corrupted"),
    (_bad_metrics, "metrics.jsonl: line 2 is not valid JSON"),
    (_no_config, "is not a vaelab run folder (no config.json)"),
]


@pytest.mark.parametrize("damage, why", INCOMPLETE, ids=[f.__name__[1:] for f, _ in INCOMPLETE])
def test_evaluate_an_incomplete_run_exits_2_naming_it(
    run_copy: Path, capsys: pytest.CaptureFixture[str], damage: object, why: str
) -> None:
    damage(run_copy)  # type: ignore[operator]
    before = snapshot(run_copy)
    assert_refused(*cli(["evaluate", str(run_copy)], capsys), str(run_copy), why)
    assert snapshot(run_copy) == before


def test_evaluate_a_missing_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-run"
    assert_refused(*cli(["evaluate", str(missing)], capsys),
                   f"run folder {missing} does not exist")
    assert not missing.exists()


# --------------------------------------------------------------------------------------------
# The same through a real process
# --------------------------------------------------------------------------------------------
def test_bad_input_in_a_real_process(truncated_data: Path, tmp_path: Path) -> None:
    """``python -m vaelab``: the exit code and stderr a shell sees (one process: ~5 s)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VAELAB_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "vaelab", *train_args(truncated_data, out)],
                          env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"vaelab: error: {truncated_data / 'train-images-idx3-ubyte'}: "
                                  "truncated IDX file")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Messages that say what is wrong (issue 17): not "does not exist" for a file, not "No such
# file" for /proc, not a val_size range for an empty IDX file
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["evaluate", "plot", "explore"])
def test_a_file_given_as_a_run_folder_says_it_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    given = tmp_path / "notes.txt"
    given.write_text("precious")
    code, err, out = cli([command, str(given)], capsys)
    assert_refused(code, err, out, f"{given} is a file, not a run folder")
    assert "does not exist" not in err[0]
    assert given.read_text() == "precious"


def test_a_file_given_as_out_says_it_is_a_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    given = tmp_path / "notes.txt"
    given.write_text("precious")
    assert_refused(*cli(train_args(data, given), capsys), f"{given} is a file, not a folder")
    below = given / "run"
    assert_refused(*cli(train_args(data, below), capsys),
                   f"cannot create {below}: {given} is a file, not a folder")
    assert given.read_text() == "precious"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", ["train", "reproduce"])
def test_an_out_folder_under_proc_says_it_cannot_be_written(
    data: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """/proc refuses mkdir with ENOENT; the message was "No such file or directory"."""
    out = Path("/proc/vaelab-cannot-be-here")
    args = train_args(data, out) if command == "train" else \
        ["reproduce", "--out", str(out), "--preset", "smoke", "--dataset", f"idx:{data}"]
    code, err, stdout = cli(args, capsys)
    assert_refused(code, err, stdout, f"cannot create {out}: /proc cannot be written")
    assert "No such file" not in err[0]


def test_an_idx_file_with_no_images_says_so(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vaelab.data import MNIST_FILES, write_idx

    folder = Path(shutil.copytree(data, tmp_path / "idx"))
    empty = folder / MNIST_FILES["train_images"]
    write_idx(empty, np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(folder / MNIST_FILES["train_labels"], np.zeros(0, dtype=np.uint8))
    out = tmp_path / "run"
    code, err, stdout = cli(train_args(folder, out), capsys)
    assert_refused(code, err, stdout, f"{empty} holds no images")
    assert "val_size" not in err[0]
    assert not out.exists()


# Run files of the wrong shape (issue 17, part 3): one line, never a traceback
# --------------------------------------------------------------------------------------------
def _config_with(run: Path, **fields: object) -> None:
    meta = json.loads((run / "config.json").read_text())
    meta["config"].update(fields)
    (run / "config.json").write_text(json.dumps(meta))


BAD_CONFIGS = [
    ("empty-object", lambda run: (run / "config.json").write_text("{}"),
     'not an object with a "config" object'),
    ("a-list", lambda run: (run / "config.json").write_text("[1, 2]"),
     'not an object with a "config" object'),
    ("config-a-string", lambda run: (run / "config.json").write_text('{"config": "vae"}'),
     'not an object with a "config" object'),
    ("limit-abc", lambda run: _config_with(run, limit="abc"),
     "limit must be a whole number or null, got 'abc'"),
    ("epochs-2.5", lambda run: _config_with(run, epochs=2.5), "epochs must be a whole number"),
    ("channels-8", lambda run: _config_with(run, channels=8),
     "channels must be a list of 2 whole numbers, got 8"),
    ("cuda-graphs-yes", lambda run: _config_with(run, cuda_graphs="yes"),
     "cuda_graphs must be true or false"),
    ("lr-null", lambda run: _config_with(run, lr=None), "lr must be a number, got None"),
    ("dataset-7", lambda run: _config_with(run, dataset=7), "dataset must be a string, got 7"),
    ("seed-2^64", lambda run: _config_with(run, seed=2**64), "seed must be a whole number from 0"),
    ("latent-0", lambda run: _config_with(run, latent_dim=0), "latent size must be >= 1"),
    ("not-utf8", lambda run: (run / "config.json").write_bytes(b"\xff\xfe{"), "is corrupted"),
]


@pytest.mark.parametrize("command", ["evaluate", "plot", "resume"])
@pytest.mark.parametrize("damage, why", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_a_config_json_of_the_wrong_shape_exits_2_naming_it(
    run_copy: Path, capsys: pytest.CaptureFixture[str], command: str, damage: object, why: str
) -> None:
    damage(run_copy)  # type: ignore[operator]
    before = snapshot(run_copy)
    argv = (["train", "--resume", "--out", str(run_copy)] if command == "resume"
            else [command, str(run_copy), *(["--samples", "0"] if command == "evaluate" else [])])
    assert_refused(*cli(argv, capsys), str(run_copy / "config.json"), why)
    assert snapshot(run_copy) == before


def test_the_api_refuses_a_config_json_of_the_wrong_shape_with_a_typed_error(
    run_copy: Path
) -> None:
    from vaelab.checkpoint import load_run, read_config
    from vaelab.errors import CheckpointError

    (run_copy / "config.json").write_text("[1, 2]")
    for load in (read_config, load_run):
        with pytest.raises(CheckpointError, match="config.json is corrupted"):
            load(run_copy)


ROW = {"epoch": 1, "step": 8, "beta": 1.0, "lr": 0.001, "train_recon": 500.0, "train_kl": 2.0,
       "train_neg_elbo": 502.0, "train_loss": 502.0, "train_kl_per_dim": [1.0, 1.0]}
BAD_ROWS = [
    ("42", "42", "line 1 is not a metrics row (an object), got int"),
    ("a-string", '"epoch"', "line 1 is not a metrics row (an object), got str"),
    ("a-list", "[1, 2]", "got list"),
    ("null", "null", "got NoneType"),
    ("epoch-one", json.dumps({**ROW, "epoch": "one"}), "line 1: epoch must be a whole number"),
    ("epoch-true", json.dumps({**ROW, "epoch": True}), "line 1: epoch must be a whole number"),
    ("recon-text", json.dumps({**ROW, "train_recon": "500"}), "train_recon must be a number"),
    ("kl-per-dim-dict", json.dumps({**ROW, "train_kl_per_dim": {"a": 1}}),
     "train_kl_per_dim must be a list of numbers"),
    ("huge-int", json.dumps({**ROW, "train_kl": 10**400}), "train_kl must be a number"),
    ("missing-fields", json.dumps({"epoch": 1}),
     "line 1 lacks step, train_recon, train_kl, train_neg_elbo"),
]


@pytest.mark.parametrize("command", ["evaluate", "plot"])
@pytest.mark.parametrize("line, why", [r[1:] for r in BAD_ROWS], ids=[r[0] for r in BAD_ROWS])
def test_a_metrics_row_of_the_wrong_shape_exits_2_naming_its_line(
    run_copy: Path, capsys: pytest.CaptureFixture[str], command: str, line: str, why: str
) -> None:
    (run_copy / "metrics.jsonl").write_text(line + "\n")
    argv = [command, str(run_copy), *(["--samples", "0"] if command == "evaluate" else [])]
    assert_refused(*cli(argv, capsys), str(run_copy / "metrics.jsonl"), why)


def test_a_good_metrics_row_still_loads(run_copy: Path) -> None:
    from vaelab.checkpoint import read_metrics

    (run_copy / "metrics.jsonl").write_text(json.dumps({**ROW, "extra": "kept"}) + "\n")
    assert read_metrics(run_copy) == [{**ROW, "extra": "kept"}]


def test_a_file_given_as_a_run_folder_is_named_as_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run"
    path.write_text("not a run")
    assert_refused(*cli(["evaluate", str(path)], capsys), f"{path} is a file, not a run folder")


# --------------------------------------------------------------------------------------------
# Models too large, seeds out of range, failed starts (issue 17, part 3)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    ["--latent-dim", "1000000000"], ["--enc-hidden", "100000000000"],
    ["--latent-dim", "4611686018427387904"], ["--dec-hidden", "10" + "0" * 4000],
    ["--batch-size", "1000000000000", "--limit", "10000000000000"],
], ids=["latent-1e9", "enc-hidden-1e11", "latent-2^62", "dec-hidden-1e4001", "batch-1e12"])
def test_a_model_that_cannot_fit_is_refused_before_it_is_allocated(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, extra: list[str]
) -> None:
    import vaelab.training

    def no_build(*args: object) -> None:
        raise AssertionError("the model was built before its size was checked")

    monkeypatch.setattr(vaelab.training.loop, "build_model", no_build)
    out = tmp_path / "run"
    code, err, stdout = cli(train_args(data, out, *extra), capsys)
    assert_refused(code, err, stdout, "the model cannot fit", "more than this machine's",
                   "of memory; choose smaller sizes")
    assert len(err[0]) < 400
    assert not out.exists()


def test_the_memory_check_compares_the_estimate_with_the_machine(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The estimate (weights, gradients and Adam's moments at 4 bytes each, plus activations)
    is compared with the machine's memory: the smoke preset fits in 64 MiB, not in 8 MiB."""
    import vaelab.config
    from vaelab.config import resolve_config, training_memory_bytes
    from vaelab.errors import ConfigError
    from vaelab.models import build_model

    cfg = resolve_config("smoke")
    params = sum(p.numel() for p in build_model(cfg.model_spec()).parameters())
    assert cfg.model_spec().parameter_count() == params
    need = training_memory_bytes(cfg)
    assert 16 * params < need < 64 * 2**20
    monkeypatch.setattr(vaelab.config, "machine_memory", lambda: 64 * 2**20)
    resolve_config("smoke")
    monkeypatch.setattr(vaelab.config, "machine_memory", lambda: 8 * 2**20)
    with pytest.raises(ConfigError, match=r"more than this machine's 8\.0 MiB of memory"):
        resolve_config("smoke")


BAD_SEEDS = [str(2**64), str(2**63), "-1", "1" + "0" * 30]


@pytest.mark.parametrize("seed", BAD_SEEDS)
@pytest.mark.parametrize("command", ["train", "evaluate", "reproduce", "classifier"])
def test_a_seed_out_of_range_exits_2_and_leaves_nothing(
    data: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    command: str, seed: str
) -> None:
    out = tmp_path / "out"
    argv = {
        "train": train_args(data, out, "--seed", seed),
        "evaluate": ["evaluate", str(finished), "--seed", seed],
        "reproduce": ["reproduce", "--out", str(out), "--preset", "smoke", "--dataset",
                      f"idx:{data}", "--seeds", "0", seed],
        "classifier": ["classifier", "train", "--out", str(out), "--seed", seed],
    }[command]
    before = snapshot(finished)
    option = "--seeds" if command == "reproduce" else "--seed"
    assert_refused(*cli(argv, capsys), f"argument {option}: must be")
    assert not out.exists()
    assert snapshot(finished) == before


def test_the_api_range_checks_seeds(data: Path, tmp_path: Path) -> None:
    from vaelab.classifier import train_classifier
    from vaelab.config import TrainConfig
    from vaelab.errors import ConfigError
    from vaelab.report import reproduce

    for seed in (2**64, -1):
        with pytest.raises(ConfigError, match="seed must be a whole number from 0 to 2"):
            TrainConfig(seed=seed).validate()
        with pytest.raises(ConfigError, match="seed must be a whole number from 0 to 2"):
            reproduce(tmp_path / "study", preset="smoke", dataset=f"idx:{data}", seeds=(0, seed),
                      progress=False)
        assert not (tmp_path / "study").exists()
        with pytest.raises(ConfigError, match="seed must be a whole number from 0 to 2"):
            train_classifier(f"idx:{data}", tmp_path / "classifier", seed=seed)
        assert not (tmp_path / "classifier").exists()
    TrainConfig(seed=2**63 - 1).validate()


def test_a_failed_start_leaves_no_folder_it_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run into a/b/run, or a study into study/, refused by a missing data set: neither the
    folder nor the parents it created are left (the study had already written its marker and
    made runs/)."""
    missing = f"idx:{tmp_path / 'nowhere'}"
    assert_refused(*cli(train_args(missing, tmp_path / "a" / "b" / "run"), capsys),
                   "no such folder")
    assert not (tmp_path / "a").exists()
    code, err, _ = cli(["reproduce", "--out", str(tmp_path / "study"), "--preset", "smoke",
                        "--dataset", missing], capsys)  # (its "training ..." lines on stdout)
    assert code == 2 and len(err) == 1 and "no such folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
