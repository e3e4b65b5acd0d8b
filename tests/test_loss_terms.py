"""The response-position KL (``lora-response-kl``) and the orthogonal loss (``lora-orth``): float64 NumPy references,
step-0 identities, accumulation, short training runs, checkpoint round trip of the orth constants, config and
logging. Tiny models; seconds."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from _sharding_worker import np_batch, tiny_config  # noqa: E402

from selfaug_jax.loss import IGNORE_INDEX, selfaug_kl, selfaug_loss, selfaug_loss_from_hidden, token_counts  # noqa: E402
from selfaug_jax.lora import LoRAConfig, lora_targets, ALL_LINEAR_TARGETS  # noqa: E402
from selfaug_jax.methods import METHOD_NAMES, get_method  # noqa: E402
from selfaug_jax.models.decoder import DecoderLM  # noqa: E402
from selfaug_jax.orth_loss import OrthConfig, orth_penalty  # noqa: E402
from selfaug_jax.train.objective import logit_align  # noqa: E402
from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from selfaug_jax.train.state import init_train_state  # noqa: E402
from selfaug_jax.train.step import StepConfig, _accumulate, make_train_step  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Response-position KL against an independent float64 NumPy reference.

B, T, V, D = 3, 9, 7, 5
PROMPT_LENS, RESPONSE_LENS = (2, 5, 1), (4, 4, 8)  # row 2's response reaches the last position (no padding)


def _labels_mask(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.full((B, T), IGNORE_INDEX, np.int64)
    mask = np.zeros((B, T), np.int64)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        labels[b, p:p + r] = rng.integers(0, V, r)
        mask[b, :p + r] = 1
    return labels, mask


def _np_logsoftmax(x):
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def np_response_reference(logits, ref_logits, labels, direction, alpha):
    """CE over labels[t + 1] != -100 and the divergence at exactly those positions t (ASFT's shifted mask)."""
    ce, div = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            lp, lr = _np_logsoftmax(logits[b, t]), _np_logsoftmax(ref_logits[b, t])
            ce.append(-lp[labels[b, t + 1]])
            if direction == "forward":
                div.append(np.sum(np.exp(lr) * (lr - lp)))
            else:
                div.append(np.sum(np.exp(lp) * (lp - lr)))
    return np.mean(ce) + alpha * np.mean(div), np.mean(div), len(div)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_response_kl_fused_and_unfused_match_numpy_float64(direction):
    labels, mask = _labels_mask(1)
    rng = np.random.default_rng(2)
    h, rh = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, D))
    w = rng.normal(size=(D, V))
    want_total, want_kl, want_n = np_response_reference(h @ w, rh @ w, labels, direction, 0.3)
    assert want_n == sum(RESPONSE_LENS) - 0  # every response token has a predicting position
    opts = dict(alpha=0.3, direction=direction, align="response")
    with jax.enable_x64(True):
        lab = jnp.asarray(labels)
        total_u, aux_u = selfaug_loss(jnp.asarray(h @ w), jnp.asarray(rh @ w), lab, attention_mask_bt=jnp.asarray(mask),
                                      **opts)
        kl_u = selfaug_kl(jnp.asarray(h @ w), jnp.asarray(rh @ w), lab, direction=direction, align="response")
        total_f, aux_f = selfaug_loss_from_hidden(jnp.asarray(h), jnp.asarray(rh), jnp.asarray(w), lab, chunk_size=4,
                                                  attention_mask_bt=jnp.asarray(mask), **opts)
        for total, kl in ((total_u, aux_u["kl"]), (total_f, aux_f["kl"])):
            assert total.dtype == jnp.float64
            np.testing.assert_allclose(float(total), want_total, rtol=1e-10)
            np.testing.assert_allclose(float(kl), want_kl, rtol=1e-10)
        np.testing.assert_allclose(float(kl_u), want_kl, rtol=1e-10)
        for aux in (aux_u, aux_f):
            assert int(aux["n_aligned_tokens"]) == int(aux["n_target_tokens"]) == want_n
        assert tuple(int(x) for x in token_counts(lab, jnp.asarray(mask), align="response")) == (want_n, want_n)


