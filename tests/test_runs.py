"""Runs of one experiment (selfaug_jax/experiment/runs.py, selfaug_jax/run_names.py): sweep parsing and naming,
which methods a swept key applies to, per-method overrides, and the errors (one line naming the key)."""

import json

import pytest

from selfaug_jax import methods as methods_lib
from selfaug_jax.experiment.config import ConfigError, build_config
from selfaug_jax.experiment.runs import parse_sweep_arg, plan_runs, run_config, sweep_override
from selfaug_jax.run_names import dir_name, format_value, run_name, scaled_name, short_keys, split_run_name
from script_modules import load_script


def _cli():
    return load_script("experiments/run.py", "run_cli")


def test_sweep_values_are_parsed_like_overrides():
    assert parse_sweep_arg("loss.alpha=0.1,0.3,0.5,1.0") == ("loss.alpha", [0.1, 0.3, 0.5, 1.0])
    assert parse_sweep_arg("loss.direction=forward,jsd") == ("loss.direction", ["forward", "jsd"])
    assert parse_sweep_arg("lora.target_modules=[q_proj,v_proj],[o_proj]") == (
        "lora.target_modules", [["q_proj", "v_proj"], ["o_proj"]])
    assert parse_sweep_arg("train.max_steps=4, null") == ("train.max_steps", [4, None])
    for bad, msg in [("loss.alpha", "expected section.key=value1"), ("alpha=0.1", "expected section.key"),
                     ("loss.alpha=0.1,,0.3", "empty value"), ("loss.alpha=", "expected section.key")]:
        with pytest.raises(ConfigError, match=msg):
            parse_sweep_arg(bad)
    # several flags = the product, stored as one train.sweep override; a key twice is refused
    text = sweep_override(["loss.alpha=0.1,0.5", "lora.rank=4,8"])
    assert text.startswith("train.sweep=") and json.loads(text.split("=", 1)[1]) == {
        "loss.alpha": [0.1, 0.5], "lora.rank": [4, 8]}
    with pytest.raises(ConfigError, match="--sweep loss.alpha given twice"):
        sweep_override(["loss.alpha=0.1", "loss.alpha=0.5"])


def test_run_names():
    assert format_value(1e-05) == "1e-05" and format_value(True) == "true" and format_value(["q", "v"]) == "q+v"
    assert short_keys(["loss.alpha", "lora.alpha", "lora.rank"]) == {
        "loss.alpha": "loss.alpha", "lora.alpha": "lora.alpha", "lora.rank": "rank"}
    assert run_name("selfaug", {"loss.alpha": 0.1}) == "selfaug[alpha=0.1]"
    assert run_name("lora", {}) == "lora"
    assert scaled_name("selfaug[alpha=0.1]", 0.5) == "selfaug[alpha=0.1]@0.5"
    assert split_run_name("selfaug[alpha=0.1]@0.5") == ("selfaug", "[alpha=0.1]@0.5")
    assert split_run_name("sft-selfaug") == ("sft-selfaug", "")
    assert split_run_name("lora@0.25") == ("lora", "@0.25")
    assert dir_name("selfaug[alpha=0.1,rank=8]@0.5") == "selfaug_alpha=0.1_rank=8_at0.5"
    assert dir_name("x[path=/a b]") == "x_path=-a-b"


