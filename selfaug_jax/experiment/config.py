"""Experiment configuration: dataclass sections, YAML presets with inheritance, ``key=value`` overrides.

A preset is a YAML file under ``experiments/configs/`` whose top-level keys are the sections below (``model``,
``data``, ``train``, ``lora``, ``optimizer``, ``loss``, ``eval``, ``mesh``, ``output``) plus an optional
``preset_base: NAME`` to inherit from another preset. Overrides use dotted keys (``train.batch_size=4``,
``optimizer.learning_rate=1e-4``). Every key is checked: an unknown key or a value of the wrong type is reported
with the valid choices, before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from selfaug_jax.checkpoints.default_model import DEFAULT_MODEL_ALIASES
from selfaug_jax.eval.suite import EvalConfig
from selfaug_jax.lora import ALL_LINEAR_TARGETS
from selfaug_jax.loss import SelfAugLossConfig
from selfaug_jax.models.remat import REMAT_POLICIES
from selfaug_jax.train.optimizer import OptimizerConfig
from selfaug_jax.train.state import METHODS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments" / "configs"
DATA_FORMATS = ("auto", "jsonl", "crag", "rag-instruct", "alpaca", "sharegpt", "openai")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


@dataclasses.dataclass
class ModelSection:
    """Which model, and in which precision. ``name``: HF dir, ``.gguf`` file, or ``smollm2-135m-instruct``."""

    name: str = "smollm2-135m-instruct"
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # storage of the frozen base (adapters and optimizer state are always float32)
    remat: str = "dots"  # none | full | dots | dots_saveable (per decoder layer)
    num_layers: int | None = None  # keep only the first N decoder layers (smoke tests / debugging)
    # Query-chunk length of attention: sequences longer than this never hold a [b, heads, t, t] float32 score
    # tensor (null: dense attention). Values are unchanged up to float rounding.
    attention_chunk: int | None = 512


@dataclasses.dataclass
class DataSection:
    """Training / evaluation data. ``train``: "default" (the shipped fictional RAG task) or a file."""

    train: str = "default"
    format: str = "auto"  # auto | jsonl | crag | rag-instruct | alpaca | sharegpt | openai (selfaug_jax/data/formats.py)
    # Column mapping, e.g. {question: instruction, documents: ctxs} (data.columns.question=instruction); keys in
    # selfaug_jax.data.formats.COLUMN_KEYS. For jsonl / alpaca / sharegpt / openai (and Parquet / Arrow files).
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    crag_split: str = "validation"  # the paper trains on CRAG's validation split
    max_length: int = 1024
    truncation: str = "drop"  # drop | truncate (lowest-ranked documents first; never question/answer)
    buckets: tuple[int, ...] = (256, 512, 768, 1024)
    max_train_examples: int | None = None
    pack: bool = False


@dataclasses.dataclass
class TrainSection:
    """The training loop. ``methods`` are run in order on the same data and seed."""

    methods: tuple[str, ...] = ("lora", "selfaug")
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum_steps: int = 1
    accum_normalization: str = "mean"  # mean (released code) | token
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every_steps: int | None = None
    eval_every_epoch: bool = False
    export: bool = True  # export merged HF model + PEFT adapter at the end


@dataclasses.dataclass
class LoRASection:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_LINEAR_TARGETS


@dataclasses.dataclass
class MeshSection:
    """Device mesh (``jax.make_mesh``); sizes multiply to the device count. ``cpu_devices`` fakes host devices."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    cpu_devices: int | None = None
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)


@dataclasses.dataclass
class OutputSection:
    dir: str = "runs/default"
    tensorboard: bool = True


