"""The main job through the `ddpt` command: smoke preset end to end, resume, early errors."""
import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.config import build_config
from pipeline.scoring.results import ResultStore
from pipeline.scoring.task_records import FILENAME, read_table
from pipeline.tracking import child_runs

DDPT = [sys.executable, "-m", "pipeline.cli"]
SMOKE_METHODS = build_config("smoke").eval.methods
METRICS = {"bleu4", "codebleu", "meteor", "chrf", "rouge_l", "exact_match", "code_ce"}


def ddpt(*args, check=True):
    return subprocess.run([*DDPT, *args], capture_output=True, text=True, check=check,
                          timeout=600)


@pytest.mark.slow
def test_smoke_run_writes_metrics_and_samples(tmp_path):
    """The default path: both prompt models trained on Ray Train + ZeRO-3, every method
    generated on the Ray actor pool, one MLflow comparison."""
    out = tmp_path / "run"
    proc = ddpt("run", "--preset", "smoke", "--output", str(out), "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == list(SMOKE_METHODS)
    for values in metrics.values():
        assert METRICS <= set(values)
        assert all(0 <= values[m] <= 1 for m in METRICS - {"code_ce"})
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["method"] for s in samples} == set(SMOKE_METHODS)
    total = len(SMOKE_METHODS) * 8
    assert len(samples) == total and {"id", "method", "generation", "reference"} <= set(samples[0])
    assert "prompt_tuning" in proc.stdout and "codebleu" in proc.stdout  # the printed table
    assert "paired against manual" in proc.stdout  # and each method against the reference
    rows = read_table(out / FILENAME)  # the per-task table: a row per (method, task)
    assert len(rows) == total and {r.method for r in rows} == set(SMOKE_METHODS)
    assert all("code_ce_diff_low" in metrics[m] for m in SMOKE_METHODS if m != "manual")
    for name in ("ddpt", "prompt_tuning"):
        assert (out / name / "checkpoint" / "model.safetensors").is_file()
        assert (out / "interpret" / name / "nearest_tokens.json").is_file()
    for picture in ("interpret/directions.png", "interpret/positions.png", "charts/metrics.png",
                    "charts/training.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture

    # MLflow: the parent comparison run holds the training runs and one run per method.
    saved = json.loads((out / "mlflow_comparison.json").read_text())
    client = MlflowClient(saved["uri"])
    children = child_runs(saved["uri"], saved["run_id"])
    roles = sorted((c.data.tags["ddpt.role"], c.info.run_name) for c in children)
    assert roles == sorted([("train", "train-ddpt"), ("train", "train-prompt_tuning")]
                           + [("method", m) for m in SMOKE_METHODS])
    params = client.get_run(saved["run_id"]).data.params  # which tasks were scored
    assert (params["data.eval_sample"], params["data.sample_seed"]) == ("first", "0")
    train = next(c for c in children if c.info.run_name == "train-ddpt")
    assert [m.step for m in client.get_metric_history(train.info.run_id, "code_loss")] == \
        [1, 2, 3, 4]

    # A re-run with --resume keeps the samples and regenerates nothing that is done.
    store = ResultStore(out / "samples.jsonl")
    store.path.write_text("".join(line + "\n" for line in
                                  store.path.read_text().splitlines()[:-3]))
    ddpt("run", "--preset", "smoke", "--output", str(out), "--no-progress", "--resume",
         "--set", "pool.backend=local")
    again = ResultStore(out / "samples.jsonl").load()
    assert len(again) == total and len({(s["method"], s["id"]) for s in again}) == total
    assert len(child_runs(saved["uri"], saved["run_id"])) == len(children)  # runs re-used


@pytest.mark.parametrize("args, message", [
    (["--set", "train.steps=-1"], "train.steps: must be > 0"),
    (["--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--set", "data.dataset=nosuch"], "unknown data set 'nosuch'"),
    (["--set", "eval.metrics=[bleu4, bleu5]"], "unknown ['bleu5']"),
    (["--set", "eval.methods=[manual, ddpt_spa2]"],
     "eval.methods: unknown method(s) ['ddpt_spa2']"),
])
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, capsys, args, message):
    """The `ddpt` command in this process (the one-line CLI test below covers the script)."""
    code = main(["run", "--preset", "smoke", "--output", str(tmp_path / "o"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "ddpt").exists()  # nothing expensive started


def test_the_default_is_the_function_level_main_job():
    """`ddpt run` with no preset: trained on MBPP, judged on MBPP test and HumanEval by running
    the code, with the DDPT variant chosen on MBPP's validation split: the configuration's
    defaults; `paper` is the paper's set-up (CoNaLa, the unconditional DDPT)."""
    from pipeline.config import RunConfig

    main_job, paper = build_config(), build_config("paper")
    assert (main_job.data.dataset, main_job.data.train_split, main_job.data.eval_split,
            main_job.data.extra_eval) == ("mbpp", "train", "test", ["humaneval"])
    assert (main_job.denoiser.condition, main_job.train.objective,
            main_job.sample.prompts) == ("instruction", "unrolled", "per_example")
    assert main_job.eval.methods == ["manual", "prompt_tuning", "ddpt_ddim", "ddpt_spa"]
    assert main_job == RunConfig() and paper.data.dataset == "conala"
    assert (paper.denoiser.condition, paper.train.objective) == ("none", "bootstrap")


def test_the_script_lists_every_subcommand_with_its_help():
    """The installed `ddpt` script: every subcommand the parser defines is listed with its help
    line, and answers its own --help."""
    from pipeline.cli import build_parser

    [subparsers] = [a for a in build_parser()._actions if a.dest == "command"]
    out = " ".join(ddpt("--help").stdout.split())
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    assert set(helps) == {"run", "train", "sample", "compare", "sweep", "evaluate", "experiment",
                          "report", "tables", "config", "prepare"}
    for name, text in helps.items():
        assert f"{name} {' '.join(text.split())}" in out, name
    assert "--output" in ddpt("train", "--help").stdout
