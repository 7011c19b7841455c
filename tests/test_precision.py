"""``--precision auto``: bf16 autocast where the CPU has bf16 instructions (AMX or AVX512-BF16)
and trains the run's network faster in it, as measured there (``vaelab.precision``); fp32
elsewhere. The choice is printed and saved in config.json, and kept by a resume on any machine,
so a resumed run ends as it would have uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import assert_same_run, one_thread
from synthetic import noisy_blobs, synthetic_dataset
from vaelab import precision as precision_module
from vaelab.bench import machine
from vaelab.config import resolve_config
from vaelab.precision import MIN_GAIN, MIN_MFLOP, bf16_speedup, forward_mflops
from vaelab.training import Trainer, cpu_bf16_hardware, pick_precision, precision_reason
from vaelab.training import hardware as train_module

CPU = torch.device("cpu")


def small(**kw: object) -> object:
    return resolve_config("smoke", **{"epochs": 2, "limit": None, "val_size": 32, **kw})


def data() -> object:
    return synthetic_dataset(noisy_blobs, 96, 32, 32, seed=3)


def bf16_cpu(monkeypatch: pytest.MonkeyPatch, isa: str | None, gain: float = 2.0,
             any_size: bool = True) -> list[object]:
    """A CPU with bf16 instructions ``isa`` on which bf16 trains ``gain`` times as fast as
    fp32; ``any_size``: the smoke network counts as large enough to time. Returns the list
    of networks the stand-in probe was asked to time."""
    timed: list[object] = []
    monkeypatch.setattr(train_module, "cpu_bf16_hardware", lambda: isa)
    monkeypatch.setattr(train_module, "bf16_speedup",
                        lambda spec, batch: timed.append(spec) or gain)
    if any_size:
        monkeypatch.setattr(train_module, "MIN_MFLOP", 0.0)
    return timed


@pytest.mark.parametrize("isa, gain, chosen", [
    ("AMX", 1.8, "bf16"), ("AVX512-BF16", 1.6, "bf16"), ("AVX512-BF16", 0.8, "fp32"),
    ("AVX512-BF16", MIN_GAIN - 0.01, "fp32"), (None, 2.0, "fp32")])
def test_auto_is_bf16_where_the_cpu_has_bf16_instructions_and_trains_faster_in_it(
        monkeypatch: pytest.MonkeyPatch, isa: str | None, gain: float, chosen: str) -> None:
    timed = bf16_cpu(monkeypatch, isa, gain, any_size=False)
    assert pick_precision("auto", CPU) == chosen  # the default network: large enough to time
    reason = precision_reason("auto", CPU)
    assert (isa or "no bf16") in reason
    if isa:
        assert f"{gain:.2f}x as fast as fp32" in reason
    assert len(timed) == (2 if isa else 0)  # no bf16 instructions: nothing to time
    for name in ("fp32", "bf16"):  # asked for by name: whatever the CPU
        assert pick_precision(name, CPU) == name
        assert precision_reason(name, CPU) == "asked for by name"


def test_a_network_too_small_to_gain_stays_fp32_untimed(monkeypatch: pytest.MonkeyPatch) -> None:
    timed = bf16_cpu(monkeypatch, "AVX512-BF16", 5.0, any_size=False)
    spec = small().model_spec()
    assert forward_mflops(spec) < MIN_MFLOP
    assert pick_precision("auto", CPU, spec) == "fp32"
    assert "too small" in precision_reason("auto", CPU, spec)
    assert timed == []


def test_the_flop_count_is_the_mlps_matrix_products() -> None:
    """784-256-128-(2 x 5) and back: 2 FLOPs per multiply-add of each linear layer."""
    spec = resolve_config("study", arch="mlp", latent_dim=5).model_spec()
    widths = [(784, 256), (256, 128), (128, 10), (5, 128), (128, 256), (256, 784)]
    assert forward_mflops(spec) == pytest.approx(sum(2 * a * b for a, b in widths) / 1e6)


@pytest.mark.parametrize("slow, below_one", [(True, True), (False, False)])
def test_the_probe_is_fp32_time_over_bf16_time(
        monkeypatch: pytest.MonkeyPatch, slow: bool, below_one: bool) -> None:
    """bf16 steps made 30 ms slower (``slow``) or fp32 ones: the ratio falls on that side of
    1; the process's random state is untouched, and a second ask is not timed again."""
    import time as time_module

    real = torch.autocast

    class Slowed:
        def __init__(self, *args: object, **kw: object) -> None:
            self.inner = real(*args, **kw)
            self.enabled = bool(kw.get("enabled"))

        def __enter__(self) -> object:
            if self.enabled == slow:
                time_module.sleep(0.03)
            return self.inner.__enter__()

        def __exit__(self, *exc: object) -> object:
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(precision_module.torch, "autocast", Slowed)
    monkeypatch.setattr(precision_module, "_measured", {})
    spec = small().model_spec()
    before = torch.get_rng_state()
    with one_thread():
        ratio = bf16_speedup(spec, 16)
        assert torch.equal(torch.get_rng_state(), before)
        assert (ratio < 1) == below_one and ratio > 0
        monkeypatch.setattr(precision_module, "_measure", lambda *a: pytest.fail("timed again"))
        assert bf16_speedup(spec, 16) == ratio


def test_the_machine_record_names_the_cpus_vendor_family_and_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A virtual machine's model name can be as generic as "Intel(R) Xeon(R) Processor": the
    bench's record adds the first processor's vendor, family and model."""
    from vaelab import bench

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
                    "model\t\t: 207\nmodel name\t: Intel(R) Xeon(R) Processor\n\n"
                    "processor\t: 1\nmodel\t\t: 1\n")
    monkeypatch.setattr(bench, "CPUINFO", info)
    m = machine()
    assert (m["cpu"], m["cpu_id"]) == ("Intel(R) Xeon(R) Processor",
                                       "GenuineIntel family 6 model 207")
    monkeypatch.setattr(bench, "CPUINFO", tmp_path / "absent")
    assert "cpu_id" not in machine()


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
    timed = bf16_cpu(monkeypatch, isa)
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
    spec = small().model_spec()
    assert raw["resolved"]["precision_reason"] == precision_reason("auto", CPU, spec, 64)
    assert timed[:1] == ([spec] if isa else [])  # the run's own network
    assert any(line.startswith(f"precision: {want} (auto: this CPU has") for line in seen)
    assert calls and all(c == (want == "bf16") for c in calls)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == want


def test_a_resume_keeps_the_precision_the_run_began_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Begun on a CPU with bf16, resumed on one without: the resumed run stays bf16 and ends
    bitwise where the uninterrupted bf16 run ends."""
    bf16_cpu(monkeypatch, "AMX")
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
