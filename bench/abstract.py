"""``bench/step.py --abstract``: compile the 7B ``selfaug`` step of every shipped 7B preset without any weights.

Scale by simulation (issue 16, item 7). For each preset's mesh, the Qwen2.5-7B-shaped model (config only:
``bench/model_shapes.py``'s ``qwen2.5-7b``, the public ``config.json`` fields of Qwen/Qwen2.5-7B-Instruct, the
same numbers as ``docs/SCALING.md`` section 2) is built under ``jax.eval_shape`` -- parameters, LoRA adapters and
Adam state are ``jax.ShapeDtypeStruct`` s, nothing is allocated -- and the real ``make_train_step`` (with the preset's
``ShardingPlan``, dtype, remat, LoRA rank, loss chunk and micro-batch) is lowered and compiled for
:data:`FAKE_DEVICES` fake CPU devices (``jax_num_cpu_devices``). Each record holds the compile time and XLA's
per-device buffer assignment (``memory_analysis()``: arguments, temporaries, outputs, aliases) next to
``docs/SCALING.md``'s arithmetic for the same shape (:func:`scaling_estimate_bytes`).

Meshes of another size are resized on the ``data`` axis to exactly 8 devices (``tpu-v4-32-7b``'s data=4, fsdp=4
becomes data=2, fsdp=4; ``tpu-v5p-7b``'s data=4 becomes data=8): the per-device batch, the weight sharding factor
``fsdp * tensor`` and therefore the per-device memory stay those of the preset; the record says so (``mesh`` vs
``preset_mesh``, ``mesh_note``).
``tpu-v5e-8`` ships a 0.5B model; its comment's 7B setting (mesh fsdp=8, 4K) is compiled as ``tpu-v5e-8-7b``.

CPU caveat: this is XLA:CPU's buffer assignment of the SPMD-partitioned program, not TPU / GPU's. XLA:CPU keeps
a float32 copy of every stacked bf16 frozen weight for the whole step (``4·L·P_layer/S`` bytes of temporaries;
not in the HLO it is given), all-gathers bf16 weights as float32 and fuses differently, so temporaries exceed an
accelerator's (``docs/SCALING.md`` section 7 has the diagnosis); the argument bytes (weights, adapters, optimizer
state, batch) are exact.

``--num-layers N`` keeps the first N layers (the estimate uses the same N) and ``--seq T`` sets the length, for
quick compiles; the full run is ``--abstract`` alone (about 1-2 min per preset with the scanned layers).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from model_shapes import shape_config  # bench/ sibling (bench/ is on sys.path, as for step.py's helpers)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
FAKE_DEVICES = 8

# preset -> mesh / data overrides for presets whose shipped model is not the 7B (their comment's 7B setting).
PRESETS_7B: dict[str, dict[str, Any]] = {
    "tpu-v4-32-7b": {},
    "tpu-v5p-7b": {},
    "gpu-8x-7b": {},
    "tpu-v5e-8-7b": {"base": "tpu-v5e-8", "mesh": {"data": 1, "fsdp": 8, "tensor": 1}, "max_length": 4096},
}


def scaled_mesh(mesh: dict[str, int], n_devices: int) -> tuple[dict[str, int], str]:
    """Resize the ``data`` axis so the mesh has exactly ``n_devices`` devices; returns the mesh and a note.

    Only ``data`` changes, so the per-device batch and the weight sharding ``fsdp * tensor`` -- hence every
    per-device shape and XLA's per-device memory -- stay the preset's; only the global batch changes.
    """
    shards = mesh["fsdp"] * mesh["tensor"]
    if n_devices % shards:
        raise SystemExit(f"mesh {mesh}: fsdp x tensor = {shards} does not divide {n_devices} fake devices")
    out = {**mesh, "data": n_devices // shards}
    note = "as shipped" if out == mesh else (f"data axis {mesh['data']} -> {out['data']} to make {n_devices} "
                                             "devices (per-device shapes unchanged)")
    return out, note


def scaling_estimate_bytes(cfg: Any, *, per_device_batch: int, seq: int, rank: int, shards: int, tensor: int,
                           loss_chunk: int, attention_chunk: int | None, global_batch: int | None = None) -> float:
    """docs/SCALING.md section 6, per chip, for remat + the fused loss + the built-in query-chunked attention.

    ``per chip = 2P/S + [S>1]·2·(2·P_layer)/tensor + [fsdp>1]·2·D·V + 16·lora(r) + b·(L·T·D·2 + T·act/tok/L / tensor)
    + attn + logits + b·T·D·2`` with attn = ``b·H·C·T·4`` (one query chunk of fp32 scores; ``H·T²·4`` if
    unchunked), logits = ``4·c·V·4`` and ``[fsdp>1]·2·D·V`` the LM head all-gathered for the loss (its ``D`` axis is
    sharded over ``fsdp``; every chunk's matmul needs all of it). ``c`` = the loss chunk's tokens *per device*:
    ``loss.chunk_size`` counts tokens of the global micro-batch (``selfaug_loss_from_hidden`` takes
    ``ceil(chunk_size / B)`` positions of each of the ``B`` sequences), so ``c = ceil(loss_chunk / global_batch) · b``
    when ``global_batch`` (sequences per micro-step, all devices) is given, else ``loss_chunk``.
    """
    d, f, v, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    h, k, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    p_total = cfg.num_params()
    p_layer = (d * h * hd + h * hd + 2 * (d * k * hd + k * hd) + h * hd * d + 3 * d * f + 2 * d)
    lora = layers * rank * ((d + h * hd) + 2 * (d + k * hd) + (h * hd + d) + 2 * (d + f) + (f + d))
    act_per_token_layer = (5 * d + 2 * k * hd + 3 * f) * 2
    b, t = per_device_batch, seq
    attn = b * h * (attention_chunk or t) * t * 4
    chunk_tokens = loss_chunk if global_batch is None else min(t, -(-loss_chunk // global_batch)) * b
    gathered_head = 2 * d * v if shards > tensor else 0  # fsdp > 1
    total = (2 * p_total / shards + (2 * 2 * p_layer / tensor if shards > 1 else 0) + gathered_head + 16 * lora
             + b * (layers * t * d * 2 + t * act_per_token_layer / tensor) + attn + 4 * chunk_tokens * v * 4
             + b * t * d * 2)
    return float(total)


def compile_preset(name: str, num_layers: int | None, seq: int | None, log) -> dict[str, Any]:
    """Lower + compile the preset's selfaug step on the fake devices; return the record."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from selfaug_jax.experiment.config import MeshSection, build_config
    from selfaug_jax.lora import LoRAConfig
    from selfaug_jax.models import DecoderLM, ModelConfig
    from selfaug_jax.train.optimizer import make_optimizer
    from selfaug_jax.train.sharding import ShardingPlan
    from selfaug_jax.train.state import init_train_state
    from selfaug_jax.train.step import StepConfig, make_train_step

    spec = PRESETS_7B[name]
    cfg = build_config(spec.get("base", name), check_paths=False)
    preset_mesh = spec.get("mesh") or {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    mesh, mesh_note = scaled_mesh(preset_mesh, FAKE_DEVICES)
    seq = seq or spec.get("max_length") or cfg.data.max_length
    accum = cfg.train.grad_accum_steps
    batch_shards = preset_mesh["data"] * preset_mesh["fsdp"]
    per_device_batch = cfg.train.batch_size // accum // batch_shards
    if per_device_batch < 1 or cfg.train.batch_size % (accum * batch_shards):
        raise SystemExit(f"{name}: batch_size {cfg.train.batch_size} / grad_accum {accum} does not split over "
                         f"data x fsdp = {batch_shards}")
    global_batch = per_device_batch * mesh["data"] * mesh["fsdp"] * accum
    model_cfg = ModelConfig.from_hf_dict(shape_config("qwen2.5-7b", num_layers))
    dtype, param_dtype = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.param_dtype)
    optimizer, schedule = make_optimizer(cfg.optimizer, total_steps=1000)
    lora_cfg = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules)
    holder: dict[str, Any] = {}

    def build():
        # The model options the runner passes (experiment/runner.py load_model); attention "auto" resolves to the
        # CPU kernel here, as the fake devices are CPUs.
        model = DecoderLM(model_cfg, dtype=dtype, param_dtype=param_dtype, remat_policy=cfg.model.remat,
                          attention_chunk=cfg.model.attention_chunk, attention_impl=cfg.model.attention_impl,
                          scan_unroll=cfg.model.scan_unroll, rngs=nnx.Rngs(0))
        model_def, state = init_train_state(model, "selfaug", optimizer, lora_config=lora_cfg, seed=0)
        holder["model_def"] = model_def  # static graph definitions (no arrays)
        return state

    t0 = time.perf_counter()
    abstract_state = jax.eval_shape(build)  # ShapeDtypeStructs only
    plan = ShardingPlan.from_config(MeshSection(**mesh))
    state_shardings = plan.state_shardings(abstract_state)
    step_fn = make_train_step(holder["model_def"], optimizer, schedule,
                              StepConfig(loss=cfg.loss, grad_accum_steps=accum,
                                         accum_normalization=cfg.train.accum_normalization),
                              state_shardings=state_shardings, batch_sharding=plan.batch_sharding())
    batch = {key: jax.ShapeDtypeStruct((global_batch, seq), jnp.int32)
             for key in ("input_ids_bt", "labels_bt", "attention_mask_bt")}
    log(f"{name}: lowering (mesh {mesh}, {model_cfg.num_hidden_layers} layers, global batch {global_batch} x {seq}, "
        f"{cfg.model.dtype}/{cfg.model.param_dtype}, remat {cfg.model.remat})")
    lowered = step_fn.lower(abstract_state, batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    import machine

    memory = machine.xla_memory_analysis(compiled)
    total = (memory.get("xla_argument_bytes", 0) + memory.get("xla_temp_bytes", 0)
             + memory.get("xla_output_bytes", 0) - memory.get("xla_alias_bytes", 0))
    shards = mesh["fsdp"] * mesh["tensor"]
    estimate = scaling_estimate_bytes(model_cfg, per_device_batch=per_device_batch, seq=seq, rank=cfg.lora.rank,
                                      shards=shards, tensor=mesh["tensor"], loss_chunk=cfg.loss.chunk_size,
                                      attention_chunk=cfg.model.attention_chunk,
                                      global_batch=global_batch // accum)
    log(f"{name}: lowered in {lower_s:.1f}s, compiled in {compile_s:.1f}s; per device: args "
        f"{memory.get('xla_argument_bytes', 0) / 1e9:.2f} GB, temp {memory.get('xla_temp_bytes', 0) / 1e9:.2f} GB, "
        f"total {total / 1e9:.2f} GB vs SCALING.md {estimate / 1e9:.2f} GB")
    return {
        "mode": "abstract", "preset": name, "mesh": mesh, "preset_mesh": preset_mesh, "mesh_note": mesh_note,
        "fake_devices": FAKE_DEVICES, "num_layers": model_cfg.num_hidden_layers, "seq": seq,
        "per_device_batch": per_device_batch, "global_batch": global_batch, "grad_accum_steps": accum,
        "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype, "remat": cfg.model.remat,
        "attention_chunk": cfg.model.attention_chunk, "scan_unroll": cfg.model.scan_unroll,
        "loss_chunk": cfg.loss.chunk_size, "lora_rank": cfg.lora.rank,
        "n_params": model_cfg.num_params(), "lower_s": lower_s, "compile_s": compile_s, **memory,
        "per_device_total_bytes": total, "scaling_estimate_bytes": estimate, "scaling_estimate_gb": estimate / 1e9,
        "jax_version": jax.__version__,
    }


def main(args: argparse.Namespace, *, log: Callable[[str], None],
         append: Callable[[dict[str, Any], str | None, Path], None]) -> list[dict[str, Any]]:
    """Compile every requested preset (``args.preset``, default all of :data:`PRESETS_7B`).

    ``log`` prints progress; ``append(record, args.out, default_path)`` prints and stores each record (both from
    ``bench/step.py``).
    """
    import jax

    import machine
    import report

    jax.config.update("jax_num_cpu_devices", FAKE_DEVICES)  # before the CPU backend starts
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    names = args.preset or list(PRESETS_7B)
    unknown = [n for n in names if n not in PRESETS_7B]
    if unknown:
        raise SystemExit(f"--preset: {unknown} not among the 7B presets {list(PRESETS_7B)}")
    if jax.device_count() != FAKE_DEVICES:
        raise SystemExit(f"--abstract needs {FAKE_DEVICES} fake CPU devices, JAX has {jax.device_count()} "
                         "(was the backend started before --abstract set jax_num_cpu_devices?)")
    seq = args.seq_given  # None: each preset's data.max_length
    recs = []
    for name in names:
        rec = compile_preset(name, args.num_layers, seq, log)
        rec.update(tag=args.tag, **machine.host_fields())
        append(rec, args.out, BENCH / "results" / "abstract_7b.jsonl")
        recs.append(rec)
    print(report.abstract_table(recs), file=sys.stderr)
    return recs

