"""The training loop: thin around the pure, jitted train step.

Per method it: builds the train state, iterates batches from a resumable sampler, runs the step, logs metrics
(``metrics.jsonl``, TensorBoard, a progress bar), saves Orbax checkpoints every N steps and at the end, resumes
exactly from the latest checkpoint, stops cleanly on a non-finite loss, runs periodic evaluations, and exports
the merged Hugging Face model and the PEFT adapter.

No host sync per step: step ``n``'s metrics stay on the device while step ``n + 1`` is dispatched and batch
``n + 2`` is prepared; the metrics of all steps up to ``n`` are read back together (one small transfer) after step
``n + 1`` was dispatched, where ``n`` is a multiple of ``train.log_every``. Every step's loss is checked. Before
a checkpoint, an evaluation or the end, the pending metrics are read and checked first, so a checkpoint never
holds a state whose loss was NaN/inf: a divergence stops the run naming the step, with the last good checkpoint
kept.

Test hook: with ``SELFAUG_JAX_TEST_NONFINITE_AT_STEP=N`` in the environment the trainable parameters are multiplied
by NaN before step ``N`` is dispatched, so the real step produces a non-finite loss (``tests/test_faults.py``).

Exports are written into a temporary sibling folder and renamed into place when complete, so a failed export (a
full disk, a kill) never leaves a half-written ``export/`` that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from selfaug_jax.checkpoints.hf import save_hf_model
from selfaug_jax.checkpoints.orbax import TrainCheckpointer
from selfaug_jax.data.batching import BatchConfig, BatchIterator
from selfaug_jax.data.readers import iter_jsonl_objects
from selfaug_jax.data.tfds_source import EpochSampler
from selfaug_jax.experiment.config import ExperimentConfig
from selfaug_jax.host_memory import release_freed_host_memory
from selfaug_jax.lora import LoRAConfig, merge_lora, save_peft_adapter
from selfaug_jax.methods import get_method
from selfaug_jax.models.decoder import DecoderLM
from selfaug_jax.train.optimizer import make_optimizer
from selfaug_jax.train.state import ModelDef, TrainState, init_train_state
from selfaug_jax.train.step import StepConfig, make_train_step

logger = logging.getLogger(__name__)

LOGGED_KEYS = ("loss", "ce", "kl", "learning_rate", "grad_norm", "n_tokens", "n_target_tokens", "n_aligned_tokens")
"""Metrics every step has, logged first; every other scalar metric of the step (a loss term's own metrics, e.g.
``orth``) is logged after them, in name order."""


NONFINITE_TEST_HOOK_ENV = "SELFAUG_JAX_TEST_NONFINITE_AT_STEP"


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class MethodRun:
    """What one method's training produced."""

    method: str
    out_dir: Path
    model_def: ModelDef
    state: TrainState
    curves: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    total_steps: int
    steps_per_epoch: int
    wall_time_s: float
    resumed_from: int | None = None

    def model(self) -> DecoderLM:
        """The trained model as trained (adapters attached for LoRA methods), on the live state."""
        return self.model_def.merged_model(self.state)

    def eval_model(self, adapter_scale: float = 1.0) -> DecoderLM:
        """The trained model for evaluation: LoRA folded into the weights (on copies), so it has the base model's
        structure and every jitted evaluation function compiled for the base model is reused. ``adapter_scale``
        < 1 merges the adapter at that scale (WiSE-FT, :func:`selfaug_jax.lora.merge_lora`; LoRA methods only)."""
        return eval_model(self.model_def, self.state, adapter_scale)


def eval_model(model_def: ModelDef, state: TrainState, adapter_scale: float = 1.0) -> DecoderLM:
    """A standalone copy of the policy with LoRA merged at ``adapter_scale`` (see :meth:`MethodRun.eval_model`)."""
    if adapter_scale != 1.0 and not model_def.spec.uses_lora:
        raise ValueError(f"adapter_scale={adapter_scale}: method {model_def.spec.name!r} has no LoRA adapter to scale")
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (new Variables: the state is never touched)
    model = model_def.policy(copy(state.trainable), copy(state.frozen))
    return merge_lora(model, scale=adapter_scale) if model_def.spec.uses_lora else model


def is_main_process() -> bool:
    return jax.process_index() == 0


def lora_config_of(cfg: ExperimentConfig) -> LoRAConfig:
    return LoRAConfig(
        rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules
    )


def batch_config_of(cfg: ExperimentConfig, pad_id: int) -> BatchConfig:
    """This process's batching: ``train.batch_size / process_count`` rows of its own examples per step. On several
    processes every row has the longest bucket's length, so all hosts' rows form one global ``[B, T]`` array
    without agreeing on a length each step."""
    buckets = tuple(sorted(cfg.data.buckets))
    n_proc = jax.process_count()
    if n_proc > 1:
        buckets = buckets[-1:]
    return BatchConfig(
        batch_size=cfg.train.batch_size // n_proc,
        buckets=buckets,
        pad_id=pad_id,
        pack=cfg.data.pack,
        pack_length=max(buckets) if cfg.data.pack else None,
        on_too_long="error",
    )


