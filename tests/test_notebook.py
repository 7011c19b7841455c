"""The walkthrough notebook runs from top to bottom on small synthetic data (quick mode).

Needs the optional packages nbformat, nbclient and ipykernel (skipped without them).
"""

from __future__ import annotations

import json
from pathlib import Path

import ipykernel  # noqa: F401 - the [test] extra: a missing one fails, never skips
import nbclient
import nbformat
import pytest

from synthetic import strokes, write_synthetic

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"


def test_notebook_is_valid_and_clean() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 5


@pytest.mark.slow
def test_notebook_runs_in_quick_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_synthetic(tmp_path / "data", strokes, 300, 100, seed=0)
    out = tmp_path / "runs"
    monkeypatch.setenv("VAELAB_NOTEBOOK_DATA", f"idx:{data}")
    monkeypatch.setenv("VAELAB_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("VAELAB_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel: no thread oversubscription
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "data" in o and "image/png" in o["data"]]
    assert len(images) >= 5  # samples, beta, curves, latent scatter, reconstructions, grid
    summary = json.loads((out / "vae" / "summary.json").read_text())
    assert summary["epochs"] == 1
