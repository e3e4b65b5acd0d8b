"""Checks for the issue-8 job files: launch.sh syntax and dry run, preset YAMLs parse and are self-consistent."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "experiments" / "tpu" / "launch.sh"
PRESETS = ["tpu-v5e-8", "tpu-v4-32-7b", "tpu-v5p-7b", "gpu-8x-7b"]
CHIPS = {"v5litepod-8": 8, "v4-32": 16, "v5p-8": 4}  # v4 / v5p names count TensorCores (2 per chip)


def test_launch_sh_syntax():
    bash = shutil.which("bash")
    assert bash is not None
    out = subprocess.run([bash, "-n", str(LAUNCH)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "set -euo pipefail" in LAUNCH.read_text()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_yaml(name):
    """Each preset builds into a valid ExperimentConfig (paths are the user's, so not checked here)."""
    from selfaug_jax.experiment.config import build_config

    cfg = build_config(name, check_paths=False)
    raw = yaml.safe_load((ROOT / "experiments" / "configs" / f"{name}.yaml").read_text())
    assert cfg.model.dtype == "bfloat16" and cfg.model.remat == "full"
    n_dev = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    micro = cfg.train.batch_size // cfg.train.grad_accum_steps
    assert micro % (cfg.mesh.data * cfg.mesh.fsdp) == 0, "micro batch must split evenly over data x fsdp"
    assert cfg.optimizer.learning_rate == 5e-4 and cfg.loss.alpha == 0.5  # inherited from paper-crag
    if name.startswith("tpu"):
        assert CHIPS[raw["launcher"]["accelerator_type"]] == n_dev
    else:
        assert n_dev == 8


@pytest.mark.parametrize("name", ["tpu-v4-32-7b", "tpu-v5e-8"])
def test_launch_dry_run_prints_the_commands_without_gcloud(name, tmp_path):
    fake = tmp_path / "gcloud"  # any real gcloud call in a dry run would fail the script
    fake.write_text("#!/bin/sh\necho 'gcloud called' >&2\nexit 99\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_PROJECT": "proj"}
    out = subprocess.run(
        ["bash", str(LAUNCH), "--config", f"experiments/configs/{name}.yaml", "--dry-run", "--", "train.seed=3"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load((ROOT / "experiments" / "configs" / f"{name}.yaml").read_text())
    acc, mesh = cfg["launcher"]["accelerator_type"], cfg["mesh"]
    lines = out.stdout.splitlines()
    assert all(line.startswith("+ ") for line in lines)
    text = out.stdout
    assert f"gcloud compute tpus tpu-vm create selfaug-{acc} --zone={cfg['launcher']['zone']} --project=proj" in text
    assert f"--accelerator-type={acc}" in text
    assert "tpu-vm scp" in text and "--worker=all" in text
    assert "jax\\[tpu\\]==0.10.2" in text
    mesh_arg = f"data={mesh['data']}\\,fsdp={mesh['fsdp']}\\,tensor={mesh['tensor']}"
    assert f"experiments/run.py\\ --config\\ experiments/configs/{name}.yaml\\ --mesh\\ {mesh_arg}" in text
    assert "train.seed=3" in text and "--distributed" in text
    assert lines[-1].endswith(f"selfaug-{acc}:selfaug-jax/runs/{name} {ROOT}/runs/ --zone={cfg['launcher']['zone']} "
                              "--project=proj --worker=0 --recurse")


def test_launch_rejects_mesh_that_does_not_fit_the_slice():
    out = subprocess.run(
        ["bash", str(LAUNCH), "--config", "experiments/configs/tpu-v4-32-7b.yaml", "--accelerator-type", "v4-8",
         "--dry-run"], capture_output=True, text=True, cwd=ROOT,
    )
    assert out.returncode == 2
    assert "mesh data=4,fsdp=4,tensor=1 has 16 devices but v4-8 has 4 chips" in out.stderr
