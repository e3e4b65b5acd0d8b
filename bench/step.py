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
    python bench/step.py --method selfaug --num-layers 2                     # truncated model (compile in depth)
    python bench/step.py --method selfaug --vs-torch                         # PyTorch HF + PEFT side by side
    python bench/step.py --method lora --vs-torch --rounds 3                 # 3 interleaved rounds: median, range
    python bench/step.py --method selfaug --compare-dtypes --steps 20        # bf16 vs fp32: speed and losses
    python bench/step.py --abstract                                          # 7B-shaped compile on 8 fake devices
    python bench/step.py --method selfaug --shape qwen2.5-0.5b --dtype bfloat16 --batch 8 --seq 2048   # random weights

Run every configuration in a fresh process: ``peak_rss_mb`` is the process-wide ``ru_maxrss``. The modes that
compare two runs (``--vs-torch``, ``--compare-dtypes``; ``bench/side_by_side.py``) start each side in its own fresh
subprocess themselves, ``--rounds N`` times each, interleaved; their ratios are medians over rounds, with the range.

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

``mfu = model_flops_per_step / median_step_s / peak_flops``; ``peak_flops`` is measured on this machine with a
large square matmul (``--peak-n``, default 4096 on CPU, 8192 on an accelerator; best of 5) and cached per CPU
model / device kind, dtype and size under ``~/.cache/selfaug_jax/bench/`` (``bench/machine.py``;
``--remeasure-peak`` refreshes it); every record names the peak it used (``peak_flops_n``) and the machine and time
it was measured. On a shared CPU host both the
peak and the step are measured under whatever load there is: the ``load_avg`` fields record it, and
``median_step_cpu_s`` (process CPU seconds per step, all threads) is a contention-robust companion of the wall time
for comparing configurations measured under different load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
if str(BENCH) not in sys.path:  # sibling helper modules (machine, report, torch_step, abstract)
    sys.path.insert(0, str(BENCH))

import machine  # noqa: E402  (no JAX / torch at import)
import model_shapes  # noqa: E402  (no JAX at import)
import report  # noqa: E402
import side_by_side  # noqa: E402  (no JAX / torch at import)

from selfaug_jax.methods import get_method  # noqa: E402  (no JAX at import)

METHODS = report.METHODS
PROMPT_FRACTION = 0.75
DEFAULT_LOSS_RTOL = 0.02  # bf16 vs fp32 losses (--compare-dtypes): bf16 keeps 8 mantissa bits (eps 2^-8 = 0.4%)


