"""Experiment configuration: dataclass sections, YAML presets with inheritance, ``key=value`` overrides.

A preset is a YAML file under ``experiments/configs/`` whose top-level keys are the sections below (``model``,
``data``, ``train``, ``lora``, ``optimizer``, ``loss``, ``orth``, ``features``, ``eval``, ``mesh``, ``output``,
``magpie``, ``sdft``) plus an optional
``preset_base: NAME`` to inherit from another preset. Overrides use dotted keys (``train.batch_size=4``,
``optimizer.learning_rate=1e-4``). Every key is checked: an unknown key or a value of the wrong type is reported
with the valid choices, before any work starts.

Validation in one place
-----------------------
The types of the dataclass fields *are* the schema: ``Literal[...]`` for choices, ``Annotated[int, Range(ge=1)]``
for bounds, ``X | None`` for optional values, ``tuple[T, ...]`` for lists. :func:`_coerce` checks each value
against its field's annotation once, while the config is built (so the error names the dotted key);
:meth:`ExperimentConfig.validate` holds only the checks that involve several fields or the filesystem.

Why this small loader and not pydantic / draccus / omegaconf: the sections are plain dataclasses shared with the
library (``OptimizerConfig``, ``SelfAugLossConfig``, ``EvalConfig`` are used directly by code that never sees a
YAML file), presets inherit through ``preset_base`` chains, and overrides are YAML-parsed dotted keys. pydantic
would have to wrap or re-declare those dataclasses (``pydantic.dataclasses`` changes their construction
semantics for every library caller) and its error messages name ``loc`` tuples rather than ``train.batch_size``;
omegaconf's structured configs do not check ``Literal`` choices or numeric ranges; draccus has no preset
inheritance. The loader is ~150 lines, fully typed-driven, and every message names the key and the valid values.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from selfaug_jax.checkpoints.default_model import DEFAULT_MODEL_ALIASES
from selfaug_jax.data.magpie import MagpieConfig
from selfaug_jax.models.decoder import DEFAULT_ATTENTION_CHUNK, DEFAULT_SCAN_UNROLL
from selfaug_jax.data.sdft import SDFTConfig
from selfaug_jax.eval.suite import EvalConfig
from selfaug_jax.feature_loss import FeatureLossConfig
from selfaug_jax.lora import ALL_LINEAR_TARGETS
from selfaug_jax.loss import SelfAugLossConfig
from selfaug_jax.models.attention_kernels import ATTENTION_IMPLS
from selfaug_jax.models.remat import REMAT_POLICIES
from selfaug_jax.orth_loss import OrthConfig
from selfaug_jax.train.optimizer import OptimizerConfig
from selfaug_jax.methods import METHOD_NAMES

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments" / "configs"


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Numeric bounds of a config field, attached with ``Annotated[int, Range(ge=1)]`` and checked by the loader."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)

    def check(self, value: float, key: str) -> None:
        ok = ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
              and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))
        if not ok:
            raise ConfigError(f"{key}: {value!r} must be {self.describe()}")


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]
DType = Literal["float32", "bfloat16"]
RematPolicy = Literal[tuple(REMAT_POLICIES)]  # type: ignore[misc]  (the policy names as Literal arguments)
AttentionImpl = Literal[ATTENTION_IMPLS]  # type: ignore[valid-type]
Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]
LoRATarget = Literal[ALL_LINEAR_TARGETS]  # type: ignore[valid-type]


@dataclasses.dataclass
class ModelSection:
    """Which model, and in which precision. ``name``: HF dir, ``.gguf`` file, or ``smollm2-135m-instruct``."""

    name: str = "smollm2-135m-instruct"
    dtype: DType = "float32"  # compute dtype
    param_dtype: DType = "float32"  # storage of the frozen base (adapters and optimizer state are always float32)
    remat: RematPolicy = "dots"  # none | full | dots | dots_and_acts | dots_saveable (per decoder layer)
    num_layers: PositiveInt | None = None  # keep only the first N decoder layers (smoke tests / debugging)
    # Query-chunk length of attention: sequences longer than this never hold a [b, heads, t, t] float32 score
    # tensor (null: dense attention). Values are unchanged up to float rounding.
    attention_chunk: PositiveInt | None = DEFAULT_ATTENTION_CHUNK
    # Attention kernel of the training / evaluation forward (selfaug_jax/models/attention_kernels.py): auto (cuDNN
    # flash attention on GPU, splash on TPU, xla_chunked on CPU) | xla_chunked | dot_product | cudnn | splash.
    # cudnn ran on an H200 (bench/README.md "On a GPU"); compiled splash has not yet run on a TPU. KV-cache decoding
    # always uses xla_chunked's kernel.
    attention_impl: AttentionImpl = "auto"
    # Layers per iteration of the layer scan (jax.lax.scan unroll): same values, more work per iteration for the
    # compiler; 2 measured fastest on XLA:CPU (bench/README.md, session 6). Decoding always uses 1.
    scan_unroll: PositiveInt = DEFAULT_SCAN_UNROLL


@dataclasses.dataclass
class DataSection:
    """Training / evaluation data. ``train``: "default" (the shipped fictional RAG task) or a file."""

    train: str = "default"
    # auto | jsonl | crag | rag-instruct | alpaca | sharegpt | openai (selfaug_jax/data/formats.py)
    format: Literal["auto", "jsonl", "crag", "rag-instruct", "alpaca", "sharegpt", "openai"] = "auto"
    # Column mapping, e.g. {question: instruction, documents: ctxs} (data.columns.question=instruction); keys in
    # selfaug_jax.data.formats.COLUMN_KEYS. For jsonl / alpaca / sharegpt / openai (and Parquet / Arrow files).
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    crag_split: str = "validation"  # the paper trains on CRAG's validation split
    max_length: Annotated[int, Range(ge=2)] = 1024
    # Documents that do not fit are dropped lowest-ranked first; those that still fit are kept ("drop"), or the
    # best dropped one is cut to fill the room ("truncate"). Never the question or the answer.
    truncation: Literal["drop", "truncate"] = "drop"
    # An example that had documents but has none left after truncation: "skip" it (counted), or "keep" it
    # (counted, with a warning: it teaches answering without evidence).
    no_documents: Literal["skip", "keep"] = "skip"
    buckets: tuple[PositiveInt, ...] = (256, 512, 768, 1024)
    max_train_examples: PositiveInt | None = None
    pack: bool = False


@dataclasses.dataclass
class TrainSection:
    """The training loop. ``methods`` are run in order on the same data and seed."""

    methods: tuple[Method, ...] = ("lora", "selfaug")
    epochs: PositiveFloat = 1.0
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 8  # global rows per optimizer step (all hosts, all micro-batches)
    grad_accum_steps: PositiveInt = 1
    accum_normalization: Literal["mean", "token"] = "mean"  # mean (released code) | token
    seed: int = 0
    # Metrics are read back to the host every log_every steps, one step late (the next step is already
    # dispatched), so the host never waits on the step it just launched; a non-finite loss stops the run.
    log_every: PositiveInt = 1
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 2
    eval_every_steps: PositiveInt | None = None
    eval_every_epoch: bool = False
    export: bool = True  # export merged HF model + PEFT adapter at the end
    # {dotted key: [values]}: one run per value (several keys: their product), e.g. {loss.alpha: [0.1, 0.5]};
    # --sweep on the command line. Rules (which keys, which methods): selfaug_jax/experiment/runs.py.
    sweep: dict[str, Any] = dataclasses.field(default_factory=dict)
    # {method: {dotted key: value}}: config values for one method only, e.g. {sft: {optimizer.learning_rate: 1e-5}}.
    method_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoRASection:
    rank: PositiveInt = 16
    alpha: PositiveFloat = 32.0
    dropout: Fraction = 0.05
    target_modules: tuple[LoRATarget, ...] = ALL_LINEAR_TARGETS


@dataclasses.dataclass
class MeshSection:
    """Device mesh (``jax.make_mesh``); sizes multiply to the device count. ``cpu_devices`` fakes host devices."""

    data: PositiveInt = 1
    fsdp: PositiveInt = 1
    tensor: PositiveInt = 1
    cpu_devices: PositiveInt | None = None  # with distributed: devices per process
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)
    # jax.distributed.initialize arguments; null: detected from the cluster (TPU pod, SLURM, ...) or, for the
    # coordinator, $JAX_COORDINATOR_ADDRESS. Give all three to launch processes by hand (tests, bare hosts).
    coordinator_address: str | None = None
    num_processes: PositiveInt | None = None
    process_id: NonNegativeInt | None = None


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
    orth: OrthConfig = dataclasses.field(default_factory=OrthConfig)  # lora-orth's term (lambda1, lambda2, top_k)
    # selfaug-features (Table 2): site q|k|v|o|attn|ffn|residual, distance mse|cosine, weight, layers (null: all)
    features: FeatureLossConfig = dataclasses.field(default_factory=FeatureLossConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    output: OutputSection = dataclasses.field(default_factory=OutputSection)
    # Options of the training-data transforms (selfaug_jax/data/transforms.py), read by the methods whose
    # registry entry names them: magpie (lora-magpie: replay n / ratio / sampling), sdft (lora-sdft: rewrite).
    magpie: MagpieConfig = dataclasses.field(default_factory=MagpieConfig)
    sdft: SDFTConfig = dataclasses.field(default_factory=SDFTConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def validate(self, check_paths: bool = True) -> "ExperimentConfig":
        """The checks that involve several fields or the filesystem (each field's own type, choices and range
        were checked while building); ``check_paths`` also checks that files exist."""
        if not self.train.methods:
            raise ConfigError("train.methods is empty; choose from " + ", ".join(METHOD_NAMES))
        if max(self.data.buckets) < self.data.max_length:
            raise ConfigError(f"data.buckets {list(self.data.buckets)} must reach data.max_length="
                              f"{self.data.max_length}; add a bucket >= {self.data.max_length}")
        if self.train.batch_size % self.train.grad_accum_steps:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} is not divisible by "
                f"train.grad_accum_steps={self.train.grad_accum_steps}"
            )
        mesh = self.mesh
        n_mesh = mesh.data * mesh.fsdp * mesh.tensor
        if mesh.cpu_devices is not None and not mesh.distributed and n_mesh != mesh.cpu_devices:
            raise ConfigError(f"mesh data={mesh.data} x fsdp={mesh.fsdp} x tensor={mesh.tensor} = {n_mesh} devices "
                              f"but mesh.cpu_devices={mesh.cpu_devices}; the sizes must multiply to the device count")
        if mesh.process_id is not None and mesh.num_processes is not None and mesh.process_id >= mesh.num_processes:
            raise ConfigError(f"mesh.process_id={mesh.process_id} must be < mesh.num_processes={mesh.num_processes}")
        rows = mesh.data * mesh.fsdp
        micro = self.train.batch_size // self.train.grad_accum_steps
        if micro % rows:
            raise ConfigError(f"train.batch_size={self.train.batch_size} (micro-batches of {micro} rows with "
                              f"train.grad_accum_steps={self.train.grad_accum_steps}) is not divisible by the "
                              f"batch-sharding mesh axes data x fsdp = {mesh.data} x {mesh.fsdp} = {rows}; use "
                              f"micro-batches that are a multiple of {rows}")
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
        name = self.model.name
        if check_paths and name not in DEFAULT_MODEL_ALIASES and not Path(name).exists():
            raise ConfigError(f"model.name: {name!r} is neither the default model name nor an existing path")
        for f, p in self.eval.mc_files.items():
            if check_paths and not Path(p).exists():
                raise ConfigError(f"eval.mc_files.{f}: file {p!r} does not exist")
        if self.train.sweep or self.train.method_overrides:
            from selfaug_jax.experiment.runs import plan_runs

            plan_runs(self)  # every run's config is built and checked now (train.sweep, train.method_overrides)
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
    if origin is Annotated:
        value = _coerce(value, args[0], key)
        for constraint in annotation.__metadata__:
            if isinstance(constraint, Range):
                constraint.check(value, key)
        return value
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
        optional = " (or null)" if type(None) in args else ""
        raise ConfigError((errors[0] + optional) if errors else f"{key}: bad value {value!r}")
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
    hints = typing.get_type_hints(cls, include_extras=True)
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
