"""Dump the jaxpr and compiled HLO of the plain forward and of the lora / selfaug train steps (a tiny qwen3-shaped
model, remat none and dots) with sha256 prefixes, to show a decoder change leaves the normal path unchanged: run it
with PYTHONPATH on two checkouts and compare (HLO modulo source-location metadata):

    JAX_PLATFORMS=cpu PYTHONPATH=/work/main python bench/feature_hlo_identity.py /tmp/main
    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/feature_hlo_identity.py /tmp/wt
"""
import sys, hashlib
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from selfaug_jax.models import DecoderLM, ModelConfig
from selfaug_jax.lora import LoRAConfig
from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
from selfaug_jax.train.state import init_train_state
from selfaug_jax.train.step import make_train_step
cfg = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, q_bias=True, qk_norm=True)
B, T = 2, 12
ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, T)), jnp.int32)
labels = ids.at[:, :5].set(-100)
batch = {"input_ids_bt": ids, "labels_bt": labels, "attention_mask_bt": jnp.ones((B, T), jnp.int32)}
out = {}
for remat in ("none", "dots"):
    model = DecoderLM(cfg, remat_policy=remat, rngs=nnx.Rngs(0))
    g, p = nnx.split(model)
    f = lambda p: nnx.merge(g, p).hidden_states(ids)
    out[f"fwd-{remat}-jaxpr"] = str(jax.make_jaxpr(f)(p))
    out[f"fwd-{remat}-hlo"] = jax.jit(f).lower(p).compile().as_text()
    for method in ("lora", "selfaug"):
        model = DecoderLM(cfg, remat_policy=remat, rngs=nnx.Rngs(0))
        opt, sched = make_optimizer(OptimizerConfig(learning_rate=1e-3), 10)
        md, st = init_train_state(model, method, opt, lora_config=LoRAConfig(rank=4), seed=0)
        step = make_train_step(md, opt, sched)
        out[f"step-{method}-{remat}-jaxpr"] = str(jax.make_jaxpr(step)(st, batch))
        out[f"step-{method}-{remat}-hlo"] = step.lower(st, batch).compile().as_text()
import os
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
for k, v in out.items():
    open(f"{d}/{k}.txt", "w").write(v)
    print(k, hashlib.sha256(v.encode()).hexdigest()[:16], len(v))
