"""Hypothesis fuzzing of what a user, or a damaged disk, hands vaelab (issue 17, part 3).

Four surfaces, 2,000 examples each: the contents of a run's ``config.json`` and of its
``metrics.jsonl`` (any JSON value or shape, and valid files with one field changed, dropped or
added, and bytes that are not text), through the loaders that ``vaelab evaluate``, ``plot`` and
``train --resume`` use; and every numeric option of ``vaelab train``, ``evaluate`` and
``reproduce`` through ``vaelab.cli.main`` in-process, with the work after the checks replaced by
a stub (nothing is trained). Each example must end in a typed error (a ``VaelabError``, which the
CLI prints as one line with exit code 2) or in values the next step can use; a traceback is a
failure. The examples are derandomised, so a failure is the same on every machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vaelab.cli
import vaelab.training
from vaelab.checkpoint import ROW_REQUIRED, read_config, read_metrics
from vaelab.cli import main
from vaelab.config import SEED_MAX, TrainConfig, resolve_config
from vaelab.errors import VaelabError
from vaelab.objectives import make_beta_schedule
from vaelab.training import resumed_config

FUZZ = settings(max_examples=2000, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
NUMBERS = (st.integers() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 2**62,
                                                                          2**63, 2**64, 10**400])
           | st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)

BASE_CONFIG = resolve_config("smoke", dataset="idx:/nowhere").to_dict()
# values a field of config.json could plausibly be given by hand
FIELD_VALUES = JSON | st.sampled_from([
    "vae", "cvae", "linear", "cyclical", "cosine", "relu", "auto", "cpu", "bernoulli", "mnist",
    [8, 16], [8], [8, 16, 32], [0, 8], [8.0, 16.0], 10**9, 2**62, 10**11, -5, 0.5, 1e308])


@st.composite
def config_documents(draw: st.DrawFn) -> Any:
    """A config.json's content: anything at all, or a good one with fields changed."""
    if draw(st.booleans()):
        return draw(JSON | st.builds(lambda v: {"config": v}, JSON))
    config = dict(BASE_CONFIG)
    for name in draw(st.lists(st.sampled_from(sorted(config)), max_size=3)):
        if draw(st.integers(0, 4)) == 0:
            config.pop(name, None)
        else:
            config[name] = draw(FIELD_VALUES)
    if draw(st.integers(0, 9)) == 0:
        config[draw(TEXT)] = draw(JSON)
    return {"config": config, "model": draw(JSON)}


ROW = {"epoch": 1, "step": 8, "beta": 1.0, "lr": 0.001, "train_recon": 500.0, "train_kl": 2.0,
       "train_neg_elbo": 502.0, "train_loss": 502.0, "train_kl_per_dim": [1.0, 1.0],
       "test_recon": 490.0, "test_kl_per_dim": [0.5, 0.5], "seconds": 1.5, "images_per_s": 300}


@st.composite
def metrics_lines(draw: st.DrawFn) -> str:
    """One line of metrics.jsonl: a good row with fields changed, any JSON, or any text."""
    kind = draw(st.integers(0, 5))  # mostly good rows with a change: a file of several lines
    if kind == 0:                   # then still loads now and then
        return draw(TEXT)
    if kind == 1:
        return json.dumps(draw(JSON))
    row = dict(ROW)
    for name in draw(st.lists(st.sampled_from(sorted(row)), max_size=2)):
        if draw(st.booleans()):
            row.pop(name, None)
        else:
            row[name] = draw(JSON)
    return json.dumps(row)


def number_text() -> st.SearchStrategy[str]:
    """What a user could type where a number belongs."""
    return (st.integers(-2**70, 2**70).map(str) | st.integers().map(str)
            | st.floats(allow_nan=True, allow_infinity=True).map(repr)
            | st.sampled_from(["", "-", "+", "1e3", "0x10", "1_000", " 7", "\u0663", "inf",
                               "-inf", "nan", "-0", "9" * 5000, str(2**63 - 1), str(2**63),
                               str(2**64), str(4611686018427387904), "1000000000", "1e-320"])
            | TEXT)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
class Accepted(Exception):
    """Raised by the stubs: the input passed every check and the work would begin."""

    def __init__(self, value: Any) -> None:
        super().__init__("accepted")
        self.value = value


