"""What ``bench/`` needs to know about the machine it runs on: peak FLOP/s (measured, cached per machine),
CPU model, memory high-water marks, load. Shared by ``bench/step.py``'s JAX and PyTorch sides.

Nothing here imports JAX or torch at module level: the PyTorch child process of ``bench/step.py --vs-torch`` must
not pay for (or count in its RSS) the other framework.

Peak FLOP/s cache
-----------------
The peak is the best of 5 runs of an ``n x n @ n x n`` matmul (default n = 4096) on the default device, operands in
the requested dtype and a float32 result (``preferred_element_type``: the form of every matmul of the model, which
accumulates in float32; XLA:CPU runs a bf16 x bf16 -> bf16 dot through float32 at about half the speed of the
bf16 x bf16 -> f32 one, bench/README.md "Session 13"), measured by JAX/XLA with whatever ``XLA_FLAGS`` the process
runs under. It is cached as JSON under
``$SELFAUG_JAX_CACHE/bench/`` (default ``~/.cache/selfaug_jax/bench/``), keyed by :func:`machine_key` (platform,
CPU model or device kind, logical CPU count) and dtype, so a record from one machine is never divided by another
machine's peak. The cache is never committed; every step record carries the peak it used (``peak_flops``), the
machine it was measured on (``peak_flops_machine``) and when (``peak_flops_date``, ``peak_flops_load_avg``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_flags() -> list[str]:
    """The CPU feature flags that matter for matmul speed here (AVX-512 family, AMX), from ``/proc/cpuinfo``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(re.findall(r"\b(avx512[a-z0-9_]*|amx[a-z0-9_]*|avx2|fma)\b", text))
    return sorted(flags)


def machine_key(platform_name: str, device_kind: str) -> str:
    """A file-name-safe key of what the peak depends on: CPU model and core count, or the accelerator kind."""
    if platform_name == "cpu":
        raw = f"cpu_{cpu_model()}_{os.cpu_count()}cpu"
    else:
        raw = f"{platform_name}_{device_kind}"
    return re.sub(r"[^A-Za-z0-9]+", "_", raw).strip("_").lower()


def peak_cache_dir() -> Path:
    """``$SELFAUG_JAX_CACHE/bench`` (default ``~/.cache/selfaug_jax/bench``): machine-local, never committed."""
    root = os.environ.get("SELFAUG_JAX_CACHE") or str(Path.home() / ".cache" / "selfaug_jax")
    return Path(root) / "bench"


def measure_peak_flops(n: int, dtype: str, repeats: int = 5) -> dict[str, Any]:
    """Best-of-``repeats`` FLOP/s of a jitted ``n x n @ n x n`` matmul in ``dtype`` with a float32 result on JAX's
    default device."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"peak_flops": 2 * n**3 / min(times), "n": n, "dtype": dtype, "result_dtype": "float32", "times_s": times}


def cached_peak_flops(platform_name: str, device_kind: str, dtype: str, *, n: int = 4096, remeasure: bool = False,
                      cache_dir: Path | None = None) -> dict[str, Any]:
    """This machine's peak FLOP/s for ``dtype``: from the cache, or measured now (and cached) if absent/asked."""
    key = machine_key(platform_name, device_kind)
    path = (cache_dir or peak_cache_dir()) / f"peak_flops_{key}_{dtype}.json"
    if path.exists() and not remeasure:
        rec = json.loads(path.read_text())
        # earlier caches measured a same-dtype result, or another matmul size: measured again
        if rec.get("result_dtype") == "float32" and rec.get("n") == n:
            rec["cached"] = True
            return rec
    import jax

    rec = measure_peak_flops(n, dtype)
    rec.update(machine=key, cpu_model=cpu_model(), cpu_count=os.cpu_count(), device_kind=device_kind,
               platform=platform_name, load_avg=load_avg(), jax_version=jax.__version__,
               xla_flags=os.environ.get("XLA_FLAGS", ""), host=platform.node(), date=utc_now(), path=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")
    rec["cached"] = False
    return rec


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux ``ru_maxrss`` is in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e6 if sys.platform == "darwin" else rss * 1024 / 1e6


def reset_peak_rss() -> bool:
    """Reset this process' peak RSS (``VmHWM``) by writing 5 to ``/proc/self/clear_refs`` (Linux >= 4.0).

    Returns whether it worked; without the reset ``VmHWM`` is still the whole process' peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def hwm_rss_mb() -> float | None:
    """``VmHWM`` (peak RSS since the last :func:`reset_peak_rss`) in MB, or ``None`` where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def host_fields() -> dict[str, Any]:
    """Fields every record carries about where and when it was measured."""
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_avg": load_avg(),
        "host": platform.node(),
        "date": utc_now(),
    }


def xla_memory_analysis(compiled: Any) -> dict[str, int]:
    """XLA's buffer assignment of a compiled executable (per device): temporaries, arguments, outputs, aliases."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- optional on some backends
        return {}
    if ma is None:
        return {}
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f"xla_{f.replace('_size_in_bytes', '_bytes')}": int(getattr(ma, f)) for f in fields if hasattr(ma, f)}


def device_peak_memory(device: Any) -> int | None:
    """Peak bytes in use on an accelerator (``memory_stats()["peak_bytes_in_use"]``); ``None`` on CPU."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- not every backend implements memory_stats
        return None
    return None if not stats else stats.get("peak_bytes_in_use")
