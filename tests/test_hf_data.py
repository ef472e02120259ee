"""Hugging Face data files as `launcher validate` and `launcher train` see them: validate reads a file's start only
and writes nothing; train writes every cache under the recipe's `cache_dir`; bad files and tokenizers are refused
in one line, alike by both. In-process calls of the CLI but one (the caches' folders are read at import)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import test_hf
from conftest import run_cli
from test_hf import CAUSAL, CLASSIFY, recipe
from test_refusals import launcher

pytest.importorskip("datasets")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_hf's tokenizer and files."""
    return test_hf.data.__wrapped__(tmp_path_factory)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_validate_reads_the_start_of_a_large_file_and_writes_nothing(data: Path, tmp_path: Path):
    big = tmp_path / "big.jsonl"
    line = json.dumps({"text": (data / "text.jsonl").read_text()[:2000]}) + "\n"
    big.write_text(line * 5000)  # 10 MB: tokenizing it takes many seconds, its first line a millisecond
    cache = tmp_path / "cache"
    args = [str(recipe(data, tmp_path)), f"data.dataset.cache_dir={cache}"]
    assert launcher("validate", *args)[0] == 0  # the imports, not timed
    start = time.perf_counter()
    code, err = launcher("validate", *args, f"data.dataset.path={big}")
    assert code == 0, err
    assert time.perf_counter() - start < 10  # what a test on a loaded 2-core machine can hold to
    assert not cache.exists()