def count_batches_per_epoch(source, batch_config: BatchConfig, seed: int) -> int:
    """Batches in one epoch (a dry pass over the sampler when packing; arithmetic otherwise)."""
    if not batch_config.pack:
        return len(source) // batch_config.batch_size
    it = BatchIterator(EpochSampler(source, seed=seed, shuffle=True, num_epochs=1), batch_config)
    return sum(1 for _ in it)


def restart_jsonl(path: Path, resume_step: int | None) -> list[dict[str, Any]]:
    """The records of a per-step JSONL log kept on resume (``step <= resume_step``; none on a fresh start), written
    back to ``path`` by the main process so the file continues from the restored step."""
    records: list[dict[str, Any]] = []
    if resume_step is not None and path.exists():
        records = [r for _, r in iter_jsonl_objects(path) if r["step"] <= resume_step]
    if is_main_process():
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


class MetricsLogger:
    """``metrics.jsonl`` (+ TensorBoard) writer; on resume, keeps only the lines up to the restored step."""

    def __init__(self, out_dir: Path, *, tensorboard: bool, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.enabled = is_main_process()
        if not self.enabled:
            self.writer = None
            return
        self.records = restart_jsonl(self.path, resume_step)
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _host_metrics(metrics_list: list[dict[str, jax.Array]]) -> list[dict[str, float]]:
    """The logged metrics of several steps as Python numbers (one ``device_get`` of the small scalars): the
    :data:`LOGGED_KEYS`, then every other scalar metric of the step (the method's loss-term metrics)."""
    keys = [_logged_keys(m) for m in metrics_list]
    fetched = jax.device_get([{k: m[k] for k in ks} for ks, m in zip(keys, metrics_list)])
    out = []
    for ks, one in zip(keys, fetched):
        row = {}
        for k in ks:  # in this order (device_get returns dicts with sorted keys)
            v = np.asarray(one[k])
            row["lr" if k == "learning_rate" else k] = int(v) if v.dtype.kind in "iu" else float(v)
        out.append(row)
    return out


def _logged_keys(metrics: dict[str, Any]) -> list[str]:
    extra = sorted(k for k, v in metrics.items() if k not in LOGGED_KEYS and np.ndim(v) == 0)
    return list(LOGGED_KEYS) + extra


def _nonfinite_test_step() -> int | None:
    """The step before which the test hook poisons the parameters (``None``: hook off)."""
    value = os.environ.get(NONFINITE_TEST_HOOK_ENV)
    return int(value) if value else None


def _poisoned(state: TrainState) -> TrainState:
    """``state`` with every trainable parameter multiplied by NaN (the test hook)."""
    return state.replace(trainable=jax.tree.map(lambda x: x * jnp.nan, state.trainable))


def train_method(
    method: str,
    cfg: ExperimentConfig,
    *,
    model: DecoderLM,
    source,
    pad_id: int,
    out_dir: Path,
    resume: bool = False,
    evaluate: Callable[[DecoderLM, int, float], dict[str, Any]] | None = None,
    plan: Any = None,
    base_model_ref: str = "",
    progress: bool = True,
) -> MethodRun:
    """Train ``model`` with ``method`` on ``source`` (a random-access tokenized dataset).

    Args:
        evaluate: called as ``evaluate(model, step, epoch)`` every ``train.eval_every_steps`` / epoch; its dict
            is recorded in ``MethodRun.evals`` and ``evals.jsonl``.
        plan: a :class:`selfaug_jax.train.sharding.ShardingPlan` for multi-device runs (``None``: one device).
    """
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    batch_config = batch_config_of(cfg, pad_id)
    steps_per_epoch = count_batches_per_epoch(source, batch_config, tcfg.seed)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(source)} training examples make no batch of {tcfg.batch_size}")
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))

    optimizer, schedule = make_optimizer(cfg.optimizer, total_steps)
    step_config = StepConfig(
        loss=cfg.loss, orth=cfg.orth, features=cfg.features, grad_accum_steps=tcfg.grad_accum_steps,
        accum_normalization=tcfg.accum_normalization,
    )
    model_def, state = init_train_state(model, method, optimizer, lora_config=lora_config_of(cfg), seed=tcfg.seed,
                                        config=step_config)
    if plan is not None:
        state = plan.shard_state(state)
        step_fn = make_train_step(
            model_def, optimizer, schedule, step_config,
            state_shardings=plan.state_shardings(state), batch_sharding=plan.batch_sharding(),
        )
    else:
        step_fn = make_train_step(model_def, optimizer, schedule, step_config)

    iterator = BatchIterator(EpochSampler(source, seed=tcfg.seed, shuffle=True), batch_config)
    checkpointer = TrainCheckpointer(out_dir / "checkpoints", max_to_keep=tcfg.keep_checkpoints)
    resumed_from = None
    if resume and checkpointer.latest_step() is not None:
        state, extra = checkpointer.restore(state)
        iterator.set_state(extra["data_state"])
        resumed_from = int(state.step)
        logger.info("%s: resumed from step %d", method, resumed_from)
    metrics_log = MetricsLogger(out_dir, tensorboard=cfg.output.tensorboard, resume_step=resumed_from)
    evals_path = out_dir / "evals.jsonl"
    evals = restart_jsonl(evals_path, resumed_from)

    def run_eval(step: int) -> None:
        if evaluate is None:
            return
        record = {"step": step, "epoch": step / steps_per_epoch}
        record.update(evaluate(eval_model(model_def, state), step, step / steps_per_epoch))
        evals.append(record)
        if is_main_process():
            with evals_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def save(step: int) -> None:
        extra = {"data_state": iterator.state, "base_model": base_model_ref, "method": method, "step": step,
                 "config": cfg.to_dict()}
        checkpointer.save(step, state, extra)

    start = int(state.step)
    bar = tqdm(total=total_steps, initial=start, desc=method, disable=not (progress and is_main_process()),
               dynamic_ncols=True)
    poison_step = _nonfinite_test_step()
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # dispatched steps whose metrics are still on device
    window = {"tokens": 0, "t": time.perf_counter()}

    def drain() -> None:
        """Read back every pending step's metrics in one transfer, stop on a non-finite loss, log the due ones."""
        if not pending:
            return
        for (step, _), host in zip(pending, _host_metrics([m for _, m in pending])):
            if not all(math.isfinite(host[k]) for k in ("loss", "ce", "kl")):
                raise TrainingDivergedError(
                    f"{method}: non-finite loss at step {step} (loss={host['loss']}, ce={host['ce']}, "
                    f"kl={host['kl']}); stopping. The last good checkpoint is kept in {checkpointer.directory} "
                    f"(step {checkpointer.latest_step()})."
                )
            window["tokens"] += host["n_tokens"]
            if step % tcfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                tokens_per_s = window["tokens"] / max(now - window["t"], 1e-9)
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), **host,
                          "tokens_per_s": round(tokens_per_s, 2)}
                metrics_log.log(record)
                bar.set_postfix(loss=f"{host['loss']:.4f}", ce=f"{host['ce']:.4f}", kl=f"{host['kl']:.2e}",
                                tok_s=f"{tokens_per_s:.0f}")
                window["tokens"], window["t"] = 0, now
        pending.clear()

    try:
        for step in range(start + 1, total_steps + 1):
            batch = next(iterator).arrays()  # prepared while the previous step runs
            if plan is not None:  # each host built only its own rows (its own examples) of the global batch
                batch = plan.put_batch(batch)
            else:
                batch = {k: jnp.asarray(v) for k, v in batch.items()}
            if step == poison_step:
                state = _poisoned(state)
            state, metrics = step_fn(state, batch)  # dispatched; runs while the host goes on
            if step == start + 1:
                release_freed_host_memory()  # that call compiled the step: return the compiler's freed heap
            if pending and pending[-1][0] % tcfg.log_every == 0:
                drain()  # up to the previous step (finished by now, or nearly): never the one just dispatched
            pending.append((step, metrics))
            bar.update(1)
            checkpoint_due = step % tcfg.checkpoint_every == 0 or step == total_steps
            eval_due = (tcfg.eval_every_steps and step % tcfg.eval_every_steps == 0) or (
                tcfg.eval_every_epoch and step % steps_per_epoch == 0
            )
            if checkpoint_due or eval_due or step == total_steps:
                drain()  # never checkpoint or evaluate a state whose loss was not checked
            if checkpoint_due:
                save(step)
            if eval_due and step != total_steps:
                run_eval(step)
        drain()
    finally:
        bar.close()
        metrics_log.close()
        checkpointer.close()

    run = MethodRun(
        method=method,
        out_dir=out_dir,
        model_def=model_def,
        state=state,
        curves=metrics_log.records,
        evals=evals,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        wall_time_s=time.perf_counter() - t_start,
        resumed_from=resumed_from,
    )
    if tcfg.export and is_main_process():
        export_run(run, cfg, base_model_ref)
    return run


def export_run(run: MethodRun, cfg: ExperimentConfig, base_model_ref: str) -> None:
    """Write ``export/hf`` (merged model, loadable by transformers) and, for LoRA methods, ``export/adapter``.

    Everything is written into ``export.tmp-<pid>`` first and renamed to ``export`` when complete (a previous
    ``export`` is moved aside and removed only after the rename), so an export that fails half-way leaves no
    folder named ``export`` with partial files: the temporary folder is removed and the error propagates.
    """
    export = run.out_dir / "export"
    tmp = run.out_dir / f"export.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if get_method(run.method).uses_lora:
            save_peft_adapter(run.model(), lora_config_of(cfg), tmp / "adapter",
                              base_model_name_or_path=base_model_ref)
        model = run.eval_model()
        tokenizer_dir = base_model_ref if base_model_ref and Path(base_model_ref).is_dir() else None
        save_hf_model(model, tmp / "hf", tokenizer_dir=tokenizer_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, export)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst`` (same filesystem), replacing an old ``dst`` without a moment
    where ``dst`` holds a mix: the old one is renamed aside first and deleted after."""
    old = dst.with_name(dst.name + f".old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
