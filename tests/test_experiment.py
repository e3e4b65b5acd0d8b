"""The main job end to end: config errors, the smoke preset, and exact resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfaug_jax.experiment.config import ConfigError, build_config
from selfaug_jax.methods import METHOD_NAMES

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "experiments" / "run.py"), "--no-progress"]
# no evaluation at all (the final one, nor the smoke preset's periodic one every 2 steps)
NO_EVAL = ["eval.n_rag=0", "eval.n_ifeval=0", "eval.n_shift_general=0", "eval.n_shift_rag=0", "eval.n_knowledge=0",
           "train.export=false", "train.eval_every_steps=null"]


def _run(args, **kw):
    return subprocess.run(RUN + args, capture_output=True, text=True, cwd=ROOT, timeout=900, **kw)


@pytest.mark.parametrize("override,message", [
    ("train.bogus=1", "unknown key(s) train.bogus"),
    ("optimizer.learning_rate=fast", "optimizer.learning_rate: expected a number"),
    ("train.methods=[lora,magic]", "train.methods: 'magic' is not one of " + ", ".join(METHOD_NAMES)),
    ("data.train=/no/such/file.jsonl", "data.train: file '/no/such/file.jsonl' does not exist"),
    ("model.name=/no/such/model", "model.name: '/no/such/model' is neither"),
    ("model.attention_chunk=0", "model.attention_chunk: 0 must be >= 1 (or null)"),
    ("lora.dropout=1.5", "lora.dropout: 1.5 must be >= 0 and < 1"),
    ("data.no_documents=maybe", "data.no_documents: 'maybe' is not one of skip, keep"),
    ("mesh.fsdp=4", "train.batch_size=2 (micro-batches of 2 rows with train.grad_accum_steps=1) is not divisible by the batch-sharding mesh axes data x fsdp = 1 x 4 = 4"),
])
def test_config_errors_are_clear_and_early(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_config("smoke", [override])


def test_cli_reports_config_errors_before_any_work(tmp_path):
    out = _run(["--preset", "smoke", "--out", str(tmp_path / "x"), "loss.direction=sideways"])
    assert out.returncode == 2
    assert "config error: loss.direction: 'sideways' is not one of forward, reverse, jsd" in out.stderr
    assert not (tmp_path / "x").exists()
    out = _run(["--preset", "no-such-preset"])
    assert out.returncode == 2 and "available presets:" in out.stderr and "smoke" in out.stderr


def test_presets_build():
    for name in ("default", "smoke"):
        cfg = build_config(name)
        assert cfg.train.methods == ("lora", "selfaug") and cfg.loss.alpha == 0.5
    for name in ("paper-crag", "paper-rag-instruct", "paper-fig2"):
        cfg = build_config(name, check_paths=False)
        assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.warmup_ratio == 0.05
        assert cfg.optimizer.schedule == "cosine" and cfg.loss.alpha == 0.5
        assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
    assert build_config("paper-crag", check_paths=False).optimizer.learning_rate == 5e-4
    rag = build_config("paper-rag-instruct", check_paths=False)
    assert rag.optimizer.learning_rate == 5e-5 and rag.train.epochs == 3 and rag.train.batch_size == 512
    fig2 = build_config("paper-fig2", check_paths=False)
    assert fig2.train.epochs == 10 and fig2.train.eval_every_epoch


def test_smoke_preset_end_to_end(tmp_path):
    out_dir = tmp_path / "smoke"
    t0 = time.perf_counter()
    proc = _run(["--preset", "smoke", "--out", str(out_dir)])
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\n[smoke] wall time {wall:.0f} s")
    summary = json.loads((out_dir / "summary.json").read_text())
    assert set(summary["methods"]) == {"base", "lora", "selfaug"}
    for method in ("base", "lora", "selfaug"):
        metrics = summary["methods"][method]
        for key in ("rag_em", "rag_f1", "ifeval_prompt_strict", "ifeval_inst_strict", "shift_general_input",
                    "shift_general_response", "shift_rag_input"):
            assert key in metrics, (method, key)
    assert summary["methods"]["base"]["shift_general_input"] == 0.0
    assert summary["methods"]["lora"]["shift_general_input"] > 0.0
    curves = summary["curves"]
    assert [r["step"] for r in curves["selfaug"]] == [1, 2, 3, 4]
    assert curves["selfaug"][0]["kl"] == 0.0  # step 0: adapters are zero, the policy is the reference
    assert curves["selfaug"][0]["loss"] == curves["selfaug"][0]["ce"]
    assert curves["selfaug"][-1]["kl"] > 0.0
    assert all(r["kl"] == 0.0 for r in curves["lora"])  # CE only
    fig2 = summary["evals_over_training"]["selfaug"]  # eval.periodic's subset at steps 0 (base), 2, 4
    assert [r["step"] for r in fig2] == [0, 2, 4]
    assert fig2[0]["shift_general_input"] == 0.0 and fig2[-1]["shift_general_input"] > 0.0
    assert "rag_em" not in fig2[1] and "ifeval_prompt_strict" in fig2[1]  # periodic_parts: ifeval, shift only
    for name in ("report.md", "curves.png", "comparison.png", "shift_vs_ifeval.png"):
        assert (out_dir / name).exists(), name
    assert "| Metric | Base | LoRA | SelfAug |" in (out_dir / "report.md").read_text()
    assert "| Metric | Base | LoRA | SelfAug |" in proc.stdout  # the console ends with the table
    # exports: merged HF model and PEFT adapter
    assert (out_dir / "selfaug" / "export" / "hf" / "model.safetensors").exists()
    assert (out_dir / "selfaug" / "export" / "adapter" / "adapter_config.json").exists()
    lines = (out_dir / "selfaug" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"step", "loss", "ce", "kl", "lr", "grad_norm", "tokens_per_s"} <= set(json.loads(lines[0]))


def _metrics(path):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s")  # wall-clock dependent
    return rows


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    common = ["--preset", "smoke", "--method", "selfaug", "train.max_steps=6", "train.checkpoint_every=2",
              "train.keep_checkpoints=3", *NO_EVAL]
    # the uninterrupted run goes on beside the one to be killed (each is ~1 core; they share nothing)
    full_log = open(tmp_path / "full.stderr", "w")
    full = subprocess.Popen(RUN + common + ["--out", str(tmp_path / "full")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=full_log, start_new_session=True)
    killed_dir = tmp_path / "killed"
    ckpt_dir = killed_dir / "selfaug" / "checkpoints"
    proc = subprocess.Popen(RUN + common + ["--out", str(killed_dir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (ckpt_dir / "2").is_dir() or (ckpt_dir / "4").is_dir():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    try:
        full.wait(timeout=900)
    finally:
        if full.poll() is None:
            os.killpg(full.pid, signal.SIGKILL)
            full.wait(timeout=60)
        full_log.close()
    assert full.returncode == 0, (tmp_path / "full.stderr").read_text()[-3000:]
    steps_done = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert steps_done and steps_done[-1] < 6, f"the run was not interrupted before the end: {steps_done}"

    resumed = _run(common + ["--out", str(killed_dir), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _metrics(killed_dir / "selfaug" / "metrics.jsonl") == _metrics(tmp_path / "full" / "selfaug" / "metrics.jsonl")


def test_sweep_and_adapter_scales_end_to_end(tmp_path):
    """--sweep gives one run (column, folder) per value, the base model is evaluated once, and eval.adapter_scales
    adds a WiSE-FT column per LoRA run."""
    out_dir = tmp_path / "sweep"
    # Only the shift evaluation (what the adapter-scale assertion reads) and one length bucket: the generation
    # evaluations, knowledge probes and export of a whole run are test_smoke_preset_end_to_end's (same code path).
    proc = _run(["--preset", "smoke", "--out", str(out_dir), "--method", "selfaug", "--sweep", "loss.alpha=0.1,2.0",
                 "train.max_steps=2", "train.export=false", "train.checkpoint_every=100", "eval.adapter_scales=[0.5]",
                 "eval.n_knowledge=0", "eval.n_shift_rag=0", "eval.n_rag=0", "eval.n_ifeval=0",
                 "eval.n_shift_general=2", "data.max_length=256", "data.buckets=[256]"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    names = ["base", "selfaug[alpha=0.1]", "selfaug[alpha=0.1]@0.5", "selfaug[alpha=2.0]", "selfaug[alpha=2.0]@0.5"]
    assert list(summary["methods"]) == names
    assert summary["runs"]["selfaug[alpha=2.0]"]["sweep"] == {"loss.alpha": 2.0}
    assert summary["runs"]["selfaug[alpha=2.0]@0.5"]["adapter_scale"] == 0.5
    assert [s["stage"] for s in summary["stages"]].count("base eval") == 1
    curves = summary["curves"]
    assert set(curves) == {"selfaug[alpha=0.1]", "selfaug[alpha=2.0]"}
    # the swept alpha reached the loss: same CE and KL at step 1 (adapters zero), different totals later
    a, b = curves["selfaug[alpha=0.1]"][-1], curves["selfaug[alpha=2.0]"][-1]
    assert a["loss"] == pytest.approx(a["ce"] + 0.1 * a["kl"], rel=1e-4)
    assert b["loss"] == pytest.approx(b["ce"] + 2.0 * b["kl"], rel=1e-4)
    for run in ("selfaug_alpha=0.1", "selfaug_alpha=2.0"):
        assert len((out_dir / run / "metrics.jsonl").read_text().splitlines()) == 2
    # half the adapter drifts less from the base model than the whole one
    m = summary["methods"]
    assert 0.0 < m["selfaug[alpha=0.1]@0.5"]["shift_general_input"] < m["selfaug[alpha=0.1]"]["shift_general_input"]
    report = (out_dir / "report.md").read_text()
    assert "| Metric | Base | SelfAug [alpha=0.1] | SelfAug [alpha=0.1] @0.5 | SelfAug [alpha=2.0] |" in report
