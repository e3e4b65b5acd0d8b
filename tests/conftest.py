"""Shared pytest setup: CPU only, a per-session cache for the converted default model."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The project's default XLA flags, as experiments/run.py and bench/step.py apply them: a default is kept only if the
# parity tests pass with it (selfaug_jax/xla_flags.py). Set before any JAX backend starts; xdist workers inherit it.
from selfaug_jax.xla_flags import apply_default_xla_flags  # noqa: E402  (imports no JAX)

apply_default_xla_flags()


def _session_compilation_cache() -> None:
    """One persistent XLA compilation cache for this test session: empty at the start, removed at the end.

    Many tests compile the same program again (the same tiny model's forward, loss or step in another test or
    parameter), and the subprocess tests (``experiments/run.py``, the multi-process and sharding workers, the
    notebook's kernel) and pytest-xdist's workers (spawned by the controller after this runs) inherit the environment,
    so each distinct program is compiled once per session. Every test still compiles what it runs (the cache starts
    empty), and counting compilations still works: ``/jax/core/compile/backend_compile_duration`` fires for cache
    hits too (``tests/test_eval_cache.py``). What it saves is measured in bench/README.md (Session 8). A cache
    directory set by the caller is used as it is.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = tempfile.mkdtemp(prefix="selfaug-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


_session_compilation_cache()
sys.path.insert(0, str(Path(__file__).parent))  # tests/torch_reference.py etc.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, width-32 chat model over SmolLM2's tokenizer, as an HF directory (``_tiny_chat_model.py``)."""
    from _tiny_chat_model import tiny_chat_model_dir

    return tiny_chat_model_dir(tmp_path_factory.mktemp("tiny_chat_model"))
