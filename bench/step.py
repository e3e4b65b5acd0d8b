"""Benchmark: training-step throughput, peak RSS and MFU of one SelfAug / baseline train step (issue 5).

Builds the real jitted train step (``selfaug_jax.train.step.make_train_step``) on the default model
(SmolLM2-135M-Instruct unless ``--model``), feeds it synthetic batches (fixed seed; the first 75% of every row is
prompt, labels ``-100``, the rest is response, no padding), excludes the first (compiling) step, times ``--steps``
more and prints one JSON line, also appended to ``bench/results/step_<platform>.jsonl`` (or ``--out``).

Usage::

    python bench/step.py --method selfaug --batch 4 --seq 256 --steps 5
    python bench/step.py --method lora --batch 1 --seq 2048 --steps 3 --remat dots --dtype float32
    python bench/step.py --method selfaug --batch 8 --seq 512 --steps 5 --mesh data=2,fsdp=1,tensor=1 --cpu-devices 2
    python bench/step.py --table bench/results/step_cpu.jsonl     # markdown table + selfaug/lora ratios
    python bench/step.py --peak-only --dtype float32              # re-measure the cached peak FLOP/s
    python bench/step.py --method lora --batch 1 --seq 2048 --attention-chunk 0   # dense attention

Run every configuration in a fresh process: ``peak_rss_mb`` is the process-wide ``ru_maxrss``.

FLOP model (``model_flops_per_step``; matmul FLOPs only, 2 FLOPs per multiply-add, no credit for remat recompute)
----------------------------------------------------------------------------------------------------------------
Notation: ``tok = B * T`` tokens per step, ``L`` layers, ``D`` hidden size, ``T`` sequence length,
``N`` = matmul parameters touched per token = all decoder-layer projection kernels (q, k, v, o, gate, up, down)
plus the LM head ``D * V`` (the tied embedding counts once, as the head; the embedding *lookup* is free),
``N_lora`` = adapter parameters (``r * (in + out)`` per adapted projection).

Per-sequence attention score/value matmuls (``QK^T`` and ``PV``), counted dense (causal masking not halved, as
in PaLM's MFU): forward ``A_fwd = 4 * L * T^2 * D`` per sequence (``2 T^2 D`` each for ``QK^T`` and ``PV``), backward
``2 * A_fwd``.

* ``sft`` (full fine-tuning):  ``F = 6 * N * tok + 12 * L * T^2 * D * B``
  (forward ``2N``, activation gradients ``2N``, weight gradients ``2N`` per token).
* ``lora``:  ``F = 4 * N * tok + 6 * N_lora * tok + 12 * L * T^2 * D * B``
  (the frozen base still costs its forward ``2N`` and the activation gradients ``2N`` that flow back through it;
  weight gradients exist only for the adapters; attention backward is all activation gradients, so ``3 * A_fwd``).
* ``selfaug`` = ``lora`` + reference forward ``2 * N * tok + 4 * L * T^2 * D * B``.
* ``sft-selfaug`` = ``sft`` + the same reference forward.

The SelfAug loss' own work (softmax, KL) and the extra head matmul of the fused loss' ``precompute`` gradient mode
are overhead, not model FLOPs. ``model_flops_per_step_6n`` is the common ``6 * N_active * tok + attention``
convention (``6N`` for the policy even under LoRA, reference ``2N``), reported so the figures compare with MFU
numbers quoted that way.

``mfu = model_flops_per_step / median_step_s / peak_flops``; ``peak_flops`` is measured once per device kind and
dtype with a large square matmul (``--peak-n``, default 4096; best of 5) and cached in
``bench/results/peak_flops_<device>_<dtype>.json`` (``--remeasure-peak`` refreshes it). On a shared CPU host both the
peak and the step are measured under whatever load there is: the ``load_avg`` fields record it, and
``median_step_cpu_s`` (process CPU seconds per step, all threads) is a contention-robust companion of the wall time
for comparing configurations measured under different load.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
METHODS = ("lora", "selfaug", "sft", "sft-selfaug")
PROMPT_FRACTION = 0.75


def parse_mesh(text: str | None, cpu_devices: int) -> Any:
    """``"data=2,fsdp=1,tensor=1"`` -> the experiment config's ``MeshSection`` (missing axes are 1)."""
    from selfaug_jax.experiment.config import MeshSection

    sizes: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in ("data", "fsdp", "tensor") or not value.strip().isdigit():
            raise SystemExit(f"--mesh: bad entry {part!r}; expected data=N,fsdp=N,tensor=N")
        sizes[key] = int(value)
    return MeshSection(**sizes, cpu_devices=cpu_devices or None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=METHODS, help="required unless --table")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (B)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (T)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the compile step")
    p.add_argument("--model", default=None, help="model name or HF dir (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute and param dtype")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_saveable"), default="dots",
                   help="per-layer remat policy (training default: dots)")
    p.add_argument("--attention-chunk", type=int, default=None,
                   help="query-chunk length of attention (default: the model default, 512); 0 = dense attention")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=512, help="fused-loss vocabulary chunk (tokens)")
    p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (a ShardingPlan, as the runner builds)")
    p.add_argument("--cpu-devices", type=int, default=0, help="fake N CPU devices (XLA host platform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-n", type=int, default=4096, help="matmul size for the peak FLOP/s measurement")
    p.add_argument("--remeasure-peak", action="store_true")
    p.add_argument("--peak-only", action="store_true",
                   help="(re)measure and cache the peak FLOP/s of this device and --dtype, print it, exit")
    p.add_argument("--json", action="store_true", help="print only the JSON line (no progress on stderr)")
    p.add_argument("--out", default=None, help="JSONL to append to (default bench/results/step_<platform>.jsonl)")
    p.add_argument("--table", default=None, metavar="JSONL",
                   help="print a markdown table (and lora/selfaug ratios) of a results JSONL, then exit")
    args = p.parse_args(argv)
    if args.method is None and args.table is None and not args.peak_only:
        p.error("--method is required")
    return args