def test_train_keeps_every_cache_under_the_recipes_cache_dir(data: Path, tmp_path: Path, monkeypatch):
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    cache = tmp_path / "cache"
    short = ["train.max_steps=1", "~eval", "checkpoint.every_steps=100", f"data.dataset.cache_dir={cache}"]
    args = [str(recipe(data, tmp_path)), f"run_dir={tmp_path / 'run'}", *short]
    proc = run_cli("validate", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert files_under(home) == [] and not cache.exists()  # validate writes nothing, anywhere
    proc = run_cli("train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert files_under(home) == []
    written = files_under(cache)
    assert any(f.startswith("datasets/") and f.endswith(".arrow") for f in written), written  # datasets' records
    assert any(f.endswith("/tokens.npy") for f in written), written  # the tokens the run maps


def write_files(data: Path, folder: Path) -> None:
    (folder / "empty.csv").write_text("")
    (folder / "header.csv").write_text("text,label\n")
    (folder / "empty.jsonl").write_text("")
    (folder / "blank.txt").write_text("")
    (folder / "lines.jsonl").write_text((data / "text.jsonl").read_text())
    (folder / "lines.tsv").write_text((data / "text.jsonl").read_text())
    (folder / "not-a-tokenizer").mkdir()


# The same set, given in full to each split.
SET = "_component_: hf_classification, path: DATA/labels.csv, tokenizer: DATA/tokenizer, label_column: lab"
# (recipe, overrides, the one line's text); FOLDER is the test's own folder, DATA the fixture's.
REFUSALS = {
    "empty csv": (CLASSIFY, ["data.dataset.path=FOLDER/empty.csv"], "data.dataset.path: FOLDER/empty.csv is empty"),
    "csv header only": (CLASSIFY, ["data.dataset.path=FOLDER/header.csv"], "FOLDER/header.csv is empty (no records)"),
    "empty jsonl": (CAUSAL, ["data.dataset.path=FOLDER/empty.jsonl"], "FOLDER/empty.jsonl is empty (no records)"),
    "empty text": (CAUSAL, ["data.dataset.path=FOLDER/blank.txt"], "FOLDER/blank.txt is empty (no records)"),
    "json lines read as csv": (
        CAUSAL,
        ["data.dataset.path=FOLDER/lines.jsonl", "data.dataset.format=csv"],
        "data.dataset.path: cannot load 'FOLDER/lines.jsonl' as csv: line ",
    ),
    "column of train and val": (
        CLASSIFY,
        ["~data.dataset", f"data.train={{{SET}}}", f"data.val={{{SET}, split: val}}"],
        "data.train.label_column: DATA/labels.csv has no column 'lab' (its columns: text, label)",
    ),
    "format of an unknown suffix": (
        CAUSAL,
        ["data.dataset.path=FOLDER/lines.tsv"],
        "data.dataset.format: cannot tell the format of FOLDER/lines.tsv: give one of csv, json, parquet, text",
    ),
    "no path": (CAUSAL, ["~data.dataset.path"], "data.dataset.path: missing required value (a data file, or a Hub"),
    "tokenizer file": (
        CAUSAL,
        ["data.dataset.tokenizer=DATA/text.jsonl"],
        "data.dataset.tokenizer: DATA/text.jsonl is a file: expected the directory a tokenizer's save_pretrained",
    ),
    "tokenizer without files": (
        CAUSAL,
        ["data.dataset.tokenizer=FOLDER/not-a-tokenizer"],
        "data.dataset.tokenizer: FOLDER/not-a-tokenizer holds no tokenizer files",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_data_is_refused_in_one_line_alike_by_validate_and_train(data: Path, tmp_path: Path, case: str):
    template, overrides, expected = REFUSALS[case]
    write_files(data, tmp_path)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    filled = [o.replace("FOLDER", str(tmp_path)).replace("DATA", str(data)) for o in overrides]
    args = [str(recipe(data, tmp_path, template)), f"run_dir={run_dir}", f"data.dataset.cache_dir={cache}", *filled]
    expected = expected.replace("FOLDER", str(tmp_path)).replace("DATA", str(data))
    for verb in ("validate", "train"):
        code, err = launcher(verb, *args)
        lines = [line for line in err.splitlines() if line.startswith("error")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (verb, err)
        assert not cache.exists() and not run_dir.exists()


def test_records_loaded_whole_refuse_an_empty_file_in_the_same_line(data: Path, tmp_path: Path):
    from launcher.components import ArgumentProblem
    from launcher.data.hf import load_records

    write_files(data, tmp_path)
    for name, format in (("header.csv", "csv"), ("empty.jsonl", "json")):
        with pytest.raises(ArgumentProblem) as e:
            load_records(name, tmp_path / name, format, ("text",), str(tmp_path / "cache"))
        assert (e.value.arg, e.value.message) == ("path", f"{tmp_path / name} is empty (no records)")


def test_a_files_columns_are_read_from_its_start_in_every_format(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from launcher.data.records import Unreadable, first_columns

    files = {
        "lines.jsonl": ('{"text": "a", "label": 1}\n{"text": "b"}\n', "json"),
        "list.json": ('[\n  {"text": "a", "label": 1}\n]\n', "json"),
        "columns.json": ('{\n  "text": ["a", "b"]\n}\n', "json"),
        "none.json": ("[]\n", "json"),
        "blank-lines.csv": ("\ntext,label\n\n'a',1\n", "csv"),
        "lines.txt": ("\n", "text"),
    }
    for name, (text, _) in files.items():
        (tmp_path / name).write_text(text)
    pq.write_table(pa.table({"text": ["a"], "label": [1]}), tmp_path / "rows.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    found = {name: first_columns(tmp_path / name, builder) for name, (_, builder) in files.items()}
    assert found == {
        "lines.jsonl": ["text", "label"],
        "list.json": ["text", "label"],
        "columns.json": ["text"],
        "none.json": None,
        "blank-lines.csv": ["text", "label"],
        "lines.txt": ["text"],
    }
    assert first_columns(tmp_path / "rows.parquet", "parquet") == ["text", "label"]
    assert first_columns(tmp_path / "none.parquet", "parquet") is None
    (tmp_path / "bad.json").write_text("{not json\n")
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "wide.csv").write_text("text\na\nb,c\n")  # a record of more fields than the header
    for name, builder in (("bad.json", "json"), ("bad.parquet", "parquet"), ("wide.csv", "csv")):
        with pytest.raises(Unreadable):
            first_columns(tmp_path / name, builder)
