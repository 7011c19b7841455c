"""Nothing lost: kills, signals, damaged checkpoints, NaNs and full disks (issue parts 1, 2, 3, 5).

Every run here is the ``smoke`` preset on a small synthetic IDX data set (480 train, 32 val,
64 test images; 8 steps an epoch, 3 epochs, a checkpoint every 3 steps), on CPU with one
thread, so a run resumed after any fault must end bit-for-bit equal to one never interrupted.
The reference run is trained once in-process; the kill and signal tests run real subprocesses.
Bad CLI input (part 4) is in test_cli_errors.py; the explorer server (part 6) in test_explore*.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import vaelab.data
import vaelab.io
from helpers import assert_same_run as same_weights_and_metrics
from helpers import cli, metrics_rows, train_in_process
from helpers import one_thread as single_thread
from synthetic import noisy_blobs, write_synthetic
from vaelab.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_run,
    read_checkpoint,
    save_checkpoint,
    save_final,
)
from vaelab.cli import main
from vaelab.errors import CheckpointError, SpecMismatch
from vaelab.io import atomic_write_json, atomic_write_text
from vaelab.locks import LOCK_FILES
from vaelab.models import ModelSpec, build_model

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# --------------------------------------------------------------------------------------------
# Data, runs and comparisons
# --------------------------------------------------------------------------------------------
def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--preset", "smoke", "--dataset", f"idx:{data}",
            "--val-size", "32", "--epochs", "3", "--checkpoint-every", "3", "--quiet", *extra]


def assert_same_run(run: Path, reference: Path) -> None:
    same_weights_and_metrics(run, reference)
    assert json.loads((run / "summary.json").read_text())["test"] == \
        json.loads((reference / "summary.json").read_text())["test"]


def newest(run: Path) -> Path:
    return list_checkpoints(run)[0]


def leftovers(run: Path) -> list[str]:
    """Temporaries a killed or failed write would leave: there must be none (the run folder's
    lock file, which a killed holder leaves and the next writer takes over, is not one)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*")
                  if p.name not in LOCK_FILES)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process runs use one thread, as the subprocesses do (OMP_NUM_THREADS=1)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("idx"), noisy_blobs, 512, 64, seed=0)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run (in-process, one thread): what every resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(train_args(data, out))
    assert [p.name for p in list_checkpoints(out)] == ["step-00000024", "step-00000021"]
    return out


@pytest.fixture
def finished(reference: Path, tmp_path: Path) -> Path:
    """A copy of the finished reference run, to damage."""
    return Path(shutil.copytree(reference, tmp_path / "run"))


