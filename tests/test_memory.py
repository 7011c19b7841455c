"""glibc's allocator keeps what a training frees (``vaelab.memory``): set by the entry points that
own their process, never by a library call."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from vaelab import memory

# 40 times: blocks of 1 to 32 MiB allocated and written, each freed two allocations later (as
# a step frees its activations and weight copies); then the page faults it took
_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from vaelab import memory
    if sys.argv[1] == "keep":
        assert memory.keep_freed_memory()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        live = []
        for mib in (1, 2, 4, 8, 16, 32):
            live.append(torch.ones(mib << 18))  # every page written
            if len(live) > 2:
                live.pop(0)
        del live
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_kept_memory_is_reused_without_faulting_it_in_again() -> None:
    """Freed blocks go back to the kernel and fault in again at their next allocation (256
    pages per MiB, 63 MiB a round); with the blocks kept, hardly more than the first round
    faults."""
    plain, kept = _faults("plain"), _faults("keep")
    assert plain > 10 * 63 * 256
    assert kept < plain / 4


def test_the_command_keeps_freed_memory_and_the_library_does_not(monkeypatch, tmp_path) -> None:
    """``vaelab`` (its ``main``) sets it before running a command; importing vaelab and its
    training, sweep and evaluation modules does not."""
    code = ("import vaelab, vaelab.training, vaelab.evaluate, vaelab.sweep, vaelab.report\n"
            "from vaelab import memory\n"
            "print(memory.keep_freed_memory.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "0"
    calls: list[int] = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    from vaelab.cli import main

    assert main(["evaluate", str(tmp_path / "missing-run")]) == 2  # one line, after the setting
    assert calls == [1]
