"""Tests for pipeline.data.loaders: real shared data, user JSONL, and located errors."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from pipeline.config import ExecutionConfig
from pipeline.data.example import Example
from pipeline.data.loaders import (
    DATASET_SPLITS,
    DATASETS,
    DataError,
    load_examples,
    resolve_data_dir,
)
from pipeline.sandbox import run_programs
from pipeline.scoring.execution import build_program

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SANDBOX = ExecutionConfig(timeout_s=20, workers=2)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("DDPT_DATA_DIR", raising=False)


def ids(examples: list[Example]) -> list[str]:
    return [e.id for e in examples]


def assert_unique(examples: list[Example]) -> None:
    assert len(set(ids(examples))) == len(examples)


# ---------------------------------------------------------------- real data

def test_default_data_dir_is_shared_folder():
    assert SHARED.is_dir(), f"shared data folder missing at {SHARED}"
    assert resolve_data_dir().resolve() == SHARED.resolve()


def test_registry_and_splits_agree():
    assert set(DATASETS) == set(DATASET_SPLITS) == {"conala", "codealpaca", "humaneval", "mbpp",
                                                      "mbpp_functions"}


def test_conala():
    train, val, test = (load_examples("conala", s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (2179, 200, 500)
    assert len(train) + len(val) == 2379
    assert not set(ids(train)) & set(ids(val))
    for split in (train, val, test):
        assert_unique(split)
    assert train[0].instruction.startswith("Concatenate elements of a list 'x'")
    assert test[0].output == "os.kill(os.getpid(), signal.SIGUSR1)"
    assert train[0].meta["question_id"] == 41067960 and train[0].meta["line"] == 2
    raw = json.loads((SHARED / "conala" / "conala-train.json").read_text())
    null_idx = next(i for i, r in enumerate(raw) if r["rewritten_intent"] is None)
    ex = {e.id: e for e in train + val}[f"conala-train-{null_idx}"]
    assert ex.instruction == raw[null_idx]["intent"]
    assert all(e.instruction.strip() and e.output.strip() for e in train + val + test)


def test_codealpaca_carve_is_disjoint_and_stable():
    splits = {s: load_examples("codealpaca", s) for s in DATASET_SPLITS["codealpaca"]}
    sizes = {s: len(v) for s, v in splits.items()}
    assert sizes == {"train": 1717, "validation": 100, "test": 200}
    assert sum(sizes.values()) == 2017
    all_ids = [i for v in splits.values() for i in ids(v)]
    assert len(set(all_ids)) == 2017
    again = {s: ids(load_examples("codealpaca", s)) for s in splits}
    assert again == {s: ids(v) for s, v in splits.items()}
    assert load_examples("codealpaca", "test", limit=5) == splits["test"][:5]


def test_humaneval():
    test = load_examples("humaneval", "test")
    assert len(test) == 164
    assert_unique(test)
    first = test[0]
    assert first.id == "HumanEval/0"
    assert first.instruction.startswith("Complete the following Python function:")
    assert first.output.startswith(first.meta["prompt"])
    assert all("check(" in e.tests and f"check({e.meta['entry_point']})" in e.tests for e in test)


def test_humaneval_reference_passes_its_tests_in_the_sandbox():
    """Data code runs in the sandbox, never in the test process; a wrong solution fails."""
    first = load_examples("humaneval", "test", limit=1)[0]
    wrong = first.output.replace("return True", "return 0")
    results = run_programs([build_program(first, first.output), build_program(first, wrong)],
                           SANDBOX)
    assert [r.status for r in results] == ["passed", "failed"]


def test_mbpp():
    sizes = {s: len(load_examples("mbpp", s)) for s in DATASET_SPLITS["mbpp"]}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    every = [e for s in DATASET_SPLITS["mbpp"] for e in load_examples("mbpp", s)]
    assert_unique(every)
    assert all("\r" not in e.output and "\r" not in e.tests for e in every)
    test = load_examples("mbpp", "test")
    assert test[0].id == "mbpp-11" and test[-1].id == "mbpp-510"
    assert test[0].input.startswith("Your code should pass this test:\nassert ")
    by_id = {e.id: e for e in every}
    # setup code comes first in tests, which run after the code (it uses the code's classes)
    assert by_id["mbpp-367"].tests.startswith("root = Node(1)")
    [result] = run_programs([build_program(by_id["mbpp-367"], by_id["mbpp-367"].output)], SANDBOX)
    assert result.status == "passed", result.message


def test_mbpp_functions_are_mbpp_in_humaneval_shape():
    """The same tasks, splits and tests as mbpp; the instruction is a function to complete and
    the canonical program (that stub, then the reference code, then the tests) passes."""
    for split in DATASET_SPLITS["mbpp_functions"]:
        plain, shaped = load_examples("mbpp", split), load_examples("mbpp_functions", split)
        assert [(e.id, e.output, e.tests) for e in plain] == \
            [(e.id, e.output, e.tests) for e in shaped]
    by_id = {e.id: e for e in load_examples("mbpp_functions", "validation")}
    assert by_id["mbpp-518"].meta["prompt"] == (
        'import math\n\n\ndef sqrt_root(num):\n    """\n'
        "    Write a function to find the square root of a perfect number.\n"
        '    assert sqrt_root(4)==2\n    """\n')
    assert by_id["mbpp-518"].instruction == \
        "Complete the following Python function:\n" + by_id["mbpp-518"].meta["prompt"]
    assert by_id["mbpp-518"].input == "" and by_id["mbpp-518"].meta["entry_point"] == "sqrt_root"
    examples = list(by_id.values())
    body_only = "    return None\n"  # a completion that leaves the stub as it is: fails
    programs = [build_program(e, e.output) for e in examples] + \
        [build_program(examples[0], body_only)]
    statuses = [r.status for r in run_programs(programs, SANDBOX)]
    assert statuses == ["passed"] * len(examples) + ["failed"]


