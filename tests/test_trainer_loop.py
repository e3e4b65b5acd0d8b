"""The trainer loop on a tiny llama: metrics are read back one step late (never the step just dispatched, except
before a checkpoint or at the end), and a NaN injected by the test hook stops the run naming the step, with the
last good checkpoint kept."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selfaug_jax.experiment import trainer

T = 16


def _source(n: int = 12):
    from selfaug_jax.data import TokenizedExample

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ids = rng.integers(3, 128, T).astype(np.int32)
        labels = np.full(T, -100, np.int32)
        labels[10:] = ids[10:]
        out.append(TokenizedExample(id=f"ex{i}", input_ids=ids, labels=labels, meta={}))
    return out


def _run(tmp_path, monkeypatch, max_steps: int = 5):
    from flax import nnx

    from _sharding_worker import tiny_config
    from selfaug_jax.experiment.config import build_config
    from selfaug_jax.models.decoder import DecoderLM

    cfg = build_config("smoke", [f"train.max_steps={max_steps}", "train.checkpoint_every=3", "train.eval_every_steps=null", "train.batch_size=2",
                                 "train.export=false", "output.tensorboard=false", f"data.max_length={T}",
                                 f"data.buckets=[{T}]", "lora.rank=4"], check_paths=False)
    events: list[tuple[str, object]] = []
    produced: dict[int, int] = {}  # id(metrics dict) -> step number (1-based call index)
    real_make, real_fetch = trainer.make_train_step, trainer._host_metrics

    def make_recording_step(*args, **kwargs):
        step_fn = real_make(*args, **kwargs)

        def recording(state, batch):
            state, metrics = step_fn(state, batch)
            n = len(produced) + 1
            produced[id(metrics)] = n
            events.append(("dispatch", n))
            return state, metrics

        return recording

    def recording_fetch(metrics_list):
        events.append(("fetch", [produced[id(m)] for m in metrics_list]))
        return real_fetch(metrics_list)

    monkeypatch.setattr(trainer, "make_train_step", make_recording_step)
    monkeypatch.setattr(trainer, "_host_metrics", recording_fetch)
    run = lambda: trainer.train_method(  # noqa: E731
        "selfaug", cfg, model=DecoderLM(tiny_config(), rngs=nnx.Rngs(0)), source=_source(), pad_id=0,
        out_dir=tmp_path / "selfaug", progress=False)
    return run, events


def test_metrics_are_read_one_step_late(tmp_path, monkeypatch):
    run, events = _run(tmp_path, monkeypatch)
    result = run()
    # step n's metrics are fetched after step n + 1 was dispatched; the checkpoint at 3 and the end drain first
    assert events == [("dispatch", 1), ("dispatch", 2), ("fetch", [1]), ("dispatch", 3), ("fetch", [2]),
                      ("fetch", [3]), ("dispatch", 4), ("dispatch", 5), ("fetch", [4]), ("fetch", [5])]
    rows = [json.loads(x) for x in (tmp_path / "selfaug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and [r["step"] for r in result.curves] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and r["n_tokens"] == 2 * T for r in rows)


def test_nan_hook_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(trainer.NONFINITE_TEST_HOOK_ENV, "4")
    run, events = _run(tmp_path, monkeypatch, max_steps=6)
    with pytest.raises(trainer.TrainingDivergedError, match=r"selfaug: non-finite loss at step 4 .*\(step 3\)"):
        run()
    assert events[-1] == ("fetch", [4]) and ("dispatch", 5) in events  # found one step late, as designed
    steps = sorted(int(p.name) for p in (tmp_path / "selfaug" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3]
    rows = [json.loads(x) for x in (tmp_path / "selfaug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
