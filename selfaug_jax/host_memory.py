"""Give the C heap's freed pages back to the operating system once the step function is compiled.

Why: compiling a train step on XLA:CPU (LLVM code generation, HLO passes) allocates and frees a few hundred MB of
small C-heap blocks. glibc's ``malloc`` keeps freed blocks that lie below the top of its heap mapped, so the
process' resident set stays that much larger for the whole run although nothing uses the memory. Measured on the
SmolLM2-135M ``selfaug`` step, 4 x 256, fp32 (2-core AMD EPYC, 2026-12-02; ``bench/README.md`` "Session 7"): the
RSS grew by 385 MB during the compile and ``malloc_trim(0)`` right after it returned 263 MB; side by side (fresh
processes, two rounds; ``bench/results/step_ab_session7_cpu.jsonl``) the steps' peak RSS fell by 345 MB (3.69 ->
3.35 GB) with no change in step time: XLA:CPU's per-step temporary buffer is one large allocation, which is
``mmap``-ed and unmapped around every step anyway.

:func:`release_freed_host_memory` calls glibc's ``malloc_trim(0)`` (it also releases free pages in the middle of the
heap, with ``madvise(MADV_DONTNEED)``; glibc >= 2.8). Where the C library is not glibc (macOS, musl) it does nothing
and says so. The trainer calls it once, after the first step is dispatched (that call compiles the step);
``bench/step.py`` and ``bench/torch_step.py`` call it before they start measuring the steps' peak RSS, so both
frameworks are measured the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def release_freed_host_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``).

    Returns:
        ``True`` if ``malloc_trim`` ran; ``False`` where it does not exist (not Linux / not glibc), in which case
        nothing was done.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        malloc_trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
