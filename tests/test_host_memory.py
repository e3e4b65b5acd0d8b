"""selfaug_jax.host_memory: glibc's malloc_trim gives freed heap pages back to the OS."""

import ctypes
import ctypes.util
import sys
from pathlib import Path

import pytest

from selfaug_jax.host_memory import release_freed_host_memory


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (musl has none)
    except (OSError, AttributeError):
        return None
    return libc


def test_release_returns_freed_heap_pages_to_the_os():
    libc = _glibc()
    if libc is None:
        pytest.skip("not glibc: release_freed_host_memory is a no-op here")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, n = 64 * 1024, 2048  # 128 MiB of blocks below glibc's mmap threshold: they come from the heap
    ptrs = []
    for _ in range(n):
        p = libc.malloc(block)
        ctypes.memset(p, 1, block)  # touch every page so it is resident
        ptrs.append(p)
    for p in ptrs[:-1]:  # the last block stays: the freed ones sit below the heap's top, which free() never trims
        libc.free(p)
    before = _rss_kib()
    assert release_freed_host_memory() is True
    after = _rss_kib()
    libc.free(ptrs[-1])
    assert before - after > 100 * 1024, (before, after)  # >= 100 of the 128 MiB freed went back to the OS


def test_release_is_a_noop_without_glibc(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert release_freed_host_memory() is False
