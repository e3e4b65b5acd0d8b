"""Per-host training data on several processes (issue 15): two ``experiments/run.py`` processes (localhost
coordinator, gloo collectives, 2 CPU devices each, separate ``$SELFAUG_JAX_CACHE`` directories) each tokenize
only their own half of the data into their own cache, train the same global batches, and resume exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from selfaug_jax.experiment.train_data import HeadSource, host_shard
from test_multiprocess import free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def test_host_shard_is_a_deterministic_partition():
    items = list(range(11))
    shards = [host_shard(items, p, 3) for p in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(shards, [])) == items
    head = HeadSource(shards[0], 3)
    assert len(head) == 3 and [head[i] for i in range(3)] == [0, 3, 6] and head[-1] == 6
    try:
        head[3]
    except IndexError:
        pass
    else:
        raise AssertionError("HeadSource must not reach past its length")


def _two_processes(tmp: Path, out: Path, extra: list[str], tag: str, model: Path) -> list[str]:
    port = free_port()
    model = str(model)  # read-only, shared; only the data caches differ
    procs, logs = [], []
    try:
        for pid in range(2):
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            env.update(JAX_PLATFORMS="cpu", SELFAUG_JAX_CACHE=str(tmp / f"cache{pid}"))
            log = open(tmp / f"{tag}{pid}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "experiments" / "run.py"), "--no-progress", "--preset", "smoke",
                 "--method", "selfaug", "--model", model, "--out", str(out), "--cpu-devices", "2",
                 "--mesh", "data=4", "--distributed", f"mesh.coordinator_address=127.0.0.1:{port}",
                 "mesh.num_processes=2", f"mesh.process_id={pid}", "train.batch_size=4", "train.max_steps=4",
                 "train.checkpoint_every=2", "train.keep_checkpoints=3", "eval.n_rag=0", "eval.n_ifeval=0",
                 "eval.n_shift_general=0", "eval.n_shift_rag=0", "eval.n_knowledge=0", "train.eval_every_steps=null",
                 "train.export=false", "output.tensorboard=false",
                 *extra],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
            ))
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    logs_text = [(tmp / f"{tag}{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in logs_text)
    return logs_text


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        r.pop("tokens_per_s")
    return rows


def test_two_hosts_tokenize_their_own_shards_into_separate_caches_and_resume_exactly(tmp_path, tiny_model_dir):
    """The subject is the data path and the resume, not the model: a tiny model (SmolLM2's tokenizer) keeps the
    four processes' steps cheap."""
    from selfaug_jax.data import load_tfds_source

    out = tmp_path / "run"
    _two_processes(tmp_path, out, [], "full", tiny_model_dir)
    full = _rows(out / "selfaug" / "metrics.jsonl")
    assert [r["step"] for r in full] == [1, 2, 3, 4]

    # each host wrote exactly one cache entry, holding its own half of the 16 smoke examples
    ids = []
    for pid in range(2):
        (entry,) = [p for p in (tmp_path / f"cache{pid}" / "datasets").iterdir()]
        assert ".tmp-" not in entry.name
        record = json.loads((entry / "prompt_stats.json").read_text())
        assert record["prompt_stats"]["n_examples"] == 8
        source = load_tfds_source(entry / record["dataset_dir"], "train")
        ids.append({source[i].id for i in range(len(source))})
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 16
    assert sorted(ids[0]) == [f"train-{i:05d}" for i in range(0, 16, 2)]
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["data"]["prompt_stats"]
    assert stats["n_examples"] == 16 and stats["host_examples"] == [8, 8] and stats["host_examples_used"] == 8

    # resume both hosts from step 2: the same batches, the same losses
    shutil.rmtree(out / "selfaug" / "checkpoints" / "4")
    _two_processes(tmp_path, out, ["--resume"], "resumed", tiny_model_dir)
    assert _rows(out / "selfaug" / "metrics.jsonl") == full
