"""Checks of a run's inputs that need more than the config file, done before any data or model work.

:func:`preflight` runs after :func:`~selfaug_jax.experiment.config.build_config` (which checked every field and
the cross-field rules) and before ``run_experiment`` reads data or loads weights. It decides from cheap sources
what would otherwise fail minutes later:

- the model directory: ``config.json`` present, valid JSON, a supported ``model_type``, ``model.num_layers``
  within the model's depth (the weights are not read);
- the mesh: its size against the devices JAX sees, the global batch against the process count, and every
  tensor dimension that the sharding rules split (hidden size over ``fsdp``; heads x head_dim, kv-heads x
  head_dim, the MLP width and the vocabulary over ``tensor``) -- all from ``config.json``;
- the tokenizer: a chat template exists and its assistant turn can be located (one tiny probe example goes
  through the real prompt builder);
- ``--resume``: at least one method of the run has a checkpoint.

Every failure is an :class:`InputError` (or one of :data:`USER_ERROR_TYPES`): ``experiments/run.py`` prints such
errors as one line and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from selfaug_jax.experiment.config import ConfigError, ExperimentConfig

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A user input (model directory, tokenizer, mesh, checkpoint directory) that cannot work; one line, with
    what is wrong, where, and the fix."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong" (exit status 2, one line) rather than a bug.

    Imported lazily so that ``experiments/run.py`` can catch them without importing JAX-heavy modules first.
    """
    from selfaug_jax.checkpoints.default_model import DefaultModelMissingError
    from selfaug_jax.checkpoints.gguf import GGUFConversionError
    from selfaug_jax.checkpoints.hf import CheckpointError
    from selfaug_jax.checkpoints.orbax import CheckpointRestoreError
    from selfaug_jax.data.prompts import PromptError
    from selfaug_jax.data.schema import DataFormatError, SchemaError
    from selfaug_jax.models.config import UnsupportedModelError
    from selfaug_jax.train.sharding import ShardingError

    return (ConfigError, InputError, DataFormatError, SchemaError, PromptError, CheckpointError,
            CheckpointRestoreError, GGUFConversionError, UnsupportedModelError, ShardingError,
            DefaultModelMissingError)


@dataclasses.dataclass(frozen=True)
class PreflightResult:
    """What the checks resolved (reused by the runner so nothing is resolved twice)."""

    model_dir: Path
    model_config: Any  # selfaug_jax.models.config.ModelConfig


def model_config_of(cfg: ExperimentConfig) -> tuple[Path, Any]:
    """``(model_dir, ModelConfig)`` from ``config.json`` only (the weights are not read)."""
    from selfaug_jax.models import resolve_model_dir
    from selfaug_jax.models.config import ModelConfig, UnsupportedModelError

    try:
        model_dir = resolve_model_dir(cfg.model.name)
    except FileNotFoundError as e:
        raise InputError(f"model.name: {' '.join(str(e).split())}") from None
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"model.name: {model_dir} has no config.json; point model.name at a Hugging Face model "
                         "directory (config.json + *.safetensors), a .gguf file or smollm2-135m-instruct")
    try:
        model_config = ModelConfig.from_json_file(config_path)
    except UnsupportedModelError as e:
        raise InputError(f"{config_path}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:
        text = str(e)
        raise InputError(text if text.startswith(str(config_path)) else f"{config_path}: {text}") from None
    n_layers = model_config.num_hidden_layers
    if cfg.model.num_layers is not None and cfg.model.num_layers > n_layers:
        raise InputError(f"model.num_layers={cfg.model.num_layers}: {config_path} has only {n_layers} layers; "
                         f"use 1..{n_layers} or null")
    return model_dir, model_config


def sharded_dimensions(model_config: Any) -> dict[str, tuple[str, int]]:
    """Every model dimension the sharding rules split: ``name -> (mesh axis, size)``.

    Mirrors ``selfaug_jax.train.sharding.LOGICAL_TO_MESH`` for the axes that hold a model dimension (``embed`` on
    ``fsdp``; ``heads``, ``kv_heads``, ``mlp`` and ``vocab`` on ``tensor``).
    """
    from selfaug_jax.train.sharding import LOGICAL_TO_MESH

    c = model_config
    sizes = {
        "embed": ("hidden_size", c.hidden_size),
        "heads": ("num_attention_heads x head_dim", c.num_attention_heads * c.head_dim),
        "kv_heads": ("num_key_value_heads x head_dim", c.num_key_value_heads * c.head_dim),
        "mlp": ("intermediate_size", c.intermediate_size),
        "vocab": ("vocab_size", c.vocab_size),
    }
    out = {}
    for logical, (name, size) in sizes.items():
        axis = LOGICAL_TO_MESH[logical]
        if axis is not None:
            out[name] = (axis if isinstance(axis, str) else axis[0], size)
    return out


def check_mesh(cfg: ExperimentConfig, model_config: Any, config_path: Path, *, device_count: int,
               process_count: int) -> None:
    """Mesh vs devices, batch vs processes, and model dimensions vs mesh axes (raises :class:`InputError`)."""
    mesh = cfg.mesh
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    n = mesh.data * mesh.fsdp * mesh.tensor
    desc = f"--mesh data={mesh.data},fsdp={mesh.fsdp},tensor={mesh.tensor}"
    if (n > 1 or process_count > 1) and n != device_count:
        raise InputError(f"{desc} needs {n} devices but JAX sees {device_count} ({process_count} process(es)); "
                         f"the sizes must multiply to the device count (on CPU: --cpu-devices {n})")
    if cfg.train.batch_size % process_count:
        raise InputError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {process_count} "
                         "processes; each process loads an equal share of every global batch")
    if cfg.data.pack and process_count > 1:
        raise InputError("data.pack=true with several processes is not supported (packed batch counts differ per "
                         "host); set data.pack=false")
    for name, (axis, size) in sharded_dimensions(model_config).items():
        if sizes[axis] > 1 and size % sizes[axis]:
            raise InputError(f"{config_path}: {name}={size} is not divisible by mesh.{axis}={sizes[axis]}; "
                             f"choose a mesh whose {axis} axis divides it")