def parse_mesh(text: str | None, cpu_devices: int) -> Any:
    """``"data=2,fsdp=1,tensor=1"`` -> the experiment config's ``MeshSection`` (missing axes are 1); None for no text.

    Without a mesh nothing of ``selfaug_jax.experiment`` is imported: its data readers need packages (tensorflow-
    datasets) that a bare accelerator image may lack, and the single-device step needs none of them.
    """
    if not text:
        return None
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
    p.add_argument("--method", choices=METHODS, help="required unless --table / --peak-only / --abstract")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (B)")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (T; default 256, with --abstract each preset's data.max_length)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the compile step")
    p.add_argument("--model", default=None, help="model name or HF dir (default: smollm2-135m-instruct)")
    p.add_argument("--shape", default=None, choices=sorted(model_shapes.SHAPES),
                   help="random weights of a named model shape instead of a checkpoint (bench/model_shapes.py)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep only the first N decoder layers (load_pretrained's truncation; compile-in-depth check)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype and frozen-parameter dtype (adapters, optimizer state, loss stay float32)")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_and_acts", "dots_saveable"), default="dots",
                   help="per-layer remat policy (training default: dots)")
    p.add_argument("--attention-chunk", type=int, default=None,
                   help="query-chunk length of attention (default: the model default, 512); 0 = dense attention")
    p.add_argument("--attention-impl", default="auto",
                   choices=("auto", "xla_chunked", "dot_product", "cudnn", "splash"),
                   help="attention kernel of the forward (model.attention_impl; models/attention_kernels.py)")
    p.add_argument("--scan-unroll", type=int, default=None,
                   help="layers per iteration of the layer scan (model.scan_unroll; default: the model default, 2)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=256, help="fused-loss chunk (tokens; default: SelfAugLossConfig's)")
    p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (a ShardingPlan, as the runner builds)")
    p.add_argument("--cpu-devices", type=int, default=0, help="fake N CPU devices (XLA host platform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-n", type=int, default=None,
                   help="matmul size for the peak FLOP/s measurement (default 4096 on CPU, 8192 on an accelerator, "
                        "where 4096^3 is too short to reach the peak: 410 vs 669 TFLOP/s on an H200)")
    p.add_argument("--remeasure-peak", action="store_true", help="measure the peak FLOP/s now (refreshes the cache)")
    p.add_argument("--peak-only", action="store_true",
                   help="(re)measure and cache the peak FLOP/s of this machine and --dtype, print it, exit")
    p.add_argument("--impl", choices=("jax", "torch"), default="jax",
                   help="which implementation this process runs (torch: the PyTorch HF + PEFT released step)")
    p.add_argument("--vs-torch", action="store_true",
                   help="run --impl jax and --impl torch one after the other, each in a fresh subprocess, and "
                        "print both and their ratios (lora / selfaug)")
    p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"),
                   help="attn_implementation of the PyTorch side (default sdpa: its fastest CPU kernel)")
    p.add_argument("--compare-dtypes", action="store_true",
                   help="run float32 and bfloat16 (fresh subprocesses), print tokens/s ratio and loss agreement")
    p.add_argument("--rounds", type=int, default=1,
                   help="--vs-torch / --compare-dtypes: run both sides this many times, interleaved in alternating "
                        "order; ratios are medians over rounds, with their range (bench/side_by_side.py)")
    p.add_argument("--loss-rtol", type=float, default=DEFAULT_LOSS_RTOL,
                   help="--compare-dtypes: max relative |loss_bf16 - loss_fp32| / loss_fp32 over all steps")
    p.add_argument("--abstract", action="store_true",
                   help="lower + compile the selfaug step of a Qwen2.5-7B-shaped model on 8 fake CPU devices "
                        "(bench/abstract.py; see its --help via --abstract --help)")
    p.add_argument("--preset", action="append", default=None,
                   help="--abstract: preset name(s) whose mesh to compile (default: every shipped 7B preset)")
    p.add_argument("--tag", default=None, help="free-form label stored in the record")
    p.add_argument("--json", action="store_true", help="print only the JSON line (no progress on stderr)")
    p.add_argument("--out", default=None,
                   help="JSONL to append to (default bench/results/step_<platform>.jsonl; '-' = do not append)")
    p.add_argument("--summary", default=None, metavar="TAG",
                   help="print issue 16's acceptance table of every bench/results record tagged TAG, then exit")
    p.add_argument("--table", default=None, metavar="JSONL",
                   help="print a markdown table of a results JSONL (any bench/step.py record kind), then exit")
    args = p.parse_args(argv)
    args.seq_given, args.seq = args.seq, args.seq or 256
    if args.method is None and not (args.table or args.summary or args.peak_only or args.abstract):
        p.error("--method is required")
    if args.vs_torch and args.method not in ("lora", "selfaug"):
        p.error("--vs-torch compares the lora and selfaug steps only")
    if args.vs_torch and args.compare_dtypes:
        p.error("use one of --vs-torch / --compare-dtypes per invocation")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and not (args.vs_torch or args.compare_dtypes):
        p.error("--rounds applies to --vs-torch and --compare-dtypes only")
    if args.shape and args.model:
        p.error("use one of --model / --shape")
    if args.shape and (args.vs_torch or args.compare_dtypes or args.impl == "torch"):
        p.error("--shape (random weights) is for the JAX step alone; the PyTorch side loads --model")
    if args.num_layers is not None and args.num_layers < 1:
        p.error(f"--num-layers must be >= 1, got {args.num_layers}")
    return args


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.json:
        print(f"[step.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def append_record(rec: dict[str, Any], out: str | None, default: Path | None = None) -> None:
    """Print ``rec`` as one JSON line and append it to ``out`` (``default`` when None; nothing when ``-``, or when
    both are None)."""
    line = json.dumps(rec)
    print(line, flush=True)
    if out == "-" or (out is None and default is None):
        return
    path = Path(out) if out else default
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(line + "\n")


def model_flops(cfg: Any, method: str, batch: int, seq: int, lora_params: int) -> dict[str, float]:
    """Analytic FLOPs per step (see the module docstring). ``cfg``: the model's ``ModelConfig``."""
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = d * q_out + 2 * d * kv_out + q_out * d + 3 * d * f
    n = layers * per_layer + d * v  # + LM head (tied or not, one D x V matmul per token)
    tok = batch * seq
    attn_fwd = 4 * layers * seq * seq * q_out * batch  # QK^T + PV, dense
    spec = get_method(method)
    if spec.uses_lora:
        policy = 4 * n * tok + 6 * lora_params * tok + 3 * attn_fwd
    else:
        policy = 6 * n * tok + 3 * attn_fwd
    policy_6n = 6 * (n + (lora_params if spec.uses_lora else 0)) * tok + 3 * attn_fwd
    reference = 2 * n * tok + attn_fwd if spec.uses_reference else 0
    return {
        "n_matmul_params": n,
        "n_lora_params": lora_params,
        "policy_flops": float(policy),
        "reference_flops": float(reference),
        "model_flops_per_step": float(policy + reference),
        "model_flops_per_step_6n": float(policy_6n + reference),
    }


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int):
    """Int32 ``[B, T]`` arrays: random token ids; labels -100 on the first 75% (prompt), ids on the rest."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int32)
    labels = ids.copy()
    labels[:, : int(PROMPT_FRACTION * seq)] = -100
    return {"input_ids_bt": ids, "labels_bt": labels, "attention_mask_bt": np.ones((batch, seq), np.int32)}


def attention_chunk_of(value: int | None) -> int | None:
    """The model's ``attention_chunk`` for ``--attention-chunk``: unset is the model default, 0 is dense (None)."""
    from selfaug_jax.models import DEFAULT_ATTENTION_CHUNK

    return DEFAULT_ATTENTION_CHUNK if value is None else (value or None)


def build_model(shape: str | None, model: str | None, *, seed: int, num_layers: int | None,
                **model_kwargs: Any) -> tuple[Any, str]:
    """The benchmarked ``DecoderLM`` and its name: random weights of ``shape`` (bench/model_shapes.py), else the
    checkpoint ``model`` (default: the default model). ``model_kwargs``: ``DecoderLM``'s options."""
    from selfaug_jax.models import DEFAULT_MODEL, load_pretrained

    if shape:
        return (model_shapes.random_model(shape, seed=seed, num_layers=num_layers, **model_kwargs),
                f"random:{shape}")
    return load_pretrained(model or DEFAULT_MODEL, num_layers=num_layers, **model_kwargs), model or DEFAULT_MODEL


def peak_fields(peak: dict[str, Any]) -> dict[str, Any]:
    """What a record keeps of the peak it divides by: the value and where / when / under what load it was taken."""
    return {"peak_flops": float(peak["peak_flops"]), "peak_flops_n": peak.get("n"),
            "peak_flops_machine": peak.get("machine"),
            "peak_flops_cpu_model": peak.get("cpu_model"), "peak_flops_device_kind": peak.get("device_kind"),
            "peak_flops_date": peak.get("date"), "peak_flops_load_avg": peak.get("load_avg"),
            "peak_flops_cached": peak.get("cached")}


def run_jax(args: argparse.Namespace) -> dict[str, Any]:
    """Build the real jitted train step, compile it ahead of time, time ``--steps`` steps; return the record."""
    import jax
    import jax.numpy as jnp

    if args.cpu_devices > 1:  # must precede JAX's backend initialisation (as in experiments/run.py)
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    sys.path.insert(0, str(ROOT))
    mesh = parse_mesh(args.mesh, args.cpu_devices)
    from selfaug_jax.host_memory import release_freed_host_memory
    from selfaug_jax.loss import SelfAugLossConfig
    from selfaug_jax.lora import LoRAConfig
    from selfaug_jax.models import DEFAULT_SCAN_UNROLL
    from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
    from selfaug_jax.train.sharding import ShardingPlan
    from selfaug_jax.train.state import init_train_state
    from selfaug_jax.train.step import StepConfig, make_train_step

    plan = ShardingPlan.from_config(mesh) if mesh is not None else None  # checks the sizes against the device count
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    peak_n = args.peak_n or (4096 if device.platform == "cpu" else 8192)
    if args.peak_only:
        peak = machine.cached_peak_flops(device.platform, device.device_kind, args.dtype, n=peak_n,
                                         remeasure=True)
        print(json.dumps(peak))
        return peak
    t0 = time.perf_counter()
    attention_chunk = attention_chunk_of(args.attention_chunk)
    model_kwargs = dict(dtype=dtype, param_dtype=dtype, remat_policy=args.remat, attention_chunk=attention_chunk,
                        attention_impl=args.attention_impl,
                        scan_unroll=DEFAULT_SCAN_UNROLL if args.scan_unroll is None else args.scan_unroll)
    model, model_name = build_model(args.shape, args.model, seed=args.seed, num_layers=args.num_layers,
                                    **model_kwargs)
    load_s = time.perf_counter() - t0
    cfg, scan_unroll = model.config, model.scan_unroll
    log(args, f"loaded {model_name} ({cfg.num_hidden_layers} layers) in {load_s:.1f}s on "
              f"{device.device_kind} ({jax.device_count()} dev), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

    optimizer, schedule = make_optimizer(OptimizerConfig(), total_steps=args.steps + 1)
    lora_config = LoRAConfig(rank=args.lora_rank)
    model_def, state = init_train_state(model, args.method, optimizer, lora_config=lora_config, seed=args.seed)
    del model
    lora_params = sum(int(x.size) for x in jax.tree.leaves(state.trainable)) if get_method(args.method).uses_lora else 0
    step_config = StepConfig(loss=SelfAugLossConfig(chunk_size=args.chunk_size))
    if plan is not None:
        state = plan.shard_state(state)
        step_fn = make_train_step(model_def, optimizer, schedule, step_config,
                                  state_shardings=plan.state_shardings(state), batch_sharding=plan.batch_sharding())
    else:
        step_fn = make_train_step(model_def, optimizer, schedule, step_config)

    def put(np_batch):
        return plan.put_batch(np_batch) if plan is not None else {k: jnp.asarray(v) for k, v in np_batch.items()}

    batches = [put(synthetic_batch(args.batch, args.seq, cfg.vocab_size, args.seed + i)) for i in range(2)]

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batches[0]).compile()  # the executable every step below runs
    compile_s = time.perf_counter() - t0
    memory = machine.xla_memory_analysis(compiled)
    rss_compile_mb = machine.peak_rss_mb()
    release_freed_host_memory()  # the compiler's freed heap, as the trainer does after its first step
    hwm_was_reset = machine.reset_peak_rss()  # from here on VmHWM is the peak of the steps alone (Linux)
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[0])
    jax.block_until_ready((state, metrics))
    first_step_s = time.perf_counter() - t0
    losses = [float(metrics["loss"])]
    log(args, f"compile {compile_s:.1f}s (XLA temp {memory.get('xla_temp_bytes', 0) / 1e9:.2f} GB), first step "
              f"{first_step_s:.1f}s, loss {losses[0]:.6f}")

    times, cpu_times = [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batches[(i + 1) % 2])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(float(metrics["loss"]))
        log(args, f"step {i + 1}/{args.steps}: {times[-1]:.2f}s wall, {cpu_times[-1]:.2f}s cpu, loss {losses[-1]:.4f}")
    if any(x != x for x in losses):
        raise SystemExit(f"loss is NaN at step {next(i for i, x in enumerate(losses) if x != x)}")

    rss_mb = machine.peak_rss_mb()  # before the peak-FLOP/s matmul, which may run below
    steps_rss_mb = machine.hwm_rss_mb() if hwm_was_reset else None
    device_peak_bytes = machine.device_peak_memory(device)
    median = statistics.median(times)
    tokens = args.batch * args.seq
    flops = model_flops(cfg, args.method, args.batch, args.seq, lora_params)
    peak = machine.cached_peak_flops(device.platform, device.device_kind, args.dtype, n=peak_n,
                                     remeasure=args.remeasure_peak)
    return {
        "impl": "jax",
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
        **peak_fields(peak),
        "mfu": flops["model_flops_per_step"] / median / float(peak["peak_flops"]),
        "mfu_6n": flops["model_flops_per_step_6n"] / median / float(peak["peak_flops"]),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "model": model_name,
        "num_layers": cfg.num_hidden_layers,
        "dtype": args.dtype,
        "remat": args.remat,
        "lora_rank": args.lora_rank if get_method(args.method).uses_lora else None,
        "chunk_size": args.chunk_size,
        "attention_chunk": attention_chunk,
        "attention_impl": args.attention_impl,
        "scan_unroll": scan_unroll,
        "device_peak_bytes": device_peak_bytes,
        "mesh": dataclasses.asdict(mesh) if mesh is not None else None,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "tag": args.tag,
        **machine.host_fields(),
    }


