"""Ray Tune sweeps: space files (fast), then real sweeps on the tiny model through Ray Tune, Ray
Train, DeepSpeed and MLflow (slow: every trial starts a Train run, tens of seconds here)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from helpers import EXAMPLES, make_lm
from pipeline.cli import main
from pipeline.config import ConfigError, RunConfig, build_config
from pipeline.data.loaders import DataError
from pipeline.data.splits import dev_examples
from pipeline.scoring.heldout import (
    heldout_code_loss,
    sharded_example_losses,
)
from pipeline.scoring.stats import mean_difference
from pipeline.studies.sweep import (
    SPACES_DIR,
    Sweep,
    TrialSummary,
    compare_to_best,
    default_space_file,
    format_trials,
    load_sweep,
    pick_best,
)
from pipeline.tracking import child_runs
from pipeline.training.dev_losses import dev_losses_record, read_dev_losses, write_dev_losses

REPO = Path(__file__).resolve().parent.parent
SMOKE_SPACE = REPO / "tune" / "smoke.yaml"


def write_space(folder: Path, data: dict, name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def space(**sections) -> dict:
    data = {"sweep": {"preset": "smoke", "eval_every": 2}, "fixed": {"train.steps": 4},
            "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
    return data


# ---- space files -------------------------------------------------------------------------------
def test_shipped_spaces_load():
    smoke = load_sweep(default_space_file("smoke"))
    assert smoke.base.model.name == "tiny-llama" and smoke.base.train.steps == 6
    assert len(smoke.space["train.lr"].values) * smoke.num_samples >= 4  # trials
    assert (smoke.asha.grace_period, smoke.asha.max_t, smoke.max_concurrent_trials) == (2, 6, 2)
    default = load_sweep(default_space_file("main"))
    assert default.base.model.name == "embedded" and default.max_concurrent_trials is None
    assert {"diffusion.schedule", "diffusion.timesteps", "denoiser.bottleneck",
            "denoiser.hidden_dim", "train.lr", "train.consistency_weight",
            "train.objective"} <= set(default.space)
    assert default.space["train.lr"].kind == "loguniform"
    # The command line's preset wins over the file's.
    with_smoke = load_sweep(default_space_file("main"), preset="smoke",
                            overrides=["train.steps=40"])
    assert with_smoke.base.model.name == "tiny-llama" and with_smoke.asha.max_t == 40


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_is_valid_and_chooses_on_a_dev_split(path):
    """Every space file loads (each value through the configuration's validation); none
    scores on a test split."""
    sweep = load_sweep(path)
    assert sweep.space and sweep.base.data.dev_split != "test"
    if path.name.startswith("mbpp_"):  # the table's: its budget, to the end, all 90 dev tasks
        base = sweep.base
        assert (base.data.dataset, base.data.dev_split, base.data.max_dev_examples) == \
            ("mbpp", "validation", 0)
        assert (base.train.steps, base.train.batch_size, sweep.asha.grace_period) == (28, 8, 28)


def test_values_are_typed_and_trial_configs_built(tmp_path):
    data = space(space={"train.lr": {"choice": ["3e-4", 1]},  # YAML 1.1 reads 3e-4 as text
                        "denoiser.bottleneck": {"randint": [2, 8]}},
                 fixed={"data.max_dev_examples": 4})
    sweep = load_sweep(write_space(tmp_path, data), overrides=["train.seed=3"])
    assert sweep.space["train.lr"].values == (3e-4, 1.0)
    assert sweep.base.train.seed == 3 and sweep.base.data.max_dev_examples == 4
    trial = sweep.trial_config({"train.lr": 3e-4, "denoiser.bottleneck": 5})
    assert (trial.train.lr, trial.denoiser.bottleneck, trial.train.eval_every) == (3e-4, 5, 0)
    run = sweep.runtime_config({"train.lr": 3e-4}, "sqlite:///x.db", "exp")
    assert (run.train.eval_every, run.train.log_every, run.train.checkpoint_every) == (2, 2, 2)
    assert (run.tracking.uri, run.tracking.experiment) == ("sqlite:///x.db", "exp")


@pytest.mark.parametrize("data, message", [
    (space(extra={"a": 1}), "top level: unknown key(s) ['extra']"),
    (space(sweep={"num_sample": 4}), "sweep: unknown key(s) ['num_sample']"),
    (space(space={"denoiser.botleneck": {"choice": [4]}}),
     "space: unknown config key 'denoiser.botleneck'; did you mean 'denoiser.bottleneck'?"),
    (space(fixed={"train.stepz": 4}), "fixed: unknown config key 'train.stepz'"),
    (space(space={"train.log_every": {"choice": [1]}}), "train.log_every is set by the sweep"),
    (space(space={"denoiser.bottleneck": {"choice": [8, -1]}}),
     "space.denoiser.bottleneck: -1 is not a valid value: denoiser.bottleneck: must be > 0"),
    (space(space={"diffusion.schedule": {"choice": ["cosien"]}}),
     "space.diffusion.schedule: 'cosien' is not a valid value"),
    (space(space={"train.lr": {"gaussian": [0, 1]}}), "space.train.lr: expected one of"),
    (space(space={"train.lr": {"loguniform": [0, 1e-2]}}), "must be > 0"),
    (space(space={"train.lr": {"uniform": [1e-2, 1e-3]}}), "needs low < high"),
    (space(space={"denoiser.hidden_dim": {"uniform": [16, 64]}}),
     "uniform draws floats, but denoiser.hidden_dim takes int: use randint or choice"),
    (space(space={"train.lr": {"randint": [1, 3]}}),
     "randint draws ints, but train.lr takes float: use uniform"),
    (space(space={"train.lr": {"choice": []}}), "choice needs a non-empty list"),
    (space(sweep={"asha": {"grace_period": 8}}), "grace_period: 8 is beyond max_t=4"),
    (space(sweep={"asha": {"reduction_factor": 1}}), "reduction_factor: must be a number > 1"),
    (space(sweep={"metric": "accuracy"}), "sweep.metric: 'accuracy' is not one of"),
    (space(sweep={"eval_every": 0}), "sweep.eval_every: must be an integer >= 1"),
    (space(sweep={"max_concurrent_trials": "many"}), "max_concurrent_trials: must be an integer"),
    (space(sweep={"preset": "huge"}), "sweep.preset: unknown preset 'huge'"),
    (space(fixed=None, space={"train.steps": {"choice": [4, 8]}}),
     "max_t: required when the space"),
    (space(fixed={"distributed.backend": "local"}), "distributed.backend must be 'ray'"),
    (space(space=None), "name at least one config key"),
    (space(fixed={"train.lr": 1e-3}), "['train.lr'] both fixed and searched"),
])
def test_bad_spaces_fail_naming_the_file_and_key(tmp_path, data, message):
    path = write_space(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value), str(err.value)


def test_bad_space_through_the_command_line(tmp_path, capsys):
    path = write_space(tmp_path, space(space={"denoiser.bottleneck": {"choice": [0]}}))
    assert main(["sweep", "--space", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "space.denoiser.bottleneck: 0 is not a valid value" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["sweep", "--space", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: space file not found" in capsys.readouterr().err


def test_a_combination_is_checked_when_the_trial_starts(tmp_path):
    data = space(space={"train.batch_size": {"choice": [4, 6]},
                        "distributed.num_workers": {"choice": [1, 4]}})
    sweep = load_sweep(write_space(tmp_path, data))
    assert sweep.trial_config({"train.batch_size": 6, "distributed.num_workers": 1})
    with pytest.raises(ConfigError, match="does not split evenly"):
        sweep.trial_config({"train.batch_size": 6, "distributed.num_workers": 4})


def test_missing_dev_split_fails_before_any_work(tmp_path):
    config = build_config("smoke", overrides=["data.dev_split=dev"])
    with pytest.raises(DataError, match=r"data.dev_split='dev': unknown split 'dev'"):
        dev_examples(config.data)
    humaneval = build_config("smoke", overrides=["data.dataset=humaneval"])
    with pytest.raises(DataError, match="humaneval has only a 'test' split"):
        dev_examples(humaneval.data)
    from pipeline.distributed.tune import run_sweep  # imports Ray; starts nothing

    sweep = load_sweep(SMOKE_SPACE, overrides=["data.dev_split=dev"])
    with pytest.raises(DataError, match="data.dev_split"):
        run_sweep(sweep, tmp_path / "out")
    assert not (tmp_path / "out" / "tune").exists()
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_concurrency_from_the_cluster(tmp_path):
    from pipeline.distributed.tune import concurrency  # imports Ray; starts nothing

    sweep = load_sweep(write_space(tmp_path, space(sweep={"max_concurrent_trials": "auto"})))
    assert sweep.max_concurrent_trials is None
    assert concurrency(sweep, {"CPU": 2.0}) == 2  # smoke: 1 worker x 0.5 CPU + 0.5 for data
    assert concurrency(sweep, {"CPU": 7.0}) == 7
    sweep.max_concurrent_trials = 3
    assert concurrency(sweep, {"CPU": 16.0}) == 3
    sweep.base.distributed.num_workers = 4  # 4 x 0.5 + 0.5 = 2.5 CPUs a trial
    with pytest.raises(ConfigError, match="a trial needs"):
        concurrency(sweep, {"CPU": 2.0})


def test_best_trial_prefers_trials_that_ran_to_the_end(tmp_path):
    sweep: Sweep = load_sweep(write_space(tmp_path, space()))
    trials = [TrialSummary("a", "stopped_early", {}, 2, 1.0),
              TrialSummary("b", "completed", {}, 4, 3.0),
              TrialSummary("c", "completed", {}, 4, 2.0),
              TrialSummary("d", "failed", {}, None, None, "boom")]
    assert pick_best(sweep, trials).trial_id == "c"
    sweep.mode = "max"
    assert pick_best(sweep, trials).trial_id == "b"
    assert pick_best(sweep, trials[:1]).trial_id == "a"  # none ran to the end
    assert pick_best(sweep, trials[3:]) is None


def test_trials_get_a_paired_interval_against_the_best(tmp_path):
    """Completed trials with per-task dev losses: their difference to the best trial, paired by
    task id (whatever the order), with the interval and p of scoring.stats; everything else
    shows a dash, the best trial 'reference'."""
    sweep: Sweep = load_sweep(write_space(tmp_path, space()))
    tasks = [f"task/{i}" for i in range(12)]
    best_losses = [1.0 + 0.1 * (i % 5) for i in range(12)]
    close = [v + (0.02 if i % 2 else -0.01) for i, v in enumerate(best_losses)]  # overlaps 0
    worse = [v + 0.3 + 0.01 * i for i, v in enumerate(best_losses)]  # clearly worse
    folders = {}
    for name, losses in (("best", best_losses), ("close", close), ("worse", worse),
                         ("early", worse)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        order = list(range(12)) if name == "best" else list(reversed(range(12)))
        write_dev_losses(folders[name], dev_losses_record(
            6, [tasks[i] for i in order], [losses[i] for i in order]))
    # An older sweep's record (no vs_best field) and a completed trial that kept no losses.
    old = TrialSummary(**{"trial_id": "old", "status": "completed", "params": {}, "step": 6,
                          "metric": 1.5, "error": None, "run_id": None})
    trials = [TrialSummary("best", "completed", {}, 6, sum(best_losses) / 12),
              TrialSummary("close", "completed", {}, 6, sum(close) / 12),
              TrialSummary("worse", "completed", {}, 6, sum(worse) / 12),
              TrialSummary("early", "stopped_early", {}, 2, 1.2), old,
              TrialSummary("failed", "failed", {}, None, None, "boom")]
    best = pick_best(sweep, trials)
    assert best.trial_id == "best"  # the selection rule is still the lowest mean
    compare_to_best(trials, best, lambda t: read_dev_losses(folders.get(t.trial_id, tmp_path)))
    by_id = {t.trial_id: t for t in trials}
    expected = mean_difference(close, best_losses, metric="dev_loss")
    assert by_id["close"].vs_best == expected and not expected.decided()
    assert by_id["worse"].vs_best.decided() and by_id["worse"].vs_best.low > 0
    assert by_id["worse"].vs_best.difference == pytest.approx(0.3 + 0.055)
    assert all(by_id[t].vs_best is None for t in ("best", "early", "old", "failed"))

    table = format_trials(sweep, trials, best).splitlines()
    assert "dev_loss - best [95% CI]" in table[0]
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line
            for line in table[2:]}
    assert expected.format(3) in rows["close"] and "(12 tasks" in rows["close"]
    assert "reference" in rows["best"]
    for name in ("early", "old", "failed"):
        assert " – " in rows[name] and "[" not in rows[name], rows[name]
    # trials.json: the interval as numbers; an older record reads as it was written.
    record = by_id["close"].record()
    assert record["vs_best"]["low"] == expected.low and record["vs_best"]["n_tasks"] == 12
    assert json.loads(json.dumps(old.record()))["vs_best"] is None


def test_malformed_dev_losses_fail_naming_the_file(tmp_path):
    assert read_dev_losses(tmp_path) is None  # none kept: no comparison, not an error
    (tmp_path / "dev_losses.json").write_text('{"ids": ["a", "a"], "losses": [1.0, 2.0]}')
    with pytest.raises(ValueError, match=r"dev_losses.json: task ids repeat"):
        read_dev_losses(tmp_path)
    (tmp_path / "dev_losses.json").write_text('{"ids": ["a"]}')
    with pytest.raises(ValueError, match=r"dev_losses.json: not a dev-losses record"):
        read_dev_losses(tmp_path)
    # In a sweep's summary a damaged file costs that trial its comparison, not the summary.
    good = tmp_path / "good"
    good.mkdir()
    write_dev_losses(good, dev_losses_record(6, ["a", "b"], [1.0, 2.0]))
    trials = [TrialSummary("good", "completed", {}, 6, 1.5),
              TrialSummary("bad", "completed", {}, 6, 1.6)]
    compare_to_best(trials, trials[0],
                    lambda t: read_dev_losses(good if t.trial_id == "good" else tmp_path))
    assert trials[1].vs_best is None


# ---- the dev loss --------------------------------------------------------------------------------
def _sharded_rank(rank: int, world: int, port: int, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    torch.manual_seed(0)
    lm = make_lm("tiny-llama")
    delta = torch.randn(lm.context_length, lm.hidden_size) * 0.1
    # One pass (the dev loss is its mean): the ranks' forwards are the test's slow part.
    results[rank] = sharded_example_losses(lm, lm.encode(EXAMPLES[:5]), delta, 2, rank,
                                           world).tolist()
    torch.distributed.destroy_process_group()


def test_sharded_dev_loss_equals_the_held_out_loss():
    """Two ranks with 3 and 2 of 5 examples (the short one pads) agree with one process: the
    mean, and each example's loss in the order of the examples."""
    torch.manual_seed(0)
    lm = make_lm("tiny-llama")
    delta = torch.randn(lm.context_length, lm.hidden_size) * 0.1
    expected = heldout_code_loss(lm, EXAMPLES[:5], delta, batch_size=2)
    encoded = lm.encode(EXAMPLES[:5])
    assert sharded_example_losses(lm, encoded, delta, 2).mean().item() == pytest.approx(expected)
    # The single-process per-example losses (batches [0, 1], [2, 3], [4]; the two ranks below
    # batch [0, 2], [4, pad] and [1, 3]: a mix-up of order or padding would show).
    each = torch.cat([lm.code_loss(lm.collate(encoded[i:i + 2]), delta, per_example=True)
                      for i in range(0, 5, 2)]).tolist()
    alone = sharded_example_losses(lm, encoded, delta, 2)
    assert alone.dtype == torch.float64 and alone.tolist() == pytest.approx(each, rel=1e-5)
    assert len(set(each)) == 5  # distinct losses: a permutation would show
    context = torch.multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    with socket.socket() as probe:  # a free port for the gloo rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [context.Process(target=_sharded_rank, args=(r, 2, port, results)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    assert results[0] == pytest.approx(each, rel=1e-5)
    assert results[1] == results[0]  # every rank holds every example's loss
    assert sum(results[0]) / 5 == pytest.approx(expected, rel=1e-5)


# ---- real sweeps -------------------------------------------------------------------------------
def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # RAY_ADDRESS=local: a local Ray of its own, never a cluster someone started on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory) -> Path:
    """`ddpt sweep --preset smoke --output DIR`, as a user types it: tune/smoke.yaml, with Ray's
    state in a storage folder outside the output (as on a cluster)."""
    out = tmp_path_factory.mktemp("sweep") / "smoke"
    shared = out.parent / "shared"
    proc = run_cli("--preset", "smoke", "--output", str(out), "--no-progress",
                   "--set", f"distributed.storage_path={shared}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "best: trial" in proc.stdout and "ddpt train --config" in proc.stdout
    (out.parent / "stdout.txt").write_text(proc.stdout)  # the trials table, for the tests
    # Tune's experiment state and every trial's Train run went to the storage only.
    stored = sorted(p.name.split("-")[0] for p in shared.iterdir())
    assert stored == ["train"] * 4 + ["tune"], stored
    assert not (out / "tune").exists() and not list(out.glob("trials/*/ray"))
    return out


def sweep_runs(out: Path):
    saved = json.loads((out / "sweep.json").read_text())
    client = MlflowClient(saved["uri"])
    return client, client.get_run(saved["run_id"]), child_runs(saved["uri"],
                                                                       saved["run_id"])


@pytest.mark.slow
def test_smoke_sweep_stops_trials_early_and_nests_mlflow_runs(smoke_sweep):
    trials = {t["trial_id"]: t for t in json.loads((smoke_sweep / "trials.json").read_text())}
    assert len(trials) == 4
    statuses = sorted(t["status"] for t in trials.values())
    assert "stopped_early" in statuses and "completed" in statuses, statuses
    # The grid fixes the order: the last trial's learning rate (1e-5) is the worst at step 2.
    last = trials[max(trials)]
    assert last["params"]["train.lr"] == 1e-5 and last["status"] == "stopped_early"
    assert last["step"] == 2

    client, parent, children = sweep_runs(smoke_sweep)
    assert parent.info.status == "FINISHED" and parent.data.tags["ddpt.role"] == "sweep"
    assert parent.data.params["sweep.asha.grace_period"] == "2"
    assert len(children) == 4  # one child per trial, none flat
    assert {c.data.tags["ddpt.trial_id"] for c in children} == set(trials)
    for child in children:
        trial = trials[child.data.tags["ddpt.trial_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.tags["ddpt.trial_status"] == trial["status"]
        assert child.data.params["train.lr"] == str(trial["params"]["train.lr"])
        assert child.data.params["diffusion.schedule"] == trial["params"]["diffusion.schedule"]
        dev = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "dev_loss")}
        if trial["status"] == "completed":
            assert sorted(dev) == [2, 4, 6]
        else:
            # Tune's stop is asynchronous: the trial may log the steps up to max_t before it
            # arrives (on a slow host, all of them), but never a step Tune did not allow.
            assert 2 in dev and trial["step"] in dev and set(dev) <= {2, 4, 6}
        assert dev[trial["step"]] == pytest.approx(trial["metric"])
        code_steps = [m.step for m in client.get_metric_history(child.info.run_id, "code_loss")]
        assert code_steps == sorted(set(code_steps)) and code_steps[0] == 1  # each step once


@pytest.mark.slow
def test_smoke_sweep_exports_the_best_configuration(smoke_sweep):
    trials = json.loads((smoke_sweep / "trials.json").read_text())
    completed = [t for t in trials if t["status"] == "completed"]
    best = min(completed, key=lambda t: t["metric"])
    client, parent, children = sweep_runs(smoke_sweep)
    assert parent.data.tags["ddpt.best_trial"] == best["trial_id"]
    assert parent.data.metrics["best_dev_loss"] == pytest.approx(best["metric"])
    best_file = smoke_sweep / "best_config.yaml"
    # The file `ddpt train --config` reads: the best trial's configuration...
    sweep = load_sweep(smoke_sweep / "space.yaml", preset="main",
                       config_file=str(smoke_sweep / "base_config.yaml"))
    assert RunConfig.load(best_file) == sweep.trial_config(best["params"])
    assert build_config("main", str(best_file)) == RunConfig.load(best_file)
    assert RunConfig.load(best_file).train.lr == best["params"]["train.lr"]
    # ... is what that trial trained, less the sweep's own bookkeeping.
    trained = RunConfig.load(smoke_sweep / "trials" / best["trial_id"] / "config.yaml")
    assert trained.train.eval_every == 2 and trained.tracking.experiment
    bookkeeping = ("train.eval_every", "train.log_every", "train.checkpoint_every",
                   "tracking.uri", "tracking.experiment")
    assert {k: v for k, v in trained.to_flat().items() if k not in bookkeeping} == \
        {k: v for k, v in RunConfig.load(best_file).to_flat().items() if k not in bookkeeping}
    # ... and is on the parent run as a tag and as an artifact.
    assert parent.data.tags["ddpt.best_config"] == best_file.read_text()
    best_child = next(c for c in children if c.data.tags["ddpt.trial_id"] == best["trial_id"])
    assert parent.data.tags["ddpt.best_run_id"] == best_child.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "space.yaml", "trials.json"} <= artifacts
    assert {"checkpoint", "config.yaml"} <= {a.path for a in
                                            client.list_artifacts(best_child.info.run_id)}


@pytest.mark.slow
def test_smoke_sweep_keeps_per_task_dev_losses_and_pairs_trials(smoke_sweep):
    """Each trial that ran to its last step kept its per-task dev losses (folder and MLflow);
    the table and trials.json pair each completed trial with the best."""
    trials = {t["trial_id"]: t for t in json.loads((smoke_sweep / "trials.json").read_text())}
    sweep = load_sweep(smoke_sweep / "space.yaml", preset="main",
                       config_file=str(smoke_sweep / "base_config.yaml"))
    dev_ids = [e.id for e in dev_examples(sweep.base.data)]
    assert len(dev_ids) == 8
    client, parent, children = sweep_runs(smoke_sweep)
    runs = {c.data.tags["ddpt.trial_id"]: c.info.run_id for c in children}
    best = parent.data.tags["ddpt.best_trial"]
    table = (smoke_sweep.parent / "stdout.txt").read_text()
    rows = {line[2:].split()[0]: line for line in table.splitlines()
            if line[:2] in ("* ", "  ") and line[2:].split()}
    assert set(rows) == set(trials)
    compared = 0
    for trial_id, trial in trials.items():
        folder = smoke_sweep / "trials" / trial_id
        saved = json.loads((folder / "dev_losses.json").read_text()) \
            if (folder / "dev_losses.json").is_file() else None
        artifacts = {a.path for a in client.list_artifacts(runs[trial_id])}
        if trial["status"] != "completed":
            # Stopped at a rung: not compared. (Tune's stop is asynchronous: on a slow host the
            # trial may still have reached its last step and kept its losses.)
            assert trial["vs_best"] is None and " – " in rows[trial_id]
            continue
        assert saved["ids"] == dev_ids and saved["step"] == 6
        assert sum(saved["losses"]) / 8 == pytest.approx(trial["metric"], rel=1e-6)
        assert "dev_losses.json" in artifacts
        if trial_id == best:
            assert trial["vs_best"] is None and "reference" in rows[trial_id]
            continue
        paired = trial["vs_best"]
        assert paired["n_tasks"] == 8 and paired["metric"] == "dev_loss"
        assert paired["low"] <= paired["difference"] <= paired["high"]
        assert paired["difference"] == pytest.approx(trial["metric"] - trials[best]["metric"])
        assert f"{paired['difference']:+.3f} [{paired['low']:+.3f}, {paired['high']:+.3f}]" \
            in rows[trial_id]
        compared += 1
    # Every completed trial but the best is paired. How many complete depends on when Tune's
    # asynchronous stops land (one on a slow host, two on a fast one); the pairing itself is
    # checked on fixed losses in test_trials_get_a_paired_interval_against_the_best.
    completed = [t for t in trials.values() if t["status"] == "completed"]
    assert completed and compared == len(completed) - 1


@pytest.fixture
def local_ray():
    """A local Ray of this test's own (never a cluster someone started on this machine)."""
    import ray

    from pipeline.distributed.session import use_local_ray_env

    use_local_ray_env()  # as ensure_ray starts a local Ray
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_resume_keeps_finished_trials(smoke_sweep, local_ray):
    """A second driver on the finished sweep (`--resume`): nothing re-runs, nothing doubles."""
    from pipeline.distributed.tune import run_sweep

    _, parent, children = sweep_runs(smoke_sweep)
    states = {p: p.stat().st_mtime_ns for p in smoke_sweep.glob("trials/*/checkpoint/state.json")}
    best = (smoke_sweep / "best_config.yaml").read_text()
    outcome = run_sweep(None, smoke_sweep, resume=True, progress=False)
    assert outcome.parent_run_id == parent.info.run_id and len(outcome.trials) == 4
    _, parent_after, children_after = sweep_runs(smoke_sweep)
    assert parent_after.info.status == "FINISHED"
    assert sorted(c.info.run_id for c in children_after) == \
        sorted(c.info.run_id for c in children)
    assert {p: p.stat().st_mtime_ns for p in states} == states  # no trial trained again
    assert (smoke_sweep / "best_config.yaml").read_text() == best
    # Without a sweep in the folder, --resume says so.
    assert main(["sweep", "--output", str(smoke_sweep / "nothing"), "--resume"]) == 2


@pytest.mark.slow
def test_broken_trials_are_recorded_and_the_sweep_goes_on(tmp_path, local_ray):
    """Trial 1 is a bad combination (batches of 6 over 4 workers), trial 2 asks for batches of
    128 of 64 training examples: each fails on its own, one after the other, and is recorded."""
    from ray.tune import ExperimentAnalysis

    path = write_space(tmp_path, {
        "sweep": {"preset": "smoke", "num_samples": 1, "eval_every": 2,
                  "max_concurrent_trials": 1},
        "fixed": {"train.steps": 2},
        "space": {"train.batch_size": {"grid": [6, 128]},
                  "distributed.num_workers": {"grid": [4]}},
    })
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no trial reported dev_loss"):
        main(["sweep", "--space", str(path), "--output", str(out), "--no-progress"])
    trials = {t["params"]["train.batch_size"]: t
              for t in json.loads((out / "trials.json").read_text())}
    assert [trials[b]["status"] for b in (6, 128)] == ["failed", "failed"]
    assert "does not split evenly" in trials[6]["error"]
    assert "training split has 64" in trials[128]["error"]

    # Tune recorded both failures (and ran the second trial after the first had failed) ...
    analysis = ExperimentAnalysis(str(out / "tune"))
    assert {t.trial_id: t.status for t in analysis.trials} == \
        {trials[6]["trial_id"]: "ERROR", trials[128]["trial_id"]: "ERROR"}
    # ... and so did MLflow: FAILED child runs with the error, under a finished parent.
    _, parent, children = sweep_runs(out)
    by_trial = {c.data.tags["ddpt.trial_id"]: c for c in children}
    assert set(by_trial) == {trials[6]["trial_id"], trials[128]["trial_id"]}
    for size, text in ((6, "does not split evenly"), (128, "training split has 64")):
        run = by_trial[trials[size]["trial_id"]]
        assert run.info.status == "FAILED" and run.data.tags["ddpt.trial_status"] == "failed"
        assert run.data.tags["error"].startswith("ConfigError: ") and text in run.data.tags["error"]
        assert run.data.params["train.batch_size"] == str(size)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == 2
    assert parent.data.tags["ddpt.best_trial"] == "none"