def test_sweep_runs_each_value_except_for_methods_that_never_read_the_key():
    cfg = build_config("smoke", ["train.methods=[sft,lora,selfaug]"], check_paths=False)
    cli = _cli()
    args = cli.parse_args(["--preset", "smoke", "--compare", "sft,lora,selfaug", "--sweep",
                           "loss.alpha=0.1,0.3,0.5,1.0"])
    cfg = build_config("smoke", cli.overrides_from_args(args), check_paths=False)
    runs = plan_runs(cfg)
    # CE-only methods do not read loss.alpha: one run each, under their plain names (no identical trainings)
    assert [r.name for r in runs] == ["sft", "lora", "selfaug[alpha=0.1]", "selfaug[alpha=0.3]",
                                      "selfaug[alpha=0.5]", "selfaug[alpha=1.0]"]
    assert runs[2].sweep == {"loss.alpha": 0.1} and runs[2].dir_name == "selfaug_alpha=0.1"
    assert [run_config(cfg, r).loss.alpha for r in runs[2:]] == [0.1, 0.3, 0.5, 1.0]
    assert run_config(cfg, runs[2]).train.sweep == {}  # applied, so a run's config does not sweep again
    # product of two keys; lora reads only lora.*; sft neither
    cfg = build_config("smoke", ["train.methods=[sft,lora,selfaug]",
                                 "train.sweep={loss.alpha: [0.1, 0.5], lora.alpha: [8, 16]}"], check_paths=False)
    names = [r.name for r in plan_runs(cfg)]
    assert names == ["sft", "lora[lora.alpha=8]", "lora[lora.alpha=16]",
                     "selfaug[loss.alpha=0.1,lora.alpha=8]", "selfaug[loss.alpha=0.1,lora.alpha=16]",
                     "selfaug[loss.alpha=0.5,lora.alpha=8]", "selfaug[loss.alpha=0.5,lora.alpha=16]"]
    # keys every method reads (optimizer.*) run every method per value
    cfg = build_config("smoke", ["train.methods=[sft,lora]", "train.sweep={optimizer.learning_rate: [1e-4, 1e-3]}"],
                       check_paths=False)
    runs = plan_runs(cfg)  # names keep the values as written (YAML reads 1e-4 as text; the config coerces it)
    assert [r.name for r in runs] == ["sft[learning_rate=1e-4]", "sft[learning_rate=1e-3]",
                                      "lora[learning_rate=1e-4]", "lora[learning_rate=1e-3]"]
    assert [run_config(cfg, r).optimizer.learning_rate for r in runs] == [1e-4, 1e-3, 1e-4, 1e-3]


def test_method_option_sections_are_swept_only_for_their_methods(monkeypatch):
    entry = methods_lib.Method("lora-feat", "LoRA + features", trains="lora", options=("train",), table=2)
    monkeypatch.setitem(methods_lib.METHODS, "lora-feat", entry)
    from selfaug_jax.experiment.runs import method_reads

    assert method_reads(entry, "train.max_steps") and not method_reads(methods_lib.METHODS["lora"], "train.max_steps")
    assert method_reads(methods_lib.METHODS["lora"], "optimizer.learning_rate")


def test_method_overrides_apply_only_to_their_method():
    cfg = build_config("smoke", ["train.methods=[sft,lora,selfaug]", "optimizer.learning_rate=5e-4",
                                 "train.method_overrides={sft: {optimizer.learning_rate: 1.0e-5}}"], check_paths=False)
    lrs = {r.name: run_config(cfg, r).optimizer.learning_rate for r in plan_runs(cfg)}
    assert lrs == {"sft": 1e-5, "lora": 5e-4, "selfaug": 5e-4}
    # nested form, and an override of a swept key takes the method out of the sweep
    cfg = build_config("smoke", ["train.methods=[sft,lora]", "train.sweep={optimizer.learning_rate: [1e-4, 1e-3]}",
                                 "train.method_overrides={sft: {optimizer: {learning_rate: 1.0e-5}}}"],
                       check_paths=False)
    runs = plan_runs(cfg)
    assert [r.name for r in runs] == ["sft", "lora[learning_rate=1e-4]", "lora[learning_rate=1e-3]"]
    assert run_config(cfg, runs[0]).optimizer.learning_rate == 1e-5


