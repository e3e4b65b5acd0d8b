"""Every bad input of issue 15 through ``experiments/run.py``: exit status 2, exactly one line on stderr that names
the file:line / field / key, little CPU time, and no output folder where the config alone decides (so no data was
tokenized and no model loaded). ``--debug`` shows the traceback instead.

The time bound is on each child's CPU time (user + sys, from ``wait4``), not wall time: the test machine is shared,
and wall time there measures the neighbours. Measured (2-core machine, shared): 2.8-3.6 s of CPU where the config
or ``config.json`` decides, 7.7-9.2 s where the tokenizer, the data file or the weights are read; most of it is
importing jax, flax and transformers (which imports torch when it is installed). The cases run up to 4 at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from selfaug_jax.methods import METHOD_NAMES

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "experiments" / "run.py"), "--no-progress", "--preset", "smoke"]
CPU_LIMIT_S = 15.0
GOOD = {"id": "a", "question": "Where is the lighthouse?", "documents": ["The lighthouse is on the cape."],
        "answer": "On the cape."}


def _default_model_dir() -> Path:
    from selfaug_jax.models import resolve_model_dir

    return resolve_model_dir("smollm2-135m-instruct")


def _tiny_model_dir(path: Path, *, drop: str | None = None, reshape: str | None = None, **config) -> Path:
    """A 2-layer llama directory (random weights) with the default model's tokenizer files."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    src = _default_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 16,
           "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **config}
    (path / "config.json").write_text(json.dumps(cfg))
    d, f, v, h, k, hd = (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"],
                         cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (h * hd, d), p + "self_attn.k_proj.weight": (k * hd, d),
                       p + "self_attn.v_proj.weight": (k * hd, d), p + "self_attn.o_proj.weight": (d, h * hd),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    if drop:
        del shapes[drop]
    if reshape:
        shapes[reshape] = tuple(s + 1 for s in shapes[reshape])
    rng = np.random.default_rng(0)
    save_file({n: (0.02 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()},
              str(path / "model.safetensors"))
    return path


def _jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _case(name: str, tmp: Path) -> tuple[list[str], str, bool]:
    """(extra arguments, expected text on the stderr line, whether the config alone decides it)."""
    good = json.dumps(GOOD)
    data = lambda *lines: ["--data", str(_jsonl(tmp / "data.jsonl", *lines))]  # noqa: E731
    bad_answer = {**GOOD, "answer": ""}
    no_answer = {k: v for k, v in GOOD.items() if k != "answer"}
    if name == "malformed_json":
        return data(good, '{"id": "b", bad'), "data.jsonl:2: invalid JSON", False
    if name == "missing_answer":
        return data(good, json.dumps(no_answer)), "data.jsonl:2: example 'a': field 'answer'", False
    if name == "empty_answer":
        return data(json.dumps(bad_answer)), "data.jsonl:1: example 'a': field 'answer' must be a non-empty", False
    if name == "documents_not_a_list":
        return (data(json.dumps({**GOOD, "documents": "one string"})),
                "data.jsonl:1: example 'a': field 'documents' must be a list", False)
    if name == "array_not_object":
        return data("[1, 2]"), "data.jsonl:1: an example must be a JSON object, got list", False
    if name == "empty_file":
        return data(), "data.train:", False
    if name == "binary_file":
        (tmp / "data.jsonl").write_bytes(bytes(range(256)) * 4)
        return ["--data", str(tmp / "data.jsonl")], "data.jsonl:1: cannot read", False
    if name == "missing_data_file":
        return ["--data", str(tmp / "nope.jsonl")], "data.train: file", True
    if name == "unknown_key":
        return ["train.bogus=1"], "unknown key(s) train.bogus", True
    if name == "bad_value":
        return ["train.batch_size=two"], "train.batch_size: expected an integer", True
    if name == "out_of_range":
        return ["lora.dropout=2"], "lora.dropout: 2.0 must be >= 0 and < 1", True
    if name == "unknown_method":
        return ["--method", "magic"], "train.methods: 'magic' is not one of " + ", ".join(METHOD_NAMES), True
    if name == "unknown_preset":
        return ["--preset", "no-such-preset"], "unknown preset 'no-such-preset'; available presets:", True
    if name == "mesh_batch_divisibility":
        return (["--cpu-devices", "8", "--mesh", "data=2,fsdp=2,tensor=2"],
                "train.batch_size=2 (micro-batches of 2 rows with train.grad_accum_steps=1) is not divisible by the "
                "batch-sharding mesh axes data x fsdp = 2 x 2 = 4", True)
    if name == "mesh_device_count":
        return ["--mesh", "data=2"], "--mesh data=2,fsdp=1,tensor=1 needs 2 devices but JAX sees 1", True
    if name == "heads_tensor_divisibility":
        model = _tiny_model_dir(tmp / "model", num_attention_heads=3, num_key_value_heads=1, head_dim=5,
                                hidden_size=15)
        return (["--model", str(model), "--cpu-devices", "2", "--mesh", "tensor=2"],
                "config.json: num_attention_heads x head_dim=15 is not divisible by mesh.tensor=2", True)
    if name == "no_config_json":
        (tmp / "model").mkdir()
        return ["--model", str(tmp / "model")], "has no config.json", True
    if name == "unknown_model_type":
        model = _tiny_model_dir(tmp / "model", model_type="gpt2")
        return ["--model", str(model)], "config.json: model_type 'gpt2' is not supported", True
    if name == "missing_tensor":
        model = _tiny_model_dir(tmp / "model", drop="model.layers.1.mlp.up_proj.weight")
        return (["--model", str(model), *data(good)],
                "missing tensor 'model.layers.1.mlp.up_proj.weight'", False)
    if name == "misshaped_tensor":
        model = _tiny_model_dir(tmp / "model", reshape="model.layers.0.self_attn.q_proj.weight")
        return (["--model", str(model), *data(good)],
                "tensor 'model.layers.0.self_attn.q_proj.weight' in model.safetensors has shape (17, 17)", False)
    if name == "no_chat_template":
        model = _tiny_model_dir(tmp / "model")
        tc = json.loads((model / "tokenizer_config.json").read_text())
        tc.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(tc))
        for extra in model.glob("chat_template.*"):
            extra.unlink()
        return ["--model", str(model)], "has no chat template", True
    if name == "assistant_turn_not_found":
        model = _tiny_model_dir(tmp / "model")
        tc = json.loads((model / "tokenizer_config.json").read_text())
        tc["chat_template"] = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
        (model / "tokenizer_config.json").write_text(json.dumps(tc))
        return ["--model", str(model)], "tokenizer: example 'preflight-probe'", True
    if name == "resume_without_checkpoint":
        return ["--resume"], "--resume: no checkpoint to resume from in", True
    raise KeyError(name)


CASES = ["malformed_json", "missing_answer", "empty_answer", "documents_not_a_list", "array_not_object",
         "empty_file", "binary_file", "missing_data_file", "unknown_key", "bad_value", "out_of_range",
         "unknown_method", "unknown_preset", "mesh_batch_divisibility", "mesh_device_count",
         "heads_tensor_divisibility", "no_config_json", "unknown_model_type", "missing_tensor", "misshaped_tensor",
         "no_chat_template", "assistant_turn_not_found", "resume_without_checkpoint"]


def _run(args: list[str], out: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``experiments/run.py``; returns the finished process and the child's own CPU seconds (user + sys, from
    ``wait4``, so concurrent runs do not mix)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "stdout.txt", "w+") as so, open(out.parent / "stderr.txt", "w+") as se:
        proc = subprocess.Popen(RUN + ["--out", str(out), *args], stdout=so, stderr=se, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, so.read(), se.read())
    return done, usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, float, str, bool, Path]]:
    """Every case, run up to ``min(4, cpu_count)`` at a time (each is one mostly single-threaded process)."""
    root = tmp_path_factory.mktemp("cli_errors")

    def one(name: str):
        tmp = root / name
        tmp.mkdir()
        args, expected, config_decides = _case(name, tmp)
        proc, cpu_s = _run(args, tmp / "run" / "out")
        return name, (proc, cpu_s, expected, config_decides, tmp / "run" / "out")

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_exit_2(name, results):
    proc, cpu_s, expected, config_decides, out = results[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(("error: ", "config error: ")) and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert cpu_s < CPU_LIMIT_S, f"{name}: {cpu_s:.1f} s of CPU"
    if config_decides:
        assert not out.exists(), "the run got past the checks into data / model work"
    print(f"\n[{name}] cpu {cpu_s:.1f} s: {lines[0]}")


def test_debug_shows_the_traceback(tmp_path):
    args, expected, _ = _case("missing_answer", tmp_path)
    proc, _ = _run(["--debug", *args], tmp_path / "run" / "out")
    assert proc.returncode != 0 and proc.returncode != 2
    assert "Traceback (most recent call last)" in proc.stderr and "SchemaError" in proc.stderr
    assert expected in proc.stderr
