"""Shared pytest setup: CPU only, a per-session cache for the converted default model."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # tests/torch_reference.py etc.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer, width-32 chat model over SmolLM2's tokenizer, as an HF directory (``_tiny_chat_model.py``)."""
    from _tiny_chat_model import tiny_chat_model_dir

    return tiny_chat_model_dir(tmp_path_factory.mktemp("tiny_chat_model"))
