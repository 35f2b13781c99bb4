"""Programs from data, execution scoring into the results store, and ``ddpt evaluate``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.config import ExecutionConfig, RunConfig
from pipeline.data.example import Example
from pipeline.data.loaders import load_examples
from pipeline.scoring.execution import build_program, program_for, score_execution
from pipeline.scoring.results import ResultStore
from pipeline.studies.evaluate_job import run_evaluate

FAST = ExecutionConfig(timeout_s=5.0, cpu_s=5, workers=2)
PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n'
HUMANEVAL_LIKE = Example(
    "he/0", "Complete", PROMPT + "    return sum(xs)\n",
    tests="def check(candidate):\n    assert candidate([1, 2]) == 3\n\ncheck(total)\n",
    meta={"prompt": PROMPT, "entry_point": "total"})


def test_build_program_for_completions_and_full_functions():
    completion = build_program(HUMANEVAL_LIKE, "    return sum(xs)\n")
    assert completion.startswith(PROMPT + "    return sum(xs)\n")
    assert completion.rstrip().endswith("check(total)")
    # a full function keeps the prompt's imports (List) and replaces the stub
    full = build_program(HUMANEVAL_LIKE, "def total(xs: List[int]) -> int:\n    return 3\n")
    assert full.startswith(PROMPT) and "return 3" in full
    mbpp = Example("m", "x", "def f():\n    return 1", tests="import math\nassert f() == 1\n")
    assert build_program(mbpp, mbpp.output) == \
        "def f():\n    return 1\n\nimport math\nassert f() == 1\n"
    assert build_program(Example("u", "x", "y"), "print(1)") == "print(1)"  # no tests


def test_score_execution_with_samples_writes_statuses(tmp_path):
    examples = [HUMANEVAL_LIKE,
                Example("m/1", "double", "def d(x):\n    return 2 * x\n",
                        tests="assert d(2) == 4\n")]
    store = ResultStore(tmp_path / "samples.jsonl")
    store.append([
        {"id": "he/0", "method": "m", "generation": "    return sum(xs)\n", "reference": "",
         "samples": ["    return sum(xs)\n", "    return 0\n", "    return sum(xs) + 0\n"]},
        # the greedy generation is not among the samples: it is run on its own
        {"id": "m/1", "method": "m", "generation": "def d(x):\n    return x + x\n",
         "reference": "", "samples": ["def d(x):\n    return x\n", "def d(x):\n    while 1: pass\n",
                                      "def d(x):\n    return 2 * x\n"]},
    ])
    config = ExecutionConfig(timeout_s=20.0, cpu_s=1, workers=2, num_samples=3, ks=[1, 2, 3])
    metrics = score_execution(store, "m", examples, config)
    records = {r["id"]: r for r in store.load()}
    assert records["he/0"]["statuses"] == ["passed", "failed", "passed"]
    assert records["he/0"]["status"] == "passed" and records["he/0"]["exec_message"] == ""
    assert records["m/1"]["statuses"] == ["failed", "timeout", "passed"]
    assert records["m/1"]["status"] == "passed"
    assert metrics["pass_at_1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert metrics["pass_at_2"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["pass_at_3"] == 1.0
    assert (metrics["passed"], metrics["total"]) == (2, 2)
    # scored records are skipped on the next call: nothing is appended
    size = store.path.stat().st_size
    assert score_execution(store, "m", examples, config) == metrics
    assert store.path.stat().st_size == size
    with pytest.raises(ValueError, match="needs at least 4"):
        score_execution(store, "m", examples,
                        ExecutionConfig(num_samples=4, ks=[1]))


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_evaluates_a_user_file_and_logs_to_mlflow(tmp_path, capsys):
    data = _write_jsonl(tmp_path / "tasks.jsonl", [
        {"id": "ok", "instruction": "add", "output": "def add(a, b):\n    return a + b",
         "tests": "assert add(2, 3) == 5", "split": "test"},
        # a visible test of its own (test-time selection): the program passes it, not the tests
        {"id": "wrong", "instruction": "sub", "output": "def sub(a, b):\n    return a + b",
         "tests": "assert sub(3, 2) == 1", "visible_tests": "assert sub(0, 0) == 0",
         "split": "test"},
        {"id": "unused", "instruction": "x", "output": "x = 1", "split": "train"},
    ])
    out = tmp_path / "out"
    args = ["evaluate", "--data", str(data), "--method", "canonical", "--output", str(out),
            "--no-progress", "--set", "execution.timeout_s=5", "--set", "execution.workers=2",
            "--set", "execution.visible_selection=true",
            "--split", "test"]  # the file whole would include the untested train record
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "canonical: 1/2 passed" in printed
    assert f"2 of the 3 records of {data} judged (split 'test')" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    selection = {"select_pass_at_1": 0.5, "select_k": 1, "select_visible_tasks": 1,
                 "select_visible_found": 1}
    assert metrics == {"canonical": {"pass_at_1": 0.5, "passed": 1, "total": 2,
                                     "records_in_data": 3, **selection}}
    records = {r["id"]: r for r in ResultStore(out / "samples.jsonl").load()}
    assert {i: r["status"] for i, r in records.items()} == {"ok": "passed", "wrong": "failed"}
    assert records["wrong"]["exec_message"].startswith("AssertionError")
    assert records["ok"]["generation"] == records["ok"]["reference"]
    assert records["wrong"]["instruction"] == "sub"  # for `ddpt report`, without the data

    run = json.loads((out / "evaluate_run.json").read_text())
    client = MlflowClient(tracking_uri=run["uri"])
    logged = client.get_run(run["run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics == {"pass_at_1": 0.5, "passed": 1.0, "total": 2.0,
                                   "records_in_data": 3.0, **selection}
    assert logged.data.tags["ddpt.judged"] == \
        f"judged 2 of the 3 records of {data} (split 'test')"
    assert logged.data.params["data.dataset"] == str(data)
    assert logged.data.params["execution.timeout_s"] == "5.0"
    assert logged.data.tags["ddpt.isolation"] in ("bwrap", "process")
    assert {a.path for a in client.list_artifacts(run["run_id"])} >= {"metrics.json",
                                                                      "samples.jsonl", "charts"}
    assert main(["report", "--output", str(out)]) == 0  # the page: a card per task, its verdict
    page = (out / "report.html").read_text()
    assert page.count('class="verdict" style="background:#1a7f37">passed') == 1
    assert page.count('>failed</span>') == 1 and "AssertionError" in page

    # a second run needs --resume; with it, scored ids are skipped
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    size = (out / "samples.jsonl").stat().st_size
    assert main([*args, "--resume"]) == 0
    assert (out / "samples.jsonl").stat().st_size == size
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_a_user_file_without_splits_is_judged_whole_unless_a_split_is_asked(tmp_path,
                                                                             capsys):
    """`ddpt evaluate --data my.jsonl`: every record of a file whose records have no split
    (not the carved test tenth), and the output (and MLflow) says how many of how many."""
    data = _write_jsonl(tmp_path / "mine.jsonl", [
        {"id": i, "instruction": f"give {i}", "output": f"def f():\n    return {i}",
         "tests": f"assert f() == {i if i % 4 else -1}"} for i in range(8)])
    common = ["evaluate", "--data", str(data), "--no-progress", "--set", "execution.workers=2"]
    assert main([*common, "--output", str(tmp_path / "whole")]) == 0
    printed = capsys.readouterr().out
    assert f"8 of the 8 records of {data} judged (every split)" in printed
    assert "canonical: 6/8 passed" in printed  # ids 0 and 4 have wrong tests
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())["canonical"]
    assert (metrics["total"], metrics["records_in_data"]) == (8, 8)
    run = json.loads((tmp_path / "whole" / "evaluate_run.json").read_text())
    logged = MlflowClient(tracking_uri=run["uri"]).get_run(run["run_id"]).data
    assert logged.tags["ddpt.judged"] == f"judged 8 of the 8 records of {data} (every split)"
    assert (logged.metrics["total"], logged.metrics["records_in_data"]) == (8, 8)


def test_evaluate_asks_for_a_split_by_option_set_or_config_file(tmp_path):
    """A split asked for by --split, --set data.eval_split or a --config file is what is
    judged; a built-in data set keeps data.eval_split (test); `ddpt run` keeps the carve."""
    from pipeline.cli import build_parser
    from pipeline.commands.evaluate import evaluate_config
    from pipeline.data.splits import eval_examples
    from pipeline.studies.evaluate_job import judged_line

    data = _write_jsonl(tmp_path / "mine.jsonl", [
        {"id": i, "instruction": "x", "output": "x = 1", "tests": "assert x"} for i in range(20)])
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  eval_split: validation\n")

    def judged(*extra: str) -> tuple[str, int]:
        args = build_parser().parse_args(["evaluate", "--data", str(data), *extra])
        config = evaluate_config(args)
        return config.data.eval_split, len(eval_examples(config.data))

    assert judged() == ("all", 20)
    assert judged("--split", "test") == ("test", 2)  # the carve: max(1, 20 // 10)
    assert judged("--set", "data.eval_split=train") == ("train", 16)
    assert judged("--config", str(config_file)) == ("validation", 2)
    assert judged("--limit", "3") == ("all", 3)  # 3 spread over the whole file
    args = build_parser().parse_args(["evaluate", "--data", str(data), "--limit", "3"])
    assert judged_line(evaluate_config(args), 3, 20) == \
        f"judged 3 of the 20 records of {data} (every split; 3 of it, spread (seed 0))"
    args = build_parser().parse_args(["evaluate", "--data", "humaneval"])
    assert evaluate_config(args).data.eval_split == "test"
    assert RunConfig().with_overrides([f"data.dataset={data}"]).data.eval_split == "test"


def test_bad_inputs_fail_before_work_naming_the_problem(tmp_path, capsys):
    untested = _write_jsonl(tmp_path / "untested.jsonl", [
        {"id": 1, "instruction": "a", "output": "x = 1", "tests": "assert x == 1", "split": "test"},
        {"id": 2, "instruction": "b", "output": "y = 2", "split": "test"},
    ])
    cases = [(["--data", "nosuchset"], "unknown data set 'nosuchset'"),
             (["--data", str(tmp_path / "missing.jsonl")], "user data file not found"),
             (["--data", str(untested)], f"{untested}:2: field 'tests': 1 of 2 examples"),
             (["--data", str(untested), "--method", "oracle"], "--method: unknown ['oracle']"),
             (["--data", str(untested), "--set", "execution.isolation=jail"],
              "execution.isolation: 'jail' is not one of")]
    for extra, message in cases:
        out = tmp_path / "out"
        assert main(["evaluate", *extra, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "samples.jsonl").exists()


def _canonical(dataset: str, tmp_path: Path) -> dict:
    config = RunConfig().with_overrides([f"data.dataset={dataset}", "data.max_eval_examples=0"])
    return run_evaluate(config, tmp_path / dataset)["canonical"]


@pytest.mark.slow
def test_canonical_humaneval_passes_all(tmp_path):
    metrics = _canonical("humaneval", tmp_path)
    assert (metrics["passed"], metrics["total"], metrics["pass_at_1"]) == (164, 164, 1.0)


@pytest.mark.slow
def test_canonical_mbpp_test_split_passes_all(tmp_path):
    metrics = _canonical("mbpp", tmp_path)
    assert len(load_examples("mbpp", "test")) == 500
    assert (metrics["passed"], metrics["total"], metrics["pass_at_1"]) == (500, 500, 1.0)


def test_lone_surrogates_from_a_program_or_the_data_lose_no_verdict(tmp_path, capsys):
    """A failure message holding chr(0xDCFF), and a record whose output holds one: every verdict
    of the batch is stored (escaped), and --resume reads them back."""
    data = tmp_path / "tasks.jsonl"
    data.write_text(
        '{"id": "ok", "instruction": "a", "output": "def f():\\n    return 1", '
        '"tests": "assert f() == 1", "split": "test"}\n'
        '{"id": "message", "instruction": "b", "output": "def f():\\n    raise '
        'ValueError(chr(0xDCFF))", "tests": "assert f() == 1", "split": "test"}\n'
        '{"id": "output", "instruction": "c\\udcff", "output": "x = \\"\\udcff\\"\\ndef f():'
        '\\n    return 1", "tests": "assert f() == 1", "split": "test"}\n')
    out = tmp_path / "out"
    args = ["evaluate", "--data", str(data), "--method", "canonical", "--output", str(out),
            "--no-progress", "--set", "execution.workers=2"]
    assert main(args) == 0
    assert "canonical: 1/3 passed" in capsys.readouterr().out
    records = {r["id"]: r for r in ResultStore(out / "samples.jsonl").load()}
    assert {i: r["status"] for i, r in records.items()} == \
        {"ok": "passed", "message": "error", "output": "error"}
    assert records["message"]["exec_message"].startswith("ValueError: \\udcff")
    assert records["output"]["instruction"] == "c\udcff"  # stored escaped, read back as it was
    assert (out / "samples.jsonl").read_bytes().decode("utf-8")  # the file is valid UTF-8
    size = (out / "samples.jsonl").stat().st_size
    assert main([*args, "--resume"]) == 0
    assert (out / "samples.jsonl").stat().st_size == size
    assert main(["report", "--output", str(out)]) == 0  # the page shows them escaped
    assert "c\\udcff" in (out / "report.html").read_bytes().decode("utf-8")


def test_score_execution_stores_test_cases(tmp_path):
    """Each assert of an MBPP-style task is a case of its own: one failing assert does not hide
    the others; pass@1 still needs all of them."""
    example = Example("m/2", "double", "def d(x):\n    return 2 * x\n",
                      tests="assert d(1) == 2\nassert d(2) == 4\nassert d(-1) == -2\n")
    store = ResultStore(tmp_path / "samples.jsonl")
    store.append([{"id": "m/2", "method": "m", "reference": "",
                   "generation": "def d(x):\n    return abs(2 * x)\n"}])
    metrics = score_execution(store, "m", [example], FAST)
    [record] = store.load()
    assert (record["status"], record["cases_passed"], record["cases_total"]) == ("failed", 2, 3)
    assert record["exec_message"].startswith("AssertionError (tests line 3")
    assert metrics["pass_at_1"] == 0.0


def test_program_for_judges_the_prompt_helpers_as_data():
    """HumanEval: the prompt is the judge's context; only the entry point comes from the
    program. MBPP: the reference's top-level names."""
    program = program_for(HUMANEVAL_LIKE, "    return sum(xs)\n")
    assert program.context == PROMPT and program.names == ("total",)
    assert program.code.startswith(PROMPT) and program.tests == HUMANEVAL_LIKE.tests
    mbpp = Example("m", "x", "import math\nclass Node:\n    pass\ndef f():\n    return 1\n",
                   tests="assert f() == 1\n")
    assert program_for(mbpp, mbpp.output).names == ("Node", "f", "math")
