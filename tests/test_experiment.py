"""Experiment specs: validation before any work, the runs they expand to, the table of mean and
std over seeds, and the whole `ddpt experiment` path on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.scoring.task_records import compare_to_reference, read_table
from pipeline.studies.experiment import aggregate, load_experiment, markdown_table
from pipeline.studies.experiment_paired import read_paired

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"


def write(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load(SMOKE.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            spec[section][name] = value
        else:
            spec[section] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_smoke_spec_expands_to_every_arm_and_seed():
    experiment = load_experiment(SMOKE)
    runs = [(d, a.name if a else None, s) for d, a, s in experiment.runs()]
    assert runs == [("mbpp", None, 0),  # seed by seed: every arm of seed 0 first
                    ("mbpp", "prompt_tuning", 0), ("mbpp", "ddpt_conditional", 0),
                    ("mbpp", "prompt_tuning", 1), ("mbpp", "ddpt_conditional", 1)]
    arm = experiment.arms[1]
    config = experiment.config("mbpp", arm, 1)
    assert config.train.seed == 1 and config.denoiser.condition == "instruction"
    assert config.data.extra_eval == ["humaneval"] and config.train.steps == 3


@pytest.mark.parametrize("changes, message", [
    ({"arms__bad": {"set": {"train.steps": -1}, "methods": ["ddpt_ddim"]}},
     "arms.bad: train.steps: must be > 0"),
    ({"arms__bad": {"set": {}, "methods": ["nosuch"]}}, "unknown method(s) ['nosuch']"),
    ({"arms__bad": {"set": {"train.method": "prompt_tuning"}, "methods": ["ddpt_ddim"]}},
     "methods use 'ddpt' but train.method is 'prompt_tuning'"),
    ({"datasets__broken": {"data.dataset": "mbpp", "denoiser.condition": "x"}},
     "datasets.broken + baselines: denoiser.condition"),
    ({"experiment__seeds": "zero"}, "experiment.seeds: a list of integers"),
    ({"experiment__baseline_methods": ["ddpt"]}, "need trained prompts"),
])
def test_a_bad_spec_fails_before_any_work_naming_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match="spec.yaml") as err:
        load_experiment(write(tmp_path, **changes))
    assert message in str(err.value)


def test_the_command_line_adds_fixed_settings_under_the_arms():
    """`ddpt experiment --set`: one more fixed setting for every run; an arm's own wins."""
    experiment = load_experiment(SMOKE, ["train.steps=5", "denoiser.condition=none"])
    tuning, ddpt = (experiment.config("mbpp", arm, 0) for arm in experiment.arms)
    assert tuning.train.steps == ddpt.train.steps == 5
    assert tuning.denoiser.condition == "none" and ddpt.denoiser.condition == "instruction"
    with pytest.raises(ConfigError, match="train.stepz"):
        load_experiment(SMOKE, ["train.stepz=5"])


def test_arms_runs_some_arms_and_names_an_unknown_one():
    """`ddpt experiment --arms`: the named arms only; 'baseline' adds the baseline methods."""
    only = load_experiment(SMOKE, only_arms=["ddpt_conditional"])
    assert [(a.name, s) for _, a, s in only.runs()] == [("ddpt_conditional", 0),
                                                         ("ddpt_conditional", 1)]
    with_baseline = load_experiment(SMOKE, only_arms=["baseline", "prompt_tuning"])
    assert [(a and a.name, s) for _, a, s in with_baseline.runs()] == [
        (None, 0), ("prompt_tuning", 0), ("prompt_tuning", 1)]
    with pytest.raises(ConfigError, match=r"no arm \['ddpt_typo'\].*'ddpt_conditional'"):
        load_experiment(SMOKE, only_arms=["ddpt_conditional", "ddpt_typo"])


