"""The PyTorch HF + PEFT side of ``bench/step.py --vs-torch``: the released SelfAug train step, timed.

Runs in its own process (``bench/step.py --impl torch``, started by ``--vs-torch``) and imports only torch,
transformers, peft and NumPy -- test dependencies (``requirements-test.txt``), never needed by the library.

The step follows the released code (USTC-StarTeam/SelfAug, ``Code/modeling_qwen2.py`` / ``layer.py``; facts in
``/work/shared/PAPER.md``):

* ``selfaug``: the reference forward runs the *same* PEFT model with the adapters disabled, under
  ``torch.no_grad()``, in train mode; then the policy forward with adapters on. Both logits are cast to float32.
  ``loss = CE + 0.5 * KLDivLoss(reduction="batchmean")(log_softmax(policy)[mask], softmax(reference)[mask])`` with
  ``mask = labels == -100`` on the *unshifted* positions; CE is HF's shifted mean over ``labels != -100``.
* ``lora``: the policy forward and CE only.

LoRA (PEFT): rank / alpha / dropout as given (defaults = ``selfaug_jax.lora.LoRAConfig``: 16 / 32 / 0.05) on all
seven projections. Optimizer: ``torch.optim.AdamW`` (lr 5e-4, weight decay 0.1, betas 0.9 / 0.999, eps 1e-8),
gradient-norm clipping at 1.0, like ``selfaug_jax.train.optimizer``'s defaults (the schedule does not affect speed).
Batches come from ``bench/step.py``'s ``synthetic_batch`` with the same seeds as the JAX side, so both sides see
identical token ids, labels and masks.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SELFAUG_ALPHA = 0.5  # hard-coded in the released code


def released_selfaug_loss(policy_logits_btv, reference_logits_btv, labels_bt, *, alpha: float = SELFAUG_ALPHA,
                          with_kl: bool = True):
    """The released SelfAug objective in PyTorch: ``(total, ce, kl)`` (float32 tensors; see the module docstring)."""
    import torch
    import torch.nn.functional as F

    logits = policy_logits_btv.float()
    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels_bt[:, 1:].reshape(-1), ignore_index=-100)
    if not with_kl:
        return ce, ce, torch.zeros_like(ce)
    mask = labels_bt == -100
    kl = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(logits, dim=-1)[mask], F.softmax(reference_logits_btv.float(), dim=-1)[mask]
    )
    return ce + alpha * kl, ce, kl


def run_torch_step(
    *,
    model_dir: str,
    method: str,
    batch: int,
    seq: int,
    steps: int,
    dtype: str,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    seed: int,
    attn_implementation: str,
    num_layers: int | None = None,
    make_batch: Callable[[int, int, int, int], dict[str, np.ndarray]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load ``model_dir`` with PEFT LoRA, run ``1 + steps`` train steps, return timings and losses.

    ``make_batch(batch, seq, vocab, seed)`` builds the NumPy batch (the JAX side's ``synthetic_batch``).
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    import machine
    from selfaug_jax.host_memory import release_freed_host_memory  # no JAX at import

    if method not in ("lora", "selfaug"):
        raise SystemExit(f"--impl torch: method {method!r} is not implemented on the PyTorch side (lora, selfaug)")
    torch.manual_seed(seed)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    t0 = time.perf_counter()
    extra = {} if num_layers is None else {"num_hidden_layers": num_layers}  # truncation, as load_pretrained's
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, attn_implementation=attn_implementation, **extra)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    model.train()  # the released code keeps train mode for the reference pass too
    load_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    vocab = model.config.vocab_size
    batches = []
    for i in range(2):
        nb = make_batch(batch, seq, vocab, seed + i)
        batches.append({k: torch.as_tensor(v, dtype=torch.long) for k, v in nb.items()})
    log(f"torch {torch.__version__}: loaded {model_dir} ({dtype}, attn={attn_implementation}, "
        f"{torch.get_num_threads()} threads) in {load_s:.1f}s")

    def step(b: dict[str, Any]) -> tuple[float, float, float]:
        ids, mask, labels = b["input_ids_bt"], b["attention_mask_bt"], b["labels_bt"]
        reference = None
        if method == "selfaug":
            with torch.no_grad(), model.disable_adapter():
                reference = model(input_ids=ids, attention_mask=mask).logits.float()
        policy = model(input_ids=ids, attention_mask=mask).logits
        total, ce, kl = released_selfaug_loss(policy, reference, labels, with_kl=method == "selfaug")
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total.item(), ce.item(), kl.item()

    release_freed_host_memory()  # the loader's freed heap: the JAX side trims after its compile the same way
    hwm_was_reset = machine.reset_peak_rss()  # VmHWM from here = the steps' peak (model load excluded)
    t0 = time.perf_counter()
    first = step(batches[0])
    first_step_s = time.perf_counter() - t0
    log(f"torch first step {first_step_s:.1f}s, loss {first[0]:.6f} (ce {first[1]:.6f}, kl {first[2]:.3g})")
    times, cpu_times, losses = [], [], [first[0]]
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(batches[(i + 1) % 2])
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(out[0])
        log(f"torch step {i + 1}/{steps}: {times[-1]:.2f}s wall, {cpu_times[-1]:.2f}s cpu, loss {out[0]:.4f}")
    median = statistics.median(times)
    return {
        "impl": "torch",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": attn_implementation,
        "method": method,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "dtype": dtype,
        "model": str(Path(model_dir)),
        "num_layers": model.config.num_hidden_layers,
        "platform": "cpu",
        "lora_rank": lora_rank,
        "n_lora_params": lora_params,
        "median_step_s": median,
        "step_times_s": times,
        "tokens_per_s": batch * seq / median,
        "median_step_cpu_s": statistics.median(cpu_times),
        "first_step_s": first_step_s,
        "load_s": load_s,
        "first_loss": first[0],
        "first_ce": first[1],
        "first_kl": first[2],
        "last_loss": losses[-1],
        "losses": losses,
        "peak_rss_mb": round(machine.peak_rss_mb(), 1),
        "steps_peak_rss_mb": (round(machine.hwm_rss_mb(), 1) if hwm_was_reset and machine.hwm_rss_mb() else None),
        **machine.host_fields(),
    }
