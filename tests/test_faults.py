"""Faults survived (issue 15): kill -9 during an Orbax save, a NaN injected into a step, a corrupted checkpoint,
``--resume`` with nothing to resume, and an export that fails half-way."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _checkpoint_state import filled_state

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
RUN = [sys.executable, str(ROOT / "experiments" / "run.py"), "--no-progress"]
NO_EVAL = ["eval.n_rag=0", "eval.n_ifeval=0", "eval.n_shift_general=0", "eval.n_shift_rag=0", "eval.n_knowledge=0",
           "train.eval_every_steps=null", "train.export=false", "output.tensorboard=false"]

# The saver killed mid-save: writes step 1 (unless present) and then step 2 of the stand-in state.
_SAVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from _checkpoint_state import filled_state
    from selfaug_jax.checkpoints.orbax import TrainCheckpointer

    ckpt = TrainCheckpointer(sys.argv[1], max_to_keep=3)
    if ckpt.latest_step() is None:
        ckpt.save(1, filled_state(1.0), {"data_state": {"index": 1}})
    print("saved 1", flush=True)
    ckpt.save(2, filled_state(2.0), {"data_state": {"index": 2}})
    print("saved 2", flush=True)
""")


def test_kill_9_during_an_orbax_save_keeps_the_previous_checkpoint(tmp_path):
    from selfaug_jax.checkpoints.orbax import TrainCheckpointer

    ckpt_dir = tmp_path / "ckpt"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    killed_mid_save = False
    for _attempt in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt_dir), str(TESTS)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True, text=True)
        try:
            assert proc.stdout.readline().strip() == "saved 1"
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                names = [p.name for p in ckpt_dir.iterdir()] if ckpt_dir.exists() else []
                if any(n.startswith("2.") and "tmp" in n for n in names) and "2" not in names:
                    os.killpg(proc.pid, signal.SIGKILL)  # step 2 is being written and not yet committed
                    killed_mid_save = True
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        if killed_mid_save:
            break
    assert killed_mid_save, "never caught the save of step 2 in progress"
    ckpt = TrainCheckpointer(ckpt_dir)
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]  # the half-written step 2 is not a checkpoint
    state, extra = ckpt.restore(filled_state(0.0))
    assert int(state.step) == 1 and extra["data_state"] == {"index": 1}
    assert all(np.all(np.asarray(w) == 1.0) for w in state.trainable.values())
    ckpt.close()
    # the next run saves step 2 over the debris and restores it
    out = subprocess.run([sys.executable, str(script), str(ckpt_dir), str(TESTS)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "saved 2" in out.stdout, out.stderr[-2000:]
    ckpt = TrainCheckpointer(ckpt_dir)
    state, extra = ckpt.restore(filled_state(0.0))
    assert ckpt.latest_step() == 2 and int(state.step) == 2 and extra["data_state"] == {"index": 2}
    ckpt.close()


def _one_stderr_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_nan_stops_the_run_naming_the_step_and_a_corrupted_checkpoint_is_named(tmp_path, tiny_model_dir):
    from selfaug_jax.checkpoints.orbax import TrainCheckpointer

    out = tmp_path / "run"  # the tiny model: the subject is the trainer's stop and the restore's error
    common = ["--preset", "smoke", "--method", "selfaug", "--model", str(tiny_model_dir), "--out", str(out),
              "train.max_steps=6",
              "train.checkpoint_every=2", "train.keep_checkpoints=5", *NO_EVAL]
    env = {**os.environ, "SELFAUG_JAX_TEST_NONFINITE_AT_STEP": "5"}
    proc = subprocess.run(RUN + common, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = _one_stderr_line(proc)
    assert "selfaug: non-finite loss at step 5" in line and "(step 4)" in line, line
    ckpt_dir = out / "selfaug" / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [2, 4]
    rows = [json.loads(x) for x in (out / "selfaug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    ckpt = TrainCheckpointer(ckpt_dir)
    assert ckpt.latest_step() == 4
    ckpt.close()

    # corrupt the latest checkpoint: --resume names it and says what to do
    for f in (ckpt_dir / "4").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage" * 7)
    proc = subprocess.run(RUN + common + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_stderr_line(proc)
    assert f"checkpoint {ckpt_dir / '4'} cannot be restored" in line and f"delete {ckpt_dir / '4'}" in line, line


def test_failed_export_leaves_no_export_folder(tmp_path, monkeypatch):
    from selfaug_jax.experiment import trainer

    out_dir = tmp_path / "sft"
    old = out_dir / "export" / "hf"
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"previous complete export")

    def failing_save(model, path, **kw):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "save_hf_model", failing_save)
    run = SimpleNamespace(out_dir=out_dir, method="sft", eval_model=lambda: None)
    with pytest.raises(OSError, match="No space left"):
        trainer.export_run(run, SimpleNamespace(), "")
    assert sorted(p.name for p in out_dir.iterdir()) == ["export"]  # no temporary folder left behind
    assert (old / "model.safetensors").read_bytes() == b"previous complete export"

    def good_save(model, path, **kw):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"new")

    monkeypatch.setattr(trainer, "save_hf_model", good_save)
    trainer.export_run(run, SimpleNamespace(), "")
    assert sorted(p.name for p in out_dir.iterdir()) == ["export"]
    assert (out_dir / "export" / "hf" / "model.safetensors").read_bytes() == b"new"