def test_response_positions_are_the_shifted_labels():
    """labels [-100, -100, 5, 6, -100]: the response KL aligns t = 1, 2 (predicting 5, 6); the prompt KL t = 0, 1, 4."""
    labels = jnp.asarray([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX]])
    logits = jnp.zeros((1, 5, V))
    aligned = {}
    for align in ("response", "prompt"):
        aligned[align] = []
        for t in range(5):
            ref = logits.at[0, t, 0].set(3.0)  # the reference differs from the policy only at position t
            if float(selfaug_kl(logits, ref, labels, align=align)) > 0:
                aligned[align].append(t)
    assert aligned == {"response": [1, 2], "prompt": [0, 1, 4]}


# ---------------------------------------------------------------------------------------------------------------
# Tiny decoder runs.

LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)


def _batch(step=0):
    return {k: jnp.asarray(v) for k, v in np_batch(step).items()}


def _state(method, *, remat="none", lr=1e-2, steps=3, config=StepConfig(), seed=0):
    model = DecoderLM(tiny_config(), remat_policy=remat, rngs=nnx.Rngs(seed))
    opt, sched = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_ratio=0.0, schedule="constant"), steps)
    model_def, state = init_train_state(model, method, opt, lora_config=LORA, seed=0, config=config)
    return model, model_def, state, opt, sched


REFERENCE_METHODS = [m for m in METHOD_NAMES if get_method(m).needs_reference_terms]


@pytest.mark.parametrize("method", REFERENCE_METHODS)
def test_reference_methods_align_nothing_at_step0(method):
    """Every method with a reference term: at step 0 (B = 0 / the copy) its KL is exactly 0 and total == CE bit for
    bit, through the real train step (per-layer remat, the training default, makes the two forwards identical).
    For a feature-alignment method the term checked is its feature distance."""
    assert {"selfaug", "sft-selfaug", "lora-response-kl"} <= set(REFERENCE_METHODS)
    _, model_def, state, opt, sched = _state(method, remat="dots")
    _, metrics = make_train_step(model_def, opt, sched)(state, _batch())
    assert np.float32(metrics["loss"]).tobytes() == np.float32(metrics["ce"]).tobytes()
    if logit_align(model_def.spec, StepConfig()) is None:  # an additive alignment term (selfaug-features)
        assert float(metrics["feature_distance"]) == 0.0 and float(metrics["kl"]) == 0.0
        return
    assert float(metrics["kl"]) == 0.0
    assert int(metrics["n_aligned_tokens"]) > 0
    if method == "lora-response-kl":
        assert int(metrics["n_aligned_tokens"]) == int(metrics["n_target_tokens"])


def test_response_kl_token_accumulation_uses_the_response_count():
    """Token-weighted accumulation normalises the KL by the method's own aligned count (response positions), not by
    loss.align's (prompt): 2 micro-batches give the one-batch loss."""
    _, model_def, state, _, _ = _state("lora-response-kl")
    state = state.replace(trainable=jax.tree.map(lambda x: x + 0.05, state.trainable))  # B != 0: KL > 0
    batch = _batch(4)
    assert logit_align(model_def.spec, StepConfig()) == "response"
    one = StepConfig()  # each micro-batch's own counts: the correct denominators
    acc = StepConfig(grad_accum_steps=2, accum_normalization="token")
    # jitted: one compile per configuration is cheaper than eager dispatch of the remat'd forward and backward
    g1, m1 = jax.jit(functools.partial(_accumulate, model_def, one, with_grad=True))(
        state.trainable, state.frozen, batch, jax.random.key(0))
    g2, m2 = jax.jit(functools.partial(_accumulate, model_def, acc, with_grad=True))(
        state.trainable, state.frozen, batch, jax.random.key(0))
    assert float(m1["kl"]) > 1e-4
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["kl"]), float(m1["kl"]), rtol=1e-5)
    scale = max(np.abs(np.asarray(a)).max() for a in jax.tree.leaves(g1))  # float32 noise relative to the largest
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------------------------
# The orthogonal loss against a float64 NumPy reference from the SVD of the weights.


