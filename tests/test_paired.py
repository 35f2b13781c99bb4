"""Paired statistics wired into the comparisons: the reference is checked before any work, an
evaluation pairs its methods from its per-task table (metrics.json, MLflow, the printed table),
and an experiment pools each arm over seeds beside each seed's own figure."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.config import ConfigError, build_config
from pipeline.scoring.stats import as_metrics
from pipeline.scoring.task_records import (
    FILENAME,
    TaskRecord,
    compare_to_reference,
    read_table,
    write_table,
)
from pipeline.studies.experiment import aggregate
from pipeline.studies.experiment_paired import (
    RECORDS,
    markdown_paired,
    partner,
    read_paired,
    write_paired,
)
from pipeline.studies.paired import check_reference, is_paired_metric

REPO = Path(__file__).resolve().parent.parent


def test_the_reference_must_be_one_of_the_compared_methods(tmp_path, capsys):
    assert build_config().eval.reference_method == "manual"
    assert check_reference("manual", ["manual", "ddpt_ddim"]) == "manual"
    assert check_reference("manual", ["ddpt_ddim"]) is None  # one method: nothing to pair
    with pytest.raises(ConfigError, match=r"^eval\.reference_method: 'spa' is not one of the "
                       r"compared methods \['manual', 'ddpt'\]"):
        check_reference("spa", ["manual", "ddpt"])
    with pytest.raises(ConfigError, match=r"eval\.reference_method: 'nosuch' is not one of"):
        build_config(overrides=["eval.reference_method=nosuch"])
    for command, message in [
        (["run", "--preset", "smoke", "--set", "eval.methods=[prompt_tuning, ddpt_ddim]"],
         "eval.reference_method: 'manual' is not one of the compared methods"),
        (["evaluate", "--data", "mbpp", "--method", "canonical", "--method", "spa"],
         "eval.reference_method: 'manual' is not one of the compared methods"),
        (["experiment", "--spec", str(REPO / "experiments" / "smoke.yaml"), "--set",
          "eval.reference_method=spa"], "smoke.yaml: eval.reference_method: 'spa'")]:
        out = tmp_path / command[0]
        assert main([*command, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())  # nothing started


def test_evaluate_pairs_its_methods_from_the_per_task_table(tmp_path, capsys):
    """canonical against the manual prompt of the tiny random model, on two tasks of a user
    file: the table, metrics.json, MLflow and the printed table hold the same figures."""
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "ok", "instruction": "add", "output": "def add(a, b):\n    return a + b",
         "tests": "assert add(2, 3) == 5\nassert add(0, 0) == 0", "split": "test"},
        {"id": "ok2", "instruction": "neg", "output": "def neg(a):\n    return -a",
         "tests": "assert neg(2) == -2", "split": "test"}]))
    out = tmp_path / "out"
    assert main(["evaluate", "--preset", "smoke", "--data", str(data), "--method", "canonical",
                 "--method", "manual", "--output", str(out), "--no-progress",
                 "--set", "pool.backend=local", "--set", "execution.timeout_s=5"]) == 0
    printed = capsys.readouterr().out
    rows = read_table(out / FILENAME)
    assert [(r.method, r.task_id, r.code_ce is None) for r in rows] == [
        ("canonical", "ok", True), ("canonical", "ok2", True),
        ("manual", "ok", False), ("manual", "ok2", False)]
    assert [(r.status, r.cases_passed, r.cases_total) for r in rows[:2]] == [
        ("passed", 2, 2), ("passed", 1, 1)]
    assert {r.chain for r in rows} == {"canonical", "greedy"}
    figure = compare_to_reference(rows, "manual")["canonical"]["pass_at_1"]
    manual_passed = sum(r.status == "passed" for r in rows[2:])
    assert figure.difference == pytest.approx(1 - manual_passed / 2)
    assert set(compare_to_reference(rows, "manual")["canonical"]) == {"pass_at_1"}
    metrics = json.loads((out / "metrics.json").read_text())
    expected = as_metrics(figure)
    assert {k: v for k, v in metrics["canonical"].items() if is_paired_metric(k)} == \
        pytest.approx(expected, nan_ok=True)
    itself = {k: v for k, v in metrics["manual"].items() if is_paired_metric(k)}  # reference
    assert set(itself) == set(expected) and itself["pass_at_1_diff"] == 0
    assert itself["pass_at_1_diff_low"] == itself["pass_at_1_diff_high"] == 0
    run = json.loads((out / "evaluate_run.json").read_text())
    client = MlflowClient(tracking_uri=run["uri"])
    logged = client.get_run(run["run_id"]).data.metrics
    assert logged["canonical.pass_at_1_diff"] == pytest.approx(figure.difference)
    assert FILENAME in {a.path for a in client.list_artifacts(run["run_id"])}
    assert "paired against manual" in printed
    [line] = [line for line in printed.splitlines() if figure.format() in line]
    assert line.split()[:2] == ["canonical", "pass_at_1"]


def _rows(method: str, seeds: list[int], passes: int, ce: float, tasks: int = 12
          ) -> list[TaskRecord]:
    return [TaskRecord(method, seed, f"t{i:02d}", "passed" if i < passes + seed else "failed",
                       ce + i / 100 + seed / 50, "greedy", 1 if i < passes + seed else 0, 1)
            for seed in seeds for i in range(tasks)]


def test_an_experiment_pools_each_arm_over_seeds_beside_each_seed(tmp_path):
    """Run tables as `ddpt experiment` leaves them: the seed-free baseline once (seed 0), an
    arm in seeds 0 and 1; one arm's run scored other tasks (its figures are an error, not a
    crash)."""
    results = []
    for arm, method, seeds, passes, ce in [("baseline", "manual", [0], 1, 1.0),
                                           ("pt", "prompt_tuning", [0, 1], 4, 0.9),
                                           ("odd", "ddpt_ddim", [0], 2, 0.8)]:
        for seed in seeds:
            table = Path("mbpp") / arm / f"seed{seed}" / FILENAME
            rows = _rows(method, [seed], passes, ce, tasks=11 if arm == "odd" else 12)
            write_table(tmp_path / table, rows)
            results.append({"dataset": "mbpp", "eval_set": "mbpp", "arm": arm, "seed": seed,
                            "method": method, "task_records": str(table),
                            "metrics": {"prompt_model_parameters": 10.0 * len(arm)}})
    found = write_paired(tmp_path, results, aggregate(results), "manual")
    combined = read_table(tmp_path / RECORDS / "mbpp.csv.gz")
    assert {r.method for r in combined} == {"baseline/manual", "pt/prompt_tuning",
                                            "odd/ddpt_ddim"}
    sidecar = json.loads((tmp_path / RECORDS / "mbpp.json").read_text())
    assert sidecar["reference"] == "baseline/manual"
    assert sidecar["facts"]["pt/prompt_tuning"] == {"prompt_model_parameters": 20.0}
    [pt] = [row for row in found if row.method == "pt/prompt_tuning"]
    pair = [r for r in combined if r.method != "odd/ddpt_ddim"]
    pooled = compare_to_reference(pair, "baseline/manual")["pt/prompt_tuning"]
    assert pt.pooled == pooled and pt.pooled["pass_at_1"].n_seeds == 2
    assert pt.pooled["pass_at_1"].difference == pytest.approx((4 + 5) / 24 - 1 / 12)
    assert sorted(pt.seeds) == [0, 1] and pt.seeds[1]["pass_at_1"].test == "mcnemar-exact"
    assert pt.seeds[1]["pass_at_1"].difference == pytest.approx(5 / 12 - 1 / 12)
    [odd] = [row for row in found if row.method == "odd/ddpt_ddim"]
    assert "differ in 1 task(s)" in odd.error and not odd.pooled
    assert read_paired(tmp_path / "paired.json") == found
    table = markdown_paired(found, "mbpp")
    assert f"| pt/prompt_tuning | baseline/manual | pass_at_1 | {pooled['pass_at_1'].format()} | " \
        f"{pt.seeds[0]['pass_at_1'].format()} | {pt.seeds[1]['pass_at_1'].format()} |" in table
    assert "| odd/ddpt_ddim | baseline/manual | - | task records:" in table


def test_an_arm_is_paired_with_its_own_run_of_the_reference_where_it_has_one():
    labels = ["baseline/manual", "a/ddpt", "a/ddpt_ddim", "b/ddpt", "b/ddpt_ddim"]
    assert [partner(label, labels, "ddpt") for label in labels] == [
        "a/ddpt", None, "a/ddpt", None, "b/ddpt"]  # no baseline run of ddpt: none for a, b
    assert [partner(label, labels, "manual") for label in labels] == [
        None, *["baseline/manual"] * 4]
