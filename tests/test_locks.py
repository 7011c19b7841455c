"""One writer per run folder (vaelab.locks): a second writer is refused with one line naming
the holder, a dead holder's lock is taken over, and a refused start leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synthetic import noisy_blobs, write_synthetic
from vaelab.cli import main
from vaelab.config import resolve_config
from vaelab.locks import HOLDER_FILE, LOCK_FILE, FolderInUse, FolderLock
from vaelab.training import Trainer

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
HOLD = ("import sys, time; from vaelab.locks import FolderLock; "
        "lock = FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("idx"), noisy_blobs, 256, 32, seed=0)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--preset", "smoke", "--dataset", f"idx:{data}",
            "--val-size", "32", "--epochs", "1", "--quiet", *extra]


def holder(folder: Path) -> subprocess.Popen[str]:
    """A real second process that takes the folder's lock and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_holder_named(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    proc = holder(out)
    try:
        capsys.readouterr()
        for extra in ((), ("--force",), ("--resume",)):
            assert main(train_args(data, out, *extra)) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1
            assert f"in use by pid {proc.pid} on {socket.gethostname()}" in err[0]
        assert {p.name for p in out.iterdir()} <= {LOCK_FILE, HOLDER_FILE}  # nothing written
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_s_lock_is_taken_over(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / HOLDER_FILE).exists()  # the dead holder's note is still there
    assert main(train_args(data, out)) == 0  # and its lock is not: the run goes ahead
    assert (out / "model.safetensors").exists() and not (out / HOLDER_FILE).exists()


def test_two_writers_in_one_process_are_refused_too(data: Path, tmp_path: Path) -> None:
    cfg = resolve_config("smoke", dataset=f"idx:{data}", val_size=32, epochs=1)
    first = Trainer(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FolderInUse, match=f"in use by pid {os.getpid()}"):
        Trainer(cfg, tmp_path / "run", progress=False, force=True)
    first.fit()  # the first writer is unharmed, and lets go when it ends
    again = Trainer(cfg, tmp_path / "run", progress=False, resume=True)
    again.close()


def test_a_refused_start_leaves_no_folder_behind(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    assert main(train_args(data, out, "--dataset", f"idx:{tmp_path / 'missing'}")) == 2
    assert not out.exists()
    lock = FolderLock(tmp_path / "fresh").acquire()
    lock.release()
    assert not (tmp_path / "fresh").exists()


def test_a_lock_on_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(Exception, match="not a folder"):
        FolderLock(f).acquire()


def test_a_folder_is_free_again_after_its_writer_ends(tmp_path: Path) -> None:
    with FolderLock(tmp_path / "a") as lock:
        assert lock.held
        (tmp_path / "a" / "work.txt").write_text("kept")
        lock.keep()
    t0 = time.monotonic()
    with FolderLock(tmp_path / "a"):
        pass
    assert time.monotonic() - t0 < 1.0 and (tmp_path / "a" / "work.txt").exists()


def test_a_second_reproduce_and_classifier_into_one_folder_are_refused(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    for folder, args in ((tmp_path / "report", ["reproduce", "--preset", "smoke", "--dataset",
                                                 f"idx:{data}", "--out"]),
                         (tmp_path / "clf", ["classifier", "train", "--dataset", f"idx:{data}",
                                             "--epochs", "1", "--out"])):
        proc = holder(folder)
        try:
            capsys.readouterr()
            assert main([*args, str(folder)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"in use by pid {proc.pid}" in err[0], err
            assert {p.name for p in folder.iterdir()} <= {LOCK_FILE, HOLDER_FILE}
        finally:
            proc.kill()
            proc.wait()


def test_a_folder_whose_holder_file_is_being_written_counts_as_empty(tmp_path: Path) -> None:
    """Another process may see the holder file's atomic-write temp for an instant (torchrun's
    second rank did, and refused a new folder as "holding other files"): it is the lock's."""
    from vaelab.locks import is_lock_file
    from vaelab.training import check_run_dir

    out = tmp_path / "run"
    out.mkdir()
    for name in (LOCK_FILE, HOLDER_FILE, f".{HOLDER_FILE}.k2j4x_a.tmp"):
        (out / name).write_text("")
        assert is_lock_file(out / name)
    assert check_run_dir(out, force=False) is False
    for name in (f"{HOLDER_FILE}.x.tmp", ".config.json.x.tmp", f".{HOLDER_FILE}.x"):
        assert not is_lock_file(out / name)
    (out / ".config.json.k2j4x_a.tmp").write_text("")
    with pytest.raises(Exception, match="already holds other files"):
        check_run_dir(out, force=False)