def np_orth_reference(model, k):
    """(orth, l2) in float64: torch layout W_t = kernel^T [out, in] = U S V^T; V_k = V[:, :k] (right singular
    vectors, [in, k]); A_t = lora_a^T [r, in]; orth = sum |V_k^T A_t^T|; l2 = sum per layer ||A|| + ||B||."""
    orth = l2 = 0.0
    for _, lin in lora_targets(model, ALL_LINEAR_TARGETS):
        kern, a, b = (np.asarray(x[...], np.float64) for x in (lin.kernel, lin.lora_a, lin.lora_b))
        for layer in range(kern.shape[0]):
            _, _, vt = np.linalg.svd(kern[layer].T)  # torch's [out, in] weight
            v_k = vt[:k].T
            orth += np.abs(v_k.T @ a[layer]).sum()
            l2 += np.linalg.norm(a[layer]) + np.linalg.norm(b[layer])
    return orth, l2


@pytest.mark.parametrize("lambda2", [0.0, 0.3])
def test_orth_term_matches_numpy_svd_reference(lambda2):
    cfg = OrthConfig(lambda1=0.5, lambda2=lambda2, top_k=3)
    model, model_def, state, _, _ = _state("lora-orth", config=StepConfig(orth=cfg))
    trainable = jax.tree.map(lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)),
                             state.trainable)  # B != 0
    nnx.update(model, trainable)
    want_orth, want_l2 = np_orth_reference(model, 3)
    value, orth, l2 = orth_penalty(state.constants["orth"], trainable, cfg)
    np.testing.assert_allclose(float(orth), want_orth, rtol=2e-5)
    np.testing.assert_allclose(float(l2), want_l2, rtol=2e-5)
    np.testing.assert_allclose(float(value), 0.5 * want_orth + lambda2 * want_l2, rtol=2e-5)
    # the stored basis spans torch's top-3 right-singular directions (equal up to each vector's sign)
    q = next(lin for path, lin in lora_targets(model, ALL_LINEAR_TARGETS) if path[-1] == "q_proj")
    basis = np.asarray(state.constants["orth"]["layers"]["self_attn"]["q_proj"]["orth_basis"][1], np.float64)
    vt = np.linalg.svd(np.asarray(q.kernel[...][1], np.float64).T)[2]
    np.testing.assert_allclose(np.abs(np.sum(basis * vt[:3].T, axis=0)), 1.0, atol=1e-5)