# --------------------------------------------------------------------------------------------
# 1. Crash-safe training: SIGKILL, SIGTERM, SIGINT
# --------------------------------------------------------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vaelab", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_new_checkpoint(proc: subprocess.Popen[str], run: Path, before: set[str],
                            timeout: float = 60.0) -> None:
    """Poll until a checkpoint not in ``before`` exists, or the process has ended."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if {p.name for p in list_checkpoints(run)} - before:
            return
        time.sleep(0.01)


def test_sigterm_then_sigkills_at_random_moments_then_resume_equals_uninterrupted(
    data: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    """Real processes: SIGTERM after the first checkpoint (exit 143, resume command printed),
    then two ``--resume`` runs SIGKILLed at seeded random moments after a new checkpoint
    (mid-step, mid-checkpoint, mid-evaluation...); the printed command then ends the run with
    the weights and metrics of the uninterrupted one."""
    run = tmp_path / "run"

    # SIGTERM: a clean stop with a checkpoint and the command that continues the run
    proc = start(train_args(data, run))
    wait_for_new_checkpoint(proc, run, set())
    assert proc.poll() is None, "the run ended before SIGTERM could be sent"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM == 143, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelab: SIGTERM: saved step-"), err
    assert lines[0].endswith(f"Resume with: vaelab train --resume --out {run}")
    saved = run / "checkpoints" / lines[0].split("saved ")[1].split()[0]
    assert read_checkpoint(saved).path == newest(run)  # whole, verified, the newest
    command = lines[0].split("Resume with: ")[1].split()
    assert command[:3] == ["vaelab", "train", "--resume"]

    # SIGKILL at random moments of resumed runs
    rng = random.Random(20240517)
    kills = 0
    for _ in range(2):
        before = {p.name for p in list_checkpoints(run)}
        proc = start(train_args(data, run, "--resume"))
        wait_for_new_checkpoint(proc, run, before)
        time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        _, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:  # it finished before the kill landed: fine, but it must have finished cleanly
            assert proc.returncode == 0, err
    assert kills >= 1

    # the printed command, as is (no other option needed), finishes the run
    assert cli(command[1:], capsys) == (0, [])
    assert_same_run(run, reference)
    assert leftovers(run) == []


def test_sigint_mid_epoch_saves_exits_130_and_resume_equals(
    data: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, one_thread: None,
) -> None:
    """Ctrl-C at step 10 (mid-epoch, not a checkpoint step) in-process, through the CLI."""
    run = tmp_path / "run"
    from vaelab.training import Trainer

    real_step = Trainer.train_step

    def step(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        real_step(self, x, y)
        if self.global_step == 10:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", step)
    code, err = cli(train_args(data, run), capsys)
    assert code == 130
    assert err == [f"vaelab: SIGINT: saved step-00000010 at epoch 2, step 10. "
                   f"Resume with: vaelab train --resume --out {run}"]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert cli(train_args(data, run, "--resume"), capsys) == (0, [])
    assert_same_run(run, reference)


# --------------------------------------------------------------------------------------------
# 2. Checkpoints are data
# --------------------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file, why", [
    (truncate, "model.safetensors", "fails its checksum"),
    (flip_bit, "model.safetensors", "fails its checksum"),
    (truncate, "state.pt", "fails its checksum"),
    (flip_bit, "state.pt", "fails its checksum"),
    (lambda p: p.unlink(), "manifest.json", "no manifest.json"),
    (lambda p: p.write_text('{"files": '), "manifest.json", "manifest.json is corrupted"),
])
def test_damaged_checkpoint_is_refused_by_name_and_the_previous_one_is_used(
    finished: Path, damage: Any, file: str, why: str
) -> None:
    bad, good = list_checkpoints(finished)
    damage(bad / file)
    with pytest.raises(CheckpointError, match=why) as e:
        read_checkpoint(bad)
    assert str(bad) in str(e.value)
    ckpt, refused = latest_checkpoint(finished, ModelSpec.from_dict(
        json.loads((finished / "config.json").read_text())["model"]))
    assert ckpt is not None and ckpt.path == good and ckpt.step == 21
    assert len(refused) == 1 and str(bad) in refused[0] and why in refused[0]


def test_resume_falls_back_past_a_bit_flipped_checkpoint_and_equals_uninterrupted(
    finished: Path, reference: Path, capsys: pytest.CaptureFixture[str], one_thread: None,
) -> None:
    bad, good = list_checkpoints(finished)
    flip_bit(bad / "state.pt")
    (finished / "summary.json").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(finished)]) == 0  # not --quiet: it logs
    out, err = capsys.readouterr()
    assert err == ""
    out = out.replace("\n", "")  # rich wraps long lines
    assert f"refused checkpoint: {bad}: state.pt fails its checksum" in out
    assert f"resumed from {good.name}" in out
    read_checkpoint(bad)  # rewritten by the resumed run, whole again
    assert_same_run(finished, reference)


def test_resume_logs_the_refusal_and_starts_over_when_no_checkpoint_is_good(
    finished: Path, reference: Path, one_thread: None
) -> None:
    from vaelab.config import TrainConfig
    from vaelab.training import train

    for ckpt in list_checkpoints(finished):
        truncate(ckpt / "model.safetensors")
    log: list[str] = []
    config = TrainConfig.from_dict(json.loads((finished / "config.json").read_text())["config"])
    train(config, finished, resume=True, progress=False, log=log.append)
    assert sum("refused checkpoint" in m and "fails its checksum" in m for m in log) == 2
    assert any("from scratch" in m for m in log)
    assert_same_run(finished, reference)


def spec_of(run: Path) -> ModelSpec:
    return ModelSpec.from_dict(json.loads((run / "config.json").read_text())["model"])


def test_wrong_kind_or_shape_checkpoint_is_refused_saying_what_it_holds(
    finished: Path, tmp_path: Path
) -> None:
    vae = spec_of(finished)
    cvae = ModelSpec(**{**vae.to_dict(), "kind": "cvae"})
    wider = ModelSpec(**{**vae.to_dict(), "latent_dim": 3})
    ckpt = newest(finished)
    with pytest.raises(CheckpointError, match=r"holds a vae \(latent 2.*but a cvae") as e:
        read_checkpoint(ckpt, cvae)
    assert str(ckpt) in str(e.value)
    with pytest.raises(CheckpointError, match=r"latent 2.*but a vae \(latent 3"):
        read_checkpoint(ckpt, wider)
    # a mix-up of runs is not hidden by falling back to an older checkpoint: it is its own
    # type (still a CheckpointError), so no caller need read the message to tell it apart
    assert issubclass(SpecMismatch, CheckpointError)
    with pytest.raises(SpecMismatch, match="holds a vae"):
        latest_checkpoint(finished, cvae)
    # a CVAE checkpoint given to a VAE
    other = tmp_path / "cvae-run"
    save_checkpoint(other, build_model(cvae), cvae, {"epoch": 0}, step=1, epoch=0)
    with pytest.raises(SpecMismatch, match=r"holds a cvae .* but a vae .* was expected"):
        latest_checkpoint(other, vae)


def test_resume_of_a_run_whose_config_says_another_kind_is_refused(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = json.loads((finished / "config.json").read_text())
    cfg["config"]["model"] = "cvae"
    (finished / "config.json").write_text(json.dumps(cfg))
    code, err = cli(["train", "--resume", "--out", str(finished)], capsys)
    assert code == 2 and len(err) == 1
    assert "holds a vae (latent 2" in err[0] and "but a cvae" in err[0]


@pytest.mark.parametrize("kind, latent", [("cvae", 2), ("vae", 3)])
def test_load_run_refuses_a_swapped_model_json_saying_what_the_weights_hold(
    finished: Path, tmp_path: Path, kind: str, latent: int
) -> None:
    other = ModelSpec(**{**spec_of(finished).to_dict(), "kind": kind, "latent_dim": latent})
    save_final(tmp_path / "other", build_model(other), other)
    load_run(finished)  # fine before the swap
    shutil.copy(tmp_path / "other" / "model.json", finished / "model.json")
    with pytest.raises(CheckpointError) as e:
        load_run(finished)
    msg = str(e.value)
    assert "model.safetensors holds a vae (latent 2" in msg
    assert f"model.json describes a {kind} (latent {latent}" in msg
    # both final files swapped: config.json still says what was trained
    shutil.copy(tmp_path / "other" / "model.safetensors", finished / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"holds a {kind} \(latent {latent}.*but a vae"):
        load_run(finished)


# --------------------------------------------------------------------------------------------
# 3. Numerical faults
# --------------------------------------------------------------------------------------------
@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """One NaN pixel in batch 5 of epoch 2, i.e. global step 12 (0-based)."""
    real = vaelab.data.Batcher.epoch

    def epoch(self: vaelab.data.Batcher, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, (x, y) in enumerate(real(self, e)):
            if e == 1 and i == 4:
                x = x.clone()
                x[0, 0, 14, 14] = float("nan")
            yield x, y

    monkeypatch.setattr(vaelab.data.Batcher, "epoch", epoch)


@pytest.mark.filterwarnings("ignore:Error detected in")  # anomaly mode's forward traceback
@pytest.mark.parametrize("anomaly", [False, True], ids=["plain", "detect-anomaly"])
def test_injected_nan_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], poisoned: None,
    anomaly: bool, one_thread: None,
) -> None:
    run = tmp_path / "run"
    code, err = cli(train_args(data, run, *(["--detect-anomaly"] if anomaly else [])), capsys)
    assert code == 2
    if anomaly:  # autograd prints the forward traceback as a warning; our message is last
        assert "returned nan values" in err[-1]
        err = err[-1:]
    assert len(err) == 1
    assert "the loss became NaN/Inf at epoch 2, step 12" in err[0]
    assert str(run / "checkpoints") in err[0]
    # the checkpoints are those from before the poisoned step, whole and finite
    assert [p.name for p in list_checkpoints(run)] == ["step-00000012", "step-00000009"]
    ckpt = read_checkpoint(newest(run), spec_of(run))
    model = build_model(ckpt.spec)
    from vaelab.checkpoint import load_weights

    load_weights(model, ckpt.weights, ckpt.path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert ckpt.state["step"] == 12 and ckpt.state["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 only
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    assert leftovers(run) == []


def test_detect_anomaly_is_accepted_on_a_healthy_run(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    args = train_args(data, tmp_path / "run", "--detect-anomaly")
    args[args.index("--epochs") + 1] = "1"
    assert cli(args, capsys) == (0, [])
    assert (tmp_path / "run" / "summary.json").exists()


# --------------------------------------------------------------------------------------------
# 5. A full disk
# --------------------------------------------------------------------------------------------
class _FullFile:
    """A file on a full disk: ``write`` stores half its bytes, then raises ENOSPC."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() does: no filename

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class DiskFull:
    """Make the ``nth`` atomic write of a file called ``name`` hit a full disk (in vaelab.io)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, nth: int = 1) -> None:
        self.name, self.nth, self.seen = name, nth, 0
        paths: dict[int, str] = {}

        def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
            fd, path = tempfile.mkstemp(*args, **kwargs)
            paths[fd] = path
            return fd, path

        def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
            f = os.fdopen(fd, *args, **kwargs)
            if Path(paths.pop(fd, "")).name.startswith(f".{self.name}."):
                self.seen += 1
                if self.seen == self.nth:
                    return _FullFile(f)
            return f

        fake_os = types.ModuleType("os")
        fake_os.__dict__.update(vars(os))
        fake_os.fdopen = fdopen  # type: ignore[attr-defined]
        monkeypatch.setattr(vaelab.io, "os", fake_os)
        monkeypatch.setattr(vaelab.io, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))

    @property
    def fired(self) -> bool:
        return self.seen >= self.nth


def test_disk_full_keeps_an_existing_file_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"old": True})
    before = target.read_bytes()
    disk = DiskFull(monkeypatch, "summary.json")
    with pytest.raises(OSError) as e:
        atomic_write_text(target, "x" * 100_000)
    assert disk.fired and e.value.errno == errno.ENOSPC
    assert str(target) in str(e.value) and "no space left on device" in str(e.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_ones(
    data: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, one_thread: None,
) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        disk = DiskFull(m, "state.pt", nth=4)  # checkpoints at steps 3, 6, 8, then 9 fails
        code, err = cli(train_args(data, run), capsys)
    assert disk.fired and code == 2 and len(err) == 1
    assert "no space left on device" in err[0]
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step-00000009'}" in err[0]
    assert "the previous checkpoints are kept" in err[0]
    assert [p.name for p in list_checkpoints(run)] == ["step-00000008", "step-00000006"]
    for ckpt in list_checkpoints(run):
        read_checkpoint(ckpt, spec_of(run))
    assert leftovers(run) == []
    # once there is room again, --resume ends exactly where an uninterrupted run does
    assert cli(train_args(data, run, "--resume"), capsys) == (0, [])
    assert_same_run(run, reference)


def test_disk_full_while_writing_metrics_keeps_the_previous_rows(
    data: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, one_thread: None,
) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        disk = DiskFull(m, "metrics.jsonl", nth=2)  # epoch 2's rewrite fails
        code, err = cli(train_args(data, run), capsys)
    assert disk.fired and code == 2 and len(err) == 1
    assert f"cannot write {run / 'metrics.jsonl'}: no space left on device" in err[0]
    assert metrics_rows(run) == metrics_rows(reference)[:1]  # epoch 1's row, whole
    assert leftovers(run) == []
    assert cli(train_args(data, run, "--resume"), capsys) == (0, [])
    assert_same_run(run, reference)


def test_disk_full_while_writing_the_summary_keeps_the_run_resumable(
    data: Path, reference: Path, finished: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, one_thread: None,
) -> None:
    before = (finished / "summary.json").read_bytes()
    with monkeypatch.context() as m:
        disk = DiskFull(m, "summary.json")
        code, err = cli(["train", "--resume", "--out", str(finished), "--quiet"], capsys)
    assert disk.fired and code == 2 and len(err) == 1
    assert f"cannot write {finished / 'summary.json'}: no space left on device" in err[0]
    assert (finished / "summary.json").read_bytes() == before
    assert leftovers(finished) == []
    assert cli(["train", "--resume", "--out", str(finished), "--quiet"], capsys) == (0, [])
    assert_same_run(finished, reference)


# --------------------------------------------------------------------------------------------
# Small things a user meets (issue 17, part 4)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                         (0o077, 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, file_mode: int,
                                        dir_mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        model = build_model(ModelSpec(channels=(4, 8), enc_hidden=8, dec_hidden=8))
        ckpt = save_checkpoint(tmp_path / "run", model, model.spec, {"step": 1}, step=1, epoch=0)
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == file_mode
    assert ckpt.stat().st_mode & 0o777 == dir_mode
    assert (ckpt / "model.safetensors").stat().st_mode & 0o777 == file_mode


def test_the_printed_resume_command_survives_copy_and_paste() -> None:
    import shlex

    from vaelab.training import resume_command

    out = Path("/tmp/my runs/it's here")
    assert shlex.split(resume_command(out))[-1] == str(out)


def test_a_nan_before_any_checkpoint_says_nothing_was_kept(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, one_thread: None,
) -> None:
    real = vaelab.data.Batcher.epoch

    def epoch(self: vaelab.data.Batcher, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in real(self, e):
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            yield x, y

    monkeypatch.setattr(vaelab.data.Batcher, "epoch", epoch)
    code, err = cli(train_args(data, tmp_path / "run"), capsys)
    assert code == 2 and len(err) == 1
    assert "no checkpoint had been saved" in err[0] and "kept in" not in err[0]


def test_a_run_that_saved_nothing_is_started_over_by_a_plain_rerun_or_resume(
    data: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, one_thread: None,
) -> None:
    """A NaN at the first step keeps nothing (no checkpoint, no weights, no metrics row): the
    same command again, without --force, starts the run over and ends as the uninterrupted run
    does; so does --resume, saying it starts from the first step."""
    real = vaelab.data.Batcher.epoch

    def poisoned(self: vaelab.data.Batcher, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in real(self, e):
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
            yield x, y

    for how in ("rerun", "resume"):
        run = tmp_path / how
        with monkeypatch.context() as m:
            m.setattr(vaelab.data.Batcher, "epoch", poisoned)
            code, err = cli(train_args(data, run), capsys)
        assert code == 2 and "no checkpoint had been saved" in err[0]
        assert (run / "config.json").exists() and not list_checkpoints(run)
        if how == "rerun":
            capsys.readouterr()
            args = train_args(data, run)
            args.remove("--quiet")
            assert main(args) == 0
            # rich wraps the line at a space or inside the path, as the path's length falls:
            # compared without any whitespace
            out = "".join(capsys.readouterr().out.split())
            assert "".join(f"{run} holds a run that saved nothing".split()) in out
            assert "startingitover" in out
        else:
            log: list[str] = []
            from vaelab.training import train

            train(None, run, resume=True, progress=False, log=log.append)
            assert log[0] == f"{run} holds no checkpoint: the run starts from its first step"
        assert_same_run(run, reference)
        assert leftovers(run) == []


def test_a_run_that_saved_something_still_needs_resume_or_force(
    finished: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The start-over above is only for a run that kept nothing: one checkpoint is enough to
    refuse a plain re-run."""
    for name in ("model.safetensors", "model.json", "summary.json"):
        (finished / name).unlink()
    shutil.rmtree(newest(finished))
    (finished / "metrics.jsonl").write_text("")
    code, err = cli(train_args(data, finished), capsys)
    assert code == 2 and "already holds a run: use --resume" in err[0]
    # nor is a folder whose config.json is not a vaelab run's
    other = finished.parent / "other"
    other.mkdir()
    (other / "config.json").write_text('{"theme": "dark"}')
    code, err = cli(train_args(data, other), capsys)
    assert code == 2 and "already holds a run: use --resume" in err[0]
    assert (other / "config.json").read_text() == '{"theme": "dark"}'