def test_rows_are_mean_and_std_over_seeds():
    results = [{"eval_set": "mbpp", "arm": "a", "method": "m", "metrics": {"x": v}}
               for v in (1.0, 2.0, 3.0)]
    [row] = aggregate(results)
    assert row.seeds == 3 and row.mean["x"] == 2.0 and row.std["x"] == pytest.approx(1.0)
    assert "| a | m | 3 | 2.000 ± 1.000 |" in markdown_table([row], ["x"], "mbpp")


@pytest.mark.slow
def test_the_smoke_experiment_runs_resumes_and_tabulates(tmp_path):
    out = tmp_path / "exp"
    assert main(["experiment", "--spec", str(SMOKE), "--output", str(out), "--no-progress"]) == 0
    tables = (out / "tables.md").read_text()
    assert "## mbpp" in tables and "## humaneval" in tables
    assert "| ddpt_conditional | ddpt_ddim (ddim-10 eta=0 + greedy) | 2 |" in tables
    for eval_set in ("mbpp", "humaneval"):  # every metric per arm, error bars over the seeds
        assert (out / "charts" / f"{eval_set}_metrics.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (1 + 2 + 2)  # (baseline + 2 arms x 2 seeds) x 2 evaluation sets
    # One combined per-task table per evaluation set; each arm against the baseline's manual
    # prompt pooled over both seeds (tasks x seeds), beside each seed's own figure.
    rows = read_table(out / "task_records" / "humaneval.csv.gz")
    assert sorted({(r.method, r.seed) for r in rows}) == [
        ("baseline/manual", 0), ("ddpt_conditional/ddpt_ddim", 0),
        ("ddpt_conditional/ddpt_ddim", 1), ("prompt_tuning/prompt_tuning", 0),
        ("prompt_tuning/prompt_tuning", 1)] and len(rows) == 5 * 3
    found = {(r.eval_set, r.method): r for r in read_paired(out / "paired.json")}
    ddpt = found[("humaneval", "ddpt_conditional/ddpt_ddim")]
    pooled = compare_to_reference([r for r in rows if "prompt_tuning" not in r.method],
                                  "baseline/manual")["ddpt_conditional/ddpt_ddim"]
    assert ddpt.pooled == pooled and pooled["code_ce"].n_seeds == 2 and sorted(ddpt.seeds) == [
        0, 1]
    assert f"| {pooled['code_ce'].format()} | {ddpt.seeds[0]['code_ce'].format()} |" in tables
    # Each arm's training facts beside its table, the prompt's last-step norm among them.
    facts = json.loads((out / "task_records" / "mbpp.json").read_text())["facts"]
    assert facts["baseline/manual"] == {}
    assert facts["ddpt_conditional/ddpt_ddim"]["prompt_norm"] > 0
    assert facts["prompt_tuning/prompt_tuning"]["prompt_model_parameters"] > 0
    saved = json.loads((out / "experiment_run.json").read_text())
    logged = MlflowClient(saved["uri"]).get_run(saved["run_id"]).data.metrics
    assert logged["humaneval.ddpt_conditional/ddpt_ddim.code_ce_diff"] == pytest.approx(
        pooled["code_ce"].difference)
    assert main(["experiment", "--spec", str(SMOKE), "--output", str(out)]) == 2  # no --resume
    # A resume with other --set settings would mix two configurations in one table.
    assert main(["experiment", "--spec", str(SMOKE), "--output", str(out), "--resume",
                 "--set", "train.lr=0.5"]) == 2
    # Lines written before a fact was kept (here: stripped of prompt_norm) get it from their run
    # folders when the experiment tabulates again.
    stripped = [json.loads(line) for line in lines]
    for result in stripped:
        result["metrics"].pop("prompt_norm", None)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    assert main(["experiment", "--spec", str(SMOKE), "--output", str(out), "--resume",
                 "--no-progress"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)  # none ran twice
    assert json.loads((out / "task_records" / "mbpp.json").read_text())["facts"] == facts


@pytest.mark.parametrize("spec", sorted((REPO / "experiments").glob("*.yaml")),
                         ids=lambda path: path.name)
def test_every_shipped_spec_is_valid(spec):
    """Every run of every shipped spec passes the configuration's validation; selection specs
    never score on a test split."""
    experiment = load_experiment(spec)
    runs = list(experiment.runs())
    assert runs
    for dataset, arm, seed in runs:
        config = experiment.config(dataset, arm, seed)
        if "dev" in spec.stem:
            assert config.data.eval_split != "test" and not config.data.extra_eval


TABLE = REPO / "experiments" / "mbpp_humaneval_table.yaml"


def test_the_table_spec_scores_every_test_task_over_three_seeds_with_tuned_matched_arms():
    """Issue 31's table: all 500 MBPP test and 164 HumanEval tasks, 3 seeds, the manual prompt,
    every arm's settings from a sweep on MBPP's dev split at the arm's own budget, the
    controls of the conditional claim at the conditional arm's parameter count (within 1%)."""
    from pipeline.data.splits import eval_examples
    from pipeline.studies.main_job import extra_config
    from pipeline.studies.sweep import load_sweep
    from pipeline.training.prompt_models import PROMPT_MODELS, LMFacts, parameter_count

    experiment = load_experiment(TABLE)
    assert experiment.seeds == [0, 1, 2] and experiment.baseline_methods == ("manual",)
    arms = {arm.name: arm for arm in experiment.arms}
    config = experiment.config("mbpp", arms["ddpt_conditional"], 0)
    assert len(eval_examples(config.data)) == 500
    assert len(eval_examples(extra_config(config, "humaneval").data)) == 164
    # SPA on top of the conditional arm: the same training, its own arm so that it can run later
    assert arms["ddpt_conditional_spa"].methods == ("ddpt_spa",)
    assert experiment.config("mbpp", arms["ddpt_conditional_spa"], 0) == config
    for arm in arms.values():
        run = experiment.config("mbpp", arm, 0)
        assert (run.train.steps, run.train.batch_size) == (28, 8)
        sweep = load_sweep(arm.sweep)
        assert sweep.base.data.dev_split == "validation" and sweep.base.data.max_dev_examples == 0
        assert sweep.asha.grace_period == sweep.asha.max_t == 28  # no trial stopped early
        assert {"train.lr", "train.prompt_tuning_lr"} & set(sweep.space)
    # n = 18 context tokens and d = 576: the embedded model's (SmolLM2-135M-Instruct)
    counts = {name: parameter_count(PROMPT_MODELS["ddpt"].build(
        experiment.config("mbpp", arms[name], 0), LMFacts(18, 576, 3.2, torch.zeros(18, 576))))
        for name in ("ddpt_conditional", "ddpt_unconditional",
                     "ddpt_unconditional_deterministic", "ddpt_deterministic")}
    assert all(abs(count / counts["ddpt_conditional"] - 1) < 0.01 for count in counts.values()), \
        counts
    lr = load_sweep(arms["prompt_tuning"].sweep).space["train.prompt_tuning_lr"].values
    assert max(lr) >= 0.3 and min(lr) <= 1e-3  # Lester et al.'s 0.3, and the old shared 1e-3


@pytest.mark.parametrize("arm, message", [
    ({"set": {"train.method": "prompt_tuning", "train.prompt_tuning_lr": 0.1,
              "train.prompt_init": "context", "train.steps": 64}, "methods": ["prompt_tuning"]},
     "trains another model than the arm: train.steps: 28 in the sweep, 64 here"),
    ({"set": {"train.method": "prompt_tuning", "train.prompt_tuning_lr": 0.1},
      "methods": ["prompt_tuning"]},
     "searches ['train.prompt_init']; set them in the arm's 'set'"),
])
def test_an_arm_must_be_the_model_its_sweep_tuned(tmp_path, arm, message):
    spec = yaml.safe_load(TABLE.read_text())
    spec["arms"] = {"tuned": {**arm, "sweep": str(REPO / "tune" / "mbpp_prompt_tuning.yaml")}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"spec.yaml: arms.tuned.sweep: .*") as err:
        load_experiment(path)
    assert message in str(err.value)