@pytest.mark.parametrize("code, message", [
    ("def f(:\n", "the reference code does not parse"),
    ("def g(x):\n    return x\n", "no top-level function of the reference code is called"),
])
def test_mbpp_functions_name_the_record_they_cannot_shape(tmp_path, code, message):
    record = {"task_id": 601, "text": "t", "code": code, "test_list": ["assert f(1) == 1"]}
    (tmp_path / "mbpp").mkdir()
    path = tmp_path / "mbpp" / "mbpp.jsonl"
    path.write_text(json.dumps({**record, "task_id": 602, "code": "def f(x):\n    return x\n"})
                    + "\n" + json.dumps(record) + "\n")
    assert len(load_examples("mbpp", "train", data_dir=str(tmp_path))) == 2
    with pytest.raises(DataError, match=message) as err:
        load_examples("mbpp_functions", "train", data_dir=str(tmp_path))
    check(err, path, 2, "code")


# ---------------------------------------------------------------- user JSONL

def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_jsonl_with_split(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [
        {"id": 1, "instruction": "add", "output": "a + b", "split": "train", "lang": "py"},
        "",
        {"id": "x", "instruction": "sub", "input": "a, b", "output": "a - b",
         "tests": "assert True", "split": "test"},
    ])
    train = load_examples(str(f), "train")
    test = load_examples(str(f), "test")
    assert ids(train) == ["1"] and ids(test) == ["x"]
    assert load_examples(str(f), "validation") == []
    assert train[0].meta["lang"] == "py" and train[0].meta["line"] == 1
    assert test[0].input == "a, b" and test[0].tests == "assert True" and test[0].meta["line"] == 3


def test_user_jsonl_without_split_is_carved(tmp_path):
    rows = [{"id": i, "instruction": f"task {i}", "output": f"x = {i}"} for i in range(30)]
    f = write_jsonl(tmp_path / "mine.jsonl", rows)
    splits = {s: ids(load_examples(str(f), s)) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 24, "validation": 3, "test": 3}
    assert sorted(sum(splits.values(), []), key=int) == [str(i) for i in range(30)]
    assert splits == {s: ids(load_examples(str(f), s)) for s in splits}


def test_all_is_every_record_of_a_file_or_a_built_in_set(tmp_path):
    rows = [{"id": i, "instruction": f"task {i}", "output": f"x = {i}"} for i in range(30)]
    f = write_jsonl(tmp_path / "mine.jsonl", rows)
    assert ids(load_examples(str(f), "all")) == [str(i) for i in range(30)]  # file order
    mbpp = load_examples("mbpp", "all")
    assert len(mbpp) == 974 and ids(mbpp)[:2] == ["mbpp-1", "mbpp-2"]
    assert ids(load_examples("humaneval", "all")) == ids(load_examples("humaneval", "test"))


def test_user_jsonl_small_file_keeps_one_held_out_each(tmp_path):
    rows = [{"id": i, "instruction": "t", "output": "pass"} for i in range(3)]
    f = write_jsonl(tmp_path / "mine.jsonl", rows)
    assert [len(load_examples(str(f), s)) for s in ("train", "validation", "test")] == [1, 1, 1]


def test_user_jsonl_gz(tmp_path):
    f = tmp_path / "mine.jsonl.gz"
    with gzip.open(f, "wt") as out:
        record = {"id": "a", "instruction": "t", "output": "pass", "split": "test"}
        out.write(json.dumps(record) + "\n")
    assert ids(load_examples(str(f), "test")) == ["a"]


# ---------------------------------------------------------------- errors name file, line, field

