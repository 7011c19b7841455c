"""Helpers that several test files share: one torch thread, in-process runs of the CLI, and the
comparison of a run with an uninterrupted reference."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vaelab.cli import main

TIMING = ("seconds", "images_per_s")  # metrics fields that differ between equal runs


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op torch thread (bitwise reproducible, and fast on a shared machine), then
    whatever it was before."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_in_process(args: list[str]) -> None:
    """``vaelab ARGS`` in this process on one thread; it must exit 0."""
    with one_thread():
        assert main(args) == 0


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run ``vaelab ARGS`` in-process: (exit code, stderr lines)."""
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    return code, capsys.readouterr().err.splitlines()


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows without their timing fields."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise the same final weights, and the same metrics rows, as ``reference``."""
    w, w_ref = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert w.keys() == w_ref.keys()
    for k in w_ref:
        assert torch.equal(w[k], w_ref[k]), f"tensor {k} differs from the uninterrupted run"
    assert metrics_rows(run) == metrics_rows(reference)
