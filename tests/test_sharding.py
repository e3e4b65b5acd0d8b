"""ShardingPlan: rules, clear errors, and sharded training equal to one device (8 fake CPU devices, subprocesses).

The multi-device runs live in ``tests/_sharding_worker.py`` (a fresh process can fake 8 host devices; this pytest
process may already have initialised JAX with one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from selfaug_jax.train.sharding import LOGICAL_TO_MESH, ShardingError, ShardingPlan, logical_axes_of, path_str

WORKER = Path(__file__).with_name("_sharding_worker.py")
# No pure "data=8": the data axis is exercised by 2x2x2, and the 8-way batch split (one row per device) by fsdp=8
# (the batch is sharded over data x fsdp); each mesh costs a compile in the worker.
MESHES = ("data=2,fsdp=2,tensor=2", "fsdp=8", "tensor=2,fsdp=4")
SAVE_MESH = "data=2,fsdp=2,tensor=2"
STEPS, SAVE_AT = 5, 3
RTOL = 1e-5


def run_worker(*args: str, timeout: float = 600) -> dict:
    """Run the worker in a fresh process (killed on timeout); returns its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=WORKER.parents[1],
    )
    if proc.returncode != 0:
        raise AssertionError(f"worker {args} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# ---------------------------------------------------------------------- rules (in process, no devices needed)
def test_param_rules_give_the_documented_logical_axes():
    assert logical_axes_of("embed_tokens/embedding", 2) == ("vocab", "embed")
    # decoder-layer parameters are stacked: a replicated "layers" axis in front
    assert logical_axes_of("layers/self_attn/q_proj/kernel", 3) == ("layers", "embed", "heads")
    assert logical_axes_of("layers/self_attn/k_proj/kernel", 3) == ("layers", "embed", "kv_heads")
    assert logical_axes_of("layers/self_attn/o_proj/kernel", 3) == ("layers", "heads", "embed")
    assert logical_axes_of("layers/mlp/up_proj/kernel", 3) == ("layers", "embed", "mlp")
    assert logical_axes_of("layers/mlp/down_proj/kernel", 3) == ("layers", "mlp", "embed")
    assert logical_axes_of("lm_head/kernel", 2) == ("embed", "vocab")
    assert logical_axes_of("layers/self_attn/v_proj/lora_a", 3) == ("layers", "embed", "rank")
    assert logical_axes_of("layers/self_attn/v_proj/lora_b", 3) == ("layers", "rank", "kv_heads")
    assert logical_axes_of("layers/self_attn/q_proj/bias", 2) == ("layers", "heads")
    assert logical_axes_of("layers/input_layernorm/scale", 2) == ("layers", "norm")
    assert logical_axes_of("layers/self_attn/q_norm/scale", 2) == ("layers", "norm")
    assert logical_axes_of("norm/scale", 1) == ("norm",)
    assert LOGICAL_TO_MESH["layers"] is None
    # optax moments mirror the parameter paths; scalars are replicated
    assert logical_axes_of("opt_state/1/0/mu/layers/mlp/gate_proj/lora_b", 3) == ("layers", "rank", "mlp")
    assert logical_axes_of("opt_state/1/0/count", 0) == ()
    assert LOGICAL_TO_MESH["batch"] == ("data", "fsdp") and LOGICAL_TO_MESH["embed"] == "fsdp"
    with pytest.raises(ShardingError, match="gives 3 axes"):
        logical_axes_of("layers/mlp/up_proj/kernel", 2)


def test_path_str_drops_variable_value():
    tree = {"layers": [{"mlp": {"up_proj": {"kernel": np.zeros((2, 2))}}}]}
    (path, _), = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert path_str(path) == "layers/0/mlp/up_proj/kernel"


def test_mesh_device_mismatch_is_a_clear_error():
    n = jax.device_count()
    with pytest.raises(ShardingError, match=rf"needs {2 * n} devices but JAX sees {n}.*--cpu-devices {2 * n}"):
        ShardingPlan.from_config(SimpleNamespace(data=2 * n, fsdp=1, tensor=1, cpu_devices=None, distributed=False))


def test_single_device_plan_replicates_everything():
    plan = ShardingPlan.from_config(SimpleNamespace(data=jax.device_count(), fsdp=1, tensor=1))
    assert plan.spec_for("lm_head/kernel", (32, 100), ("embed", "vocab")) == P()
    assert plan.batch_sharding().spec == P(("data", "fsdp"), None)


# ---------------------------------------------------------------------- 8 fake devices
@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("sharding") / "ckpt"
    out = run_worker("meshes", "--devices", "8", "--meshes", ";".join(MESHES), "--steps", str(STEPS),
                     "--ckpt", str(ckpt), "--save-at", str(SAVE_AT), "--mesh", SAVE_MESH)
    out["ckpt"] = str(ckpt)
    return out


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_losses_equal_single_device(mesh_run, mesh):
    single = mesh_run["losses"]["single"]
    got = mesh_run["losses"][mesh]
    assert mesh_run["device_count"] == 8 and len(got) == STEPS
    assert len(set(np.round(single, 6))) > 1  # the loss really moves (LoRA dropout + updates)
    assert rel_diff(got, single) <= RTOL, (mesh, got, single)


def test_state_layout_on_2x2x2(mesh_run):
    specs = mesh_run["specs_222"]
    assert specs["frozen/embed_tokens/embedding"] == "P('tensor', 'fsdp')"
    assert specs["frozen/layers/self_attn/q_proj/kernel"] == "P(None, 'fsdp', 'tensor')"
    assert specs["frozen/layers/self_attn/o_proj/kernel"] == "P(None, 'tensor', 'fsdp')"
    assert specs["frozen/lm_head/kernel"] == "P('fsdp', 'tensor')"
    assert specs["frozen/layers/input_layernorm/scale"] == "P()"
    assert specs["trainable/layers/mlp/gate_proj/lora_b"] == "P(None, None, 'tensor')"
    assert specs["opt_state/1/0/nu/layers/mlp/down_proj/lora_a"] == "P(None, 'tensor')"
    assert specs["step"] == "P()" and specs["rng"] == "P()"


def test_fsdp8_param_bytes_are_an_eighth(mesh_run):
    ratio = mesh_run["frozen_bytes_fsdp8"] / mesh_run["frozen_bytes_total"]
    # 1/8 of every matrix; only the RMSNorm scales (replicated) are extra
    assert 0.125 <= ratio < 0.135, ratio
    assert mesh_run["trainable_bytes_fsdp8"] < mesh_run["trainable_bytes_total"]


def test_non_dividing_dims_are_clear_errors(mesh_run):
    errors = mesh_run["errors"]
    assert "needs 3 devices but JAX sees 8" in errors["mesh_mismatch"] and "--cpu-devices 3" in errors["mesh_mismatch"]
    assert "embed_tokens/embedding: dim 0 (vocab, size 100)" in errors["vocab"]
    assert "pad the vocabulary to a multiple of 8" in errors["vocab"]
    assert "k_proj/kernel: dim 1 (kv_heads, size 12)" in errors["heads"] and "size 8" in errors["heads"]
    assert "dim 0 (batch, size 6)" in errors["batch"]
    assert errors["replicate_spec"] == "P()"  # allow_replicate=True falls back to replication


@pytest.mark.parametrize("devices,mesh", [(1, ""), (4, "fsdp=2,tensor=2")])
def test_checkpoint_restores_onto_another_topology(mesh_run, devices, mesh):
    """Saved after 3 steps on 8 devices (2x2x2), restored on 1 / 4 devices: steps 4-5 equal the 8-device run."""
    out = run_worker("restore", "--devices", str(devices), "--mesh", mesh, "--ckpt", mesh_run["ckpt"],
                     "--steps", str(STEPS))
    assert out["device_count"] == devices and out["start"] == SAVE_AT and out["extra"] == {"note": "test"}
    uninterrupted = mesh_run["losses"][SAVE_MESH][SAVE_AT:]
    assert rel_diff(out["losses"], uninterrupted) <= RTOL, (out["losses"], uninterrupted)


# ---------------------------------------------------------------------- the default model (opt-in: ~10 min, ~4 GB)
SMOKE_ARGS = ("--preset", "smoke", "--method", "selfaug", "--max-steps", "5", "--no-progress", "train.batch_size=4",
              "data.max_length=256", "data.buckets=[256]", "eval.n_rag=1", "eval.n_ifeval=1",
              "eval.n_shift_general=1", "eval.n_shift_rag=1")


@pytest.mark.skipif(not os.environ.get("SELFAUG_SHARDING_DEFAULT_MODEL"),
                    reason="slow: set SELFAUG_SHARDING_DEFAULT_MODEL=1 to run the default model on 8 CPU devices")
def test_default_model_smoke_run_on_2x2x2_equals_one_device(tmp_path):
    """``experiments/run.py --cpu-devices 8 --mesh data=2,fsdp=2,tensor=2`` on SmolLM2-135M: the 5 per-step losses
    equal the 1-device run (measured: max relative difference 2.5e-7)."""
    run = WORKER.parents[1] / "experiments" / "run.py"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    losses = {}
    for name, extra in {"one": (), "mesh": ("--cpu-devices", "8", "--mesh", "data=2,fsdp=2,tensor=2")}.items():
        out = tmp_path / name
        subprocess.run([sys.executable, str(run), *SMOKE_ARGS, *extra, "--out", str(out)], check=True, timeout=900,
                       env=env, capture_output=True)
        lines = (out / "selfaug" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(x)["loss"] for x in lines]
    assert len(losses["one"]) == 5
    assert rel_diff(losses["mesh"], losses["one"]) <= RTOL, losses
