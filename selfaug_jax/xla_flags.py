"""Default XLA flags of selfaug-jax: chosen by measurement, applied before JAX initialises its backends.

XLA reads ``$XLA_FLAGS`` once, when the first backend is created, so :func:`apply_default_xla_flags` must run
before any ``jax.devices()`` / first computation (``experiments/run.py`` calls it first thing in ``main``,
``bench/step.py`` before ``main`` when run as a script; importing ``jax`` itself is fine). It *appends* each default to ``$XLA_FLAGS`` only when the
user has not set that flag already, so an explicit ``XLA_FLAGS=--flag=value`` always wins, and
``SELFAUG_JAX_XLA_DEFAULTS=0`` turns the defaults off altogether (what the A/B benchmark does for its baseline).

Which flags are defaults, and why, is decided by ``bench/xla_flags_ab.py`` (results in
``bench/results/xla_flags_ab_cpu.jsonl``, discussion in ``bench/README.md``): a flag is kept only if it made the
SmolLM2 ``selfaug`` step measurably faster side by side in one invocation and the parity tests stay green with
it. ``xla_cpu_*`` flags are ignored by the GPU / TPU backends, so the defaults are harmless there.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

# (flag, value) pairs; see the module docstring for how an entry earns its place here. In the 2026-12-01 A/B
# (bench/README.md, "XLA:CPU options") no jaxlib 0.10.2 option (oneDNN, XNNPACK fusions / graph fusion, 512-bit
# vectors, the fast-compile preset) made the SmolLM2 selfaug step faster beyond run-to-run noise, fp32 or bf16.
# Session 16 (bench/README.md, "XLA:CPU options", session 16): the YNNPACK reduce fusion off
# (--xla_cpu_experimental_ynn_fusion_type=-reduce) made the selfaug 4 x 256 step 7.6% (fp32) / 9.5% (bf16) faster,
# but the 1 x 2048 step 7% slower (2 interleaved pairs), and with it the 1 x 8192 step took 718 s against 550-614 s
# in five earlier acceptance runs (not side by side). Long RAG contexts are the main use, so it is not a default
# (set it in XLA_FLAGS for short-sequence runs). Still empty.
DEFAULT_XLA_FLAGS: tuple[tuple[str, str], ...] = ()

DISABLE_ENV_VAR = "SELFAUG_JAX_XLA_DEFAULTS"


def _flag_names(xla_flags: str) -> set[str]:
    """The ``--name`` part of every ``--name[=value]`` token of an ``XLA_FLAGS`` string."""
    return {tok.split("=", 1)[0] for tok in xla_flags.split() if tok.startswith("--")}


def merged_xla_flags(current: str, defaults: tuple[tuple[str, str], ...] | None = None) -> str:
    """``current`` plus every default (``DEFAULT_XLA_FLAGS`` when None) whose flag ``current`` does not set."""
    defaults = DEFAULT_XLA_FLAGS if defaults is None else defaults
    present = _flag_names(current)
    extra = [f"--{name}={value}" for name, value in defaults if f"--{name}" not in present]
    return " ".join(filter(None, [current.strip(), *extra]))


def apply_default_xla_flags(environ: MutableMapping[str, str] | None = None) -> str:
    """Add the default flags to ``environ["XLA_FLAGS"]`` (default ``os.environ``); returns the resulting value.

    A no-op when ``SELFAUG_JAX_XLA_DEFAULTS`` is ``0`` / ``false`` / ``no``. Call before JAX creates a backend.
    """
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "")
    if env.get(DISABLE_ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return current
    merged = merged_xla_flags(current)
    if merged:
        env["XLA_FLAGS"] = merged
    return merged
