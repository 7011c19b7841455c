"""``vaelab sweep``: a grid of runs on a local Ray, faults, re-runs, the table, bad grids.

The trials are the ``smoke`` preset on a small synthetic IDX data set (512 train images, 32
of them validation, 64 test; 8 steps an epoch, 4 epochs, a checkpoint every 3 steps), one
torch thread each, so a trial whose worker is killed and retried must end bit-for-bit equal to
a run never interrupted. The sweep runs as a real ``vaelab sweep`` process with a local Ray of
2 CPUs; the test kills one trial's worker (the pid in its run folder's lock) mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray  # noqa: F401 - a plain import: the [test] extra installs Ray, CI never skips these

from helpers import assert_same_run, cli, train_in_process
from synthetic import noisy_blobs, write_synthetic
from vaelab.checkpoint import list_checkpoints
from vaelab.cli import _train_overrides, build_parser
from vaelab.config import resolve_config
from vaelab.locks import HOLDER_FILE, LOCK_FILES, FolderInUse, FolderLock
from vaelab.sweep import (
    GRID_KEYS,
    aggregate,
    mean_std,
    plan_sweep,
    render_markdown,
    run_trial,
)

GRID = ["--grid", "latent_dim=2,3", "--grid", "seed=0,1"]
TRIALS = ["latent_dim=2,seed=0", "latent_dim=2,seed=1", "latent_dim=3,seed=0",
          "latent_dim=3,seed=1"]
VICTIM = "latent_dim=2,seed=0"  # the trial whose worker is killed (submitted first)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def base_options(data: Path) -> list[str]:
    return ["--preset", "smoke", "--dataset", f"idx:{data}", "--val-size", "32", "--epochs",
            "4", "--checkpoint-every", "3"]


def sweep_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--out", str(out), *base_options(data), *GRID, "--num-cpus", "2",
            "--tolerance", "0", "--quiet", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("idx"), noisy_blobs, 512, 64, seed=0)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The victim's settings trained in-process, one thread, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(["train", "--out", str(out), *base_options(data), "--latent-dim", "2",
                      "--seed", "0", "--quiet"])
    return out


@pytest.fixture(scope="module")
def swept(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-trial sweep as a real process on a local Ray of 2 CPUs; the victim trial's worker
    is SIGKILLed once its first checkpoint is on disk."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    proc = subprocess.Popen([sys.executable, "-m", "vaelab", *sweep_args(data, out)], env=ENV,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = out / VICTIM
    killed = None
    deadline = time.monotonic() + 300  # Ray's start can take a minute on a loaded machine
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            holder = json.loads((victim / HOLDER_FILE).read_text())
        except (OSError, ValueError):
            holder = None
        if holder and list_checkpoints(victim) and not (victim / "summary.json").exists():
            os.kill(int(holder["pid"]), signal.SIGKILL)
            killed = int(holder["pid"])
            break
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=300)
    return {"out": out, "killed": killed, "code": proc.returncode, "stdout": stdout,
            "stderr": stderr}


# --------------------------------------------------------------------------------------------
# A sweep on Ray: faults, the table, re-runs
# --------------------------------------------------------------------------------------------
def test_a_killed_worker_is_retried_and_its_trial_equals_an_uninterrupted_run(
    swept: dict[str, Any], reference: Path,
) -> None:
    assert swept["code"] == 0, swept["stderr"]
    assert swept["killed"] is not None, (
        "the victim's worker was never seen between its first checkpoint and its end")
    out = swept["out"]
    result = json.loads((out / "sweep.json").read_text())
    assert result["status"] == "done" and result["trained"] == 4
    assert [t["name"] for t in result["trials"]] == TRIALS
    assert all(t["status"] == "done" for t in result["trials"])
    victim = next(t for t in result["trials"] if t["name"] == VICTIM)
    # the task that finished is a retry in another process, resumed from a checkpoint
    assert victim["this_sweep"]["pid"] != swept["killed"]
    assert victim["this_sweep"]["resumed_from_step"] in (3, 6, 8, 9, 12, 15, 16, 18, 21, 24)
    assert_same_run(out / VICTIM, reference)
    assert sorted(p.name for p in (out / VICTIM).rglob(".*") if p.name not in LOCK_FILES) == []
    # every trial is an ordinary, finished run folder with its settings
    for t in result["trials"]:
        cfg = json.loads((out / t["name"] / "config.json").read_text())["config"]
        assert (cfg["latent_dim"], cfg["seed"]) == (t["values"]["latent_dim"], t["values"]["seed"])
        assert cfg["epochs"] == 4 and (out / t["name"] / "model.json").exists()


def test_the_table_is_the_mean_and_std_of_the_trials_summaries(swept: dict[str, Any]) -> None:
    out = swept["out"]
    result = json.loads((out / "sweep.json").read_text())
    assert [r["settings"] for r in result["rows"]] == [{"latent_dim": 2}, {"latent_dim": 3}]
    for row, names in zip(result["rows"], (TRIALS[:2], TRIALS[2:]), strict=True):
        values = [json.loads((out / n / "summary.json").read_text())["test"]["neg_elbo"]
                  for n in names]
        mean = sum(values) / 2
        std = abs(values[0] - values[1]) / 2 ** 0.5  # n - 1 = 1
        got = row["metrics"]["neg_elbo"]
        assert got["mean"] == pytest.approx(mean) and got["std"] == pytest.approx(std)
        assert row["seeds"] == [0, 1] and row["metrics"]["neg_log_px"]["mean"] is None
        assert f"| {row['settings']['latent_dim']} | 0, 1 |" in (out / "sweep.md").read_text()
        assert f"{mean:.2f} ± {std:.2f}" in (out / "sweep.md").read_text()
        assert f"{mean:.2f} ± {std:.2f}" in swept["stdout"]  # the same table, printed


def test_a_second_invocation_trains_nothing_and_starts_no_ray(
    swept: dict[str, Any], data: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = swept["out"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
              and p.name not in ("sweep.json", "sweep.md")}
    code, err = cli(sweep_args(data, out), capsys)
    assert (code, err) == (0, [])
    result = json.loads((out / "sweep.json").read_text())
    assert result["trained"] == 0 and result["settings"]["ray"] is None
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_trials_written_before_a_new_setting_existed_still_count_as_done(
    swept: dict[str, Any], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A trial's config.json from before ``weight_decay`` existed (the field absent) is the
    same settings as today's default (no decay): a rerun trains nothing."""
    out = Path(shutil.copytree(swept["out"], tmp_path / "grid"))
    for name in TRIALS:
        path = out / name / "config.json"
        saved = json.loads(path.read_text())
        del saved["config"]["weight_decay"]
        path.write_text(json.dumps(saved))
    code, err = cli(sweep_args(data, out), capsys)
    assert (code, err) == (0, [])
    result = json.loads((out / "sweep.json").read_text())
    assert result["trained"] == 0 and result["settings"]["ray"] is None
    assert all(t["status"] == "done" for t in result["trials"])