@pytest.mark.parametrize("override,message", [
    ("train.method_overrides={sft: {optimizer.learning_rate: fast}}",
     "train.method_overrides.sft: optimizer.learning_rate: expected a number, got 'fast'"),
    ("train.method_overrides={sft: {optimizer.lr: 1}}",
     r"train.method_overrides.sft: unknown key\(s\) optimizer.lr in section 'optimizer'"),
    ("train.method_overrides={magic: {optimizer.learning_rate: 1}}", "train.method_overrides: unknown method 'magic'"),
    ("train.method_overrides={lora: {data.max_length: 128}}", "train.method_overrides.lora: data.max_length cannot vary"),
    ("train.sweep={eval.n_rag: [4, 8]}", "train.sweep: eval.n_rag cannot vary between runs"),
    ("train.sweep={loss.alpha: 0.5}", "train.sweep.loss.alpha: expected a non-empty list"),
    ("train.sweep={loss.alpha: [0.5, 0.5]}", r"train.sweep.loss.alpha: value\(s\) 0.5 given twice"),
    ("train.sweep={loss.alpha: [0.5, high]}", r"train.sweep point selfaug\[alpha=high\]: loss.alpha: expected a number"),
    ("train.sweep={loss.alpha: [0.1, 0.5]}", "train.sweep: none of the methods lora reads loss.alpha"),
    ("eval.adapter_scales=[0.5, 1.0]", r"adapter_scales: 1.0 must be in \(0, 1\)"),
])
def test_bad_sweeps_and_overrides_fail_with_one_line(override, message):
    extra = ["train.methods=[lora]"] if "none of the methods" in message else []
    with pytest.raises(ConfigError, match=message) as err:
        build_config("smoke", extra + [override], check_paths=False)
    assert "\n" not in str(err.value)


def test_cli_sweep_error_exits_2_before_any_work(tmp_path, capsys):
    rc = _cli().main(["--preset", "smoke", "--out", str(tmp_path / "x"), "--sweep", "loss.alpha=0.1,oops"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: train.sweep point selfaug[alpha=oops]: loss.alpha: expected a number, got 'oops'"]
    assert not (tmp_path / "x").exists()


def test_presets_load_and_validate():
    cpu = build_config("compare-cpu", check_paths=False)
    # every registered method is in compare-cpu (uncomment the full list there when new methods land)
    missing = [m for m in methods_lib.METHOD_NAMES if m not in cpu.train.methods]
    assert not missing, f"compare-cpu.yaml: add {missing} to train.methods"
    lrs = {r.name: run_config(cpu, r).optimizer.learning_rate for r in plan_runs(cpu)}
    assert lrs["sft"] == 4e-5 and lrs["lora"] == 2e-3
    assert cpu.model.name == "smollm2-135m-instruct" and cpu.data.train == "default"
    t1 = build_config("paper-table1", check_paths=False)
    table1 = [m for m, e in methods_lib.METHODS.items() if e.table == 1]
    assert list(t1.train.methods) == table1, "paper-table1.yaml: train.methods must be every Table-1 method in order"
    lrs = {r.name: run_config(t1, r).optimizer.learning_rate for r in plan_runs(t1)}
    assert lrs["sft"] == 1e-5 and all(v == 5e-4 for k, v in lrs.items() if k != "sft")
    assert t1.train.epochs == 1 and t1.train.batch_size == 16 and t1.loss.alpha == 0.5
    assert t1.optimizer.weight_decay == 0.1 and t1.optimizer.warmup_ratio == 0.05 and t1.data.format == "crag"
    assert t1.model.name == "Qwen/Qwen2.5-7B-Instruct"
    t2 = build_config("paper-table2", check_paths=False)
    assert "selfaug" in t2.train.methods
    if "selfaug-features" in methods_lib.METHOD_NAMES:  # after the merge: the sweep lines must be uncommented
        assert t2.train.sweep == {"features.site": ["q", "k", "v", "o", "attn", "ffn", "residual"]}, \
            "paper-table2.yaml: uncomment methods / sweep"
        assert [r.name for r in plan_runs(t2)][-1] == "selfaug"  # selfaug does not read features.*


def test_list_methods_prints_the_registry():
    lines = _cli().list_methods().splitlines()
    assert lines[0].split()[:5] == ["method", "paper", "trains", "reference", "terms"]
    assert [line.split()[0] for line in lines[1:]] == list(methods_lib.METHOD_NAMES)
    assert lines[1 + methods_lib.METHOD_NAMES.index("selfaug")].split()[1:5] == ["Table", "1", "lora", "base"]
