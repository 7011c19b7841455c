"""``--precision auto``: bf16 autocast where the CPU computes bf16 in hardware (AMX or
AVX512-BF16), fp32 elsewhere; the choice printed and saved in config.json, and kept by a resume
on any machine, so a resumed run ends as it would have uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import assert_same_run, one_thread
from synthetic import noisy_blobs, synthetic_dataset
from vaelab import train as train_module
from vaelab.bench import machine
from vaelab.config import resolve_config
from vaelab.train import Trainer, cpu_bf16_hardware, pick_precision, precision_reason

CPU = torch.device("cpu")


def small(**kw: object) -> object:
    return resolve_config("smoke", **{"epochs": 2, "limit": None, "val_size": 32, **kw})


def data() -> object:
    return synthetic_dataset(noisy_blobs, 96, 32, 32, seed=3)


@pytest.mark.parametrize("isa, chosen", [("AMX", "bf16"), ("AVX512-BF16", "bf16"), (None, "fp32")])
def test_auto_is_bf16_exactly_where_the_cpu_has_bf16_instructions(
        monkeypatch: pytest.MonkeyPatch, isa: str | None, chosen: str) -> None:
    monkeypatch.setattr(train_module, "cpu_bf16_hardware", lambda: isa)
    assert pick_precision("auto", CPU) == chosen
    assert (isa or "no bf16") in precision_reason("auto", CPU)
    for name in ("fp32", "bf16"):  # asked for by name: whatever the CPU
        assert pick_precision(name, CPU) == name
        assert precision_reason(name, CPU) == "asked for by name"


def test_the_detection_reads_torchs_own_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.cpu
    for amx, avx, want in [(True, True, "AMX"), (False, True, "AVX512-BF16"),
                           (False, False, None)]:
        monkeypatch.setattr(cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(cpu, "_is_avx512_bf16_supported", lambda v=avx: v, raising=False)
        assert cpu_bf16_hardware() == want
    assert machine()["cpu_bf16"] == "none"  # the bench's machine record names it


@pytest.mark.parametrize("isa", ["AVX512-BF16", None])
def test_the_choice_is_printed_and_saved_and_trains_in_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isa: str | None) -> None:
    monkeypatch.setattr(train_module, "cpu_bf16_hardware", lambda: isa)
    seen: list[str] = []
    calls: list[bool] = []
    real = torch.autocast

    def spy(*args: object, **kw: object) -> object:
        calls.append(bool(kw.get("enabled")))
        return real(*args, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    with one_thread():
        Trainer(small(device="cpu"), tmp_path / "run", progress=False, dataset=data(),
                log=seen.append).fit()
    want = "bf16" if isa else "fp32"
    raw = json.loads((tmp_path / "run" / "config.json").read_text())
    assert raw["config"]["precision"] == "auto"
    assert raw["resolved"]["precision"] == want
    assert raw["resolved"]["precision_reason"] == precision_reason("auto", CPU)
    assert any(line.startswith(f"precision: {want} (auto: this CPU has") for line in seen)
    assert calls and all(c == (want == "bf16") for c in calls)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == want


def test_a_resume_keeps_the_precision_the_run_began_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Begun on a CPU with bf16, resumed on one without: the resumed run stays bf16 and ends
    bitwise where the uninterrupted bf16 run ends."""
    monkeypatch.setattr(train_module, "cpu_bf16_hardware", lambda: "AMX")
    with one_thread():
        Trainer(small(device="cpu"), tmp_path / "ref", progress=False, dataset=data()).fit()
        cut = Trainer(small(device="cpu", epochs=1), tmp_path / "cut", progress=False,
                      dataset=data())
        cut.fit()
        monkeypatch.setattr(train_module, "cpu_bf16_hardware", lambda: None)
        seen: list[str] = []  # trained on to 2 epochs (the smoke schedules allow it)
        again = Trainer(None, tmp_path / "cut", resume=True, progress=False, dataset=data(),
                        log=seen.append, changes={"epochs": 2})
        assert again.precision == "bf16"
        again.fit()
    assert "precision: bf16 (kept from the run's start)" in seen
    assert_same_run(tmp_path / "cut", tmp_path / "ref")


def test_a_run_from_before_the_record_resumes_in_fp32_on_the_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders written before config.json had ``resolved`` trained ``auto`` as fp32 on every
    CPU: a resume there keeps fp32 even on a CPU with bf16."""
    monkeypatch.setattr(train_module, "cpu_bf16_hardware", lambda: None)
    with one_thread():
        Trainer(small(device="cpu", epochs=1), tmp_path / "old", progress=False,
                dataset=data()).fit()
        raw = json.loads((tmp_path / "old" / "config.json").read_text())
        del raw["resolved"]
        (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
        monkeypatch.setattr(train_module, "cpu_bf16_hardware", lambda: "AMX")
        again = Trainer(None, tmp_path / "old", resume=True, progress=False, dataset=data(),
                        changes={"epochs": 2})
        assert again.precision == "fp32"
        again.close()