def test_orth_gradient_is_finite_at_b_zero_and_only_a_drives_orth():
    cfg = OrthConfig(lambda1=0.5, lambda2=0.3, top_k=2)
    _, _, state, _, _ = _state("lora-orth", config=StepConfig(orth=cfg))
    grads = jax.grad(lambda tr: orth_penalty(state.constants["orth"], tr, cfg)[0])(state.trainable)
    flat = {jax.tree_util.keystr(p): np.asarray(g) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert all(np.isfinite(g).all() for g in flat.values())
    assert all(np.all(g == 0) for name, g in flat.items() if "lora_b" in name)  # ||B|| at B = 0: subgradient 0
    assert all(np.abs(g).max() > 0 for name, g in flat.items() if "lora_a" in name)


def test_lora_orth_step0_and_short_training():
    """Step 0: B = 0, so CE and the logits are the base model's, kl = 0, and orth / orth_l2 come from A alone;
    3 steps lower the orth term (it dominates the tiny model's gradient)."""
    model, model_def, state, opt, sched = _state("lora-orth")
    want_orth, want_l2 = np_orth_reference(model, 8)  # B = 0: the l2 part is sum ||A|| alone
    step = make_train_step(model_def, opt, sched)
    orths = []
    for i in range(3):
        state, metrics = step(state, _batch(i))
        if i == 0:
            assert float(metrics["kl"]) == 0.0 and int(metrics["n_aligned_tokens"]) == 0
            assert want_orth > 0
            np.testing.assert_allclose(float(metrics["orth"]), want_orth, rtol=2e-5)
            np.testing.assert_allclose(float(metrics["orth_l2"]), want_l2, rtol=2e-5)
            np.testing.assert_allclose(float(metrics["loss"]), float(metrics["ce"]) + 0.5 * want_orth, rtol=1e-5)
        assert np.isfinite(float(metrics["loss"]))
        orths.append(float(metrics["orth"]))
    assert orths[2] < orths[1] < orths[0], orths


def test_lora_response_kl_short_training():
    _, model_def, state, opt, sched = _state("lora-response-kl", remat="dots")
    step = make_train_step(model_def, opt, sched)
    kls = []
    for i in range(3):
        state, metrics = step(state, _batch(i))
        assert np.isfinite(float(metrics["loss"]))
        kls.append(float(metrics["kl"]))
    assert kls[0] == 0.0 and kls[1] > 0 and kls[2] > 0


@pytest.mark.parametrize("accum", ["mean", "token"])
def test_orth_counts_once_per_step_under_accumulation(accum):
    _, model_def, state, _, _ = _state("lora-orth")
    batch = _batch(5)
    _, m1 = _accumulate(model_def, StepConfig(), state.trainable, state.frozen, batch, jax.random.key(0),
                        with_grad=False, constants=state.constants)
    _, m2 = _accumulate(model_def, StepConfig(grad_accum_steps=2, accum_normalization=accum), state.trainable,
                        state.frozen, batch, jax.random.key(0), with_grad=False, constants=state.constants)
    np.testing.assert_allclose(float(m2["orth"]), float(m1["orth"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["loss"]) - float(m2["ce"]), float(m1["loss"]) - float(m1["ce"]), rtol=1e-5)


def test_orth_constants_are_rebuilt_identically_and_resume_continues(tmp_path):
    """Checkpoints do not store the constants (like the frozen base); the restore template rebuilds them from the
    same base weights bit for bit, and the resumed step equals the uninterrupted one."""
    from selfaug_jax.checkpoints.orbax import TrainCheckpointer

    _, model_def, state, opt, sched = _state("lora-orth", steps=4)
    step = make_train_step(model_def, opt, sched)
    for i in range(2):
        state, _ = step(state, _batch(i))
    ckpt = TrainCheckpointer(tmp_path / "ckpt")
    ckpt.save(2, state, {"note": "orth"})
    constants = jax.tree.map(np.asarray, state.constants)
    _, want = step(state, _batch(2))

    _, _, template, _, _ = _state("lora-orth", steps=4)  # a fresh run's state: what a resume restores into
    restored, extra = ckpt.restore(template)
    ckpt.close()
    assert extra == {"note": "orth"} and int(restored.step) == 2
    assert jax.tree.structure(restored.constants) == jax.tree.structure(constants)
    for a, b in zip(jax.tree.leaves(restored.constants), jax.tree.leaves(constants)):
        assert np.asarray(a).tobytes() == b.tobytes()
    _, got = step(restored, _batch(2))  # same structure: the compiled step is reused
    for key in ("loss", "orth", "ce"):
        np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-6)


def test_orth_constants_shard_like_lora_a():
    from selfaug_jax.train.sharding import ShardingPlan, logical_axes_of

    assert logical_axes_of("orth/layers/self_attn/o_proj/orth_basis", 3) == ("layers", "heads", "rank")
    assert logical_axes_of("orth/layers/mlp/gate_proj/orth_basis", 3) == ("layers", "embed", "rank")
    _, _, state, _, _ = _state("lora-orth")
    plan = ShardingPlan.from_config(type("M", (), {"data": jax.device_count(), "fsdp": 1, "tensor": 1})())
    shardings = plan.state_shardings(state)
    assert jax.tree.structure(shardings.constants) == jax.tree.structure(state.constants)
    sharded = plan.shard_state(state)
    assert sharded.constants["orth"]["layers"]["mlp"]["down_proj"]["orth_basis"].shape == (2, 64, 8)


def test_orth_options_config_and_errors():
    from selfaug_jax.experiment.config import ConfigError, build_config

    cfg = build_config("smoke", ["orth.top_k=4", "orth.lambda1=0.1", "orth.lambda2=0.3"], check_paths=False)
    assert cfg.orth == OrthConfig(lambda1=0.1, lambda2=0.3, top_k=4)
    assert build_config("smoke", check_paths=False).orth == OrthConfig(lambda1=0.5, lambda2=0.0, top_k=8)
    with pytest.raises(ConfigError, match="orth.top_k must be a positive int"):
        build_config("smoke", ["orth.top_k=0"], check_paths=False)
    with pytest.raises(ConfigError, match="orth.lambda1"):
        build_config("smoke", ["orth.lambda1=-1"], check_paths=False)
    with pytest.raises(ConfigError, match="unknown key"):
        build_config("smoke", ["orth.k=3"], check_paths=False)
    with pytest.raises(ValueError, match="orth.top_k=40 exceeds the rank bound 32"):
        _state("lora-orth", config=StepConfig(orth=OrthConfig(top_k=40)))


def test_trainer_logs_every_term_metric():
    from selfaug_jax.experiment.trainer import LOGGED_KEYS, _host_metrics

    metrics = {k: jnp.float32(1.5) for k in LOGGED_KEYS if not k.startswith("n_")}
    metrics.update({k: jnp.int32(3) for k in LOGGED_KEYS if k.startswith("n_")})
    metrics.update(orth=jnp.float32(2.25), orth_l2=jnp.float32(0.5))
    (row,) = _host_metrics([metrics])
    assert list(row)[-2:] == ["orth", "orth_l2"] and row["orth"] == 2.25 and row["n_tokens"] == 3
    assert list(row)[:3] == ["loss", "ce", "kl"]


_SHARDED_SCRIPT = r"""
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_num_cpu_devices", 4)
sys.path.insert(0, "tests")
from types import SimpleNamespace
import jax.numpy as jnp
from flax import nnx
from _sharding_worker import tiny_config, np_batch
from selfaug_jax.lora import LoRAConfig
from selfaug_jax.models.decoder import DecoderLM
from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
from selfaug_jax.train.sharding import ShardingPlan
from selfaug_jax.train.state import init_train_state
from selfaug_jax.train.step import make_train_step

def run(plan):
    opt, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0), 2)
    md, st = init_train_state(DecoderLM(tiny_config(), rngs=nnx.Rngs(0)), "lora-orth", opt,
                              lora_config=LoRAConfig(rank=4, dropout=0.0))
    if plan is None:
        step, put = make_train_step(md, opt, sched), lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    else:
        st = plan.shard_state(st)
        step = make_train_step(md, opt, sched, state_shardings=plan.state_shardings(st),
                               batch_sharding=plan.batch_sharding())
        put = plan.put_batch
    rows = []
    for i in range(2):
        st, m = step(st, put(np_batch(i)))
        rows.append([float(m["loss"]), float(m["orth"])])
    basis = st.constants["orth"]["layers"]["self_attn"]["o_proj"]["orth_basis"]
    return rows, str(getattr(basis.sharding, "spec", None))

with jax.default_device(jax.devices()[0]):
    single, _ = run(None)
sharded, spec = run(ShardingPlan.from_config(SimpleNamespace(data=1, fsdp=2, tensor=2)))
print(json.dumps({"single": single, "sharded": sharded, "spec": spec}))
"""


def test_lora_orth_sharded_equals_one_device():
    """4 fake devices (fsdp=2, tensor=2, a fresh process): the orth bases are laid out like LoRA A (o_proj's input
    axis is the heads axis -> tensor) and the 2-step losses and orth values equal the one-device run."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True, timeout=900,
                          cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["spec"] == "PartitionSpec(None, 'tensor')" or out["spec"] == "P(None, 'tensor')", out["spec"]
    np.testing.assert_allclose(np.asarray(out["sharded"]), np.asarray(out["single"]), rtol=1e-5)
    assert out["single"][1][1] < out["single"][0][1]  # the orth value moves
