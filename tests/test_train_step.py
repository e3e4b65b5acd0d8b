"""The pure train step: step-0 identity, PyTorch+peft gradient parity, accumulation, and training dynamics."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from selfaug_jax.lora import ALL_LINEAR_TARGETS, LoRAConfig, lora_targets, peft_tensor_name, save_peft_adapter
from selfaug_jax.loss import SelfAugLossConfig
from selfaug_jax.models import load_pretrained
from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
from selfaug_jax.train.state import init_train_state
from selfaug_jax.train.step import StepConfig, _accumulate, make_eval_step, make_train_step
from jaxpr_tools import dot_output_shapes
from torch_reference import make_tiny_hf_model

LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
B, T, V = 4, 24, 128


def make_batch(seed=0, b=B, t=T, prompt_lens=None, pad_lens=None):
    """Random tokens; labels -100 on a prompt prefix and on trailing padding (attention_mask 0 there)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (b, t)).astype(np.int32)
    prompt_lens = prompt_lens or [int(x) for x in rng.integers(5, t // 2, b)]
    pad_lens = pad_lens or [int(x) for x in rng.integers(0, 5, b)]
    labels = ids.copy()
    mask = np.ones((b, t), np.int32)
    for i in range(b):
        labels[i, : prompt_lens[i]] = -100
        if pad_lens[i]:
            labels[i, t - pad_lens[i]:] = -100
            mask[i, t - pad_lens[i]:] = 0
            ids[i, t - pad_lens[i]:] = 0
    return {"input_ids_bt": jnp.asarray(ids), "labels_bt": jnp.asarray(labels), "attention_mask_bt": jnp.asarray(mask)}


@pytest.fixture(scope="module", params=["llama3-untied", "qwen2-bias-tied"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return d, make_tiny_hf_model(request.param, d)


def _setup(d, method, lr=1e-3, steps=10, lora=LORA, step_config=StepConfig(), seed=0, remat="dots"):
    model = load_pretrained(d, remat_policy=remat)
    opt, sched = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_ratio=0.0, schedule="constant"), steps)
    model_def, state = init_train_state(model, method, opt, lora_config=lora, seed=seed)
    return model_def, state, make_train_step(model_def, opt, sched, step_config), opt, sched


@pytest.mark.parametrize("method", ["selfaug", "sft-selfaug"])
def test_step0_kl_is_exactly_zero_and_total_equals_ce(tiny, method):
    """With per-layer remat (the training default) the policy's primal forward fuses exactly like the reference's,
    so at step 0 the two are bitwise equal. (Without remat XLA fuses the linearised forward differently and the
    KL is ~1e-8: float32 rounding, not a semantic difference.)"""
    d, _ = tiny
    model_def, state, step, _, _ = _setup(d, method, remat="dots")
    _, metrics = step(state, make_batch())
    assert float(metrics["kl"]) == 0.0
    assert np.float32(metrics["loss"]).tobytes() == np.float32(metrics["ce"]).tobytes()
    assert int(metrics["n_aligned_tokens"]) > 0 and int(metrics["n_target_tokens"]) > 0
    _, metrics_plain = _setup(d, method, remat="none")[2](_setup(d, method, remat="none")[1], make_batch())
    assert abs(float(metrics_plain["kl"])) < 1e-6 and abs(float(metrics_plain["loss"] - metrics["ce"])) < 1e-5


def _set_nonzero_b(state, seed=0):
    def randomise(path, x):
        if any(getattr(k, "key", None) == "lora_b" for k in path):
            key = jax.random.key(seed + zlib.crc32(str(path).encode()) % 10000)  # deterministic across processes
            return 0.1 * jax.random.normal(key, x.shape, x.dtype)
        return x

    trainable = jax.tree_util.tree_map_with_path(randomise, state.trainable)
    return state.replace(trainable=trainable)


def _torch_loss_and_grads(torch_model, adapter_dir, batch):
    """The released SelfAug loss on transformers + peft: CE + 0.5 * KLDivLoss(batchmean) on labels == -100."""
    pm = peft.PeftModel.from_pretrained(torch_model, adapter_dir, is_trainable=True)
    pm.train()  # no dropout configured; train mode as in the released code
    ids = torch.as_tensor(np.asarray(batch["input_ids_bt"]), dtype=torch.long)
    labels = torch.as_tensor(np.asarray(batch["labels_bt"]), dtype=torch.long)
    with torch.no_grad(), pm.disable_adapter():
        ref_logits = pm(ids).logits.float()
    logits = pm(ids).logits.float()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    mask = labels == -100
    kl = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(logits, -1)[mask], torch.softmax(ref_logits, -1)[mask]
    )
    total = ce + 0.5 * kl
    total.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in pm.named_parameters() if p.grad is not None}
    pm.unload()
    return float(total), float(ce), float(kl), grads


