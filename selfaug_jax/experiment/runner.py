"""The whole SelfAug experiment: data -> base evaluation -> train each method -> evaluate -> report.

``run_experiment(cfg)`` is what ``python experiments/run.py`` calls. Every method starts from the same base model,
the same tokenized data and the same seed, so the comparison table differs only by the method.

Order of work, cheapest checks first: :func:`~selfaug_jax.experiment.preflight.preflight` (model ``config.json``,
mesh, ``--resume``), the tokenizer's chat template, reading the data file (schema errors name file:line), then
tokenization, and only then the model weights.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from selfaug_jax.eval.report import write_report
from selfaug_jax.eval.base_cache import base_evaluation
from selfaug_jax.eval.suite import EXTRA_METRIC_INFO, PARTS, evaluate_model, prepare_eval_data
from selfaug_jax.experiment.config import ExperimentConfig
from selfaug_jax.experiment.preflight import check_tokenizer, preflight
from selfaug_jax.experiment.train_data import tokenized_train_source, transformed_sources
from selfaug_jax.experiment.progress import StageTracker
from selfaug_jax.experiment.runs import plan_runs, run_config
from selfaug_jax.run_names import scaled_name
from selfaug_jax.experiment.trainer import is_main_process, train_method
from selfaug_jax.methods import get_method
from selfaug_jax.models import load_pretrained, load_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_model(cfg: ExperimentConfig, model_dir: Path):
    """The base model, in the configured precision (frozen base may be bf16; adapters stay float32)."""
    return load_pretrained(
        model_dir,
        dtype=_DTYPES[cfg.model.dtype],
        param_dtype=_DTYPES[cfg.model.param_dtype],
        remat_policy=cfg.model.remat,
        num_layers=cfg.model.num_layers,
        attention_chunk=cfg.model.attention_chunk,
        attention_impl=cfg.model.attention_impl,
        scan_unroll=cfg.model.scan_unroll,
    )


def _lm_eval(model, tokenizer, cfg: ExperimentConfig) -> dict[str, Any]:
    """``eval.lm_eval_tasks`` on one model (selfaug_jax/eval/lm_eval_tasks.py)."""
    from selfaug_jax.eval.lm_eval_tasks import run_lm_eval_tasks

    return run_lm_eval_tasks(model, tokenizer, cfg.eval.lm_eval_tasks, include_path=cfg.eval.lm_eval_include_path,
                             limit=cfg.eval.lm_eval_limit, batch_size=cfg.eval.batch_size)


def run_experiment(cfg: ExperimentConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the configured methods and write ``summary.json``, ``report.md`` and plots to ``cfg.output.dir``."""
    t0 = time.perf_counter()
    # One run per method, or per sweep point of it (train.sweep), each with its method's overrides
    # (train.method_overrides): selfaug_jax/experiment/runs.py. Run names are the report's columns.
    runs = plan_runs(cfg)
    methods = [r.name for r in runs]
    scales = tuple(cfg.eval.adapter_scales)
    if scales and not any(get_method(r.method).uses_lora for r in runs):
        logger.warning("eval.adapter_scales=%s: no LoRA method in this run; no scaled columns", list(scales))
    transforms = [get_method(r.method).data for r in runs]  # each run's training-data transform ("none": as is)
    extra = ["data transforms"] if any(t != "none" for t in transforms) else []
    tracker = StageTracker(["data", "base eval"] + extra
                           + [f"{m} {k + 1}/{len(methods)}" for k, m in enumerate(methods)] + ["report"],
                           kinds=["data", "eval"] + ["data"] * len(extra) + ["method"] * len(methods) + ["report"],
                           stream=sys.stderr if progress and is_main_process() else None)
    tracker.begin("data")
    model_dir = preflight(cfg, resume=resume).model_dir
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer(tokenizer, cfg, model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    source, data_stats = tokenized_train_source(cfg, tokenizer, model_dir)

    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    plan = None
    n_devices = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    if n_devices > 1 or jax.process_count() > 1:
        from selfaug_jax.train.sharding import ShardingPlan

        plan = ShardingPlan.from_config(cfg.mesh)

    eval_data = prepare_eval_data(tokenizer, cfg.eval)
    tracker.begin("base eval")
    base_model = load_model(cfg, model_dir)
    t_eval = time.perf_counter()
    base_eval = base_evaluation(base_model, tokenizer, eval_data, cfg.eval)  # disk-cached (eval.cache)
    ref_responses, base_metrics, base_samples = base_eval.reference_responses, base_eval.metrics, base_eval.samples
    logger.info("base evaluation: %.1fs (%s)", time.perf_counter() - t_eval,
                "reused from cache" if base_eval.cache_hit else "computed")
    lm_eval_results = {"base": _lm_eval(base_model, tokenizer, cfg)} if cfg.eval.lm_eval_tasks else {}

    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "data": {"train_examples": len(source), "prompt_stats": data_stats, "eval": eval_data.info},
        "methods": {"base": base_metrics},
        "metric_info": dict(EXTRA_METRIC_INFO),
        "samples": {"base": base_samples},
        "items": {"base": base_samples.pop("items", {})},
        "curves": {},
        "evals_over_training": {},
        "timing_s": {},
        "runs": {"base": {"method": "base"}, **{r.name: r.as_dict() for r in runs}},
    }
    periodic = bool(cfg.train.eval_every_steps or cfg.train.eval_every_epoch)

    # Training-data transforms (MAGPIE replay, SDFT rewrite): generated once with the base model already loaded,
    # shared by the methods that name the same transform (selfaug_jax/data/transforms.py).
    sources = {"none": source}
    if extra:
        tracker.begin("data transforms")
        n_task = int(data_stats.get("n_kept", len(source)))
        for name, (src, report) in transformed_sources(cfg, tokenizer, model_dir, base_model, transforms,
                                                       n_task).items():
            sources[name] = src
            results["data"].setdefault("transforms", {})[name] = report

    # The periodic evaluation during training (paper Fig. 2): eval.periodic's fixed subset (or the final sizes),
    # whose step-0 point is the base model on the same subset (disk-cached like the base evaluation).
    periodic_cfg = cfg.eval.periodic_config()
    periodic_parts = cfg.eval.periodic_parts or PARTS
    periodic_data, periodic_refs, periodic_base = eval_data, ref_responses, base_metrics
    if periodic and periodic_cfg is not cfg.eval:
        periodic_data = prepare_eval_data(tokenizer, periodic_cfg)
        sub = base_evaluation(base_model, tokenizer, periodic_data, periodic_cfg)
        periodic_refs, periodic_base = sub.reference_responses, sub.metrics

    def evaluate(model, step, epoch):
        return evaluate_model(model, tokenizer, periodic_data, periodic_cfg, original_model=base_model,
                              reference_responses=periodic_refs, parts=periodic_parts)[0]

    for k, spec in enumerate(runs):
        method = spec.name
        tracker.begin(f"{method} {k + 1}/{len(methods)}")
        t_method = time.perf_counter()
        run = train_method(
            spec.method,
            run_config(cfg, spec) if spec.overrides else cfg,
            model=load_model(cfg, model_dir),
            source=sources[get_method(spec.method).data],
            pad_id=pad_id,
            out_dir=out / spec.dir_name,
            resume=resume,
            evaluate=evaluate if periodic else None,
            plan=plan,
            base_model_ref=str(model_dir),
            progress=progress,
        )
        metrics, samples = evaluate_model(
            run.eval_model(), tokenizer, eval_data, cfg.eval, original_model=base_model,
            reference_responses=ref_responses,
        )
        results["methods"][method] = metrics
        if cfg.eval.lm_eval_tasks:
            lm_eval_results[method] = _lm_eval(run.eval_model(), tokenizer, cfg)
        results["samples"][method] = samples
        results["curves"][method] = run.curves
        if periodic:
            final = metrics if periodic_cfg is cfg.eval else evaluate(run.eval_model(), run.total_steps, None)
            results["evals_over_training"][method] = (
                [{"step": 0, "epoch": 0.0, **periodic_base}] + run.evals
                + [{"step": run.total_steps, "epoch": run.total_steps / run.steps_per_epoch, **final}]
            )
        results["timing_s"][method] = {"train": round(run.wall_time_s, 1),
                                       "total": round(time.perf_counter() - t_method, 1)}
        results["items"][method] = samples.pop("items", {})
        for scale in scales if get_method(spec.method).uses_lora else ():  # WiSE-FT columns (eval.adapter_scales)
            name = scaled_name(method, scale)
            t_scaled = time.perf_counter()
            scaled_model = run.eval_model(scale)
            results["methods"][name], scaled_samples = evaluate_model(
                scaled_model, tokenizer, eval_data, cfg.eval, original_model=base_model,
                reference_responses=ref_responses)
            if cfg.eval.lm_eval_tasks:
                lm_eval_results[name] = _lm_eval(scaled_model, tokenizer, cfg)
            results["items"][name] = scaled_samples.pop("items", {})
            results["samples"][name] = scaled_samples
            results["runs"][name] = {**spec.as_dict(), "adapter_scale": scale}
            results["timing_s"][name] = {"eval": round(time.perf_counter() - t_scaled, 1)}
            del scaled_model, scaled_samples
        del run, samples
        gc.collect()  # the method's train step, merged model and their compiled executables

    if lm_eval_results:
        results["lm_eval"] = lm_eval_results

    tracker.begin("report")
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    table = ""
    if is_main_process():
        tracker.end()
        results["stages"] = tracker.records()
        table = write_report(results, out)
        if lm_eval_results:
            from selfaug_jax.eval.lm_eval_tasks import lm_eval_markdown

            with open(out / "report.md", "a") as f:
                f.write("\n" + lm_eval_markdown(lm_eval_results))
        (out / "samples.json").write_text(json.dumps(results["samples"], indent=2, default=str) + "\n")
    results["table"] = table
    return results
