"""Library calls leave the process as they found it: torch's global random state and its
TF32 / cuDNN switches (issue 19). The switches are set on CUDA only, but they are plain flags,
so their scoping is checked here on any machine."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from helpers import one_thread
from synthetic import noisy_blobs, write_synthetic
from vaelab import backends
from vaelab.backends import cuda_settings, fp32_on_model_device, keeps_process_rng
from vaelab.config import resolve_config
from vaelab.data import load_dataset
from vaelab.training import train


def flags() -> tuple[bool, bool, bool]:
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.benchmark)


@pytest.fixture
def tf32_on():
    """PyTorch's defaults for convolutions, TF32 for matrix products too, no kernel search;
    the process's own values back afterwards."""
    before = flags()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    torch.backends.cudnn.benchmark = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before[:2]
    torch.backends.cudnn.benchmark = before[2]


def test_a_cuda_scope_sets_ieee_fp32_and_puts_the_process_values_back(tf32_on: None) -> None:
    with cuda_settings("cuda", benchmark=True):
        assert flags() == (False, False, True)
        with cuda_settings(torch.device("cuda")):  # nested: the outer scope's values stay
            assert flags() == (False, False, True)
        assert flags() == (False, False, True)
    assert flags() == (True, True, False)
    with cuda_settings("cpu", benchmark=True):  # another device: nothing changes
        assert flags() == (True, True, False)
    with pytest.raises(ValueError), cuda_settings("cuda"):
        raise ValueError  # an error inside restores them too
    assert flags() == (True, True, False)
    assert backends._depth == 0


def test_scopes_entered_from_several_threads_restore_once_the_last_ends(tf32_on: None) -> None:
    inside, go = threading.Barrier(3), threading.Event()

    def run() -> None:
        with cuda_settings("cuda", benchmark=True):
            inside.wait()
            go.wait()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait()
    assert flags() == (False, False, True)
    go.set()
    for t in threads:
        t.join()
    assert flags() == (True, True, False)


def test_an_evaluation_scopes_the_switches_to_its_models_device(tf32_on: None) -> None:
    seen = []

    @fp32_on_model_device
    def evaluation(model: torch.nn.Module) -> None:
        seen.append(flags())

    evaluation(torch.nn.Linear(2, 2))  # a CPU model: nothing to change
    assert seen == [(True, True, False)] and flags() == (True, True, False)


def test_a_benchmark_that_seeds_the_global_generator_leaves_it_as_it_was() -> None:
    @keeps_process_rng
    def tutorial() -> torch.Tensor:
        torch.manual_seed(0)
        return torch.rand(3)

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = tutorial()
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(tutorial(), first)  # and what it drew is seeded all the same


def test_training_and_resuming_leave_the_global_generator_alone(tmp_path: Path) -> None:
    """A run seeds its weights in a fork of the generator and draws everything else from its
    own generators: the caller's random stream goes on as if the run had not happened, and
    the run's weights do not depend on it."""
    idx = write_synthetic(tmp_path / "idx", noisy_blobs, 256, 64, seed=0)
    data = load_dataset(f"idx:{idx}", val_size=32)
    cfg = resolve_config("smoke", dataset="idx:synthetic", val_size=32)
    weights = []
    with one_thread():
        for caller_seed in (1, 2):
            torch.manual_seed(caller_seed)
            before = torch.get_rng_state()
            result = train(cfg, tmp_path / f"run{caller_seed}", progress=False, dataset=data)
            assert torch.equal(torch.get_rng_state(), before)
            weights.append(result.model.state_dict())
            before = torch.get_rng_state()
            train(None, tmp_path / f"run{caller_seed}", resume=True, progress=False,
                  dataset=data, changes={"epochs": 2})
            assert torch.equal(torch.get_rng_state(), before)
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k
