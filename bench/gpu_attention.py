"""Attention kernels on the machine it runs on: values and gradients against a float32 reference, and their speed.

Issue 16 item 5: ``model.attention_impl`` chooses cuDNN flash attention on a GPU (``"auto"``), but the CPU test
suite can only check its dispatch. This script runs every kernel the platform offers on one realistic training
shape -- Qwen2.5-0.5B's attention (14 query / 2 KV heads of 64), bf16, ``--batch`` x ``--seq`` with causal masking
and right padding on half the rows -- and for each kernel records:

* ``out_err``: max |out - reference| over the real (non-padding) query rows, the reference being the dense
  ``xla_chunked`` kernel run in float32 on the same (bf16-rounded) inputs;
* ``grad_err_{q,k,v}``: max |grad - reference grad| / max |reference grad| of ``sum(out * cotangent)`` (real rows);
* ``ok``: every error within ``--rtol`` (default 0.02: bf16 keeps 8 mantissa bits, eps 2^-8 = 0.4%, and a
  softmax over 2K keys adds a few roundings); the bf16 ``xla_chunked`` kernel's own errors are recorded next to it
  as the yardstick;
* ``fwd_bwd_ms``: median time of a jitted forward + backward over ``--repeats`` runs after a warm-up.

Kernels: ``xla_chunked`` (this project's CPU default), ``dot_product`` (``jax.nn.dot_product_attention``'s XLA
implementation), ``cudnn`` (the path ``auto`` takes on a GPU: ``is_causal`` plus the dense padding mask) and, as a
lead for a faster path, ``cudnn_causal_only`` (``is_causal`` with no mask, on unpadded rows only: what a packed-free
batch without padding would need). One JSON line per kernel goes to stdout and to ``--out``; a kernel that fails
records its error instead of stopping the others.

Usage::

    python bench/gpu_attention.py --out bench/results/gpu_attention.jsonl          # on the GPU machine
    python bench/gpu_attention.py --batch 1 --seq 128 --repeats 2 --out -           # CPU smoke (no cudnn)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--q-chunk", type=int, default=512, help="xla_chunked's query chunk (the model default)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rtol", type=float, default=0.02)
    p.add_argument("--out", default=None, help="JSONL to append to ('-': stdout only)")
    return p.parse_args(argv)


def make_inputs(args: argparse.Namespace, seed: int = 0):
    """bf16 q, k, v, a float32 cotangent, the ForwardMask (causal + right padding on odd rows), the valid rows."""
    import jax
    import jax.numpy as jnp

    from selfaug_jax.models.attention_kernels import ForwardMask

    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    b, t, h, g, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q = jax.random.normal(kq, (b, t, h, d), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, g, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, g, d), jnp.float32).astype(jnp.bfloat16)
    cot = jax.random.normal(kg, (b, t, h, d), jnp.float32)
    lengths = jnp.array([t if i % 2 == 0 else (3 * t) // 4 for i in range(b)], jnp.int32)
    valid_bt = jnp.arange(t)[None, :] < lengths[:, None]
    causal_ts = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    dense_bts = causal_ts[None] & valid_bt[:, None, :]
    mask = ForwardMask(dense_bts, valid_bt.astype(jnp.int32))
    return q, k, v, cot, mask, valid_bt


def kernels(args: argparse.Namespace) -> dict[str, Callable[..., Any]]:
    """name -> fn(q, k, v, mask) over the kernels of ``attention_kernels`` plus the causal-only cuDNN lead."""
    import jax

    from selfaug_jax.models import attention_kernels as ak

    out: dict[str, Callable[..., Any]] = {
        "xla_chunked": lambda q, k, v, m: ak.xla_chunked(q, k, v, m, args.q_chunk),
        "dot_product": lambda q, k, v, m: ak.dot_product(q, k, v, m),
    }
    if jax.default_backend() == "gpu":
        out["cudnn"] = lambda q, k, v, m: ak.cudnn(q, k, v, m)
        out["cudnn_causal_only"] = lambda q, k, v, m: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    return out


def fwd_bwd(fn: Callable[..., Any]) -> Callable[..., Any]:
    """jit(q, k, v, mask, cot, valid) -> (out, (dq, dk, dv)) of ``sum(out * cot)`` over the valid query rows."""
    import jax
    import jax.numpy as jnp

    def objective(q, k, v, mask, cot, valid_bt):
        out = fn(q, k, v, mask).astype(jnp.float32)
        return jnp.sum(jnp.where(valid_bt[:, :, None, None], out * cot, 0.0)), out

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))


def max_err(a, b, valid_bt=None, relative: bool = False) -> float:
    import jax.numpy as jnp

    diff = jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
    if valid_bt is not None:
        diff = jnp.where(valid_bt[:, :, None, None], diff, 0.0)
    err = float(jnp.max(diff))
    return err / max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))), 1e-30) if relative else err


def check_one(name: str, fn, inputs, reference, args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    q, k, v, cot, mask, valid_bt = inputs
    if name == "cudnn_causal_only":  # no mask: compare on the unpadded (even) rows only
        valid_bt = valid_bt & (jnp.arange(valid_bt.shape[0]) % 2 == 0)[:, None]
    step = fwd_bwd(fn)
    (_, out), grads = jax.block_until_ready(step(q, k, v, mask, cot, valid_bt))
    ref_out, ref_grads = reference(valid_bt)
    rec: dict[str, Any] = {"kernel": name, "out_err": max_err(out, ref_out, valid_bt)}
    for axis, g, rg in zip("qkv", grads, ref_grads):
        rec[f"grad_err_{axis}"] = max_err(g, rg, relative=True)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(q, k, v, mask, cot, valid_bt))
        times.append(time.perf_counter() - t0)
    rec["fwd_bwd_ms"] = 1e3 * statistics.median(times)
    # out_err is absolute (outputs are O(1) here: softmax-weighted means of unit-normal values).
    rec["ok"] = bool(max(rec["out_err"], rec["grad_err_q"], rec["grad_err_k"], rec["grad_err_v"]) <= args.rtol)
    return rec


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    for path in (ROOT, BENCH):  # the package, and step.py's append_record
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import jax
    import jax.numpy as jnp

    from selfaug_jax.models import attention_kernels as ak
    from step import append_record

    inputs = make_inputs(args)
    q, k, v, cot, mask, _ = inputs
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_step = fwd_bwd(lambda q_, k_, v_, m: ak.xla_chunked(q_, k_, v_, m, args.q_chunk))

    def reference(valid_bt):
        (_, out), grads = ref_step(*f32, mask, cot, valid_bt)
        return out, grads

    device = jax.devices()[0]
    common = {"platform": device.platform, "device_kind": device.device_kind, "jax_version": jax.__version__,
              "batch": args.batch, "seq": args.seq, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "dtype": "bfloat16", "padding": "right, 1/4 of odd rows",
              "auto_selects": ak.select_kernel("auto", q, mask)[0]}
    records = []
    for name, fn in kernels(args).items():
        try:
            rec = check_one(name, fn, inputs, reference, args)
        except Exception as exc:  # a kernel the platform refuses is a finding, not the end of the check
            rec = {"kernel": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-2000:]}
        rec = {**rec, **common}
        records.append(rec)
        append_record(rec, args.out)  # no --out: stdout only
    return records


if __name__ == "__main__":
    main()
