#!/usr/bin/env python3
"""selfaug-jax main job: fine-tune, evaluate downstream gain and forgetting, and report.

    python experiments/run.py                               # preset "default": lora vs selfaug on SmolLM2, ~15 min CPU
    python experiments/run.py --preset smoke                # the same pipeline, tiny (~2 min)
    python experiments/run.py --method selfaug --max-steps 50 --out runs/x
    python experiments/run.py --compare lora,selfaug,sft train.batch_size=4 optimizer.learning_rate=1e-4
    python experiments/run.py --preset paper-crag --model /path/Qwen2.5-7B-Instruct --data crag_task_1_dev_v4.jsonl.bz2
    python experiments/run.py --resume --out runs/default   # continue every method from its latest checkpoint
    python experiments/run.py --cpu-devices 8 --mesh data=2,fsdp=2,tensor=2 --preset smoke
    python experiments/run.py --sweep loss.alpha=0.1,0.3,0.5,1.0   # one run (column) per value: selfaug[alpha=0.1]
    python experiments/run.py --preset compare-cpu                 # every method on SmolLM2, <= 60 min on 2 cores

Positional ``section.key=value`` arguments override any config field (see ``experiments/configs/*.yaml``).

Exit status: 0 done; 2 a bad input (config key or value, data file, model directory, tokenizer, mesh, checkpoint
directory), reported as one line on stderr before the work it would break (``--debug``: with the traceback);
3 training stopped on a non-finite loss (the last good checkpoint is kept). Logs go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from selfaug_jax.methods import METHOD_NAMES  # no JAX import: --help stays fast

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=4")
    p.add_argument("--preset", "--config", dest="preset", default="default",
                   help="preset name under experiments/configs/ or a YAML file (default: default)")
    p.add_argument("--method", help="train a single method: " + " | ".join(METHOD_NAMES))
    p.add_argument("--compare", help="comma-separated methods run on the same data and seed, e.g. lora,selfaug")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one run per value of a dotted config key, e.g. loss.alpha=0.1,0.5 (columns selfaug[alpha=0.1]"
                        ", ...); several flags = their product; methods that never read the key run once "
                        "(rules: selfaug_jax/experiment/runs.py)")
    p.add_argument("--model", help="HF model dir, .gguf file, or smollm2-135m-instruct")
    p.add_argument("--data", help="training data: our JSONL, CRAG task 1 .jsonl.bz2, RAG-Instruct .json, Alpaca / "
                        "ShareGPT / OpenAI messages (data.format, data.columns.*), .parquet / .arrow / a "
                        "save_to_disk directory")
    p.add_argument("--out", "--output-dir", dest="out", help="output directory")
    p.add_argument("--max-steps", type=int, help="stop each method after this many optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of each method")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2")
    p.add_argument("--cpu-devices", type=int, help="fake N host devices on CPU (testing sharding)")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (multi-host)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback of input errors")
    p.add_argument("--list-methods", action="store_true", help="print the method registry (name, paper table, "
                   "what trains, reference, loss terms) and exit")
    return p.parse_args(argv)


def list_methods() -> str:
    """The registry as a plain-text table, in the paper's order (``--list-methods``)."""
    from selfaug_jax.methods import METHODS

    where = {1: "Table 1", 2: "Table 2", 0: "extension"}
    rows = [(m.name, where.get(m.table, str(m.table)), m.trains, m.reference, "+".join(m.terms) or "-", m.summary)
            for m in METHODS.values()]
    width = [max(len(r[i]) for r in rows + [("method", "paper", "trains", "reference", "terms", "")])
             for i in range(5)]
    head = ("method", "paper", "trains", "reference", "terms", "summary")
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], width)) + "  " + r[5] for r in [head] + rows)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Translate the convenience flags into dotted config overrides (explicit overrides win: they come last)."""
    from selfaug_jax.experiment.config import ConfigError

    out = []
    if args.method and args.compare:
        raise ConfigError("use either --method or --compare, not both")
    if args.method:
        out.append(f"train.methods=[{args.method}]")
    if args.compare:
        out.append(f"train.methods=[{args.compare}]")
    if args.model:
        out.append(f"model.name={args.model}")
    if args.data:
        out.append(f"data.train={args.data}")
    if args.out:
        out.append(f"output.dir={args.out}")
    if args.max_steps is not None:
        out.append(f"train.max_steps={args.max_steps}")
    if args.mesh:
        for part in args.mesh.split(","):
            if "=" not in part:
                raise ConfigError(f"--mesh {args.mesh!r}: expected axis=size pairs like data=2,fsdp=4")
            out.append(f"mesh.{part.strip()}")
    if args.cpu_devices:
        out.append(f"mesh.cpu_devices={args.cpu_devices}")
    if args.distributed:
        out.append("mesh.distributed=true")
    if args.sweep:
        from selfaug_jax.experiment.runs import sweep_override

        out.append(sweep_override(args.sweep))
    return out + list(args.overrides)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (multi-line messages, e.g. a list of bad tensors, joined by "; ")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = ""
    for line in lines:
        text += ("" if not text else " " if text.endswith(":") else "; ") + line
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    from selfaug_jax.xla_flags import apply_default_xla_flags

    apply_default_xla_flags()  # XLA reads $XLA_FLAGS once, when JAX starts its backend (below)
    args = parse_args(argv)
    if args.list_methods:
        print(list_methods())
        return 0
    # Logs go to stdout; stderr carries only errors (and progress bars), so a bad input reads as one line there.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return run(args)
    except Exception as e:
        from selfaug_jax.experiment.config import ConfigError
        from selfaug_jax.experiment.preflight import user_error_types
        from selfaug_jax.experiment.trainer import TrainingDivergedError

        if args.debug:
            raise
        if isinstance(e, ConfigError):
            print(f"config error: {one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, user_error_types()):
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, TrainingDivergedError):
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 3
        raise


def run(args: argparse.Namespace) -> int:
    if args.no_progress:  # also the data writer's (tfds) bars, which would otherwise land on stderr
        os.environ["TQDM_DISABLE"] = "1"
    if args.cpu_devices:  # must happen before JAX initialises its backends
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax

        jax.config.update("jax_num_cpu_devices", args.cpu_devices)

    import jax

    from selfaug_jax.checkpoints.default_model import cache_dir
    from selfaug_jax.experiment.config import build_config

    # Persistent XLA compilation cache: a second run (or the default run after the smoke run) skips most compiles.
    # A cache the user configured (JAX_COMPILATION_CACHE_DIR and its thresholds, read by JAX at import) is kept.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    cfg = build_config(args.preset, overrides_from_args(args))
    if cfg.mesh.distributed:
        if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
        kwargs = {k: v for k, v in (("coordinator_address", cfg.mesh.coordinator_address),
                                    ("num_processes", cfg.mesh.num_processes),
                                    ("process_id", cfg.mesh.process_id)) if v is not None}
        jax.distributed.initialize(**kwargs)

    from selfaug_jax.experiment.runner import run_experiment

    t0 = time.perf_counter()
    results = run_experiment(cfg, resume=args.resume, progress=not args.no_progress)
    if jax.process_index() == 0:
        print()
        print(results["table"])
        print(f"\nwall time: {time.perf_counter() - t0:.0f} s   report: {Path(cfg.output.dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