def check(err: pytest.ExceptionInfo, path, line, field) -> None:
    e = err.value
    assert (e.path, e.line, e.field) == (None if path is None else str(path), line, field)
    if path is not None:
        assert str(e).startswith(f"{path}:{line}: " if line else f"{path}: ")


def test_missing_data_dir(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"data folder not found.*--data-dir.*DDPT_DATA_DIR") as err:
        resolve_data_dir(str(missing))
    check(err, missing, None, None)
    monkeypatch.setenv("DDPT_DATA_DIR", str(missing))
    with pytest.raises(DataError, match=r"from DDPT_DATA_DIR.*MANIFEST\.md") as err:
        load_examples("mbpp", "test")
    check(err, missing, None, None)


def test_missing_file(tmp_path):
    expected = tmp_path / "conala" / "conala-train.json"
    with pytest.raises(DataError, match=r"missing data file of data set 'conala'") as err:
        load_examples("conala", "train", data_dir=str(tmp_path))
    check(err, expected, None, None)


def test_missing_user_file(tmp_path):
    with pytest.raises(DataError, match="user data file not found") as err:
        load_examples(str(tmp_path / "none.jsonl"), "train")
    check(err, tmp_path / "none.jsonl", None, None)


def test_malformed_json_line(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": 1, "instruction": "a", "output": "b"}, "", '{"id": 2, "instruction": "a",'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON") as err:
        load_examples(str(f), "train")
    check(err, f, 3, None)


def test_missing_output_field(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": 1, "instruction": "a", "output": "b"}, {"id": 2, "instruction": "a"}])
    expected = r":2: field 'output': missing \(expected a non-empty string\)"
    with pytest.raises(DataError, match=expected) as err:
        load_examples(str(f), "train")
    check(err, f, 2, "output")


@pytest.mark.parametrize("row, field", [
    ({"id": 1, "instruction": "a", "output": 5}, "output"),
    ({"id": 1.5, "instruction": "a", "output": "b"}, "id"),
    ({"id": 1, "instruction": ["a"], "output": "b"}, "instruction"),
    ({"id": 1, "instruction": "a", "output": "b", "split": "dev"}, "split"),
    ([1, 2], None),
])
def test_wrong_type(tmp_path, row, field):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"id": 0, "instruction": "a", "output": "b"}, row])
    with pytest.raises(DataError, match="expected") as err:
        load_examples(str(f), "train")
    check(err, f, 2, field)


@pytest.mark.parametrize("tests, problem", [
    ("# a comment only\n", "hold no statement (only comments or blank lines)"),
    ("pass\n", "hold no statement that can fail (only `pass` or constants)"),
    ('"""a docstring"""\n...\n', "hold no statement that can fail"),
    ("assert f(1 ==\n", "do not parse"),
])
def test_tests_that_cannot_fail_are_refused_on_loading(tmp_path, tests, problem):
    """Tests with nothing that can fail would pass every program: refused with the file, the line,
    the record's id and the field, by the sandbox's own rule (pipeline/sandbox/cases.py)."""
    f = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "fine", "instruction": "a", "output": "b", "tests": "assert b"},
        {"id": "empty", "instruction": "a", "output": "b", "tests": "  \n"},  # blank: no tests
        {"id": "t3", "instruction": "a", "output": "b", "tests": tests}])
    with pytest.raises(DataError, match=f"record 't3': the tests {re.escape(problem)}") as err:
        load_examples(str(f), "train")
    check(err, f, 3, "tests")


