"""Writes tests/results_fixture/example.csv.gz and example.json: SYNTHETIC per-task records
(seeded random draws, not results of any run) for tests/test_results_page.py; run once from the
repository root, the files are committed. page.md is their page (`ddpt tables --results
tests/results_fixture --page tests/results_fixture/page.md`)."""
import json
import random
from pathlib import Path

from pipeline.scoring.task_records import TaskRecord, write_table

rng = random.Random(31)
folder = Path("tests/results_fixture")
rows = []
rates = {"baseline/manual": (0.05, 1.40, "greedy"),
         "prompt_tuning/prompt_tuning": (0.08, 1.30, "greedy"),
         "ddpt_conditional/ddpt_ddim": (0.30, 1.20, "ddim-3 eta=1 + greedy")}
for method, (rate, ce, chain) in rates.items():
    for seed in ([0] if method.startswith("baseline") else [0, 1, 2]):
        for task in range(40):
            passed = rng.random() < rate
            total = rng.randint(3, 7)
            rows.append(TaskRecord(method, seed, f"mbpp-{11 + task}",
                                   "passed" if passed else rng.choice(["failed", "error"]),
                                   round(ce + rng.gauss(0, 0.2) - task / 200, 4), chain,
                                   total if passed else rng.randint(0, total - 1), total))
write_table(folder / "example.csv.gz", rows)
(folder / "example.json").write_text(json.dumps({
    "reference": "baseline/manual",
    "facts": {"prompt_tuning/prompt_tuning": {"prompt_model_parameters": 23040,
                                              "prompt_norm": 14.7,
                                              "step_time_vs_prompt_tuning": 1.0},
              "ddpt_conditional/ddpt_ddim": {"prompt_model_parameters": 851136,
                                             "prompt_norm": 470.0,
                                             "step_time_vs_prompt_tuning": 1.12}}},
    indent=1, sort_keys=True) + "\n")
