"""``selfaug_jax/xla_flags.py``: defaults are appended, never override the user's flags, and can be turned off."""

from selfaug_jax import xla_flags

DEFAULTS = (("xla_cpu_use_onednn", "true"), ("xla_cpu_prefer_vector_width", "512"))


def test_defaults_are_appended_to_the_users_flags():
    merged = xla_flags.merged_xla_flags("--xla_dump_to=/tmp/x", DEFAULTS)
    assert merged == "--xla_dump_to=/tmp/x --xla_cpu_use_onednn=true --xla_cpu_prefer_vector_width=512"
    assert xla_flags.merged_xla_flags("", DEFAULTS) == "--xla_cpu_use_onednn=true --xla_cpu_prefer_vector_width=512"


def test_a_flag_the_user_set_is_kept_as_the_user_set_it():
    merged = xla_flags.merged_xla_flags("--xla_cpu_use_onednn=false", DEFAULTS)
    assert merged == "--xla_cpu_use_onednn=false --xla_cpu_prefer_vector_width=512"


def test_apply_sets_the_environment_and_can_be_disabled(monkeypatch):
    monkeypatch.setattr(xla_flags, "DEFAULT_XLA_FLAGS", DEFAULTS)
    env = {"XLA_FLAGS": "--xla_cpu_use_onednn=false"}
    assert xla_flags.apply_default_xla_flags(env) == "--xla_cpu_use_onednn=false --xla_cpu_prefer_vector_width=512"
    assert env["XLA_FLAGS"] == "--xla_cpu_use_onednn=false --xla_cpu_prefer_vector_width=512"
    off = {"SELFAUG_JAX_XLA_DEFAULTS": "0"}
    assert xla_flags.apply_default_xla_flags(off) == "" and "XLA_FLAGS" not in off
