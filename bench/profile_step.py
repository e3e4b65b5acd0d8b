"""Where a train step's time goes: XLA cost analysis, the optimized HLO's op census and a per-op profile.

Builds the same step as ``bench/step.py`` (real ``init_train_state`` + ``make_train_step``, synthetic batch), then

* ``--hlo-out FILE``: writes the optimized HLO text of the compiled step;
* prints the op census of every ``while`` body (copies, dynamic-(update-)slices, transposes, dots, fusions,
  random-bit generators) -- the layer scan's forward and backward bodies are the two biggest;
* runs ``--steps`` steps under ``jax.profiler.trace`` and aggregates the XLA:CPU thunk events of the trace
  (``jax.profiler.ProfileData``, read offline from the ``.xplane.pb``) into total self-time per HLO op and per
  category (dot / matmul custom call, elementwise fusion, copy, dynamic-update-slice, random bits, reduce, other),
  printing the top ``--top`` ops with their HLO text.

Usage::

    python bench/profile_step.py --method selfaug --num-layers 4 --steps 2 --hlo-out /tmp/step.hlo

Numbers are CPU-time shares of one process's XLA thunks; on a loaded host compare shares, not seconds.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="selfaug")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--remat", default="dots")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--attention-chunk", type=int, default=None,
                   help="query-chunk length of the attention (default: the model default; 0: dense)")
    p.add_argument("--shape", default=None, help="random weights of a bench/model_shapes.py shape (no checkpoint)")
    p.add_argument("--attention-impl", default="auto", help="model.attention_impl (auto: cudnn on GPU)")
    p.add_argument("--trace-out", default=None, help="also copy the trace's .xplane.pb here (read it offline)")
    p.add_argument("--hlo-out", default=None)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--no-trace", action="store_true")
    return p.parse_args(argv)


def categorize(hlo_line: str, name: str, dot_computations: frozenset[str] = frozenset()) -> str:
    """A coarse category of one optimized-HLO instruction line.

    ``dot_computations``: names of fused computations that contain a dot (an XNNPACK / YNNPACK fusion calling one
    is a matmul with fused operand slices / epilogues; one without a dot is a reduction or elementwise op)."""
    called = re.search(r"calls=%([\w.\-]+)", hlo_line)
    if name.startswith(("ynn_fusion", "xnn_fusion")):
        return "dot" if called and called.group(1) in dot_computations else "reduce"
    if " dot(" in hlo_line or "__onednn$matmul" in hlo_line:
        return "dot"
    if "convolution(" in hlo_line:
        return "dot"
    if "rng-bit-generator" in hlo_line or "threefry" in hlo_line.lower() or "random_bits" in hlo_line:
        return "random"
    if "dynamic-update-slice" in hlo_line or "dynamic_update_slice" in name:
        return "dynamic-update-slice"
    if " copy(" in hlo_line or name.startswith("copy"):
        return "copy"
    if " transpose(" in hlo_line:
        return "transpose"
    if "kind=kLoop" in hlo_line or "kind=kInput" in hlo_line or "kind=kOutput" in hlo_line:
        return "fusion"
    if " reduce(" in hlo_line:
        return "reduce"
    if " while(" in hlo_line or " conditional(" in hlo_line or " call(" in hlo_line:
        return "control"
    return "other"


COMPONENTS = (  # (component, regex on the op's metadata op_name), first match wins
    ("lora-dropout bits", r"lora_dropout_hash|bernoulli|random_bits|threefry|_uniform"),
    # the head as [D, V] ("dv") or as the tied embedding [V, D] ("vd", loss.head_layout)
    # ("sbtd,..->sbtv": policy and reference stacked through one shared head, the closed-form chunk)
    ("loss: head matmuls",
     r"btd,dv->btv|btv,dv->btd|dv->btv|->btd/dot|,dv->|btd,vd->btv|btv,vd->btd|sbtd,(dv|vd)->sbtv"),
    # the fused loss's live-chunk branch (its skip_unweighted lax.cond, the only cond in the step) holds the rest
    ("loss: softmax/KL/CE", r"log_softmax|closed_call/jvp\(\)/|selfaug|_ce_|kl|cond/branch_\d+_fun"),
    ("attention", r"bkgts|btkgd|bkmd|bkms|softmax|attention|one_chunk"),
    ("optimizer", r"adam|clip|global_norm|apply_updates|optax"),
)


def component(hlo_line: str) -> str:
    m = re.search(r'op_name="([^"]*)"', hlo_line)
    op = m.group(1) if m else ""
    for comp, rx in COMPONENTS:
        if re.search(rx, op):
            return comp
    phase = ("layers: backward" if "transpose(jvp" in op else "layers: forward") if "while/body" in op else "other"
    if "rematted_computation" in op:
        phase = "layers: remat recompute"
    return phase


def self_times(lines_events):
    """Self time of every event (its duration minus that of events nested in it on the same line)."""
    out = []
    for events in lines_events:
        evs = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
        stack = []  # [end_ns, name, self_ns]
        for ev in evs:
            while stack and ev.start_ns >= stack[-1][0]:
                out.append(tuple(stack.pop()[1:]))
            if stack:
                stack[-1][2] -= ev.duration_ns
            stack.append([ev.start_ns + ev.duration_ns, ev.name, ev.duration_ns])
        out.extend(tuple(x[1:]) for x in stack)
    return out


def census(hlo_text: str) -> None:
    """Op counts of each computation used as a while body (and the entry), biggest first."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            current = m.group(2)
            comps[current] = []
        elif current is not None and line.startswith("  "):
            comps[current].append(line)
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
    ops = ("dot(", "copy(", "dynamic-slice(", "dynamic-update-slice(", "transpose(", "fusion(", "rng-bit-generator(",
           "custom-call(", "while(", "reduce(", "broadcast(", "bitcast(")
    rows = []
    for name, lines in comps.items():
        if name not in bodies:
            continue
        counts = {op: sum(1 for ln in lines if f" {op}" in ln) for op in ops}
        rows.append((len(lines), name, counts))
    rows.sort(reverse=True)
    print("\n== while bodies (optimized HLO): instruction census ==")
    for n, name, counts in rows[:12]:
        print(f"{name}: {n} instr; " + ", ".join(f"{k[:-1]}={v}" for k, v in counts.items() if v))


