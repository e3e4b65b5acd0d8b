"""Import a repository script (``bench/*.py``, ``experiments/run.py``) as a module, without running its ``main``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str, register: bool = False) -> ModuleType:
    """Execute ``ROOT / relative_path`` as the module ``module_name`` and return it.

    ``register=True`` also puts it in ``sys.modules`` first (dataclasses defined in the script look their module up
    there).
    """
    spec = importlib.util.spec_from_file_location(module_name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