def run_cli(argv: list[str]) -> tuple[int | Accepted, list[str]]:
    """``vaelab ARGV`` in-process: (exit code or the stub's Accepted, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            result: int | Accepted = main(argv)
        except SystemExit as e:  # argparse
            result = int(e.code or 0)
        except Accepted as a:
            result = a
    return result, err.getvalue().splitlines()


def assert_one_line(code: int | Accepted, err: list[str]) -> None:
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("vaelab") and ": error: " in err[0], err
    assert len(err[0]) < 600, err[0]


def assert_typed(e: BaseException) -> None:
    assert isinstance(e, VaelabError), repr(e)
    assert "\n" not in str(e) and 0 < len(str(e)) < 600, str(e)


def assert_usable(cfg: TrainConfig) -> None:
    """What training does with a config before its first step, short of allocating it."""
    cfg.validate()
    torch.Generator().manual_seed(cfg.seed + 1 + 7919 * 7)  # the noise of rank 7 of 8
    torch.Generator().manual_seed(cfg.seed + min(cfg.epochs, 10**6))  # an epoch's shuffle
    schedule = make_beta_schedule(cfg.beta_schedule, steps_per_epoch=8,
                                  warmup_epochs=cfg.warmup_epochs, beta=cfg.beta,
                                  cycles=cfg.cycles, total_epochs=cfg.epochs)
    assert all(math.isfinite(schedule.value(t)) for t in (0, 7, 10**6))
    assert math.isfinite(cfg.lr) and cfg.lr > 0
    json.dumps(cfg.to_dict(), allow_nan=False)
    assert cfg.model_spec().parameter_count() >= 1


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for the examples' files: in memory where the OS has one (/dev/shm), since a
    write to this machine's disk costs a hundred times more and there are 10,000 examples."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="vaelab-fuzz-") as folder:
            yield Path(folder)
    else:
        yield tmp_path_factory.mktemp("fuzz")


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``train`` and the study's first step after its checks raise Accepted instead of working;
    on --resume, the stub first checks the options against the run as ``Trainer`` does."""

    def train(config: TrainConfig | None, out: Any, **kwargs: Any) -> None:
        if kwargs.get("resume"):
            config = resumed_config(Path(out), config, kwargs.get("changes"))[2]
        raise Accepted(config)

    def pick_device(name: str) -> None:
        raise Accepted(name)

    monkeypatch.setattr(vaelab.training, "train", train)
    monkeypatch.setattr(vaelab.training, "pick_device", pick_device)
    yield


@pytest.fixture(scope="module", autouse=True)
def one_parser() -> Iterator[None]:
    """``main`` parses with one parser built once: building it is 90% of a call's time, and
    parsing never changes it."""
    parser = vaelab.cli.build_parser()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(vaelab.cli, "build_parser", lambda: parser)
        yield


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------
@FUZZ
@given(doc=config_documents() | st.binary(max_size=40))
def test_fuzz_config_json(scratch: Path, doc: Any) -> None:
    """Any config.json: read_config (evaluate, plot, explore) gives a config every reader can
    use, or a CheckpointError naming the file; the resume check on top gives a trainable
    config or a typed error (the model's memory, say)."""
    run = scratch / "config-run"
    run.mkdir(exist_ok=True)
    path = run / "config.json"
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    try:
        raw, cfg = read_config(run)
    except Exception as e:  # noqa: BLE001 - the type is what is checked
        event("refused")
        assert_typed(e)
        assert str(path) in str(e)
        return
    assert isinstance(raw, dict) and isinstance(cfg, TrainConfig)
    for key in ("dataset", "val_size", "likelihood", "model", "limit"):  # dataset_for_run & co
        assert key in cfg.to_dict()
    try:
        _, _, resumed = resumed_config(run, None, {})
    except Exception as e:  # noqa: BLE001
        event("read, refused on resume")
        assert_typed(e)
        return
    event("accepted")
    assert_usable(resumed)


# --------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------
@FUZZ
@given(lines=st.lists(metrics_lines(), min_size=1, max_size=4) | st.binary(max_size=40))
def test_fuzz_metrics_jsonl(scratch: Path, lines: list[str] | bytes) -> None:
    """Any metrics.jsonl: read_metrics (load_run, hence evaluate and plot) gives rows the
    training curves can draw, or a CheckpointError naming the file and line."""
    run = scratch / "metrics-run"
    run.mkdir(exist_ok=True)
    path = run / "metrics.jsonl"
    path.write_bytes(lines if isinstance(lines, bytes) else "\n".join(lines).encode())
    try:
        rows = read_metrics(run)
    except Exception as e:  # noqa: BLE001
        event("refused")
        assert_typed(e)
        assert str(path) in str(e)
        return
    event(f"accepted, {min(len(rows), 2)}+ rows")
    for row in rows:
        assert isinstance(row, dict) and set(ROW_REQUIRED) <= set(row)
    # what plots.training_curves computes from them
    for key in ("epoch", "beta", "train_recon", "train_kl", "train_neg_elbo", "test_recon"):
        np.array([m.get(key, np.nan) for m in rows], dtype=float)


