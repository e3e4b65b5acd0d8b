"""The method registry (selfaug_jax/methods.py): entries are consistent and everything that reads methods uses it."""

import pytest

from selfaug_jax.experiment.config import ConfigError, build_config
from selfaug_jax.methods import METHOD_NAMES, METHODS, Method, get_method, paper_order
from selfaug_jax.train.objective import ADDITIVE_TERMS, LOGIT_TERMS


def test_every_entry_is_consistent_and_its_terms_exist():
    assert METHOD_NAMES[:2] == ("sft", "lora")  # the paper's Table-1 column order starts Base | SFT | LoRA
    for name, m in METHODS.items():
        assert m.name == name and m.label and m.summary
        assert all(t in LOGIT_TERMS or t in ADDITIVE_TERMS for t in m.terms), name
        assert sum(t in LOGIT_TERMS for t in m.terms) <= 1, name
        assert m.uses_reference == (m.reference != "none")


def test_invalid_entries_are_refused():
    with pytest.raises(ValueError, match="needs trains='lora'"):
        Method("x", "X", trains="all", reference="base")
    with pytest.raises(ValueError, match="reference='copy'"):
        Method("x", "X", trains="lora", reference="copy")
    with pytest.raises(ValueError, match="need a reference model"):
        Method("x", "X", trains="lora", terms=("prompt_kl",))


def test_lookup_and_order():
    assert get_method("selfaug").reference == "base"
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from sft, lora"):
        get_method("nope")
    assert paper_order(["selfaug", "x", "lora", "sft"]) == ["sft", "lora", "selfaug", "x"]


def test_config_accepts_exactly_the_registry_names():
    for name in METHOD_NAMES:
        assert build_config("smoke", [f"train.methods=[{name}]"], check_paths=False).train.methods == (name,)
    with pytest.raises(ConfigError, match="'magic' is not one of"):
        build_config("smoke", ["train.methods=[magic]"], check_paths=False)


def test_readme_lists_every_registered_method():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [name for name in METHOD_NAMES if f"| `{name}` |" not in readme]
    assert not missing, f"README.md's method table lacks {missing}"