def check_tokenizer(tokenizer: Any, cfg: ExperimentConfig, model_dir: Path) -> None:
    """A chat template exists and a probe example's assistant turn can be located in it."""
    from selfaug_jax.data import PromptConfig, PromptError, RagExample, tokenize_example

    probe = RagExample.from_dict({"id": "preflight-probe", "question": "What is the probe?",
                                  "documents": ["The probe is a test."], "answer": "A test."},
                                 where="preflight probe")
    try:
        tokenize_example(probe, tokenizer, PromptConfig(max_length=None))
    except PromptError as e:
        raise InputError(f"{model_dir}: tokenizer: {' '.join(str(e).split())}; the model directory needs a chat "
                         "template (tokenizer_config.json 'chat_template' or chat_template.jinja) that renders the "
                         "assistant turn and ends it with an end-of-turn token, as instruct models ship") from None


def check_resume(cfg: ExperimentConfig) -> None:
    """``--resume`` needs a checkpoint of at least one method under ``output.dir``."""
    from selfaug_jax.experiment.runs import plan_runs

    out = Path(cfg.output.dir)
    dirs = {r.name: r.dir_name for r in plan_runs(cfg)}  # one folder per run (sweep points have their own)
    found = [m for m, d in dirs.items() if _has_checkpoint(out / d / "checkpoints")]
    if not found:
        where = ", ".join(str(out / d / "checkpoints") for d in dirs.values())
        raise InputError(f"--resume: no checkpoint to resume from in {where}; run without --resume to start "
                         "fresh, or give the --out of the run to continue")
    missing = [m for m in dirs if m not in found]
    if missing:
        logger.info("--resume: no checkpoint yet for %s; those methods start from step 0", ", ".join(missing))


def _has_checkpoint(directory: Path) -> bool:
    """A finished Orbax step folder (an integer name; Orbax writes ``N.orbax-checkpoint-tmp-*`` first)."""
    return directory.is_dir() and any(p.name.isdigit() and p.is_dir() for p in directory.iterdir())


def preflight(cfg: ExperimentConfig, *, resume: bool = False) -> PreflightResult:
    """All checks above, in order of cost; returns the resolved model directory and config."""
    import jax

    if resume:
        check_resume(cfg)
    model_dir, model_config = model_config_of(cfg)
    check_mesh(cfg, model_config, model_dir / "config.json", device_count=jax.device_count(),
               process_count=jax.process_count())
    return PreflightResult(model_dir=model_dir, model_config=model_config)