# --------------------------------------------------------------------------------------------
# Numeric options of the CLI
# --------------------------------------------------------------------------------------------
TRAIN_NUMBERS = ["--latent-dim", "--epochs", "--batch-size", "--lr", "--warmup-epochs",
                 "--beta", "--cycles", "--free-bits", "--seed", "--val-size", "--limit",
                 "--checkpoint-every", "--enc-hidden", "--dec-hidden", "--enc-mlp-layers",
                 "--enc-refine", "--dec-mlp-layers", "--dec-refine", "--dec-full-channels",
                 "--channels"]


@pytest.fixture(scope="module")
def saved_run(scratch: Path) -> Path:
    """A run folder whose config.json is the smoke preset's (nothing else: it is not trained)."""
    run = scratch / "saved-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": BASE_CONFIG}))
    return run


@FUZZ
@given(options=st.lists(st.tuples(st.sampled_from(TRAIN_NUMBERS), number_text(), number_text()),
                        min_size=1, max_size=3),
       resume=st.booleans())
def test_fuzz_train_numbers(scratch: Path, saved_run: Path, stubbed: None,
                            options: list[tuple[str, str, str]], resume: bool) -> None:
    """``vaelab train`` with any numbers: one line and exit 2, or a config that training can
    start from. With --resume the numbers are checked against the run's config."""
    argv = ["train", "--quiet"]
    argv += ["--resume", "--out", str(saved_run)] if resume else [
        "--out", str(scratch / "never"), "--preset", "smoke", "--dataset", "idx:/nowhere"]
    for option, value, second in options:
        argv += [option, value, *([second] if option == "--channels" else [])]
    code, err = run_cli(argv)
    event("accepted" if isinstance(code, Accepted) else "refused")
    if isinstance(code, Accepted):
        assert err == []
        assert_usable(code.value)
        return
    assert_one_line(code, err)
    assert not (scratch / "never").exists()


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@FUZZ
@given(seed=number_text(), samples=number_text(), tolerance=number_text(),
       which=st.sets(st.sampled_from(["--seed", "--samples", "--tolerance"]), min_size=1))
def test_fuzz_evaluate_numbers(scratch: Path, seed: str, samples: str, tolerance: str,
                               which: set[str]) -> None:
    """``vaelab evaluate`` with any numbers: one line and exit 2, and the line is the missing
    run's exactly when every number is in range (so no bad number gets past the checks)."""
    values = {"--seed": seed, "--samples": samples, "--tolerance": tolerance}
    missing = scratch / "no-such-run"
    argv = ["evaluate", str(missing)]
    for option in sorted(which):
        argv += [f"{option}={values[option]}"]
    code, err = run_cli(argv)
    assert_one_line(code, err)
    s, k, t = _int(seed), _int(samples), _float(tolerance)
    ok = (("--seed" not in which or (s is not None and 0 <= s <= SEED_MAX))
          and ("--samples" not in which or (k is not None and k >= 0))
          and ("--tolerance" not in which or (t is not None and math.isfinite(t) and t >= 0)))
    event("accepted" if ok else "refused")
    assert ("does not exist" in err[0]) == ok, err[0]


@FUZZ
@given(seeds=st.lists(number_text(), min_size=1, max_size=3), samples=number_text(),
       logpx=number_text(), tolerance=number_text(),
       which=st.sets(st.sampled_from(["--samples", "--logpx-images", "--tolerance"])))
def test_fuzz_reproduce_numbers(scratch: Path, stubbed: None, seeds: list[str], samples: str,
                                logpx: str, tolerance: str, which: set[str]) -> None:
    """``vaelab reproduce`` with any numbers: one line and exit 2, or every number in range
    when the study would begin; either way its --out is not left behind."""
    out = scratch / "study"
    values = {"--samples": samples, "--logpx-images": logpx, "--tolerance": tolerance}
    argv = ["reproduce", "--out", str(out), "--preset", "smoke", "--seeds", *seeds]
    for option in sorted(which):
        argv += [f"{option}={values[option]}"]
    code, err = run_cli(argv)
    event("accepted" if isinstance(code, Accepted) else "refused")
    assert not out.exists()
    if not isinstance(code, Accepted):
        assert_one_line(code, err)
        return
    assert err == []
    assert all(0 <= int(s) <= SEED_MAX for s in seeds)
    if "--samples" in which:
        assert int(samples) >= 0
    if "--logpx-images" in which:
        assert int(logpx) >= 0
    if "--tolerance" in which:
        assert math.isfinite(float(tolerance)) and float(tolerance) > 0