# Accelerator kernels that are matrix products or fused attention, by name (cuBLAS / CUTLASS / cuDNN / Triton).
# Seen on an H200 (jax 0.11.2): cuBLAS "nvjet_sm90_*", Triton "gemm_fusion_dot*", cuDNN "*_sdpa_*_flash_*".
_GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|matmul|_dot_", re.I)
_ATTENTION_KERNEL = re.compile(r"sdpa|flash|fmha", re.I)


def device_kernel_profile(data, line_of: dict, dot_computations: frozenset[str], steps: int, top: int) -> None:
    """GPU / TPU: total kernel time per category from the device planes' kernel (stream) lines.

    A kernel is a matmul or fused attention by its name (cuBLAS / Triton GEMM / cuDNN), else categorized from its
    HLO instruction (the ``hlo_op`` stat) like the CPU thunks; its component comes from that instruction. Run with
    ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` on a GPU: inside a command buffer (a CUDA graph) kernels are
    traced as one ``command_buffer_N`` event each, with no HLO instruction. Printed next to the
    sum: the step's device-busy time, so idle gaps between kernels (launch or host waits) show as the difference
    from the wall time."""
    per_kernel, per_cat, per_comp = collections.Counter(), collections.Counter(), collections.Counter()
    busy_ns, first, last = 0, None, None
    for plane in data.planes:
        if not plane.name.startswith(("/device:GPU", "/device:TPU")):
            continue
        lines = list(plane.lines)
        kernel_lines = [ln for ln in lines if ln.name.startswith("Stream")] or lines
        for line in kernel_lines:
            for ev in line.events:
                stats = dict(ev.stats)
                op = str(stats.get("hlo_op", "") or "")
                comp = component(line_of[op]) if op in line_of else "unattributed"
                if _ATTENTION_KERNEL.search(ev.name):  # before GEMM: cuDNN's attention kernels use wgmma too
                    cat = "attention"
                elif _GEMM_KERNEL.search(ev.name):
                    cat = "dot"
                else:
                    cat = categorize(line_of[op], op, dot_computations) if op in line_of else "other kernel"
                per_kernel[(op or ev.name)[:120], cat] += ev.duration_ns
                per_cat[cat] += ev.duration_ns
                per_comp[comp, "matmul" if cat == "dot" else "rest"] += ev.duration_ns
                busy_ns += ev.duration_ns
                first = ev.start_ns if first is None else min(first, ev.start_ns)
                last = ev.end_ns if last is None else max(last, ev.end_ns)
    if not busy_ns:
        print("no device kernel events in the trace; planes:", [p.name for p in data.planes])
        return
    span = (last - first) / 1e9 / steps
    print(f"\n== device kernel time per step: {busy_ns / 1e9 / steps:.4f} s busy over a {span:.4f} s span ==")
    for cat, ns in per_cat.most_common():
        print(f"  {cat:22s} {ns / 1e9 / steps:8.4f} s  {100 * ns / busy_ns:5.1f}%")
    print("\n== per component: matmul / rest (s per step) ==")
    comps = sorted({c for c, _ in per_comp}, key=lambda c: -(per_comp[c, "matmul"] + per_comp[c, "rest"]))
    for comp in comps:
        mm, rest = per_comp[comp, "matmul"], per_comp[comp, "rest"]
        print(f"  {comp:26s} matmul {mm / 1e9 / steps:8.4f} s   rest {rest / 1e9 / steps:8.4f} s")
    print(f"\n== top {top} kernels / HLO ops ==")
    for (name, cat), ns in per_kernel.most_common(top):
        hlo = line_of.get(name, "")[:200]
        print(f"{ns / 1e9 / steps:8.5f} s  {cat:12s} {name}  {hlo}")


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from selfaug_jax.loss import SelfAugLossConfig
    from selfaug_jax.lora import LoRAConfig
    from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
    from selfaug_jax.train.state import init_train_state
    from selfaug_jax.train.step import StepConfig, make_train_step
    from step import attention_chunk_of, build_model, synthetic_batch

    dtype = jnp.dtype(args.dtype)
    attention_chunk = attention_chunk_of(args.attention_chunk)
    model, _ = build_model(args.shape, None, seed=0, num_layers=args.num_layers, dtype=dtype, param_dtype=dtype,
                           remat_policy=args.remat, attention_chunk=attention_chunk,
                           attention_impl=args.attention_impl)
    optimizer, schedule = make_optimizer(OptimizerConfig(), total_steps=args.steps + 1)
    model_def, state = init_train_state(model, args.method, optimizer, lora_config=LoRAConfig(), seed=0)
    step_fn = make_train_step(model_def, optimizer, schedule, StepConfig(loss=SelfAugLossConfig(chunk_size=args.chunk_size)))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(args.batch, args.seq, model.config.vocab_size, 0).items()}
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    print(f"compile {time.perf_counter() - t0:.1f}s")
    text = compiled.as_text()
    if args.hlo_out:
        Path(args.hlo_out).write_text(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    print("cost analysis: flops %.3g, bytes accessed %.3g, transcendentals %.3g" % (
        cost.get("flops", 0), cost.get("bytes accessed", 0), cost.get("transcendentals", 0)))
    census(text)
    dot_computations = frozenset(
        m.group(1) for m in re.finditer(r"^%([\w.\-]+) [^\n]*\{\n(?:(?!^\}).*\n)*?.* dot\(", text, re.M))
    line_of = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(ROOT )?%?([\w.\-]+) = ", line)
        if m:
            line_of[m.group(2)] = line.strip()

    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if args.no_trace:
        return
    tmp = tempfile.mkdtemp(prefix="selfaug_prof_")
    c0, t0 = time.process_time(), time.perf_counter()
    with jax.profiler.trace(tmp):
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
    wall, cpu = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
    print(f"traced steps: {wall:.2f} s wall, {cpu:.2f} s cpu per step")
    from jax.profiler import ProfileData

    pb = next(Path(tmp).rglob("*.xplane.pb"))
    if args.trace_out:
        Path(args.trace_out).mkdir(parents=True, exist_ok=True)
        shutil.copy(pb, Path(args.trace_out) / pb.name)
    data = ProfileData.from_serialized_xspace(pb.read_bytes())
    if jax.default_backend() != "cpu":
        device_kernel_profile(data, line_of, dot_computations, args.steps, args.top)
        return
    per_op = collections.Counter()
    per_op_n = collections.Counter()
    all_lines = [list(line.events) for plane in data.planes for line in plane.lines]
    for name, ns in self_times(all_lines):
        if name in line_of:
            per_op[name] += ns
            per_op_n[name] += 1
    total = sum(per_op.values())
    per_cat = collections.Counter()
    per_comp = collections.Counter()
    per_comp_cat = collections.Counter()
    for name, ns in per_op.items():
        cat, comp = categorize(line_of[name], name, dot_computations), component(line_of[name])
        per_cat[cat] += ns
        per_comp[comp] += ns
        per_comp_cat[(comp, "matmul" if cat == "dot" else "rest")] += ns
    print(f"\n== thunk self time per step: {total / 1e9 / args.steps:.3f} s (wall time of XLA ops, all threads) ==")
    for cat, ns in per_cat.most_common():
        print(f"  {cat:22s} {ns / 1e9 / args.steps:8.3f} s  {100 * ns / max(total, 1):5.1f}%")
    print("\n== per component: matmul / rest (s per step, share of total) ==")
    for comp, ns in per_comp.most_common():
        mm, rest = per_comp_cat[(comp, "matmul")], per_comp_cat[(comp, "rest")]
        print(f"  {comp:26s} {ns / 1e9 / args.steps:8.3f} s {100 * ns / max(total, 1):5.1f}%   matmul "
              f"{mm / 1e9 / args.steps:7.3f} s   rest {rest / 1e9 / args.steps:7.3f} s")
    print(f"\n== top {args.top} ops ==")
    for name, ns in per_op.most_common(args.top):
        print(f"{ns / 1e9 / args.steps:8.4f} s x{per_op_n[name] // args.steps:4d}  {categorize(line_of[name], name, dot_computations):8s} "
              f"{component(line_of[name])[:18]:18s} "
              f"{line_of[name][:260]}")


if __name__ == "__main__":
    main()