@dataclasses.dataclass
class ExperimentConfig:
    preset: str = "default"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    loss: SelfAugLossConfig = dataclasses.field(default_factory=SelfAugLossConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def validate(self, check_paths: bool = True) -> "ExperimentConfig":
        """Semantic checks (types are checked while building); ``check_paths`` also checks that files exist."""
        for m in self.train.methods:
            if m not in METHODS:
                raise ConfigError(f"train.methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
        if not self.train.methods:
            raise ConfigError("train.methods is empty")
        for key, value in (("model.dtype", self.model.dtype), ("model.param_dtype", self.model.param_dtype)):
            if value not in ("float32", "bfloat16"):
                raise ConfigError(f"{key}: {value!r} is not one of float32, bfloat16")
        if self.model.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat: {self.model.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if self.model.attention_chunk is not None and self.model.attention_chunk < 1:
            raise ConfigError(f"model.attention_chunk: {self.model.attention_chunk!r} must be a positive int or null")
        if self.data.format not in DATA_FORMATS:
            raise ConfigError(f"data.format: {self.data.format!r} is not one of {', '.join(DATA_FORMATS)}")
        if check_paths and self.data.train != "default" and not Path(self.data.train).exists():
            raise ConfigError(f"data.train: file {self.data.train!r} does not exist")
        if check_paths and self.data.train != "default":
            _check_data_columns(self.data)
        if self.eval.lm_eval_tasks:
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise ConfigError("eval.lm_eval_tasks needs lm-eval: pip install -e '.[lm-eval]'")
            if check_paths and self.eval.lm_eval_include_path and not Path(self.eval.lm_eval_include_path).is_dir():
                raise ConfigError(f"eval.lm_eval_include_path: directory {self.eval.lm_eval_include_path!r} "
                                  f"does not exist")
        if self.data.truncation not in ("drop", "truncate"):
            raise ConfigError(f"data.truncation: {self.data.truncation!r} is not one of drop, truncate")
        if max(self.data.buckets) < self.data.max_length:
            raise ConfigError(f"data.buckets {self.data.buckets} must reach data.max_length={self.data.max_length}")
        if self.train.batch_size % self.train.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} is not divisible by "
                f"train.grad_accum_steps={self.train.grad_accum_steps}"
            )
        if self.train.accum_normalization not in ("mean", "token"):
            raise ConfigError(f"train.accum_normalization: {self.train.accum_normalization!r} is not mean or token")
        name = self.model.name
        if check_paths and name not in DEFAULT_MODEL_ALIASES and not Path(name).exists():
            raise ConfigError(f"model.name: {name!r} is neither the default model name nor an existing path")
        for f, p in self.eval.mc_files.items():
            if check_paths and not Path(p).exists():
                raise ConfigError(f"eval.mc_files.{f}: file {p!r} does not exist")
        return self


def _check_data_columns(data: DataSection) -> None:
    """The column mapping against the training file's first record (``selfaug_jax.data.formats``)."""
    from selfaug_jax.data.formats import check_columns
    from selfaug_jax.data.readers import resolve_format
    from selfaug_jax.data.schema import DataFormatError

    try:
        fmt = resolve_format(data.train, data.format.replace("-", "_"))
        if fmt in ("crag", "rag_instruct"):
            if data.columns:
                raise DataFormatError(f"data.columns is not supported with data.format={fmt} (fixed fields)")
            return
        check_columns(data.train, fmt, data.columns)
    except DataFormatError as e:
        raise ConfigError(f"data.train: {e}") from None


# ---------------------------------------------------------------------- building from dicts
def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML or command-line value to a field's annotated type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(_coerce(v, inner, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
                          f"valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping of {hint.__name__} fields, got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        return p
    p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; available presets: {', '.join(names)}")
    return p


def load_preset_dict(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged mapping of a preset and its ``preset_base`` chain."""
    path = preset_path(name_or_path)
    if str(path) in _seen:
        raise ConfigError(f"preset_base cycle: {' -> '.join(_seen + (str(path),))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections")
    base_name = raw.pop("preset_base", None)
    raw.pop("launcher", None)  # read by experiments/tpu/launch.sh only
    base = load_preset_dict(base_name, _seen + (str(path),)) if base_name else {}
    return _deep_merge(base, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, value = text.split("=", 1)
    parsed = yaml.safe_load(value) if value.strip() else ""
    return key.strip().split("."), parsed


def build_config(
    preset: str = "default",
    overrides: list[str] | tuple[str, ...] = (),
    *,
    check_paths: bool = True,
    **sections: Any,
) -> ExperimentConfig:
    """Preset + dotted overrides (+ section dicts) -> a validated :class:`ExperimentConfig`."""
    values = load_preset_dict(preset)
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    values = _deep_merge(values, sections)
    values.setdefault("preset", Path(preset).stem)
    return _build(ExperimentConfig, values, "").validate(check_paths)
