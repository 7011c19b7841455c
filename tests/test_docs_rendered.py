"""The measured tables in README.md and BENCHMARKS.md are what their committed JSON renders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _renderer():
    spec = importlib.util.spec_from_file_location("render_docs",
                                                  ROOT / "benchmarks" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documents_equal_their_rendering() -> None:
    r = _renderer()
    for doc in r.DOCUMENTS:
        text = (ROOT / doc).read_text()
        assert r.render(text) == text, f"{doc} differs from its JSON: run render_docs.py"


def test_every_section_is_rendered_somewhere() -> None:
    r = _renderer()
    found = {m.group(2) for doc in r.DOCUMENTS
             for m in r.PATTERN.finditer((ROOT / doc).read_text())}
    assert found == set(r.SECTIONS)