def _mesh(rec: dict[str, Any]) -> str:
    mesh = rec.get("mesh")
    return "-" if not mesh else f"data={mesh['data']},fsdp={mesh['fsdp']},tensor={mesh['tensor']}"


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def _delta(rec: dict[str, Any], base: dict[str, Any], key: str, spec: str, scale: float = 1.0) -> str:
    if rec.get(key) is None or base.get(key) is None:
        return "-"
    return format((rec[key] - base[key]) / scale, spec)


def _ratio(rec: dict[str, Any], base: dict[str, Any], key: str) -> str:
    return f"{rec[key] / base[key]:.2f}" if rec.get(key) and base.get(key) else "-"


def markdown_table(path: str | Path) -> str:
    """A markdown table of the records in ``path`` plus the selfaug/lora (sft-selfaug/sft) ratios per shape."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    recs.sort(key=lambda r: (r["seq"], r["batch"], METHODS.index(r["method"])))
    rows = [
        "| method | B x T | mesh | dtype | remat | attn chunk | median step s (wall) | median step s (cpu) | tokens/s "
        "| peak RSS MB (process) | peak RSS MB (steps) | XLA temp GB | compile s | model GFLOP/step | MFU | MFU (6N) "
        "| load avg (1/5/15 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        rows.append(
            f"| {r['method']} | {r['batch']} x {r['seq']} | {_mesh(r)} | {r['dtype']} | {r['remat']} "
            f"| {r.get('attention_chunk') or 'dense'} | {r['median_step_s']:.1f} "
            f"| {_fmt(r.get('median_step_cpu_s'), '.1f')} | {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} "
            f"| {_fmt(r.get('steps_peak_rss_mb'), '.0f')} | {_fmt(r.get('xla_temp_bytes'), '.2f', 1e9)} "
            f"| {r['compile_s']:.0f} | {r['model_flops_per_step'] / 1e9:.0f} | {r['mfu']:.1%} | {r['mfu_6n']:.1%} "
            f"| {' / '.join(str(x) for x in r['load_avg'] or [])} |"
        )
    by = {(r["method"], r["batch"], r["seq"], r["dtype"], r["remat"], r.get("attention_chunk"), _mesh(r)): r
          for r in recs}
    ratio_rows = [
        "",
        "| shape | pair | step time ratio (wall) | step time ratio (cpu) | peak RSS delta MB (process) "
        "| peak RSS delta MB (steps) | XLA temp delta GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, b, t, dt, rm, ac, mesh), r in by.items():
        base_method = {"selfaug": "lora", "sft-selfaug": "sft"}.get(method)
        base = by.get((base_method, b, t, dt, rm, ac, mesh)) if base_method else None
        if base is None:
            continue
        ratio_rows.append(
            f"| {b} x {t} {dt} remat={rm} attn={ac or 'dense'} mesh={mesh} | {method} / {base_method} "
            f"| {r['median_step_s'] / base['median_step_s']:.2f} | {_ratio(r, base, 'median_step_cpu_s')} "
            f"| {r['peak_rss_mb'] - base['peak_rss_mb']:+.0f} | {_delta(r, base, 'steps_peak_rss_mb', '+.0f')} "
            f"| {_delta(r, base, 'xla_temp_bytes', '+.2f', 1e9)} |"
        )
    return "\n".join(rows + (ratio_rows if len(ratio_rows) > 3 else []))


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.json:
        print(f"[step.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def xla_memory_analysis(compiled: Any) -> dict[str, int]:
    """XLA's buffer assignment of the compiled step: temporaries, arguments, outputs, aliased bytes."""
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


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def model_flops(cfg: Any, method: str, batch: int, seq: int, lora_params: int) -> dict[str, float]:
    """Analytic FLOPs per step (see the module docstring). ``cfg``: the model's ``ModelConfig``."""
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = d * q_out + 2 * d * kv_out + q_out * d + 3 * d * f
    n = layers * per_layer + d * v  # + LM head (tied or not, one D x V matmul per token)
    tok = batch * seq
    attn_fwd = 4 * layers * seq * seq * q_out * batch  # QK^T + PV, dense
    if method in ("lora", "selfaug"):
        policy = 4 * n * tok + 6 * lora_params * tok + 3 * attn_fwd
    else:
        policy = 6 * n * tok + 3 * attn_fwd
    policy_6n = 6 * (n + (lora_params if method in ("lora", "selfaug") else 0)) * tok + 3 * attn_fwd
    reference = 2 * n * tok + attn_fwd if method in ("selfaug", "sft-selfaug") else 0
    return {
        "n_matmul_params": n,
        "n_lora_params": lora_params,
        "policy_flops": float(policy),
        "reference_flops": float(reference),
        "model_flops_per_step": float(policy + reference),
        "model_flops_per_step_6n": float(policy_6n + reference),
    }