def run_torch(args: argparse.Namespace) -> dict[str, Any]:
    """The PyTorch HF + PEFT released step on ``--model`` (an HF directory), in this process."""
    import torch_step

    if not args.model or not Path(args.model).is_dir():
        raise SystemExit(f"--impl torch needs --model HF_DIR (got {args.model!r}); --vs-torch resolves it")
    if args.mesh or args.cpu_devices:
        raise SystemExit("--impl torch runs on one device: drop --mesh / --cpu-devices")
    defaults = _lora_defaults()
    rec = torch_step.run_torch_step(
        model_dir=args.model, method=args.method, batch=args.batch, seq=args.seq, steps=args.steps,
        dtype=args.dtype, lora_rank=args.lora_rank, lora_alpha=defaults["alpha"], lora_dropout=defaults["dropout"],
        seed=args.seed, attn_implementation=args.torch_attn, num_layers=args.num_layers,
        make_batch=synthetic_batch, log=lambda m: log(args, m))
    rec["tag"] = args.tag
    return rec


def _lora_defaults() -> dict[str, float]:
    """``selfaug_jax.lora.LoRAConfig``'s alpha and dropout (the JAX side's), read without importing JAX."""
    import ast

    src = (ROOT / "selfaug_jax" / "lora.py").read_text()
    out: dict[str, float] = {}
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ClassDef) and node.name == "LoRAConfig":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    if item.target.id in ("alpha", "dropout"):
                        out[item.target.id] = float(ast.literal_eval(item.value))
    if set(out) != {"alpha", "dropout"}:
        raise SystemExit("could not read LoRAConfig.alpha / .dropout from selfaug_jax/lora.py")
    return out