# --------------------------------------------------------------------------------------------
# Strict resume (issue 17, part 2)
# --------------------------------------------------------------------------------------------
def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_resume_refuses_options_that_differ_from_the_run_listing_them_all(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: a finished run resumed with --epochs 20 --lr 0.5 --model cvae
    --latent-dim 7 exited 0 and ignored all four. --epochs is safe for this run (constant
    learning rate, linear warm-up); the other three are refused, in one line, each with the
    run's value, and nothing in the folder changes."""
    before = tree(finished)
    code, err = cli(["train", "--resume", "--out", str(finished), "--epochs", "20", "--lr",
                     "0.5", "--model", "cvae", "--latent-dim", "7", "--preset", "study"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"vaelab: error: --resume: these options differ from {finished}'s "
                             "config: --model cvae (run has vae), --latent-dim 7 (run has 2), "
                             "--lr 0.5 (run has 0.001), --preset study (run has smoke). ")
    assert "--epochs" not in err[0].split(". ")[0]
    assert tree(finished) == before


def test_resume_accepts_repeated_values_and_the_safe_options_and_still_equals_uninterrupted(
    finished: Path, reference: Path, data: Path, capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    """An unfinished run (killed in epoch 3: its newest checkpoint and final files gone)
    resumed with the full original command, plus the safe options --device cpu,
    --no-cuda-graphs and --checkpoint-every 2: accepted, and the weights are the uninterrupted
    run's. config.json records what the resume changed."""
    shutil.rmtree(newest(finished))
    for name in ("model.safetensors", "model.json", "summary.json"):
        (finished / name).unlink()
    args = train_args(data, finished, "--resume", "--device", "cpu", "--no-cuda-graphs")
    args[args.index("--checkpoint-every") + 1] = "2"
    assert cli(args, capsys) == (0, [])
    assert_same_run(finished, reference)
    config = json.loads((finished / "config.json").read_text())
    assert config["config"]["checkpoint_every"] == 2 and config["config"]["device"] == "cpu"
    assert config["resumes"][-1]["changed"]["checkpoint_every"] == {"from": 3, "to": 2}
    assert "lr" not in config["resumes"][-1]["changed"]


def test_a_finished_run_trained_on_to_more_epochs_equals_an_uninterrupted_longer_run(
    data: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    one_thread: None,
) -> None:
    """--resume --epochs 5 on the finished 3-epoch run trains epochs 4 and 5; weights, metrics
    and summary are bit for bit those of a run trained for 5 epochs from the start (the smoke
    preset's constant learning rate and linear warm-up do not depend on the run's length).
    config.json now says 5 epochs, so a later plain --resume continues to 5."""
    longer = tmp_path / "five"
    args = train_args(data, longer)
    args[args.index("--epochs") + 1] = "5"
    assert cli(args, capsys) == (0, [])
    from vaelab.training import Trainer

    # while the extension runs, the run is unfinished: the 3-epoch final files are gone
    trainer = Trainer(None, finished, resume=True, progress=False, changes={"epochs": 5})
    assert not (finished / "model.json").exists() and not (finished / "summary.json").exists()
    assert json.loads((finished / "config.json").read_text())["config"]["epochs"] == 5
    trainer.close()
    assert cli(["train", "--resume", "--out", str(finished), "--quiet"], capsys) == (0, [])
    assert_same_run(finished, longer)
    assert len(metrics_rows(finished)) == 5


@pytest.mark.parametrize("field, value, why", [
    ("lr_schedule", "cosine", "its cosine learning rate decays over all the run's epochs"),
    ("beta_schedule", "cyclical", "its cyclical beta spreads its cycles over all the run's"),
])
def test_more_epochs_are_refused_where_the_schedule_depends_on_the_run_length(
    finished: Path, capsys: pytest.CaptureFixture[str], field: str, value: str, why: str
) -> None:
    """A cosine learning rate or a cyclical beta is spread over the whole run: a longer run
    would have trained differently from its first step, so --epochs is refused for it."""
    config = json.loads((finished / "config.json").read_text())
    config["config"][field] = value
    (finished / "config.json").write_text(json.dumps(config))
    before = tree(finished)
    code, err = cli(["train", "--resume", "--out", str(finished), "--epochs", "5"], capsys)
    assert code == 2 and len(err) == 1
    assert f"--epochs 5 (run has 3: {why}" in err[0]
    assert tree(finished) == before
    if field == "lr_schedule":  # (the edited beta schedule would not match the checkpoint's)
        # the same epochs are no change, and accepted
        assert cli(["train", "--resume", "--out", str(finished), "--epochs", "3", "--quiet"],
                   capsys) == (0, [])


def test_fewer_epochs_than_already_trained_are_refused(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = tree(finished)
    code, err = cli(["train", "--resume", "--out", str(finished), "--epochs", "2"], capsys)
    assert code == 2 and err == [f"vaelab: error: --epochs 2: {finished} has already trained "
                                 "3 epochs; a resume cannot take steps back"]
    # from step 21 (5 steps into epoch 3), 2 epochs are behind it too
    shutil.rmtree(newest(finished))
    code, err = cli(["train", "--resume", "--out", str(finished), "--epochs", "2"], capsys)
    assert code == 2 and "has already trained 2 epochs and 5 steps of the next" in err[0]
    assert tree(finished) == {k: v for k, v in before.items()
                              if not k.startswith("checkpoints/step-00000024")}


def test_resume_and_force_together_are_refused(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(["train", "--resume", "--force", "--out", str(finished)], capsys)
    assert code == 2 and "--resume continues the run in --out and --force replaces it" in err[0]


def test_the_api_refuses_a_resume_whose_config_differs_from_the_run(finished: Path) -> None:
    """``train(config, out, resume=True)`` used to ignore ``config``; a field that differs
    from the saved config is now refused like the CLI's option, and the saved config itself is
    accepted."""
    from dataclasses import replace

    from vaelab.checkpoint import read_config
    from vaelab.errors import ConfigError
    from vaelab.training import Trainer

    _, saved = read_config(finished)
    with pytest.raises(ConfigError, match=r"--lr 0\.5 \(run has 0\.001\), --seed 3 \(run has 0\)"):
        Trainer(replace(saved, lr=0.5, seed=3), finished, resume=True, progress=False)
    Trainer(saved, finished, resume=True, progress=False).close()
    Trainer(replace(saved, device="cpu"), finished, resume=True, progress=False).close()
