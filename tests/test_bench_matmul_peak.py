"""bench/matmul_peak.py: every variant runs in its own process with its own XLA_FLAGS and writes one record per
shape x dtype with the machine it ran on."""

import json
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
    assert [(r["variant"], r["shape_name"], r["dtype"]) for r in rows] == [
        (v, s, d) for v in ("xla", "xla_onednn_dot", "torch") for s in ("square", "projection")
        for d in ("float32", "bfloat16")]
    assert all(r["gflops"] > 0 and r["cpu_model"] and r["tag"] == "t" for r in rows)
    square = rows[0]
    assert (square["m"], square["k"], square["n"]) == (64, 64, 64)
    assert (rows[2]["m"], rows[2]["k"], rows[2]["n"]) == (1024, 576, 1536)
    assert rows[4]["xla_flags"] == "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"
    assert "jax_version" in rows[0] and "torch_version" in rows[-1] and rows[-1]["xla_flags"] is None
    assert proc.stdout.count("GFLOP/s") == len(rows)


def test_bad_sizes_are_refused_before_any_measurement():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "matmul_peak.py"), "--n", "0", "--out", "-"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "--n and --repeats must be >= 1, got --n 0" in proc.stderr and "GFLOP/s" not in proc.stdout
