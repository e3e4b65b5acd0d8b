"""Dataset formats and file kinds (selfaug_jax/data/formats.py): Alpaca, ShareGPT, OpenAI messages, a column
mapping, Parquet / Arrow / save_to_disk, counts, one-line errors (exit 2 from experiments/run.py).

Every format's fixture (tests/fixtures/formats) describes the same three examples as ``equivalent.jsonl`` (our
schema): documents in a field, documents embedded in the prompt, and a multi-turn chat with documents on the last
user turn; each must tokenize to exactly the same ids and labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfaug_jax.data import PromptConfig, tokenize_examples
from selfaug_jax.data.formats import check_columns, iter_records, read_formatted, resolve_columns
from selfaug_jax.data.readers import ReaderStats, read_examples, resolve_format
from selfaug_jax.data.schema import DataFormatError
from selfaug_jax.models import DEFAULT_MODEL, load_tokenizer
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "formats"
OPENAI_COLUMNS = {"messages": "chat", "documents": "ctxs", "id": "uid"}
CASES = [  # (file, format, columns)
    ("alpaca.json", "alpaca", {}),
    ("sharegpt.jsonl", "sharegpt", {}),
    ("openai_mapped.jsonl", "openai", OPENAI_COLUMNS),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference(tokenizer):
    examples = list(read_examples(FIX / "equivalent.jsonl", "jsonl"))
    return _tokenized(examples, tokenizer)


def _tokenized(examples, tokenizer) -> dict[str, tuple[list[int], list[int]]]:
    tokenized, stats = tokenize_examples(examples, tokenizer, PromptConfig(max_length=None))
    assert stats.n_skipped == 0
    return {t.id: (t.input_ids.tolist(), t.labels.tolist()) for t in tokenized}


def _records(path: Path) -> list[dict]:
    return [rec for _, rec in iter_records(path)]


def _table_rows(records: list[dict]) -> list[dict]:
    """Documents as ``{text, title}`` structs: an Arrow column cannot mix strings and structs."""
    def as_struct(d):
        return {"text": d, "title": None} if isinstance(d, str) else {"title": None, **d}

    return [{k: [as_struct(d) for d in v] if k in ("documents", "ctxs") and v else v for k, v in r.items()}
            for r in records]


def _write_table(records: list[dict], path: Path) -> Path:
    """Records as a Parquet or Arrow file (the schema unified over all records, absent fields null)."""
    records = _table_rows(records)
    schema = pa.unify_schemas([pa.Table.from_pylist([r]).schema for r in records], promote_options="permissive")
    table = pa.Table.from_pylist(records, schema=schema)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        with pa.ipc.new_stream(str(path), table.schema) as writer:  # datasets' .arrow files are IPC streams
            writer.write_table(table)
    return path


@pytest.mark.parametrize("name,fmt,columns", CASES)
def test_format_gives_the_tokenized_examples_of_equivalent_jsonl(name, fmt, columns, tokenizer, reference):
    stats = ReaderStats()
    examples = list(read_examples(FIX / name, fmt, columns=columns, stats=stats))
    assert _tokenized(examples, tokenizer) == reference
    n_extra = len(_records(FIX / name)) - 3  # alpaca and sharegpt carry one record without an answer
    assert (stats.n_records, stats.n_examples, stats.n_skipped) == (3 + n_extra, 3, n_extra)
    assert stats.n_documents == 4
    if n_extra:
        assert stats.skip_reasons == {"empty answer" if fmt == "alpaca" else "no final assistant turn": 1}
    # documents embedded in the prompt: no separate documents, the whole prompt is the (aligned) input
    embedded = next(e for e in examples if e.id == "a2")
    assert not any(m.documents for m in embedded.to_messages())


@pytest.mark.parametrize("kind", [".parquet", ".arrow"])
@pytest.mark.parametrize("name,fmt,columns", CASES + [("equivalent.jsonl", "jsonl", {})])
def test_table_files_read_like_the_json_source(name, fmt, columns, kind, tokenizer, tmp_path):
    records = _records(FIX / name)
    path = _write_table(records, tmp_path / f"data{kind}")
    ours = list(read_examples(path, fmt, columns=columns))
    assert _tokenized(ours, tokenizer) == _tokenized(list(read_examples(FIX / name, fmt, columns=columns)), tokenizer)
    if not columns:
        assert resolve_format(path) == fmt  # auto sniffs the first record


def test_save_to_disk_directory_and_dataset_dict(tokenizer, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = _records(FIX / "sharegpt.jsonl")
    ds = datasets.Dataset.from_list(_table_rows(records))
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    for path in (tmp_path / "ds", tmp_path / "dd"):
        assert resolve_format(path) == "sharegpt"
        assert _tokenized(list(read_examples(path)), tokenizer) == reference
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "only_test"))
    with pytest.raises(DataFormatError, match=r"only_test: a DatasetDict without a 'train' split \(splits: test\)"):
        list(read_examples(tmp_path / "only_test", "sharegpt"))


def test_auto_detects_alpaca_and_sharegpt_json():
    assert resolve_format(FIX / "alpaca.json") == "alpaca"
    assert resolve_format(FIX / "sharegpt.jsonl") == "sharegpt"
    assert resolve_format(FIX / "equivalent.jsonl") == "jsonl"


def test_column_mapping_errors_name_column_and_file(tmp_path):
    with pytest.raises(DataFormatError, match=r"alpaca.json:2: missing column 'prompt' \(data.columns.question=prompt\)"):
        check_columns(FIX / "alpaca.json", "alpaca", {"question": "prompt"})
    with pytest.raises(DataFormatError, match=r"openai_mapped.jsonl:1: missing column 'messages' \(default messages"):
        check_columns(FIX / "openai_mapped.jsonl", "openai", {})
    with pytest.raises(DataFormatError, match=r"^data.columns.bogus: unknown key; valid keys: question, "):
        resolve_columns("alpaca", {"bogus": "x"})
    with pytest.raises(DataFormatError, match=r"^data.columns.history: not used by data.format=openai"):
        resolve_columns("openai", {"history": "h"})
    with pytest.raises(DataFormatError, match=r"sharegpt.jsonl:1: conversations\[0\] has no 'role' field "
                                              r"\(data.columns.role\); turn has from, value"):
        list(read_formatted(FIX / "sharegpt.jsonl", "sharegpt", columns={"role": "role"}))
    # a bad row deep in a Parquet file is named by row
    records = _records(FIX / "alpaca.json")
    records[2]["history"] = [["a user turn without its answer"]]
    path = _write_table(records, tmp_path / "bad.parquet")
    with pytest.raises(DataFormatError, match=r"bad.parquet:row 2: history\[0\] must be a \[user, assistant\] pair"):
        list(read_examples(path, "alpaca"))


def _run_main():
    return load_script("experiments/run.py", "selfaug_run_main").main


@pytest.mark.parametrize("args,expected", [
    (["--data", str(FIX / "alpaca.json"), "data.format=alpaca", "data.columns.question=prompt"],
     "alpaca.json:2: missing column 'prompt' (data.columns.question=prompt)"),
    (["--data", str(FIX / "sharegpt.jsonl"), "data.format=sharegpt", "data.columns.messages=turns"],
     "sharegpt.jsonl:1: missing column 'turns' (data.columns.messages=turns)"),
    (["--data", str(FIX / "openai_mapped.jsonl"), "data.format=openai", "data.columns.messages=chat",
      "data.columns.documents=passages"],
     "openai_mapped.jsonl:1: missing column 'passages' (data.columns.documents=passages)"),
    (["--data", str(FIX / "equivalent.jsonl"), "data.columns.question=query"],
     "equivalent.jsonl:1: missing column 'query' (data.columns.question=query)"),
    (["--data", str(FIX / "alpaca.json"), "data.format=alpaca", "data.columns.roles=x"],
     "data.columns.roles: unknown key"),
])
def test_wrong_mapping_exits_2_with_one_line(args, expected, capsys, tmp_path):
    main = _run_main()
    assert main(["--preset", "smoke", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("config error: data.train: ") and expected in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_wrong_mapping_in_table_file_exits_2(capsys, tmp_path):
    path = _write_table(_records(FIX / "openai_mapped.jsonl"), tmp_path / "chat.parquet")
    main = _run_main()
    assert main(["--preset", "smoke", "--out", str(tmp_path / "run"), "--data", str(path), "data.format=openai",
                 "data.columns.messages=conversation"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"config error: data.train: {path}:row 0: missing column 'conversation' "
                   f"(data.columns.messages=conversation); record has uid, chat, ctxs")


def test_reader_counts_are_logged(caplog):
    with caplog.at_level("INFO", logger="selfaug_jax.data.formats"):
        list(read_examples(FIX / "sharegpt.jsonl", "sharegpt"))
    line = next(r.getMessage() for r in caplog.records if "sharegpt.jsonl" in r.getMessage())
    assert "'n_records': 4" in line and "'n_examples': 3" in line and "'n_skipped': 1" in line
    assert "'skip_reasons': {'no final assistant turn': 1}" in line


def test_system_default_and_ids(tmp_path):
    recs = [{"instruction": "Q?", "output": "A."}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (ex,) = read_formatted(tmp_path / "a.jsonl", "alpaca", system="Be brief.")
    assert (ex.id, ex.system, ex.question, ex.answer) == ("a.jsonl:1", "Be brief.", "Q?", "A.")
    assert np.array_equal([len(ex.documents)], [0])


def test_runner_reads_the_configured_format_and_mapping():
    from selfaug_jax.experiment.config import build_config
    from selfaug_jax.experiment.train_data import load_train_examples

    cfg = build_config("smoke", [f"data.train={FIX / 'openai_mapped.jsonl'}", "data.format=openai",
                                 "data.columns.messages=chat", "data.columns.documents=ctxs", "data.columns.id=uid",
                                 "data.max_train_examples=null"])
    assert cfg.data.columns == OPENAI_COLUMNS
    examples = load_train_examples(cfg)
    assert [e.id for e in examples] == ["a1", "a2", "a3"]
    assert examples == list(read_examples(FIX / "openai_mapped.jsonl", "openai", columns=OPENAI_COLUMNS))


def test_first_record_does_not_read_a_large_json_array_whole(tmp_path):
    from selfaug_jax.data.formats import first_record

    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(json.dumps({"question": "q" * 70_000, "answer": str(i)}) for i in range(3))
                    + "\n")  # the closing bracket is missing: only a full read would notice
    where, rec = first_record(path)
    assert where == f"{path}:2" and rec["answer"] == "0"
    with pytest.raises(DataFormatError, match=r"big.json:5: expected .,. or .\]. after an array element"):
        list(iter_records(path))
