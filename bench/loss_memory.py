"""Benchmark: memory and time of value+grad for the unfused vs fused SelfAug loss.

Compares, under ``jax.jit``, the gradient w.r.t. the policy hidden states and LM head of

* ``unfused``: ``logits = hidden @ lm_head`` (policy and reference, float32 ``[B, T, V]``) -> ``selfaug_loss``;
* ``fused`` (``grad_mode="precompute"``, the default) and ``fused_remat`` (``grad_mode="remat"``):
  ``selfaug_loss_from_hidden`` with the chosen ``chunk_size``.

Memory is XLA's compiled temporary-buffer size (``jax.jit(f).lower(...).compile().memory_analysis()``,
``temp_size_in_bytes``); it needs no execution, so it is reported at the full shapes even on a small host.
Time is the median wall time of ``--repeats`` executions after one warm-up, runs of the variants interleaved.
On a CPU host the unfused loss at the full shape does not fit in memory (~30 GB of temporaries), so by default
(``--time-scale auto``) time is measured on CPU at ``T / 8`` (same B, D, V) and at the full shape on an accelerator.

Usage (defaults: the Qwen2.5-0.5B head, D=896, V=151936; B x T = 1 x 8192 and 4 x 2048)::

    python bench/loss_memory.py                      # writes bench/results/loss_memory_<platform>.{json,md}
    python bench/loss_memory.py --time-scale 1       # time at the full shapes (needs ~40 GB for the unfused loss)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from selfaug_jax.loss import IGNORE_INDEX, selfaug_loss, selfaug_loss_from_hidden  # noqa: E402

GB = 1e9


def make_fns(chunk_size: int) -> dict:
    """name -> f(hidden, ref_hidden, lm_head, labels) returning the scalar loss."""

    def unfused(h, rh, w, labels):
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        ref_logits = jnp.einsum("btd,dv->btv", rh, w, preferred_element_type=jnp.float32)
        return selfaug_loss(logits, ref_logits, labels)[0]

    def fused(h, rh, w, labels):
        return selfaug_loss_from_hidden(h, rh, w, labels, chunk_size=chunk_size, grad_mode="precompute")[0]

    def fused_remat(h, rh, w, labels):
        return selfaug_loss_from_hidden(h, rh, w, labels, chunk_size=chunk_size, grad_mode="remat")[0]

    return {"unfused": unfused, "fused": fused, "fused_remat": fused_remat}


def value_and_grad_jit(fn):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 2)))


def abstract_args(b: int, t: int, d: int, v: int, dtype) -> tuple:
    return (jax.ShapeDtypeStruct((b, t, d), dtype), jax.ShapeDtypeStruct((b, t, d), dtype),
            jax.ShapeDtypeStruct((d, v), dtype), jax.ShapeDtypeStruct((b, t), jnp.int32))


def concrete_args(b: int, t: int, d: int, v: int, dtype, seed: int = 0) -> tuple:
    """Random hidden states / head and RAG-like labels: -100 prompt (60%), response, -100 trailing padding (10%)."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    rh = h + 0.1 * rng.normal(size=(b, t, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    labels = rng.integers(0, v, size=(b, t)).astype(np.int32)
    prompt, pad = int(0.6 * t), int(0.1 * t)
    labels[:, :prompt] = IGNORE_INDEX
    if pad:
        labels[:, t - pad:] = IGNORE_INDEX
    return (jnp.asarray(h, dtype), jnp.asarray(rh, dtype), jnp.asarray(w, dtype), jnp.asarray(labels))


def memory_row(name: str, fn, args: tuple) -> dict:
    t0 = time.perf_counter()
    compiled = value_and_grad_jit(fn).lower(*args).compile()
    m = compiled.memory_analysis()
    return dict(variant=name, temp_gb=m.temp_size_in_bytes / GB, argument_gb=m.argument_size_in_bytes / GB,
                output_gb=m.output_size_in_bytes / GB, compile_s=time.perf_counter() - t0)