def test_loss_and_lora_grads_match_pytorch_peft(tiny, tmp_path):
    d, torch_model = tiny
    model_def, state, _, _, _ = _setup(d, "selfaug")
    state = _set_nonzero_b(state)
    # torch ignores attention_mask in the released loss; use an all-ones mask so both models see the same inputs
    batch = make_batch(1, pad_lens=[0, 0, 0, 0])
    model = model_def.merged_model(state)
    save_peft_adapter(model, LORA, tmp_path / "adapter")
    total_t, ce_t, kl_t, grads_t = _torch_loss_and_grads(torch_model, tmp_path / "adapter", batch)
    assert kl_t > 1e-4  # the adapters really move the distribution

    grads, metrics = _accumulate(
        model_def, StepConfig(), state.trainable, state.frozen, batch, jax.random.key(0), with_grad=True
    )
    np.testing.assert_allclose(float(metrics["loss"]), total_t, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ce"]), ce_t, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), kl_t, rtol=1e-5)
    graph_model = nnx.merge(model_def.policy_graphdef, grads, state.frozen)
    n_checked = 0
    for path, linear in lora_targets(graph_model, ALL_LINEAR_TARGETS):
        for which, ours_l in (("A", linear.lora_a[...]), ("B", linear.lora_b[...])):
            for layer in range(ours_l.shape[0]):
                name = peft_tensor_name(path, which, layer).replace(".weight", ".default.weight")
                theirs = grads_t[name].T
                rel = np.abs(np.asarray(ours_l[layer]) - theirs).max() / np.abs(theirs).max()
                assert rel <= 1e-4, (name, rel)
                n_checked += 1
    assert n_checked == 28


def test_token_weighted_accumulation_equals_one_big_batch(tiny):
    d, _ = tiny
    model_def, state, _, _, _ = _setup(d, "selfaug")
    state = _set_nonzero_b(state, 7)
    batch = make_batch(2)
    big = StepConfig(accum_normalization="token")
    acc = StepConfig(grad_accum_steps=2, accum_normalization="token")
    g1, m1 = _accumulate(model_def, big, state.trainable, state.frozen, batch, jax.random.key(0), with_grad=True)
    g2, m2 = _accumulate(model_def, acc, state.trainable, state.frozen, batch, jax.random.key(0), with_grad=True)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(a)).max())


def test_default_accumulation_is_mean_of_micro_batch_losses(tiny):
    d, _ = tiny
    model_def, state, _, _, _ = _setup(d, "selfaug")
    state = _set_nonzero_b(state, 3)
    batch = make_batch(3)
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    per_micro = [
        _accumulate(model_def, StepConfig(), state.trainable, state.frozen, h, jax.random.key(0), with_grad=True)
        for h in halves
    ]
    g, m = _accumulate(model_def, StepConfig(grad_accum_steps=2), state.trainable, state.frozen, batch,
                       jax.random.key(0), with_grad=True)
    np.testing.assert_allclose(float(m["loss"]), np.mean([float(x[1]["loss"]) for x in per_micro]), rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), np.mean([float(x[1]["kl"]) for x in per_micro]), rtol=1e-5)
    for a, b, c in zip(jax.tree.leaves(g), jax.tree.leaves(per_micro[0][0]), jax.tree.leaves(per_micro[1][0])):
        expected = (np.asarray(b) + np.asarray(c)) / 2
        np.testing.assert_allclose(np.asarray(a), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_eval_step_matches_train_metrics(tiny):
    d, _ = tiny
    model_def, state, step, _, _ = _setup(d, "selfaug")
    state = _set_nonzero_b(state, 5)
    batch = make_batch(4)
    eval_metrics = make_eval_step(model_def)(state, batch)
    _, train_metrics = step(state, batch)
    for key in ("loss", "ce", "kl", "n_target_tokens", "n_aligned_tokens"):
        np.testing.assert_allclose(float(eval_metrics[key]), float(train_metrics[key]), rtol=1e-5)


def test_selfaug_fits_while_staying_close_and_lora_drifts(tmp_path):
    """A few hundred steps on one batch: both fit the answers; SelfAug keeps the prompt KL much lower."""
    d = tmp_path / "m"
    make_tiny_hf_model("llama-tied", d, init_std=0.3)
    batch = make_batch(5, prompt_lens=[12, 14, 10, 16], pad_lens=[0, 2, 0, 3])
    lora = LoRAConfig(rank=8, alpha=16.0, dropout=0.0)
    results = {}
    for method in ("lora", "selfaug"):
        model_def, state, step, _, _ = _setup(d, method, lr=3e-3, steps=300, lora=lora)
        first_ce = None
        for _ in range(300):
            state, metrics = step(state, batch)
            first_ce = first_ce if first_ce is not None else float(metrics["ce"])
        # measure prompt KL of both runs with the same SelfAug eval step
        probe_def, _ = init_train_state(load_pretrained(d), "selfaug", make_optimizer(OptimizerConfig(), 1)[0],
                                        lora_config=lora)
        eval_metrics = make_eval_step(probe_def)(state, batch)
        results[method] = (first_ce, float(eval_metrics["ce"]), float(eval_metrics["kl"]))
    (lora_ce0, lora_ce, lora_kl), (sa_ce0, sa_ce, sa_kl) = results["lora"], results["selfaug"]
    assert lora_ce < 0.1 * lora_ce0 and sa_ce < 0.2 * sa_ce0  # both overfit the batch
    assert sa_kl < 0.5 * lora_kl  # SelfAug stays closer to the original on the prompt tokens
    assert sa_kl < 0.5


def test_full_finetuning_methods_run(tiny):
    d, _ = tiny
    for method in ("sft", "sft-selfaug"):
        model_def, state, step, _, _ = _setup(d, method, lr=1e-3)
        batch = make_batch(6)
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            assert np.isfinite(losses[-1]) and float(metrics["grad_norm"]) > 0
        assert losses[-1] < losses[0]
        assert int(state.step) == 3


@pytest.mark.parametrize("method", ["selfaug", "sft-selfaug"])
def test_lora_step_projects_policy_and_reference_with_one_head_matmul(tiny, method):
    """LoRA methods share the frozen head between policy and reference, so the fused loss projects both hidden
    states with one stacked [2, B, t, V] matmul per chunk; full fine-tuning trains the policy's head, so the
    reference keeps its own head and no stacked projection exists."""
    d, _ = tiny
    _, state, step, _, _ = _setup(d, method)
    jaxpr = jax.make_jaxpr(step)(state, make_batch())
    stacked = [s for s in dot_output_shapes(jaxpr) if len(s) == 4 and s[0] == 2 and s[-1] == V]
    assert bool(stacked) == (method == "selfaug")
