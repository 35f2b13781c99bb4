"""DDPT training through real Ray Train workers with DeepSpeed ZeRO-3 on CPU (gloo), tracked
in MLflow on SQLite. Slow: each Ray start costs tens of seconds here."""
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from helpers import load_local_nodes, run_in_terminal

pytestmark = pytest.mark.slow
TINY = ["--preset", "smoke", "--no-progress", "--set", "model.name=tiny-llama",
        "--set", "data.max_train_examples=12", "--set", "train.batch_size=6",
        "--set", "train.lr=1e-2", "--set", "distributed.num_workers=2"]


def ddpt_train(output: Path, *extra: str, wait: bool = True):
    command = [sys.executable, "-m", "pipeline.cli", "train", "--output", str(output), *TINY,
               *extra]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def mlflow_run(output: Path):
    saved = json.loads((output / "mlflow_run.json").read_text())
    client = MlflowClient(saved["uri"])
    return client, client.get_run(saved["run_id"])


def steps_of(client, run, key="code_loss"):
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def test_zero3_two_workers_shard_learn_and_resume(tmp_path):
    """The per-task prompt model on two Train workers: the conditional denoiser, its EMA
    teacher (buffers, updated from the gathered ZeRO-3 parameters) and the condition statistics
    (all-reduced over the ranks' shards); a full restart continues with the saved teacher.
    (The unconditional model under ZeRO-3 on two workers: tests/test_two_nodes.py.)"""
    import torch

    from helpers import EXAMPLES, make_lm
    from pipeline.training.checkpoint import load_prompt_model

    out, shared = tmp_path / "run", tmp_path / "shared"
    # Checkpoints in a storage folder outside the output folder (as an NFS mount on a cluster),
    # and the per-task prompt model with its teacher.
    storage = ["--set", f"distributed.storage_path={shared}",
               "--set", "denoiser.condition=instruction",
               "--set", "train.objective=bootstrap_teacher"]
    # In a terminal, as a user runs it: the live training line, none of the libraries' noise.
    command = [sys.executable, "-m", "pipeline.cli", "train", "--output", str(out),
               *[a for a in TINY if a != "--no-progress"], "--set", "train.steps=24",
               "--set", "train.checkpoint_every=12", *storage]
    code, printed = run_in_terminal(command)
    assert code == 0, printed[-5000:]
    assert re.search(r"train run 24/24 \|.*\| loss \d+\.\d{3} · [\d.]+ ex/s", printed), printed
    assert re.search(r"train run 1\d/24 .* left", printed), printed  # time left, mid-run
    for noise in ("split(", "Loading weights", "FutureWarning", "Running Dataset",
                  "TrainController", "built successfully", "Creating initial MLflow"):
        assert noise not in printed, (noise, printed[-5000:])
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 24

    # Ray's run state went to the storage only; storage.json in the output points at it.
    pointer = json.loads((out / "storage.json").read_text())
    assert pointer["root"] == str(shared) and pointer["name"].startswith("train-run-")
    assert not (out / "ray").exists()
    saved = [p for p in (shared / pointer["name"]).glob("checkpoint_*") if p.is_dir()]
    assert len(saved) == 2  # num_to_keep
    first, _, _ = load_prompt_model(out / "checkpoint")

    # As if the driver had died after Ray persisted the checkpoint of step 24 and before its
    # steps reached MLflow (a lost head node): the restart logs them again, once.
    saved_run = json.loads((out / "mlflow_run.json").read_text())
    with sqlite3.connect(saved_run["uri"].removeprefix("sqlite:///")) as db:
        db.execute("DELETE FROM metrics WHERE step > 12")
    # A full restart: a longer schedule, continued from the last checkpoint in the storage.
    ddpt_train(out, "--resume", "--set", "train.steps=36", "--set", "train.checkpoint_every=12",
               *storage)
    client, run = mlflow_run(out)
    assert run.data.tags["ddpt.resumed_from_step"] == "24"
    assert steps_of(client, run) == list(range(1, 37))  # every step once, none twice
    # ZeRO-3: each of the 2 ranks holds exactly half of the frozen LM's elements.
    assert {m.value for m in client.get_metric_history(run.info.run_id, "lm_shard_share")} == {0.5}
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "code_loss")]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.1, losses

    # The MLflow run: flattened config as params, per-step curves, checkpoint and config.
    params = run.data.params
    assert params["distributed.num_workers"] == "2" and params["model.name"] == "tiny-llama"
    assert {"code_loss", "loss", "examples_per_second", "step_seconds"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "config.yaml"} <= artifacts
    files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "checkpoint/model.safetensors" in files and "checkpoint/optimizer.pt" not in files
    assert run.info.status == "FINISHED"

    # The saved prompt model: the teacher moved on after the restart, the condition statistics
    # came from the data, and two instructions get two prompts from the same noise.
    model, config, state = load_prompt_model(out / "checkpoint")
    assert state["step"] == 36 and config.train.objective == "bootstrap_teacher"
    assert model.conditional and float(model.denoiser.cond_scale.min()) > 0
    assert not torch.equal(model.denoiser.cond_mean, torch.zeros_like(model.denoiser.cond_mean))
    assert not torch.equal(first.teacher.out.weight, model.teacher.out.weight)
    lm = make_lm("tiny-llama")
    c = lm.condition(lm.collate(lm.encode(EXAMPLES[:2])))
    same_noise = [torch.Generator().manual_seed(0) for _ in range(2)]
    a, b = model.sample_directions(2, same_noise, steps=4, condition=c)
    assert not torch.allclose(a, b)


def test_a_killed_worker_restarts_from_the_last_checkpoint(tmp_path):
    """The one-node form of tests/test_two_nodes.py's lost node: run only where that test
    cannot (no network namespaces), so that the restart path is always covered once. Both check
    the same things (a restart from a committed checkpoint, every step once in MLflow, the last
    step exported); the two-node test kills a whole node (raylet and workers), this one a Train
    worker process. Running both cost 145 s of a 24-minute suite."""
    reason = load_local_nodes().available()
    if reason is None:
        pytest.skip("covered by tests/test_two_nodes.py, which runs on this machine")
    out = tmp_path / "run"
    # 100 steps of about 0.25 s: the kill comes at the second checkpoint (step 40), with 60
    # steps still to run.
    proc = ddpt_train(out, "--set", "train.steps=100", "--set", "train.checkpoint_every=20",
                      "--set", "train.log_every=50",
                      "--set", "distributed.max_failures=2", wait=False)
    try:
        victim = None
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            checkpoints = list((out / "ray" / "train").glob("checkpoint_*"))
            if len(checkpoints) >= 2:  # the first is committed: kill a worker process for real
                workers = [p for p in psutil.process_iter(["cmdline"])
                           if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
                if workers:
                    victim = workers[-1]
                    victim.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.2)
        assert victim is not None, "never saw a training worker to kill"
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-5000:]
    client, run = mlflow_run(out)
    assert "ddpt.resumed_from_step" in run.data.tags  # it really restarted from a checkpoint
    assert steps_of(client, run) == list(range(1, 101))  # and counted no step twice
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 100


def test_bad_tracking_uri_fails_before_ray_starts(tmp_path):
    # RAY_TMPDIR: a Ray started by this command would leave its session folder there
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--output", str(tmp_path / "o"), *TINY,
         "--set", "tracking.uri=foo://nowhere"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "RAY_TMPDIR": str(tmp_path / "ray_tmp")})
    assert proc.returncode == 2 and "foo://nowhere" in proc.stderr
    assert not (tmp_path / "o" / "ray").exists() and not (tmp_path / "ray_tmp").exists()