def time_variants(fns: dict, args: tuple, repeats: int) -> dict:
    compiled = {name: value_and_grad_jit(fn) for name, fn in fns.items()}
    results = {}
    for name, f in compiled.items():  # warm-up (compile + first run) and outputs for the agreement check
        results[name] = jax.block_until_ready(f(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    base_v, base_g = results["unfused"]
    out = {}
    for name in fns:
        v, g = results[name]
        out[name] = dict(
            median_s=statistics.median(times[name]), all_s=times[name],
            value=float(v), value_rel_err_vs_unfused=abs(float(v) - float(base_v)) / abs(float(base_v)),
            grad_rel_err_vs_unfused=max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                                              / jnp.max(jnp.abs(b.astype(jnp.float32)))) for a, b in zip(g, base_g)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x8192,4x2048", help="comma-separated BxT")
    p.add_argument("--d", type=int, default=896, help="hidden size (Qwen2.5-0.5B: 896)")
    p.add_argument("--v", type=int, default=151936, help="vocabulary (Qwen2.5-0.5B: 151936)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="hidden/head dtypes for the memory table")
    p.add_argument("--time-dtype", default="float32")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--time-scale", default="auto", help="time at T / scale; auto = 8 on CPU, 1 otherwise; 0 = skip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)

    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    platform_name = jax.devices()[0].platform
    scale = (8 if platform_name == "cpu" else 1) if a.time_scale == "auto" else int(a.time_scale)
    fns = make_fns(a.chunk_size)
    report = dict(
        benchmark="selfaug_jax.loss value+grad (w.r.t. hidden and lm_head), unfused vs fused",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax=jax.__version__, device=str(jax.devices()[0].device_kind), platform=platform_name,
        host=dict(machine=platform.machine(), cpu_count=os.cpu_count()),
        d=a.d, v=a.v, chunk_size=a.chunk_size, command="python bench/loss_memory.py " + " ".join(argv or sys.argv[1:]),
        memory=[], timing=[])

    for b, t in shapes:
        for dt_name in a.dtypes.split(","):
            args = abstract_args(b, t, a.d, a.v, jnp.dtype(dt_name))
            rows = [memory_row(name, fn, args) for name, fn in fns.items()]
            base = rows[0]["temp_gb"]
            for r in rows:
                r.update(b=b, t=t, dtype=dt_name, fraction_of_unfused=r["temp_gb"] / base)
                print(f"memory B={b} T={t} {dt_name:8s} {r['variant']:12s} temp {r['temp_gb']:7.3f} GB "
                      f"({r['fraction_of_unfused']:.3f} of unfused)", flush=True)
            report["memory"].extend(rows)

    if scale > 0:
        for b, t in shapes:
            tt = max(1, t // scale)
            args = concrete_args(b, tt, a.d, a.v, jnp.dtype(a.time_dtype))
            res = time_variants(fns, args, a.repeats)
            for name, r in res.items():
                r.update(variant=name, b=b, t=tt, full_t=t, dtype=a.time_dtype,
                         speedup_vs_unfused=res["unfused"]["median_s"] / r["median_s"])
                print(f"time   B={b} T={tt} {a.time_dtype} {name:12s} {r['median_s']:8.3f} s  "
                      f"(x{r['speedup_vs_unfused']:.2f} vs unfused; value rel err {r['value_rel_err_vs_unfused']:.1e},"
                      f" grad rel err {r['grad_rel_err_vs_unfused']:.1e})", flush=True)
                report["timing"].append(r)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"loss_memory_{platform_name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def to_markdown(r: dict) -> str:
    lines = [f"# SelfAug loss: unfused vs fused value+grad ({r['device']}, jax {r['jax']})", "",
             f"D={r['d']}, V={r['v']}{' (Qwen2.5-0.5B head)' if (r['d'], r['v']) == (896, 151936) else ''}, "
             f"chunk_size={r['chunk_size']}; {r['date']}; "
             f"`{r['command'].strip()}`", "",
             "## Compiled temporary memory (`memory_analysis().temp_size_in_bytes`)", "",
             "| B x T | dtype | variant | temp GB | fraction of unfused |", "|---|---|---|---:|---:|"]
    for m in r["memory"]:
        lines.append(f"| {m['b']}x{m['t']} | {m['dtype']} | {m['variant']} | {m['temp_gb']:.3f} | "
                     f"{m['fraction_of_unfused']:.3f} (1/{1 / m['fraction_of_unfused']:.1f}) |")
    if r["timing"]:
        lines += ["", "## Wall time (median; jit, after warm-up)", "",
                  "| B x T timed (full T) | variant | median s | speed-up vs unfused | value rel err | grad rel err |",
                  "|---|---|---:|---:|---:|---:|"]
        for t in r["timing"]:
            lines.append(f"| {t['b']}x{t['t']} ({t['full_t']}) | {t['variant']} | {t['median_s']:.3f} | "
                         f"{t['speedup_vs_unfused']:.2f} | {t['value_rel_err_vs_unfused']:.1e} | "
                         f"{t['grad_rel_err_vs_unfused']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