def run_vs_torch(args: argparse.Namespace) -> dict[str, Any]:
    """Our step and the PyTorch HF + PEFT released step, same weights and batches (bench/side_by_side.py)."""
    sys.path.insert(0, str(ROOT))
    from selfaug_jax.models import DEFAULT_MODEL, resolve_model_dir  # imports JAX but starts no backend

    model_dir = str(resolve_model_dir(args.model or DEFAULT_MODEL))
    return side_by_side.vs_torch(args, model_dir, lambda msg: log(args, msg), append_record, RESULTS)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.table:
        print(report.any_table(args.table))
        return None
    if args.summary:
        print(report.acceptance_summary(RESULTS, args.summary))
        return None
    if args.abstract:
        import abstract

        return abstract.main(args, log=lambda msg: log(args, msg), append=append_record)
    if args.vs_torch:
        return run_vs_torch(args)
    if args.compare_dtypes:
        return side_by_side.compare_dtypes(args, lambda msg: log(args, msg), append_record, RESULTS)
    rec = run_torch(args) if args.impl == "torch" else run_jax(args)
    if args.peak_only:
        return rec
    default = RESULTS / (f"step_{rec['platform']}.jsonl" if args.impl == "jax" else "step_torch_cpu.jsonl")
    append_record(rec, args.out, default)
    return rec


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from selfaug_jax.xla_flags import apply_default_xla_flags  # before JAX creates its backend

    apply_default_xla_flags()
    # compile_s is a figure (issue 16: <= 15 s): compile for real, never from a persistent cache the caller's
    # environment points at (JAX reads JAX_COMPILATION_CACHE_DIR at import, which happens after this line)
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    main()
