"""The public API at ``vaelab.``: every name in ``__all__`` resolves to the object its module
defines, ``import vaelab`` alone loads no torch, and the README's API example runs as
written on real MNIST."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import vaelab
from vaelab.data import MNIST_FILES, data_root

README = Path(__file__).resolve().parents[1] / "README.md"


def _have_mnist() -> bool:
    folder = data_root() / "mnist"
    return all(os.path.exists(folder / name) for name in MNIST_FILES.values())


if os.environ.get("CI") == "true" and not _have_mnist():
    raise RuntimeError("CI=true but real MNIST is not in data_root()/mnist: .ci/run fetches it")


def test_every_public_name_is_its_modules_own() -> None:
    assert sorted(vaelab.__all__) == sorted({*vaelab._WHERE, "__version__"})
    for name, module in vaelab._WHERE.items():
        assert getattr(vaelab, name) is getattr(import_module(module), name), name
    assert vaelab.train.__module__ == "vaelab.training.loop"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vaelab.nope  # noqa: B018


def test_import_vaelab_alone_loads_no_torch() -> None:
    code = "import sys, vaelab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def readme_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## The Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


@pytest.mark.mnist
@pytest.mark.skipif(not _have_mnist(), reason="real MNIST not in data_root()/mnist")
def test_the_readmes_api_example_runs_as_written(tmp_path: Path) -> None:
    code = readme_api_example()
    assert code.startswith("import vaelab\n")
    here = str(Path(vaelab.__file__).resolve().parents[1])  # this vaelab, from any folder
    path = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "neg_elbo" in done.stdout and "log_px" in done.stdout
    assert (tmp_path / "runs" / "vae-quick" / "model.safetensors").is_file()
