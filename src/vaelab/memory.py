"""glibc's allocator told to keep what a training frees, for the next step to reuse.

A training step on the CPU frees and allocates the same few dozen blocks of megabytes each
step (activations, the bf16 copies of the weights, their gradients). glibc's ``malloc`` serves
a block that large by ``mmap`` and returns it to the kernel when freed, so the next step
faults every page of it in again (``benchmarks/malloc_keep.py`` measures what that costs the
study's pair). ``keep_freed_memory`` raises the size that goes to
``mmap`` and the free memory the heap keeps (``mallopt``). It is a setting of the whole
process, so only an entry point that owns its process makes it: the ``vaelab`` command and a
sweep's Ray worker; a library call never does. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks up to 256 MiB come from the heap
TRIM_THRESHOLD = 1 << 30  # the heap keeps up to 1 GiB free at its top


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep freed blocks of up to ``MMAP_THRESHOLD`` bytes for reuse
    instead of handing them back to the kernel (once per process). True where it was set;
    False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
