"""Subprocess worker for tests/test_sharding.py and tests/test_multiprocess.py (needs its own JAX device count).

    python tests/_sharding_worker.py MODE --devices N [--out FILE] [...]

Modes (each prints / writes one JSON object):
    meshes    1-device baseline losses, then the same steps on each ``--meshes`` mesh; per-device param bytes;
              the clear errors; optionally saves a checkpoint after ``--save-at`` steps (``--ckpt DIR``).
    restore   restore ``--ckpt`` onto ``--mesh`` and continue to ``--steps``.
    proc      one process of a multi-process run (``--process-id``, ``--num-processes``, ``--port``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_mesh(text: str) -> tuple[int, int, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        sizes[k.strip()] = int(v)
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["meshes", "restore", "proc"])
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--meshes", default="")  # ";"-separated mesh specs
    p.add_argument("--mesh", default="")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ckpt", default="")
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()

    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.mode == "proc":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    result = {"meshes": run_meshes, "restore": run_restore, "proc": run_proc}[args.mode](args)
    if jax.process_index() == 0:
        text = json.dumps(result)
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text)
    if args.mode == "proc":
        jax.distributed.shutdown()


# ---------------------------------------------------------------------- shared setup
B, T, V = 8, 16, 128


def tiny_config():
    from selfaug_jax.models.config import ModelConfig

    return ModelConfig(
        model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    )


def np_batch(step: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(1000 + step)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    labels = ids.copy()
    mask = np.ones((B, T), np.int32)
    for i in range(B):
        labels[i, : int(rng.integers(3, T // 2))] = -100
        pad = int(rng.integers(0, 4))
        if pad:
            labels[i, T - pad:] = -100
            mask[i, T - pad:] = 0
            ids[i, T - pad:] = 0
    return {"input_ids_bt": ids, "labels_bt": labels, "attention_mask_bt": mask}


def setup(plan, total_steps: int = 5):
    """(model_def, optimizer, state, step_fn) for selfaug on the tiny llama, on ``plan`` (None = one device)."""
    from flax import nnx

    from selfaug_jax.lora import LoRAConfig
    from selfaug_jax.models.decoder import DecoderLM
    from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
    from selfaug_jax.train.state import init_train_state
    from selfaug_jax.train.step import make_train_step

    model = DecoderLM(tiny_config(), rngs=nnx.Rngs(0))
    opt, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, schedule="cosine"), total_steps)
    model_def, state = init_train_state(model, "selfaug", opt, lora_config=LoRAConfig(rank=4, dropout=0.1), seed=0)
    if plan is None:
        return model_def, state, make_train_step(model_def, opt, sched)
    state = plan.shard_state(state)
    step_fn = make_train_step(
        model_def, opt, sched, state_shardings=plan.state_shardings(state), batch_sharding=plan.batch_sharding()
    )
    return model_def, state, step_fn


def put(plan, batch, *, is_global=True):
    import jax.numpy as jnp

    if plan is None:
        return {k: jnp.asarray(v) for k, v in batch.items()}
    return plan.put_batch(batch, is_global=is_global)


def train(plan, state, step_fn, steps: range) -> tuple[object, list[float]]:
    losses = []
    for s in steps:
        state, metrics = step_fn(state, put(plan, np_batch(s)))
        losses.append(float(metrics["loss"]))
    return state, losses


def make_plan(spec: str):
    from types import SimpleNamespace

    from selfaug_jax.train.sharding import ShardingPlan

    d, f, t = parse_mesh(spec)
    return ShardingPlan.from_config(SimpleNamespace(data=d, fsdp=f, tensor=t, cpu_devices=None, distributed=False))


def single_device_losses(steps: int) -> list[float]:
    import jax

    with jax.default_device(jax.devices()[0]):
        _, state, step_fn = setup(None)
        return train(None, state, step_fn, range(steps))[1]


# ---------------------------------------------------------------------- modes
def run_meshes(args) -> dict:
    import jax

    from selfaug_jax.train.sharding import (
        ShardingError, ShardingPlan, path_str, per_device_param_bytes, total_param_bytes,
    )

    out: dict = {"device_count": jax.device_count(), "losses": {}, "times": {}}
    t0 = time.perf_counter()
    out["losses"]["single"] = single_device_losses(args.steps)
    out["times"]["single"] = time.perf_counter() - t0
    for spec in filter(None, args.meshes.split(";")):
        t0 = time.perf_counter()
        plan = make_plan(spec)
        _, state, step_fn = setup(plan)
        if parse_mesh(spec) == (1, 8, 1):
            out["frozen_bytes_fsdp8"] = per_device_param_bytes(state.frozen)
            out["frozen_bytes_total"] = total_param_bytes(state.frozen)
            out["trainable_bytes_fsdp8"] = per_device_param_bytes(state.trainable)
            out["trainable_bytes_total"] = total_param_bytes(state.trainable)
            out["q_kernel_spec"] = str(state.frozen["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec)
        if parse_mesh(spec) == (2, 2, 2):
            flat = {path_str(path): str(x.sharding.spec) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
            out["specs_222"] = {k: v for k, v in flat.items() if "layers/" in k or "embed" in k or "lm_head" in k
                                or k.startswith("step") or k.startswith("rng")}
        if args.ckpt and args.save_at:
            state, first = train(plan, state, step_fn, range(args.save_at))
            if parse_mesh(spec) == parse_mesh(args.mesh or spec):
                from selfaug_jax.checkpoints.orbax import TrainCheckpointer

                ckpt = TrainCheckpointer(args.ckpt)
                ckpt.save(args.save_at, state, {"note": "test"})
                ckpt.close()
            state, rest = train(plan, state, step_fn, range(args.save_at, args.steps))
            losses = first + rest
        else:
            state, losses = train(plan, state, step_fn, range(args.steps))
        out["losses"][spec] = losses
        out["times"][spec] = time.perf_counter() - t0

    # clear errors
    errors = {}
    for name, fn in {
        "mesh_mismatch": lambda: make_plan("data=3"),
        "vocab": lambda: ShardingPlan(make_plan("tensor=8").mesh).spec_for(
            "embed_tokens/embedding", (100, 32), ("vocab", "embed")),
        "heads": lambda: ShardingPlan(make_plan("tensor=8").mesh).spec_for(
            "layers/self_attn/k_proj/kernel", (32, 12), ("embed", "kv_heads")),
        "batch": lambda: make_plan("data=8").put_batch({"input_ids_bt": np_batch(0)["input_ids_bt"][:6]}),
    }.items():
        try:
            fn()
            errors[name] = None
        except ShardingError as e:
            errors[name] = str(e)
    plan_rep = ShardingPlan(make_plan("tensor=8").mesh, allow_replicate=True)
    errors["replicate_spec"] = str(plan_rep.spec_for("embed_tokens/embedding", (100, 32), ("vocab", "embed")))
    out["errors"] = errors
    return out


def run_restore(args) -> dict:
    import jax

    from selfaug_jax.checkpoints.orbax import TrainCheckpointer

    plan = make_plan(args.mesh) if jax.device_count() > 1 else None
    _, state, step_fn = setup(plan)
    ckpt = TrainCheckpointer(args.ckpt)
    state, extra = ckpt.restore(state)
    ckpt.close()
    start = int(state.step)
    leaf = jax.tree.leaves(state.trainable)[0]
    _, losses = train(plan, state, step_fn, range(start, args.steps))
    return {"start": start, "losses": losses, "extra": extra, "device_count": jax.device_count(),
            "restored_sharding": str(getattr(leaf.sharding, "spec", leaf.sharding))}


def run_proc(args) -> dict:
    """One process of ``--num-processes``: each loads only its rows of every global batch."""
    import jax

    plan = make_plan(args.mesh)
    _, state, step_fn = setup(plan)
    losses = []
    rows = plan.process_batch_slice(B)
    for s in range(args.steps):
        local = {k: v[rows] for k, v in np_batch(s).items()}
        state, metrics = step_fn(state, plan.put_batch(local))
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "rows": [rows.start, rows.stop]}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