def test_a_rerun_with_other_settings_is_refused_until_force(
    swept: dict[str, Any], data: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The same folder with --epochs 5: its trials hold 4-epoch runs, so it exits 2 naming the
    setting that differs, and touches nothing (no Ray, no trial file)."""
    out = swept["out"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    args = [a if a != "4" else "5" for a in sweep_args(data, out)]
    code, err = cli(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert f"{out / TRIALS[0]} holds a run with other settings (epochs)" in err[0]
    assert "--force" in err[0]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_rerun_resumes_an_unfinished_trial_to_the_same_weights(
    swept: dict[str, Any], data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A trial left mid-run (its end and newest checkpoint gone) is resumed by the next sweep
    from the checkpoint it has, to the weights it had; the finished ones are left alone."""
    out = Path(shutil.copytree(swept["out"], tmp_path / "grid"))
    trial = out / TRIALS[3]
    for name in ("summary.json", "model.json", "model.safetensors"):
        (trial / name).unlink()
    shutil.rmtree(list_checkpoints(trial)[0])
    code, err = cli(sweep_args(data, out), capsys)
    assert (code, err) == (0, [])
    result = json.loads((out / "sweep.json").read_text())
    assert result["trained"] == 1
    record = next(t for t in result["trials"] if t["name"] == TRIALS[3])["this_sweep"]
    kept = list_checkpoints(swept["out"] / TRIALS[3])[1]  # the newest one left in the copy
    assert record["resumed_from_step"] == int(kept.name.split("-")[1])
    assert_same_run(trial, swept["out"] / TRIALS[3])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(*args: str, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    return subprocess.Popen([ray_cli, "start", "--block", "--num-cpus", "1",
                             "--disable-usage-stats", *args], env=env, cwd=cwd, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_the_readme_cluster_recipe_two_nodes_on_this_machine(data: Path, tmp_path: Path) -> None:
    """README's recipe: `ray start --head`, `ray start --address` (a second node, here on the
    same machine, a non-default port, token authentication), then `vaelab sweep --address`:
    both trials finish, on the two nodes, each an ordinary run folder. The nodes' processes
    are this test's own `ray start --block`, stopped by SIGTERM."""
    import secrets

    env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = _free_port()
    nodes = [_ray_start("--head", "--port", str(port), "--include-dashboard", "false",
                        env=env, cwd=tmp_path)]
    try:
        nodes.append(_ray_start("--address", f"127.0.0.1:{port}", env=env, cwd=tmp_path))
        wait = (f"import ray, time; ray.init(address='127.0.0.1:{port}', "
                "logging_level='ERROR')\nt = time.monotonic()\n"
                "while sum(n['Alive'] for n in ray.nodes()) < 2 and time.monotonic() - t < 60:"
                " time.sleep(0.2)\n"
                "print(sum(n['Alive'] for n in ray.nodes()))")
        up = subprocess.run([sys.executable, "-c", wait], env=env, text=True,
                            capture_output=True, timeout=120)
        assert up.stdout.strip() == "2", up.stderr[-2000:]
        out = tmp_path / "grid"
        done = subprocess.run(
            [sys.executable, "-m", "vaelab", "sweep", "--out", str(out), *base_options(data),
             "--grid", "seed=0,1", "--tolerance", "0", "--quiet", "--address",
             f"127.0.0.1:{port}"], env=env, text=True, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        for proc in reversed(nodes):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        # `ray start --head` names its cluster in /tmp/ray for a plain `ray.init()`; `ray stop`
        # would remove that, and every Ray on the machine with it: remove only our own
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink(missing_ok=True)
    result = json.loads((out / "sweep.json").read_text())
    assert result["settings"]["ray"]["nodes"] == 2 and not result["settings"]["ray"]["local"]
    assert [t["status"] for t in result["trials"]] == ["done", "done"]
    assert len({t["this_sweep"]["node"] for t in result["trials"]}) == 2
    assert all((out / t["name"] / "model.json").exists() for t in result["trials"])


# --------------------------------------------------------------------------------------------
# The pieces, without Ray
# --------------------------------------------------------------------------------------------
def test_aggregate_groups_by_setting_and_gives_mean_and_sample_std() -> None:
    def trial(lat: int, seed: int, elbo: float | None, recon: float) -> dict[str, Any]:
        return {"name": f"{lat}-{seed}", "values": {"latent_dim": lat, "seed": seed},
                "metrics": {"recon": recon, "kl": 1.0, "neg_elbo": elbo, "neg_log_px": None}}

    rows = aggregate([trial(2, 0, 100.0, 90.0), trial(5, 0, 80.0, 70.0),
                      trial(2, 1, 102.0, 91.0), trial(2, 2, 104.0, 95.0),
                      trial(5, 1, None, 72.0)])
    assert [r["settings"] for r in rows] == [{"latent_dim": 2}, {"latent_dim": 5}]
    two, five = rows
    assert two["seeds"] == [0, 1, 2] and five["seeds"] == [0, 1]
    assert two["metrics"]["neg_elbo"] == {"mean": 102.0, "std": 2.0, "n": 3}
    assert two["metrics"]["recon"]["mean"] == pytest.approx(92.0)
    assert two["metrics"]["recon"]["std"] == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)
    assert two["metrics"]["kl"] == {"mean": 1.0, "std": 0.0, "n": 3}
    # a missing value is left out; one value has no spread; none has no mean
    assert five["metrics"]["neg_elbo"] == {"mean": 80.0, "std": None, "n": 1}
    assert five["metrics"]["neg_log_px"] == {"mean": None, "std": None, "n": 0}
    assert mean_std([3.0, None, 5.0]) == (4.0, pytest.approx(2 ** 0.5))
    md = render_markdown({"plan": {"preset": "smoke", "grid": {"latent_dim": [2, 5],
                                                                "seed": [0, 1, 2]}},
                          "settings": {"tolerance": 0.1}, "rows": rows,
                          "trials": [{"name": "x"}]})
    assert "| 2 | 0, 1, 2 | 92.00 ± 2.65 | 1.00 ± 0.00 | 102.00 ± 2.00 | — |" in md
    assert "| 5 | 0, 1 | 71.00 ± 1.41 | 1.00 ± 0.00 | 80.00 | — |" in md


def test_without_a_seed_key_each_trial_is_its_own_row() -> None:
    rows = aggregate([{"values": {"beta": b}, "seed": 7, "metrics": {"neg_elbo": x}}
                      for b, x in ((0.5, 1.0), (1.0, 2.0))])
    assert [(r["settings"], r["seeds"], r["metrics"]["neg_elbo"]["mean"]) for r in rows] == \
        [({"beta": 0.5}, [7], 1.0), ({"beta": 1.0}, [7], 2.0)]


def test_the_grid_keys_are_vaelab_trains_options() -> None:
    args = build_parser().parse_args(["train", "--out", "x"])
    assert set(GRID_KEYS) == set(_train_overrides(args)) - {"cuda_graphs"}


def test_plan_parses_values_by_type_and_names_trials(tmp_path: Path) -> None:
    plan = plan_sweep(tmp_path / "s", preset="smoke", options={"epochs": 2},
                      grid={"seed": ["0", "1"], "lr": ["1e-3"], "channels": ["4x8"],
                            "activation": ["elu"]})
    assert [t.name for t in plan.trials] == ["lr=0.001,channels=4x8,activation=elu,seed=0",
                                             "lr=0.001,channels=4x8,activation=elu,seed=1"]
    c = plan.trials[1].config
    assert (c.seed, c.lr, c.channels, c.activation, c.epochs, c.preset) == \
        (1, 1e-3, (4, 8), "elu", 2, "smoke")
    assert c == resolve_config("smoke", epochs=2, seed=1, lr=1e-3, channels=(4, 8),
                               activation="elu")
    # a spec file's JSON values go through the same checks
    plan = plan_sweep(tmp_path / "s", grid={"latent_dim": [2, 5], "channels": [[4, 8]]})
    assert [t.config.latent_dim for t in plan.trials] == [2, 5]


BAD_GRIDS = [
    (["--grid", "sed=0,1"], "--grid sed: not a train option"),
    (["--grid", "seed=0,x"], "--grid seed: 'x' is not a whole number"),
    (["--grid", "lr=0.1,fast"], "--grid lr: 'fast' is not a number"),
    (["--grid", "lr=nan"], "--grid lr: 'nan' is not a finite number"),
    (["--grid", "seed="], "--grid seed: an empty list of values"),
    (["--grid", "seed=0,,1"], "an empty value in the list"),
    (["--grid", "seed"], "expected KEY=V1,V2,..."),
    (["--grid", "seed=0,0"], "the value 0 is listed twice"),
    (["--grid", "seed=0", "--grid", "seed=1"], "--grid seed is given twice"),
    (["--seed", "3", "--grid", "seed=0,1"], "seed is given both as an option and in the grid"),
    (["--grid", "lr=0.1,-1"], "trial lr=-1.0: learning rate must be > 0"),
    (["--grid", "activation=relu,tanh"], "unknown activation 'tanh'"),
    (["--grid", "channels=4"], "is not two whole numbers like 16x32"),
    ([], "a sweep needs at least one --grid"),
    (["--grid", "seed=0", "--gpus-per-trial", "1.5"], "--gpus-per-trial must be"),
    (["--grid", "seed=0", "--resume"], "--resume is not a sweep option"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_GRIDS)
def test_a_bad_grid_exits_2_with_one_line_and_writes_nothing(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "sweep"
    code, err = cli(["sweep", "--out", str(out), "--preset", "smoke", *extra], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert err[0].startswith("vaelab: error: ")
    assert not out.exists()


@pytest.mark.parametrize(("spec", "message"), [
    ("{", "is not JSON"),
    ('{"grid": {"seed": 0}}', "grid 'seed' must be a list"),
    ('{"grid": {"seed": [0, 1.5]}}', "--grid seed: '1.5' is not a whole number"),
    ('{"grid": {"seed": []}}', "an empty list of values"),
    ('{"grid": {"seed": [0]}, "sweep": 1}', "unknown spec fields sweep"),
    ('{"grid": {"seed": [0]}, "preset": "huge"}', "unknown preset 'huge'"),
    ('{"grid": {"seed": [0]}, "options": {"epochs": "three"}}',
     "option epochs: 'three' is not a whole number"),
    ('{"grid": {"seed": [0]}, "options": {"warmup": 1}}', "unknown train option(s): warmup"),
])
def test_a_bad_spec_file_exits_2_with_one_line(
    spec: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "spec.json").write_text(spec)
    out = tmp_path / "sweep"
    code, err = cli(["sweep", "--out", str(out), "--spec", str(tmp_path / "spec.json")], capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_spec_file_gives_the_grid_and_options(tmp_path: Path) -> None:
    from vaelab.sweep import load_spec

    (tmp_path / "spec.json").write_text(json.dumps(
        {"preset": "smoke", "options": {"epochs": 2}, "grid": {"seed": [0, 1]}}))
    spec = load_spec(tmp_path / "spec.json")
    plan = plan_sweep(tmp_path / "s", preset=spec["preset"], options=spec["options"],
                      grid=spec["grid"])
    assert [(t.name, t.config.epochs, t.config.preset) for t in plan.trials] == \
        [("seed=0", 2, "smoke"), ("seed=1", 2, "smoke")]


def test_a_missing_data_set_exits_2_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "sweep"
    code, err = cli(["sweep", "--out", str(out), "--preset", "smoke", "--dataset",
                     f"idx:{tmp_path / 'nowhere'}", "--grid", "seed=0,1"], capsys)
    assert code == 2 and len(err) == 1 and "nowhere: no such folder" in err[0], err
    assert not out.exists()


def test_a_folder_that_is_not_a_sweep_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, err = cli(["sweep", "--out", str(tmp_path), "--preset", "smoke", "--grid", "seed=0"],
                    capsys)
    assert code == 2 and len(err) == 1 and "not a sweep's folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_trial_waits_for_a_folder_another_attempt_still_holds(
    data: Path, reference: Path, tmp_path: Path,
) -> None:
    """A retry that starts while the attempt it replaces still holds the run folder waits for
    it (here 0.5 s), then trains; one held for longer than it waits is refused by name."""
    cfg = resolve_config("smoke", dataset=f"idx:{data}", val_size=32, epochs=4,
                         checkpoint_every=3, latent_dim=2, seed=0).to_dict()
    run = tmp_path / "run"
    run.mkdir()  # a folder the lock did not make: its release leaves it in place
    lock = FolderLock(run).acquire()
    with pytest.raises(FolderInUse, match="in use by pid"):
        run_trial(cfg, str(run), lock_wait=0.3)
    threading.Timer(0.5, lock.release).start()
    record = run_trial(cfg, str(run), lock_wait=30)
    assert record["trained"] and record["resumed_from_step"] is None
    assert_same_run(run, reference)
    # finished: called again, it trains nothing
    assert run_trial(cfg, str(run))["trained"] is False
