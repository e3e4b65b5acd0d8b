"""XLA's buffer assignment of the ``selfaug-features`` train step vs ``lora`` / ``selfaug`` (feature_loss.py).

SmolLM2-135M shapes (abstract state under ``jax.eval_shape``: no weights are read, only ``config.json``), batch
4 x 256, float32, remat ``dots``, LoRA rank 16. ``outside-SITE`` measures the alternative design where the policy's
taps also leave its layer scan and the distance is taken after it (a custom ``loss_fn``).

    JAX_PLATFORMS=cpu PYTHONPATH=. python bench/feature_memory.py ~/.cache/selfaug_jax/smollm2-135m-instruct \
        lora selfaug selfaug-features:residual selfaug-features:attn selfaug-features:k outside-residual outside-attn
"""
import dataclasses, json, sys, time
import jax, jax.numpy as jnp
from flax import nnx
from selfaug_jax import loss as loss_lib
from selfaug_jax.feature_loss import SITE_TAPS, FeatureLossConfig, layer_distance_sum, _aligned_mask_bt
from selfaug_jax.lora import LoRAConfig
from selfaug_jax.models import DecoderLM, ModelConfig
from selfaug_jax.models.taps import LayerTaps
from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
from selfaug_jax.train.state import init_train_state
from selfaug_jax.train.step import StepConfig, make_train_step
from selfaug_jax.train.objective import method_loss

hf = json.load(open(sys.argv[1] + "/config.json"))
cfg = ModelConfig.from_hf_dict(hf)
B, T = 4, 256


def outside_loss(model_def, config, trainable, frozen, batch, rng, normalizers):
    """Alternative: both forwards emit their taps [L, b, t, F]; the distance is taken after the scans."""
    sites = SITE_TAPS[config.features.site]
    kw = dict(attention_mask=batch["attention_mask_bt"])
    _, ref = jax.lax.stop_gradient(model_def.reference(trainable, frozen).hidden_states(
        batch["input_ids_bt"], taps=LayerTaps(sites), **kw))
    policy = model_def.policy(trainable, frozen)
    hidden, pol = policy.hidden_states(batch["input_ids_bt"], dropout_rng=rng, taps=LayerTaps(sites), **kw)
    ce, aux = loss_lib.sft_loss_from_hidden(hidden, jax.lax.stop_gradient(policy.lm_head_weight()),
                                            batch["labels_bt"], chunk_size=config.loss.chunk_size)
    mask = _aligned_mask_bt(config, batch)
    sums = jax.vmap(lambda p, r: layer_distance_sum(p, r, mask, "mse"))(pol, ref)
    value = jnp.mean(sums) / jnp.maximum(jnp.sum(mask), 1)
    return ce + 0.5 * value, dict(aux, feature_distance=value)


def measure(method, site=None, loss_fn=method_loss):
    opt, sched = make_optimizer(OptimizerConfig(learning_rate=1e-4), 100)
    holder = {}

    def build():
        model = DecoderLM(cfg, remat_policy="dots", rngs=nnx.Rngs(0))
        md, st = init_train_state(model, method, opt, lora_config=LoRAConfig(rank=16), seed=0)
        holder["md"] = md
        return st

    st = jax.eval_shape(build)
    config = StepConfig(features=FeatureLossConfig(site=site or "residual"))
    step = make_train_step(holder["md"], opt, sched, config, loss_fn=loss_fn)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32) for k in ("input_ids_bt", "labels_bt", "attention_mask_bt")}
    t0 = time.process_time()
    ma = step.lower(st, batch).compile().memory_analysis()
    name = method + (f"[{site}]" if site else "") + ("" if loss_fn is method_loss else " taps-out-of-scan")
    print(f"{name:42s} temp {ma.temp_size_in_bytes / 2**20:8.1f} MiB  args {ma.argument_size_in_bytes / 2**20:7.1f} MiB"
          f"  (compile cpu {time.process_time() - t0:.0f}s)", flush=True)


for spec in sys.argv[2:]:
    if spec == "outside-residual":
        measure("selfaug-features", "residual", outside_loss)
    elif spec == "outside-attn":
        measure("selfaug-features", "attn", outside_loss)
    elif ":" in spec:
        measure(*spec.split(":"))
    else:
        measure(spec)
