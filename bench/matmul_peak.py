"""What this CPU's matmul units can do, against what XLA:CPU reaches: fp32 and bf16, XLA flag variants and PyTorch.

Why: issue 16 asks for bf16 steps >= 1.7x the fp32 step on a CPU with native bf16. Whether that is reachable depends
first on the matmul kernels: if XLA:CPU's bf16 dot is no faster than its fp32 dot, no change to the model code can
give the step 1.7x. This script measures, each variant in a fresh process (XLA reads ``XLA_FLAGS`` once, at backend
start), the best-of-``--repeats`` FLOP/s of

* a square ``n x n @ n x n`` matmul (``--n``, default 4096: the peak ``bench/step.py`` divides by), and
* the SmolLM2 step's typical projection, ``[1024, 576] x [576, 1536]`` (4 x 256 tokens, width 576 -> 1536),

in float32 and bfloat16, for JAX under each ``XLA_FLAGS`` variant below and for PyTorch (``torch.matmul``, its
oneDNN / MKL kernels; torch is a test dependency, never imported by the library). Each row is one JSON record in
``--out`` (default ``bench/results/matmul_peak_cpu.jsonl``) with the CPU model, load average and versions: the
figures belong to the machine they were taken on, never a universal number.

    python bench/matmul_peak.py                      # every variant, fp32 + bf16
    python bench/matmul_peak.py --variants xla torch --out -
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import machine  # noqa: E402  (bench/machine.py)

# name -> XLA_FLAGS of the JAX variants (all exist in jaxlib 0.10.2's XLA:CPU; `XLA_FLAGS=--help` lists them).
XLA_VARIANTS: dict[str, str] = {
    "xla": "",
    "xla_onednn_dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "xla_xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "xla_no_ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=-dot",
}
SHAPES: dict[str, tuple[int, int, int] | None] = {"square": None, "projection": (1024, 576, 1536)}
# (operand dtype, result dtype): the model's matmuls take float32 results (preferred_element_type); a bf16 result is
# measured too because XLA:CPU runs it through float32 (about half the bf16 -> f32 speed on avx512_bf16 CPUs).
# torch.matmul has no float32 result for bf16 operands, so its bf16 rows are bf16 -> bf16.
FORMS = (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"))
TORCH_FORMS = (("float32", "float32"), ("bfloat16", "bfloat16"))


def _time_best(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_jax(m: int, k: int, n: int, dtype: str, repeats: int, result_dtype: str = "float32") -> float:
    """Best FLOP/s of a jitted ``[m, k] @ [k, n]``, operands in ``dtype``, result in ``result_dtype``, on JAX's
    default device (inner loop of 8 calls)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    a = jax.random.normal(key, (m, k), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.dtype(dtype))
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.dtype(result_dtype)))
    mm(a, b).block_until_ready()
    inner = 1 if m * k * n >= 2**34 else 8

    def run() -> None:
        out = None
        for _ in range(inner):
            out = mm(a, b)
        out.block_until_ready()

    return inner * 2 * m * k * n / _time_best(run, repeats)


def measure_torch(m: int, k: int, n: int, dtype: str, repeats: int) -> float:
    """Best FLOP/s of ``torch.matmul`` in ``dtype`` on the CPU, with torch's default thread count."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(getattr(torch, dtype))
    b = torch.randn(k, n, generator=gen).to(getattr(torch, dtype))
    torch.matmul(a, b)
    inner = 1 if m * k * n >= 2**34 else 8

    def run() -> None:
        for _ in range(inner):
            torch.matmul(a, b)

    return inner * 2 * m * k * n / _time_best(run, repeats)


def child(variant: str, n_square: int, repeats: int) -> list[dict[str, Any]]:
    """Measure every shape x dtype of one variant in this process."""
    records = []
    for shape_name, shape in SHAPES.items():
        m, k, n = shape or (n_square, n_square, n_square)
        for dtype, result_dtype in TORCH_FORMS if variant == "torch" else FORMS:
            if variant == "torch":
                flops = measure_torch(m, k, n, dtype, repeats)
            else:
                flops = measure_jax(m, k, n, dtype, repeats, result_dtype)
            records.append({"variant": variant, "xla_flags": XLA_VARIANTS.get(variant), "shape_name": shape_name,
                            "m": m, "k": k, "n": n, "dtype": dtype, "result_dtype": result_dtype,
                            # 4 significant digits: a tiny --n under load must not round to 0.0
                            "gflops": float(f"{flops / 1e9:.4g}")})
    return records


def versions(variant: str) -> dict[str, Any]:
    if variant == "torch":
        import torch

        return {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
    import jax

    return {"jax_version": jax.__version__}


def run_child(cmd: list[str], env: dict[str, str], crash_retries: int,
              label: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run one variant's process; rerun it (up to ``crash_retries`` times) only when a signal killed it.

    Why: XLA:CPU's oneDNN dot path (``xla_onednn_dot``) crashes natively now and then when another process loads the
    CPU (seen in CI, where a second pytest worker runs; 3 of 6 concurrent runs at 57d6c5b). A native crash is
    reported on stderr and counted in every record of the variant (``crashed_attempts``), never hidden; a Python
    error (positive exit code) is not retried. Returns the last process and the number of crashed attempts.
    """
    crashes = 0
    while True:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode >= 0 or crashes >= crash_retries:
            return proc, crashes
        crashes += 1
        print(f"matmul_peak: variant {label} crashed (signal {-proc.returncode}; last stderr line "
              f"{proc.stderr.strip().splitlines()[-1:]}), rerunning it ({crashes} of {crash_retries})",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=[*XLA_VARIANTS, "torch"],
                   choices=[*XLA_VARIANTS, "torch"], help="what to measure (each in a fresh process)")
    p.add_argument("--n", type=int, default=4096, help="size of the square matmul")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tag", default="")
    p.add_argument("--crash-retries", type=int, default=1,
                   help="reruns of a variant whose process a signal killed (a native crash); counted in the records")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "matmul_peak_cpu.jsonl"),
                   help="JSONL to append to ('-': print only)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        p.error(f"--n and --repeats must be >= 1, got --n {args.n} --repeats {args.repeats}")
    if args.crash_retries < 0:
        p.error(f"--crash-retries must be >= 0, got {args.crash_retries}")

    if args.child:  # one variant, in the fresh process its parent started
        rows = child(args.child, args.n, args.repeats)
        print(json.dumps({"rows": rows, **versions(args.child)}))
        return 0

    out_rows = []
    for variant in args.variants:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        if XLA_VARIANTS.get(variant):
            env["XLA_FLAGS"] = XLA_VARIANTS[variant]
        proc, crashes = run_child([sys.executable, __file__, "--child", variant, "--n", str(args.n),
                                   "--repeats", str(args.repeats)], env, args.crash_retries, variant)
        if proc.returncode != 0:
            print(f"matmul_peak: variant {variant} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        common = {"cpu_model": machine.cpu_model(), "cpu_count": os.cpu_count(), "load_avg": machine.load_avg(),
                  "date": machine.utc_now(), "tag": args.tag, "crashed_attempts": crashes,
                  **{k: v for k, v in result.items() if k != "rows"}}
        for row in result["rows"]:
            out_rows.append({**row, **common})
            form = f"{row['dtype']}->{row['result_dtype']}"
            print(f"{variant:16s} {row['shape_name']:10s} {form:18s} {row['gflops']:7.1f} GFLOP/s")
    if args.out != "-":
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in out_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
