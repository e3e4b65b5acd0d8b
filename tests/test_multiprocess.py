"""Two JAX processes x 4 CPU devices (localhost coordinator, gloo collectives) reproduce the 1-process losses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_sharding_worker.py")
STEPS = 3
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    from _sharding_worker import single_device_losses

    port = free_port()
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs, logs = [], []
    try:
        for pid in range(2):
            log = open(tmp_path / f"proc{pid}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), "proc", "--devices", "4", "--num-processes", "2",
                 "--process-id", str(pid), "--port", str(port), "--mesh", "data=2,fsdp=2,tensor=2",
                 "--steps", str(STEPS), "--out", str(out)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=WORKER.parents[1], start_new_session=True,
            ))
        single = single_device_losses(STEPS)  # meanwhile, in this process on one device
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    tails = "\n".join((tmp_path / f"proc{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], tails
    result = json.loads(out.read_text())  # written by process 0 only
    assert result["process_count"] == 2 and result["device_count"] == 8 and result["local_device_count"] == 4
    assert result["rows"] == [0, 4]  # process 0 loaded only its half of each global batch of 8
    got, ref = np.asarray(result["losses"]), np.asarray(single)
    assert np.max(np.abs(got - ref) / np.abs(ref)) <= 1e-5, (got, ref)
