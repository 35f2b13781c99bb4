"""User data read through Hugging Face `datasets` (pipeline.data.tables): Parquet, CSV, JSON and
save_to_disk folders, ``data.columns``, the splits, and errors that name the file, row and
field. The files are written here, into tmp_path; nothing comes from a hub."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import RECORD_FIELDS, build_config
from pipeline.data.example import Example
from pipeline.data.loaders import DataError, load_examples
from pipeline.data.records import USER_FIELDS
from pipeline.data.splits import eval_examples, train_examples
from pipeline.data.tables import table_rows

SPLITS = ("train", "validation", "test")
COLUMNS = {"id": "task_id", "instruction": "prompt", "output": "solution", "tests": "check"}


def tasks(n: int = 12) -> list[dict]:
    """n small tasks under other column names than the record's."""
    return [{"task_id": f"t{i}", "prompt": f"add {i} to `x`", "solution": f"x + {i}",
             "check": f"assert (lambda x: x + {i})(1) == {1 + i}"} for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def ids(examples: list[Example]) -> list[str]:
    return [e.id for e in examples]


def by_split(dataset: str, columns: dict | None = None) -> dict[str, list[str]]:
    return {s: ids(load_examples(dataset, s, columns=columns)) for s in SPLITS}


def test_record_fields_are_examples_fields_and_split():
    """data.columns' fields (config) are the fields the loaders read: Example's and split."""
    names = [f for f in Example.__dataclass_fields__ if f != "meta"]
    assert RECORD_FIELDS == USER_FIELDS and set(RECORD_FIELDS) == {*names, "split"}


@pytest.mark.parametrize("write", [write_parquet, write_csv])
def test_a_table_maps_its_columns_and_is_carved_like_a_jsonl_file(tmp_path, write):
    """data.columns maps the file's columns; without a split column the records get the seeded
    carve of a user JSONL file: the same records go to the same splits."""
    rows = tasks(30)
    table = write(tmp_path / f"tasks.{write.__name__.split('_')[1]}", rows)
    splits = by_split(str(table), COLUMNS)
    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text("".join(json.dumps({"id": r["task_id"], "instruction": r["prompt"],
                                         "output": r["solution"]}) + "\n" for r in rows))
    assert splits == by_split(str(jsonl))
    assert {s: len(v) for s, v in splits.items()} == {"train": 24, "validation": 3, "test": 3}
    first = load_examples(str(table), "train", columns=COLUMNS, limit=1)[0]
    row = next(r for r in rows if r["task_id"] == first.id)
    assert (first.instruction, first.output, first.tests, first.input) == \
        (row["prompt"], row["solution"], row["check"], "")
    assert first.meta["source"] == str(table) and first.meta["row"] == rows.index(row) + 1


def test_a_split_column_and_default_ids(tmp_path):
    """A mapped split column is each row's split; without an id column a row's id is its row
    number."""
    rows = [{"q": f"task {i}", "a": f"x = {i}", "fold": ["train", "test"][i % 2]}
            for i in range(4)]
    table = write_csv(tmp_path / "folds.csv", rows)
    splits = by_split(str(table), {"instruction": "q", "output": "a", "split": "fold"})
    assert splits == {"train": ["row-1", "row-3"], "validation": [], "test": ["row-2", "row-4"]}


def test_a_json_file_and_save_to_disk_folders(tmp_path):
    """A JSON array file and a saved Dataset are carved; a saved DatasetDict keeps its splits."""
    import datasets

    rows = tasks(5)
    (tmp_path / "tasks.json").write_text(json.dumps(rows))
    assert sum(by_split(str(tmp_path / "tasks.json"), COLUMNS).values(), []) != []
    whole = datasets.Dataset.from_list(rows)
    whole.save_to_disk(str(tmp_path / "saved"))
    assert by_split(str(tmp_path / "saved"), COLUMNS) == by_split(str(tmp_path / "tasks.json"),
                                                                  COLUMNS)
    parts = datasets.DatasetDict({"train": whole.select(range(3)),
                                  "test": whole.select(range(3, 5))})
    parts.save_to_disk(str(tmp_path / "parts"))
    assert ids(load_examples(str(tmp_path / "parts"), "test", columns=COLUMNS)) == ["t3", "t4"]
    with pytest.raises(DataError, match="unknown split 'validation'.*valid splits: train, test"):
        load_examples(str(tmp_path / "parts"), "validation", columns=COLUMNS)
    bad = datasets.Dataset.from_list([*rows[3:4], {**rows[4], "prompt": None}])
    datasets.DatasetDict({"train": whole.select(range(3)), "test": bad}).save_to_disk(
        str(tmp_path / "bad"))
    with pytest.raises(DataError) as err:
        load_examples(str(tmp_path / "bad"), "train", columns=COLUMNS)
    assert (err.value.path, err.value.row, err.value.field) == \
        (f"{tmp_path / 'bad'} [test]", 2, "instruction")


def test_a_changed_file_is_read_again(tmp_path):
    table = write_parquet(tmp_path / "t.parquet", tasks(2))
    assert ids(load_examples(str(table), "train", columns=COLUMNS)) == ["t0", "t1"]
    write_parquet(table, [{**r, "task_id": r["task_id"] + "-new"} for r in tasks(2)])
    assert ids(load_examples(str(table), "train", columns=COLUMNS)) == ["t0-new", "t1-new"]


def test_a_jsonl_file_takes_data_columns_too(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tasks(3)))
    splits = by_split(str(path), COLUMNS)
    assert sorted(sum(splits.values(), [])) == ["t0", "t1", "t2"]
    first = load_examples(str(path), "test", columns=COLUMNS)[0]
    assert first.instruction.startswith("add") and first.tests.startswith("assert")
    (tmp_path / "bad.jsonl").write_text(json.dumps({**tasks(1)[0], "solution": ""}) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(str(tmp_path / "bad.jsonl"), "train", columns=COLUMNS)
    assert (err.value.line, err.value.field, err.value.column) == (1, "output", "solution")


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("write, cell, problem", [
    (write_csv, "", "missing"),  # an empty CSV cell is read as null
    (write_parquet, "   ", "empty"),
])
def test_a_bad_row_names_the_file_row_and_field(tmp_path, write, cell, problem):
    rows = tasks(4)
    rows[2]["solution"] = cell
    table = write(tmp_path / f"bad.{write.__name__.split('_')[1]}", rows)
    with pytest.raises(DataError) as err:
        load_examples(str(table), "train", columns=COLUMNS)
    e = err.value
    assert (e.path, e.row, e.field, e.column) == (str(table), 3, "output", "solution")
    assert str(e).startswith(f"{table}: row 3: field 'output' (column 'solution'): {problem}")


def test_a_row_whose_tests_cannot_fail_names_its_row_and_column(tmp_path):
    rows = tasks(3)
    rows[1]["check"] = "# TODO: write the tests"
    table = write_parquet(tmp_path / "untested.parquet", rows)
    with pytest.raises(DataError, match=r"row 2: field 'tests' \(column 'check'\): record 't1': "
                       r"the tests hold no statement"):
        load_examples(str(table), "train", columns=COLUMNS)


def test_duplicate_ids_name_both_rows(tmp_path):
    rows = tasks(3)
    rows[2]["task_id"] = "t0"
    table = write_parquet(tmp_path / "dup.parquet", rows)
    with pytest.raises(DataError, match=r"row 3: field 'id' \(column 'task_id'\): duplicate id "
                       r"'t0' \(rows 1 and 3\)"):
        load_examples(str(table), "train", columns=COLUMNS)


def test_a_missing_column_names_it_and_the_file(tmp_path):
    table = write_csv(tmp_path / "tasks.csv", tasks(3))
    with pytest.raises(DataError) as err:
        load_examples(str(table), "train", columns={**COLUMNS, "output": "answer"})
    assert (err.value.path, err.value.field, err.value.column) == (str(table), "output", "answer")
    assert "column 'answer' not found" in str(err.value) and "'solution'" in str(err.value)
    with pytest.raises(DataError, match="field 'instruction': column 'instruction' not found"):
        load_examples(str(table), "train")  # unmapped: the record's own name


def test_a_missing_column_fails_before_any_model_loads(tmp_path, capsys):
    """`ddpt run` on a file without the mapped column exits 2 naming it, before the run writes
    anything (its config.yaml is written before the model is built)."""
    table = write_parquet(tmp_path / "tasks.parquet", tasks(6))
    out = tmp_path / "o"
    code = main(["run", "--preset", "smoke", "--output", str(out),
                 "--set", "distributed.backend=local", "--set", "pool.backend=local",
                 "--set", f"data.dataset={table}",
                 "--set", "data.columns={instruction: prompt, output: answer}"])
    err = capsys.readouterr().err
    assert code == 2 and str(table) in err and "column 'answer' not found" in err
    assert not (out / "config.yaml").exists()


def test_data_columns_is_for_user_files_only():
    with pytest.raises(DataError, match="data.columns is for your own files"):
        load_examples("mbpp", "test", columns={"output": "code"})


def test_a_hub_name_fails_fast_naming_the_setting(monkeypatch):
    """With the hub off a hub name fails at once, naming data.dataset; nothing is fetched."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(DataError, match=r"data.dataset='someone/tasks': a hub name, but the hub "
                       "is off"):
        load_examples("someone/tasks", "train")
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- through the pipeline

def test_the_splits_a_run_reads_and_the_rows_ray_reads(tmp_path):
    """The run's splits come through data.columns; `table_rows` gives the table rows of exactly
    those examples (what the Ray path hands to ray.data.from_huggingface)."""
    table = write_parquet(tmp_path / "tasks.parquet", tasks(12))
    config = build_config("smoke", overrides=[f"data.dataset={table}",
                                              "data.columns={instruction: prompt, output: "
                                              "solution, id: task_id}"])
    train, test = train_examples(config.data), eval_examples(config.data)
    assert len(train) == 10 and len(test) == 1 and not set(ids(train)) & set(ids(test))
    rows = table_rows(train, config.data.dataset, config.data.columns)
    assert rows["id"] == ids(train) and rows["output"] == [e.output for e in train]
    assert table_rows(train, "mbpp") is None  # a built-in: Python rows
    assert table_rows([Example("x", "i", "o")], config.data.dataset,
                      config.data.columns) is None  # not records of the table


@pytest.mark.slow  # about 20 s a file on 2 busy cores, a minute for the first (imports)
@pytest.mark.parametrize("suffix, columns", [
    ("parquet", "{id: task_id, instruction: prompt, output: solution}"),
    ("csv", "{instruction: prompt, output: solution}"),
])
def test_a_table_trains_and_evaluates(tmp_path, suffix, columns):
    """The tiny model trains a DDPT prompt for two steps on a Parquet / CSV file and compares
    it with the manual prompt on the file's test split, all in this process."""
    from pipeline.studies.main_job import run_main

    rows = tasks(12)
    table = (write_parquet if suffix == "parquet" else write_csv)(tmp_path / f"t.{suffix}", rows)
    config = build_config("smoke", overrides=[
        "distributed.backend=local", "pool.backend=local", "train.steps=2",
        f"data.dataset={table}", f"data.columns={columns}", "eval.metrics=[bleu4, chrf]"])
    out = tmp_path / "run"
    metrics = run_main(config, out, methods=("manual", "ddpt_ddim"), progress=False)
    assert set(metrics) == {"manual", "ddpt_ddim"}
    assert all(0 <= values["bleu4"] <= 1 for values in metrics.values())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    test_ids = ids(load_examples(str(table), "test", columns=config.data.columns))
    assert sorted({s["id"] for s in samples}) == test_ids and len(samples) == 2
    reference = {r["task_id"] if suffix == "parquet" else f"row-{i}": r["solution"]
                 for i, r in enumerate(rows, 1)}
    assert all(s["reference"] == reference[s["id"]] for s in samples)
    assert json.loads((out / "ddpt" / "checkpoint" / "state.json").read_text())["step"] == 2


@pytest.mark.slow  # a local Ray and one tokenizing actor: about 30 s on 2 busy cores
def test_ray_data_reads_a_table_through_from_huggingface(tmp_path):
    """The Ray path: a table's training split goes to Ray Data as a `datasets.Dataset`
    (``ray.data.from_huggingface``, which reads a local one as Arrow) and is tokenized there
    exactly as in this process."""
    import ray

    from pipeline.distributed.data import example_rows, tokenized_dataset
    from pipeline.distributed.session import use_local_ray_env
    from pipeline.lm.loader import load_tokenizer
    from pipeline.lm.template import PromptTemplate

    table = write_parquet(tmp_path / "tasks.parquet", tasks(12))
    config = build_config("smoke", overrides=[
        f"data.dataset={table}", "data.columns={id: task_id, instruction: prompt, "
        "output: solution}"])
    train = train_examples(config.data)
    use_local_ray_env()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = example_rows(train, config)
        assert rows.take_all() == [{"id": e.id, "instruction": e.instruction, "input": e.input,
                                    "output": e.output} for e in train]
        assert "FromArrow" in rows.stats()  # from_items would read "FromItems"
        tokenized = tokenized_dataset(train, config).take_all()
    finally:
        ray.shutdown()
    template = PromptTemplate(load_tokenizer(config.model), config.prompt, is_encoder_decoder=False)
    assert [r["id"] for r in tokenized] == ids(train)
    for row, example in zip(tokenized, train):
        encoded = template.encode(example)
        assert row["prompt_ids"].tolist() == encoded.prompt_ids
        assert row["target_ids"].tolist() == encoded.target_ids