def measure_peak_flops(jax, jnp, n: int, dtype: str, repeats: int = 5) -> dict[str, Any]:
    """Best-of-``repeats`` FLOP/s of an ``n x n @ n x n`` matmul on the default device."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"peak_flops": 2 * n**3 / min(times), "n": n, "dtype": dtype, "times_s": times}


def cached_peak_flops(args: argparse.Namespace, jax, jnp, device_kind: str) -> dict[str, Any]:
    """The cached peak FLOP/s of this device kind and dtype, measuring (and caching) it if absent."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_").lower() or "unknown"
    path = RESULTS / f"peak_flops_{slug}_{args.dtype}.json"
    if path.exists() and not args.remeasure_peak:
        return json.loads(path.read_text())
    log(args, f"measuring peak FLOP/s ({args.peak_n}^2 {args.dtype} matmul) -> {path.name}")
    rec = measure_peak_flops(jax, jnp, args.peak_n, args.dtype)
    rec.update(device_kind=device_kind, load_avg=load_avg(), jax_version=jax.__version__,
               host=platform.node(), cpu_count=os.cpu_count(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int):
    """Int32 ``[B, T]`` arrays: random token ids; labels -100 on the first 75% (prompt), ids on the rest."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int32)
    labels = ids.copy()
    labels[:, : int(PROMPT_FRACTION * seq)] = -100
    return {"input_ids_bt": ids, "labels_bt": labels, "attention_mask_bt": np.ones((batch, seq), np.int32)}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return None
    import jax
    import jax.numpy as jnp

    if args.cpu_devices > 1:  # must precede JAX's backend initialisation (as in experiments/run.py)
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    sys.path.insert(0, str(ROOT))
    mesh = parse_mesh(args.mesh, args.cpu_devices)
    from selfaug_jax.loss import SelfAugLossConfig
    from selfaug_jax.lora import LoRAConfig
    from selfaug_jax.models import DEFAULT_ATTENTION_CHUNK, DEFAULT_MODEL, load_pretrained
    from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
    from selfaug_jax.train.state import init_train_state, uses_lora
    from selfaug_jax.train.step import StepConfig, make_train_step

    from selfaug_jax.train.sharding import ShardingPlan

    plan = ShardingPlan.from_config(mesh) if args.mesh else None  # checks the sizes against the device count

    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    device_kind = device.device_kind
    if args.peak_only:
        args.remeasure_peak = True
        peak = cached_peak_flops(args, jax, jnp, device_kind)
        print(json.dumps(peak))
        return peak
    t0 = time.perf_counter()
    attention_chunk = DEFAULT_ATTENTION_CHUNK if args.attention_chunk is None else (args.attention_chunk or None)
    model = load_pretrained(args.model or DEFAULT_MODEL, dtype=dtype, param_dtype=dtype, remat_policy=args.remat,
                            attention_chunk=attention_chunk)
    load_s = time.perf_counter() - t0
    cfg = model.config
    log(args, f"loaded {args.model or DEFAULT_MODEL} in {load_s:.1f}s on {device_kind} ({jax.device_count()} dev)")

    optimizer, schedule = make_optimizer(OptimizerConfig(), total_steps=args.steps + 1)
    lora_config = LoRAConfig(rank=args.lora_rank)
    model_def, state = init_train_state(model, args.method, optimizer, lora_config=lora_config, seed=args.seed)
    del model
    lora_params = 0
    if uses_lora(args.method):
        lora_params = sum(int(x.size) for x in jax.tree.leaves(state.trainable))
    step_config = StepConfig(loss=SelfAugLossConfig(chunk_size=args.chunk_size))
    if plan is not None:
        state = plan.shard_state(state)
        step_fn = make_train_step(model_def, optimizer, schedule, step_config,
                                  state_shardings=plan.state_shardings(state), batch_sharding=plan.batch_sharding())
    else:
        step_fn = make_train_step(model_def, optimizer, schedule, step_config)

    def put(np_batch):
        if plan is not None:
            return plan.put_batch(np_batch)
        return {k: jnp.asarray(v) for k, v in np_batch.items()}

    batches = [put(synthetic_batch(args.batch, args.seq, cfg.vocab_size, args.seed + i)) for i in range(2)]

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0]).compile()  # the executable every step below runs
    compile_s = time.perf_counter() - t0
    memory = xla_memory_analysis(compiled)
    rss_compile_mb = peak_rss_mb()
    hwm_was_reset = reset_peak_rss()  # from here on VmHWM is the peak of the steps alone (Linux)
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[0])
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - t0
    first_loss = float(metrics["loss"])
    log(args, f"compile {compile_s:.1f}s (XLA temp {memory.get('xla_temp_bytes', 0) / 1e9:.2f} GB), first step "
              f"{first_step_s:.1f}s, loss {first_loss:.4f}")

    times, cpu_times = [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batches[(i + 1) % 2])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        log(args, f"step {i + 1}/{args.steps}: {times[-1]:.2f}s wall, {cpu_times[-1]:.2f}s cpu, "
                  f"loss {float(metrics['loss']):.4f}")
    loss = float(metrics["loss"])
    if not (loss == loss):
        raise SystemExit("loss is NaN")

    rss_mb = peak_rss_mb()  # before the (tiny) peak-FLOP/s matmul, which may run below
    steps_rss_mb = hwm_rss_mb() if hwm_was_reset else None
    device_peak_bytes = device_peak_memory(device)
    median = statistics.median(times)
    tokens = args.batch * args.seq
    flops = model_flops(cfg, args.method, args.batch, args.seq, lora_params)
    peak = cached_peak_flops(args, jax, jnp, device_kind)
    peak_flops = float(peak["peak_flops"])
    rec = {
        "method": args.method,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": tokens,
        "steps": args.steps,
        "median_step_s": median,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "step_times_s": times,
        "tokens_per_s": tokens / median,
        "median_step_cpu_s": statistics.median(cpu_times),
        "step_cpu_times_s": cpu_times,
        "peak_rss_mb": round(rss_mb, 1),
        "compile_peak_rss_mb": round(rss_compile_mb, 1),
        "steps_peak_rss_mb": None if steps_rss_mb is None else round(steps_rss_mb, 1),
        **memory,
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "load_s": load_s,
        **flops,
        "achieved_flops": flops["model_flops_per_step"] / median,
        "peak_flops": peak_flops,
        "peak_flops_load_avg": peak.get("load_avg"),
        "mfu": flops["model_flops_per_step"] / median / peak_flops,
        "mfu_6n": flops["model_flops_per_step_6n"] / median / peak_flops,
        "first_loss": first_loss,
        "last_loss": loss,
        "model": args.model or DEFAULT_MODEL,
        "dtype": args.dtype,
        "remat": args.remat,
        "lora_rank": args.lora_rank if uses_lora(args.method) else None,
        "chunk_size": args.chunk_size,
        "attention_chunk": attention_chunk,
        "device_peak_bytes": device_peak_bytes,
        "mesh": dataclasses.asdict(mesh) if args.mesh else None,
        "platform": device.platform,
        "device_kind": device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "load_avg": load_avg(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    line = json.dumps(rec)
    print(line, flush=True)
    out = Path(args.out) if args.out else RESULTS / f"step_{device.platform}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(line + "\n")
    return rec


if __name__ == "__main__":
    main()
