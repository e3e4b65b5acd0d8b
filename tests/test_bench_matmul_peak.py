"""bench/matmul_peak.py: every variant runs in its own process with its own XLA_FLAGS and writes one record per
shape x dtype with the machine it ran on."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_each_variant_runs_in_a_fresh_process_with_its_flags(tmp_path):
    out = tmp_path / "peak.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "matmul_peak.py"), "--variants", "xla",
                           "xla_onednn_dot", "torch", "--n", "64", "--repeats", "2", "--tag", "t", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    jax_forms = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]
    torch_forms = [("float32", "float32"), ("bfloat16", "bfloat16")]  # torch.matmul: no f32 result of bf16 operands
    assert [(r["variant"], r["shape_name"], r["dtype"], r["result_dtype"]) for r in rows] == [
        (v, s, *form) for v in ("xla", "xla_onednn_dot", "torch") for s in ("square", "projection")
        for form in (torch_forms if v == "torch" else jax_forms)]
    bad = [r for r in rows if not (r["gflops"] > 0 and r["cpu_model"] and r["tag"] == "t"
                                   and r["crashed_attempts"] in (0, 1))]
    assert not bad, (bad, proc.stderr[-2000:])
    square = rows[0]
    assert (square["m"], square["k"], square["n"]) == (64, 64, 64)
    assert (rows[3]["m"], rows[3]["k"], rows[3]["n"]) == (1024, 576, 1536)
    assert rows[6]["xla_flags"] == "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"
    assert "jax_version" in rows[0] and "torch_version" in rows[-1] and rows[-1]["xla_flags"] is None
    assert proc.stdout.count("GFLOP/s") == len(rows)


def test_bad_sizes_are_refused_before_any_measurement():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "matmul_peak.py"), "--n", "0", "--out", "-"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--n and --repeats must be >= 1, got --n 0" in proc.stderr and "GFLOP/s" not in proc.stdout


def _load_matmul_peak():
    from script_modules import load_script

    sys.path.insert(0, str(ROOT / "bench"))
    return load_script("bench/matmul_peak.py", "matmul_peak")


def test_a_native_crash_is_rerun_and_counted_but_a_python_error_is_not(tmp_path, capsys):
    mp = _load_matmul_peak()
    marker = tmp_path / "crashed_once"
    # Killed by SIGSEGV on the first attempt only (a native crash), then succeeds.
    flaky = ("import os, signal, sys\n"
             f"m = {str(marker)!r}\n"
             "if not os.path.exists(m):\n"
             "    open(m, 'w').close(); sys.stderr.write('frame PyObject_CallOneArg\\n'); sys.stderr.flush()\n"
             "    os.kill(os.getpid(), signal.SIGSEGV)\n"
             "print('ok')\n")
    proc, crashes = mp.run_child([sys.executable, "-c", flaky], dict(os.environ), 1, "v")
    assert (proc.returncode, crashes, proc.stdout.strip()) == (0, 1, "ok")
    err = capsys.readouterr().err
    assert "variant v crashed (signal 11" in err and "PyObject_CallOneArg" in err
    # Crashing every time: gives up after the allowed reruns and returns the crash.
    always = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    proc, crashes = mp.run_child([sys.executable, "-c", always], dict(os.environ), 2, "v")
    assert (proc.returncode, crashes) == (-11, 2)
    # A Python error is a bug, not a flaky kernel: no rerun.
    proc, crashes = mp.run_child([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), 5, "v")
    assert (proc.returncode, crashes) == (3, 0)
