"""Keep freed CPU memory in the process for reuse (Linux with glibc).

PyTorch's CPU tensors come from ``malloc``. With glibc's defaults, a large freed block is handed
back to the operating system (``munmap``, or trimming the top of the heap), and the next tensor
of that size is faulted in again page by page. A training step frees and reallocates the same
sizes every time, and an exact eigenvector refresh builds and frees a graph several times a
gradient's size, so its page faults fall mostly on Eigen-SAM's and X-SAM's refresh steps
(measured by ``benchmarks/bench_optimizers.py`` with both allocators, docs/cost.md).

:func:`keep_freed_memory` sets glibc's ``M_MMAP_THRESHOLD`` to its largest value (32 MiB, the
ceiling of glibc's own adaptive threshold) and turns ``M_TRIM_THRESHOLD`` off, so freed blocks
below 32 MiB stay in the heap, as CUDA's caching allocator keeps freed device memory. The
resident size then stays near the run's peak instead of shrinking between steps (the benchmark's
memory table gives both peaks). The ``eigensam`` command calls it at start.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
LARGEST_MMAP_THRESHOLD = 32 * 2**20  # glibc: at most HEAP_MAX_SIZE / 2 on 64-bit
NO_TRIM = -1  # mallopt(M_TRIM_THRESHOLD, -1) disables trimming
# Settings a user may have made through the environment; they are left as they are.
USER_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed blocks below 32 MiB for reuse (see the module
    docstring); return whether it was applied.

    Does nothing and returns False off Linux/glibc, or when the environment already sets
    malloc's thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
    ``MALLOC_TOP_PAD_``, ``GLIBC_TUNABLES``): the user's choice wins. Affects the whole process,
    from this call on.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    applied = libc.mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) == 1
    return applied and libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM) == 1
