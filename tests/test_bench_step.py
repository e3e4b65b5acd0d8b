"""``bench/step.py`` and its helpers: FLOP model, synthetic batch, peak cache, and real runs of every mode on tiny
models (JAX step, truncation, the PyTorch side-by-side, bf16 vs fp32 losses, the abstract 7B compile)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from selfaug_jax.models import ModelConfig
from script_modules import load_script
from torch_reference import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--batch", "2", "--seq", "24", "--attention-chunk", "8", "--lora-rank", "4", "--chunk-size", "16"]


def load_bench_script(filename: str):
    """A ``bench/`` script imported as a module (``bench_<name>``), without running its ``main``."""
    return load_script(f"bench/{filename}", f"bench_{Path(filename).stem}")


@pytest.fixture(scope="module")
def step_bench():
    yield load_script("bench/step.py", "bench_step", register=True)
    sys.modules.pop("bench_step", None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "model"
    make_tiny_hf_model("llama-tied", path)
    return path


@pytest.fixture()
def peak_cache(tmp_path, monkeypatch):
    """Keep the peak-FLOP/s cache of these tests out of the user's cache."""
    monkeypatch.setenv("SELFAUG_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "bench"


def test_flop_model_by_hand(step_bench):
    cfg = ModelConfig(model_type="llama", vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    # per layer: q 8x8 + k, v 8x4 each + o 8x8 + gate/up/down 3 x 8x12 = 64 + 64 + 64 + 288 = 480; head 8x100
    n = 2 * 480 + 800
    tok, attn = 3 * 16, 4 * 2 * 16 * 16 * 8 * 3
    lora = step_bench.model_flops(cfg, "lora", 3, 16, lora_params=50)
    assert lora["n_matmul_params"] == n
    assert lora["model_flops_per_step"] == 4 * n * tok + 6 * 50 * tok + 3 * attn
    selfaug = step_bench.model_flops(cfg, "selfaug", 3, 16, lora_params=50)
    assert selfaug["reference_flops"] == 2 * n * tok + attn
    assert selfaug["model_flops_per_step"] == lora["model_flops_per_step"] + 2 * n * tok + attn
    sft = step_bench.model_flops(cfg, "sft-selfaug", 3, 16, lora_params=0)
    assert sft["policy_flops"] == 6 * n * tok + 3 * attn


def test_remat_choices_are_the_models_policies(step_bench):
    """``--remat`` lists the policy names by hand (step.py imports no JAX at start-up): every policy is accepted."""
    from selfaug_jax.models.remat import REMAT_POLICIES

    for name in REMAT_POLICIES:
        assert step_bench.parse_args(["--method", "selfaug", "--remat", name]).remat == name


def test_synthetic_batch_is_75_percent_prompt(step_bench):
    batch = step_bench.synthetic_batch(2, 16, 100, seed=0)
    assert (batch["labels_bt"][:, :12] == -100).all()
    np.testing.assert_array_equal(batch["labels_bt"][:, 12:], batch["input_ids_bt"][:, 12:])
    assert batch["attention_mask_bt"].all()


def test_no_peak_is_committed():
    assert not list((ROOT / "bench" / "results").glob("peak_flops*")), "the peak is per machine: never commit it"


def test_peak_cache_is_per_machine_and_reused(step_bench, peak_cache):
    import machine  # bench/ is on sys.path once step.py is loaded

    first = machine.cached_peak_flops("cpu", "cpu", "float32", n=64)
    key = machine.machine_key("cpu", "cpu")
    path = peak_cache / f"peak_flops_{key}_float32.json"
    assert path.exists() and first["cached"] is False and first["peak_flops"] > 0
    assert key.startswith("cpu_") and key.endswith(f"_{os.cpu_count()}cpu")
    assert first["cpu_model"] == machine.cpu_model()
    again = machine.cached_peak_flops("cpu", "cpu", "float32", n=64)
    assert again["cached"] is True and again["peak_flops"] == first["peak_flops"]
    fresh = machine.cached_peak_flops("cpu", "cpu", "float32", n=64, remeasure=True)
    assert fresh["cached"] is False and json.loads(path.read_text())["date"] == fresh["date"]
    # a cache written before the peak took a float32 result (a same-dtype result) is measured again
    stale = json.loads(path.read_text())
    del stale["result_dtype"]
    path.write_text(json.dumps(stale))
    redone = machine.cached_peak_flops("cpu", "cpu", "float32", n=64)
    assert redone["cached"] is False and json.loads(path.read_text())["result_dtype"] == "float32"
    # a peak cached for another matmul size (an accelerator's 8192 vs 4096) is measured again at the size asked
    resized = machine.cached_peak_flops("cpu", "cpu", "float32", n=32)
    assert resized["cached"] is False and resized["n"] == 32 and json.loads(path.read_text())["n"] == 32
    assert machine.machine_key("gpu", "NVIDIA H100 80GB HBM3") == "gpu_nvidia_h100_80gb_hbm3"


def test_model_shapes_match_the_published_parameter_counts(step_bench):
    """bench/model_shapes.py builds the named shapes (random weights, here only their shapes): Qwen2.5-0.5B has
    494,032,768 parameters (tied embeddings), Qwen2.5-7B 7,615,616,512 (its model card's 7.61B)."""
    import jax
    from flax import nnx

    import model_shapes

    def n_params(name, **kw):
        model = nnx.eval_shape(lambda: model_shapes.random_model(name, seed=0, **kw))
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

    assert n_params("qwen2.5-0.5b") == 494_032_768
    assert n_params("qwen2.5-7b") == 7_615_616_512
    assert model_shapes.shape_config("qwen2.5-0.5b", 2)["num_hidden_layers"] == 2
    assert model_shapes.SHAPES["qwen2.5-0.5b"]["num_hidden_layers"] == 24  # shape_config returned a copy
    with pytest.raises(SystemExit, match="unknown 'qwen9'"):
        model_shapes.shape_config("qwen9")
    with pytest.raises(SystemExit, match=r"--num-layers 30 must be in \[1, 24\]"):
        model_shapes.shape_config("qwen2.5-0.5b", 30)
    with pytest.raises(SystemExit):
        step_bench.parse_args(["--method", "lora", "--shape", "qwen2.5-0.5b", "--model", "x"])


def test_one_real_run_truncated_writes_a_record_and_a_table(step_bench, tiny_model, tmp_path, peak_cache):
    import report

    out = tmp_path / "step.jsonl"
    args = ["--method", "selfaug", "--steps", "2", "--model", str(tiny_model), "--num-layers", "1", *TINY_ARGS,
            "--json", "--out", str(out)]
    rec = step_bench.main(args)
    assert json.loads(out.read_text().splitlines()[-1]) == rec
    assert rec["num_layers"] == 1  # the tiny model has 2 layers: --num-layers truncated it
    assert rec["attention_chunk"] == 8 and rec["steps"] == 2 and len(rec["step_times_s"]) == 2
    assert rec["xla_temp_bytes"] > 0 and rec["compile_s"] > 0
    assert rec["tokens_per_s"] == pytest.approx(48 / rec["median_step_s"])
    assert len(rec["losses"]) == 3 and np.isfinite(rec["losses"]).all()
    # the peak it divided by is this machine's, from the cache outside the repository
    cached = json.loads(next(peak_cache.glob("peak_flops_*_float32.json")).read_text())
    assert rec["peak_flops"] == cached["peak_flops"] and rec["peak_flops_machine"] == cached["machine"]
    assert rec["mfu"] == pytest.approx(rec["model_flops_per_step"] / rec["median_step_s"] / rec["peak_flops"])
    step_bench.main(args[:1] + ["lora"] + args[2:])
    table = report.markdown_table(out)
    assert "| selfaug / lora |" in table and "| 2 x 24 float32 remat=dots attn=8 mesh=- " in table


def test_vs_torch_runs_both_sides_on_the_same_weights_and_batch(step_bench, tiny_model, tmp_path, peak_cache):
    out = tmp_path / "vs.jsonl"
    rec = step_bench.main(["--method", "selfaug", "--vs-torch", "--steps", "1", "--model", str(tiny_model),
                           *TINY_ARGS, "--json", "--out", str(out)])
    ours, theirs = rec["jax"], rec["torch"]
    # step 0: LoRA B = 0 on both sides, so KL = 0 and the loss is the base model's CE on the same batch
    assert abs(theirs["first_kl"]) < 1e-6
    assert rec["first_loss_abs_diff"] < 1e-5 and theirs["first_loss"] == pytest.approx(ours["first_loss"], abs=1e-5)
    assert theirs["n_lora_params"] == ours["n_lora_params"]  # same adapters (rank, targets)
    assert rec["n_rounds"] == 1
    assert rec["tokens_per_s_ratio"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert theirs["steps_peak_rss_mb"] > 0 and ours["steps_peak_rss_mb"] > 0
    assert json.loads(out.read_text().splitlines()[-1]) == rec


def test_bf16_losses_agree_with_fp32_over_20_steps(step_bench, tiny_model, tmp_path, peak_cache):
    common = ["--method", "selfaug", "--steps", "19", "--model", str(tiny_model), *TINY_ARGS, "--json", "--out", "-"]
    fp32 = step_bench.main(common + ["--dtype", "float32"])
    bf16 = step_bench.main(common + ["--dtype", "bfloat16"])
    agreement = step_bench.side_by_side.loss_agreement(fp32["losses"], bf16["losses"], step_bench.DEFAULT_LOSS_RTOL)
    assert len(agreement["loss_rel_diffs"]) == 20
    assert agreement["losses_agree"], agreement["loss_rel_diffs"]
    assert agreement["loss_max_rel_diff"] > 0  # bf16 really ran: it is not bitwise the float32 step
    assert not step_bench.side_by_side.loss_agreement([1.0, 2.0], [1.0, 2.1], 0.02)["losses_agree"]


def test_scaling_estimate_matches_scaling_md_by_hand(step_bench):
    import abstract
    import model_shapes

    cfg = ModelConfig.from_hf_dict(model_shapes.QWEN25_7B_CONFIG)
    assert cfg.num_params() == 7_615_616_512  # docs/SCALING.md section 2
    est = abstract.scaling_estimate_bytes(cfg, per_device_batch=1, seq=4096, rank=16, shards=1, tensor=1,
                                          loss_chunk=512, attention_chunk=512)
    by_hand = (2 * 7_615_616_512 + 16 * 16 * 90_112 * 28 + 28 * 4096 * 3584 * 2 + 4096 * 151_552
               + 28 * 512 * 4096 * 4 + 4 * 512 * 152064 * 4 + 4096 * 3584 * 2)
    assert est == by_hand and round(est / 1e9, 1) == 18.8  # SCALING.md: 18.6 fused-attention + 0.23 chunk scores
    # fsdp 4: + two gathered layers + the gathered LM head 2·D·V; the loss chunk is ceil(512 / 8) = 64 tokens/device
    est_fsdp = abstract.scaling_estimate_bytes(cfg, per_device_batch=1, seq=4096, rank=16, shards=4, tensor=1,
                                               loss_chunk=512, attention_chunk=512, global_batch=8)
    by_hand_fsdp = (2 * 7_615_616_512 / 4 + 2 * 2 * 233_057_792 + 2 * 3584 * 152064 + 16 * 16 * 90_112 * 28
                    + 28 * 4096 * 3584 * 2 + 4096 * 151_552 + 28 * 512 * 4096 * 4 + 4 * 64 * 152064 * 4
                    + 4096 * 3584 * 2)
    assert est_fsdp == by_hand_fsdp
    assert abstract.scaled_mesh({"data": 4, "fsdp": 4, "tensor": 1}, 8)[0] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert abstract.scaled_mesh({"data": 4, "fsdp": 1, "tensor": 1}, 8)[0] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert abstract.scaled_mesh({"data": 8, "fsdp": 1, "tensor": 1}, 8)[1] == "as shipped"


def test_abstract_compile_of_a_7b_layer_on_8_fake_devices(step_bench, tmp_path):
    import abstract
    import model_shapes

    out = tmp_path / "abstract.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--abstract", "--preset", "tpu-v4-32-7b",
                           "--num-layers", "1", "--seq", "128", "--json", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and rec["preset_mesh"]["data"] == 4
    assert rec["per_device_batch"] == 1 and rec["global_batch"] == 8 and rec["num_layers"] == 1
    # arguments per device: the bf16 frozen weights sharded fsdp=4 ways dominate (embeddings + head + 1 layer)
    cfg = ModelConfig.from_hf_dict(model_shapes.shape_config("qwen2.5-7b", 1))
    frozen_per_device = 2 * cfg.num_params() / 4
    assert frozen_per_device <= rec["xla_argument_bytes"] <= 1.1 * frozen_per_device
    assert rec["xla_temp_bytes"] > 0 and rec["compile_s"] > 0


def test_loss_chunk_bench_parses_arms_and_rejects_bad_ones():
    """bench/loss_chunk.py's --arms: CHUNK:closed / CHUNK:autodiff, one clear error otherwise."""
    module = load_bench_script("loss_chunk.py")
    assert module.parse_arms("512:autodiff,256:closed") == [(512, False), (256, True)]
    with pytest.raises(ValueError, match="'256:fast'"):
        module.parse_arms("256:fast")


def test_profile_step_files_each_loss_matmul_under_the_head():
    """bench/profile_step.py's component table: the head projections (separate, and the closed-form chunk's one
    stacked policy + reference matmul through a shared head) are head matmuls, not softmax / KL work."""
    prof = load_bench_script("profile_step.py")
    body = "jit(train_step)/jvp()/while/body/closed_call/cond/branch_1_fun"

    def line(op: str) -> str:
        return '%f = f32[512,49152]{1,0} fusion(%a, %b), metadata={op_name="' + body + "/" + op + '/dot_general"}'

    assert prof.component(line("sbtd,vd->sbtv")) == "loss: head matmuls"
    assert prof.component(line("sbtd,dv->sbtv")) == "loss: head matmuls"
    assert prof.component(line("btd,vd->btv")) == "loss: head matmuls"
    assert prof.component(line("reduce_max")) == "loss: softmax/KL/CE"


def test_profile_step_attributes_gpu_kernels_by_name_then_by_hlo(capsys):
    """bench/profile_step.py on a GPU trace: cuDNN attention before GEMM (its kernels use wgmma too), cuBLAS /
    Triton GEMMs by kernel name, other kernels through their ``hlo_op`` instruction, host planes ignored."""
    import types

    prof = load_bench_script("profile_step.py")

    def ev(name, start, dur, op=""):
        return types.SimpleNamespace(name=name, start_ns=start, duration_ns=dur, end_ns=start + dur,
                                     stats=[("hlo_op", op)] if op else [])

    ms = 10 ** 6
    kernels = [ev("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 0, 400 * ms, "dpa.1"),
               ev("nvjet_sm90_tss_128x160_64x5_2x1_v_bz_NNT", 400 * ms, 300 * ms, "custom-call.2"),
               ev("gemm_fusion_dot_general_219", 700 * ms, 100 * ms, "gemm_fusion_dot_general.1"),
               ev("loop_xor_fusion_3", 800 * ms, 150 * ms, "xor.1"), ev("input_reduce_fusion", 950 * ms, 50 * ms)]
    gpu = types.SimpleNamespace(name="/device:GPU:0", lines=[
        types.SimpleNamespace(name="Stream #14(Compute)", events=kernels),
        types.SimpleNamespace(name="XLA Ops", events=[ev("derived line, not counted", 0, 10 ** 12)])])
    host_line = types.SimpleNamespace(name="t", events=[ev("x", 0, 10 ** 12)])
    host = types.SimpleNamespace(name="/host:CPU", lines=[host_line])
    line_of = {"xor.1": '%xor.1 = u32[8,2048,448]{2,1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(train_step)"}'}
    prof.device_kernel_profile(types.SimpleNamespace(planes=[host, gpu]), line_of, frozenset(), steps=1, top=10)
    out = capsys.readouterr().out
    assert "device kernel time per step: 1.0000 s busy over a 1.0000 s span" in out  # the stream line alone
    rows = {ln.split()[0]: float(ln.split()[-3]) for ln in out.splitlines()
            if ln.startswith("  ") and ln.rstrip().endswith("%")}
    assert rows == {"attention": 0.4, "dot": 0.4, "fusion": 0.15, "other": 0.05}, out


def test_gpu_attention_check_runs_the_cpu_kernels_against_the_reference(tmp_path):
    """bench/gpu_attention.py on CPU (no cuDNN there): both XLA kernels within bf16 rounding of the float32
    reference, one record each, and auto resolving to xla_chunked."""
    ga = load_bench_script("gpu_attention.py")
    out = tmp_path / "attn.jsonl"
    recs = ga.main(["--batch", "2", "--seq", "32", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                    "--q-chunk", "8", "--repeats", "1", "--out", str(out)])
    assert [r["kernel"] for r in recs] == ["xla_chunked", "dot_product"]
    assert len(out.read_text().splitlines()) == 2
    for r in recs:
        assert r["ok"] and r["auto_selects"] == "xla_chunked" and r["platform"] == "cpu"
        assert 0 < r["out_err"] < 0.02 and 0 < r["grad_err_q"] < 0.02 and r["fwd_bwd_ms"] > 0


def test_reduce_fusion_bench_sums_the_divergence_both_ways(tmp_path):
    """bench/reduce_fusion.py on a tiny chunk: every arm timed, one record each, and the matrix-vector divergence sum
    (reductions.sum_last_axis, the loss chunk's form) equal to the fused reduction to float32 rounding."""
    rf = load_bench_script("reduce_fusion.py")
    out = tmp_path / "reduce.jsonl"
    recs = rf.main(["--batch", "2", "--chunk-tokens", "8", "--vocab", "512", "--reps", "1", "--out", str(out)])
    assert [r["arm"] for r in recs] == ["sum", "sum_plus1", "exp_sum", "kl_fused", "kl_matvec"]
    assert len(out.read_text().splitlines()) == 5
    assert all(r["median_wall_ms"] > 0 for r in recs)
    assert 0 <= recs[0]["kl_matvec_vs_fused_max_rel_diff"] < 1e-5


def test_attention_block_bench_times_the_kernel_the_model_runs(tmp_path, capsys):
    """bench/attention_block.py on a tiny layer: both arms timed, one record each; the gradients it times (query
    chunks, causal block skipping) equal the dense kernel's; bad head counts are one line."""
    import jax
    import jax.numpy as jnp

    ab = load_bench_script("attention_block.py")
    out = tmp_path / "attn.jsonl"
    recs = ab.main(["--batch", "2", "--seq", "16", "--heads", "4", "--kv-heads", "2", "--head-dim", "8",
                    "--q-chunk", "4", "--reps", "1", "--out", str(out)])
    assert [r["arm"] for r in recs] == ["forward", "forward_backward"] and all(r["median_wall_ms"] > 0 for r in recs)
    assert len(out.read_text().splitlines()) == 2 and recs[0]["q_chunk"] == 4
    args = ab.layer_inputs(2, 16, 4, 2, 8, "float32")
    chunked = jax.jit(ab.arms(4)["forward_backward"])(*args)
    dense = jax.jit(ab.arms(None)["forward_backward"])(*args)
    for c, d in zip(chunked, dense):
        assert float(jnp.max(jnp.abs(d))) > 1e-2
        np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=0, atol=2e-5)
    with pytest.raises(SystemExit):
        ab.main(["--heads", "5", "--kv-heads", "2", "--out", "-"])
    assert "--heads 5 must be a multiple of --kv-heads 2" in capsys.readouterr().err