def test_duplicate_id_names_both_lines(tmp_path):
    f = write_jsonl(tmp_path / "dup.jsonl", [
        {"id": "a", "instruction": "x", "output": "y"},
        {"id": "b", "instruction": "x", "output": "y"},
        {"id": "a", "instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"duplicate id 'a' \(lines 1 and 3\)") as err:
        load_examples(str(f), "train")
    check(err, f, 3, "id")


def test_mixed_split_presence(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": 1, "instruction": "x", "output": "y", "split": "train"},
        {"id": 2, "instruction": "x", "output": "y"},
        {"id": 3, "instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: field 'split': missing") as err:
        load_examples(str(f), "train")
    check(err, f, 2, "split")


def test_unknown_dataset():
    expected = r"unknown data set 'nope'.*conala, codealpaca, humaneval, mbpp"
    with pytest.raises(DataError, match=expected) as err:
        load_examples("nope", "train")
    check(err, None, None, None)


def test_unknown_split():
    with pytest.raises(DataError, match=r"unknown split 'dev'.*prompt, test, validation, train"):
        load_examples("mbpp", "dev")


def test_humaneval_has_only_test():
    with pytest.raises(DataError, match=r"humaneval has only a 'test' split"):
        load_examples("humaneval", "train")


def test_malformed_json_array_reports_record_line(tmp_path):
    (tmp_path / "conala").mkdir()
    f = tmp_path / "conala" / "conala-train.json"
    f.write_text('[\n  {\n    "intent": "a",\n    "snippet": "x"\n  },\n'
                 '  {\n    "intent": "b",\n    "snippet": 7\n  }\n]\n')
    with pytest.raises(DataError, match=r"conala-train\.json:6: field 'snippet'") as err:
        load_examples("conala", "train", data_dir=str(tmp_path))
    check(err, f, 6, "snippet")  # the second record starts on line 6
    f.write_text('[\n  {"intent": "a", "snippet": "x"},\n  {"intent": "b" "snippet": "y"}\n]\n')
    with pytest.raises(DataError, match="malformed JSON") as err:
        load_examples("conala", "train", data_dir=str(tmp_path))
    check(err, f, 3, None)
    f.write_text('[\n  {"intent": "a", "snippet": "x"}\n  {"intent": "b", "snippet": "y"}\n]\n')
    with pytest.raises(DataError, match="expected ',' or ']'") as err:
        load_examples("conala", "train", data_dir=str(tmp_path))
    check(err, f, 3, None)
    f.write_text('[\n  "just a string"\n]\n')
    with pytest.raises(DataError, match="record is a JSON str, expected an object") as err:
        load_examples("conala", "train", data_dir=str(tmp_path))
    check(err, f, 2, None)


def test_conala_null_rewritten_intent_in_tmp_file(tmp_path):
    (tmp_path / "conala").mkdir()
    rows = [{"intent": "title", "rewritten_intent": None, "snippet": "x", "question_id": 1},
            {"intent": "title", "rewritten_intent": "better", "snippet": "y", "question_id": 1}]
    (tmp_path / "conala" / "conala-test.json").write_text(json.dumps(rows, indent=2))
    test = load_examples("conala", "test", data_dir=str(tmp_path))
    assert [e.instruction for e in test] == ["title", "better"]
    assert ids(test) == ["conala-test-0", "conala-test-1"]


# ---------------------------------------------------------------- the evaluated tasks
def test_the_spread_sample_is_seeded_spread_and_prefix_stable():
    """data.eval_sample=spread: the same tasks every time for a seed, another set for another
    seed; spread over the whole split (no long unsampled stretch, unlike the first N); a sample
    of N holds every smaller one (resumes and comparisons of different sizes stay paired);
    listed in file order; 0 or N >= the split's size is all of it."""
    from pipeline.data.splits import spread_order, take_sample

    for count in (1, 2, 7, 90, 164, 500):
        assert sorted(spread_order(count, seed=3)) == list(range(count))
    tasks = [Example(f"t{i}", "x", "y") for i in range(164)]
    sample = take_sample(tasks, 32, "spread", seed=0)
    assert sample == take_sample(tasks, 32, "spread", seed=0)
    assert ids(sample) != ids(take_sample(tasks, 32, "spread", seed=1))
    positions = [int(task.id[1:]) for task in sample]
    assert positions == sorted(positions) and len(positions) == 32
    gaps = [b - a for a, b in zip([-1, *positions], [*positions, 164])]
    assert max(gaps) <= 2.7 * 164 / 32  # the three-gap bound; the first 32 leave a gap of 132
    for small, large in ((8, 16), (32, 64), (64, 163)):
        assert set(ids(take_sample(tasks, small, "spread", 0))) <= \
            set(ids(take_sample(tasks, large, "spread", 0)))
    assert take_sample(tasks, 32, "first", 0) == tasks[:32]
    assert take_sample(tasks, 0, "spread", 0) == tasks == take_sample(tasks, 500, "spread", 0)


def test_the_main_job_scores_a_spread_sample_of_each_test_set_and_records_it():
    """`make run`: 32 MBPP test tasks and 32 HumanEval tasks spread over each set (not tasks
    11-42 and HumanEval/0-31), named in the configuration MLflow records; the paper preset (and
    so smoke) keeps the first N, as its results were measured."""
    from pipeline.config import build_config
    from pipeline.data.splits import eval_examples
    from pipeline.studies.main_job import extra_config

    config = build_config("main")
    mbpp = ids(eval_examples(config.data))
    humaneval = ids(eval_examples(extra_config(config, "humaneval").data))
    assert len(mbpp) == len(humaneval) == 32
    assert mbpp != [f"mbpp-{i}" for i in range(11, 43)]
    assert int(mbpp[-1].split("-")[1]) > 480 and int(humaneval[-1].split("/")[1]) > 150
    flat = config.to_flat()
    assert (flat["data.eval_sample"], flat["data.sample_seed"]) == ("spread", 0)
    paper = build_config("paper").data
    assert paper.eval_sample == "first" and build_config("smoke").data.eval_sample == "first"
