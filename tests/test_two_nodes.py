"""Two Ray nodes on one machine, for real (cluster/local_nodes.py): network namespaces joined by
a veth pair, the worker node in a mount namespace where the job's output folders are hidden,
so only ``distributed.storage_path`` is shared, as on a cluster with node-local disks. MLflow is
a ``mlflow server`` on the head. A worker node is killed mid-run and replaced: training goes on
from the last checkpoint in the shared storage with every step once in MLflow, and the sampler
pool loses and duplicates no example. The head node is killed mid-training and a new cluster
started: the resubmitted job continues from the storage, every step once in MLflow."""
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import load_local_nodes, shared_data_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
local_nodes = load_local_nodes()

TINY = ["--preset", "smoke", "--no-progress", "--set", "model.name=tiny-llama",
        "--set", "data.max_train_examples=12", "--set", "train.batch_size=6",
        "--set", "train.lr=1e-2"]
READ_MLFLOW = """
import json, sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
run = client.get_run(sys.argv[2])
print(json.dumps({"steps": [m.step for m in client.get_metric_history(sys.argv[2], "code_loss")],
                  "shares": [m.value for m in client.get_metric_history(sys.argv[2],
                                                                        "lm_shard_share")],
                  "tags": run.data.tags, "status": run.info.status,
                  "artifacts": [a.path for a in client.list_artifacts(sys.argv[2], "checkpoint")]}))
"""
WAIT_HTTP = """
import sys, time, urllib.request
deadline = time.time() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2); break
    except OSError:
        if time.time() > deadline: raise
        time.sleep(0.5)
"""


@pytest.fixture()
def cluster(tmp_path):
    reason = local_nodes.available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable here: {reason}")
    outputs = tmp_path / "outputs"  # the driver's disk: hidden on the worker node
    outputs.mkdir()
    nodes = local_nodes.LocalNodes(tmp_path / "nodes", hidden=[outputs])
    try:
        nodes.start_head()
        nodes.add_worker()
        yield nodes, outputs
    finally:
        nodes.close()  # raises if a process, namespace, link or mount is left behind
        assert local_nodes.leftovers(nodes.prefix) == []


def mlflow_server(nodes, node: str, folder: Path) -> tuple[str, subprocess.Popen]:
    """``mlflow server`` on SQLite inside ``node`` (port 5000 of its address); its URL and
    process once it answers. ``nodes.close()`` stops it with the node's other processes."""
    folder.mkdir()
    ip = nodes.head_ip if node == "head" else nodes.worker_ip
    server = nodes.popen([sys.executable, "-m", "mlflow", "server", "--host", ip, "--port", "5000",
                          "--workers", "1", "--backend-store-uri",
                          f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
                          str(folder / "artifacts")], node=node,
                         env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=str(folder))
    uri = f"http://{ip}:5000"
    nodes.run([sys.executable, "-c", WAIT_HTTP, f"{uri}/health", "120"], node=node,
              check=True, timeout=150)
    return uri, server


def process_name(pid: int) -> str:
    """A process's first command-line word ("" once it has exited)."""
    try:
        return (psutil.Process(pid).cmdline() or [""])[0]
    except psutil.NoSuchProcess:
        return ""


def read_mlflow(nodes, uri: str, run_id: str) -> dict:
    """The run's ``code_loss`` steps, ``lm_shard_share`` values, tags, status and checkpoint
    artifacts, read from the server from inside the head node."""
    read = nodes.run([sys.executable, "-c", READ_MLFLOW, uri, run_id], capture_output=True,
                     text=True, timeout=120, cwd=str(REPO))
    assert read.returncode == 0, read.stderr[-3000:]
    return json.loads(read.stdout)


def submit(nodes, env: dict, *argv: str) -> subprocess.Popen:
    """``ray job submit --working-dir . -- python jobs/<command>.py ...`` from the head's
    namespace, as a user submits (it waits for the job and prints its log); Ray uploads the
    working dir and starts the entrypoint in its copy."""
    command, *rest = argv
    runtime_env = json.dumps({"env_vars": env})
    return nodes.popen([nodes.ray, "job", "submit", "--address", nodes.dashboard_url,
                        "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--",
                        sys.executable, f"jobs/{command}.py", *rest], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, cwd=str(REPO))


def wait_for(condition, job: subprocess.Popen, what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not condition():
        if job.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{job.stdout.read()[-5000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)


def test_training_and_sampling_survive_a_lost_node(cluster, tmp_path):
    nodes, outputs = cluster
    shared = tmp_path / "shared"  # the storage every node reaches (NFS on a cluster)
    uri, _ = mlflow_server(nodes, "head", tmp_path / "mlflow")
    data_dir = shared_data_dir().resolve()
    env = {"MLFLOW_TRACKING_URI": uri, "DDPT_DATA_DIR": str(data_dir)}

    # Training: one ZeRO-3 worker per node (gloo over the veth), checkpoints only in `shared`.
    out = outputs / "train"
    steps = 60
    job = submit(nodes, env, "train", "--output", str(out), *TINY,
                 "--set", f"train.steps={steps}", "--set", "train.checkpoint_every=10",
                 "--set", "train.log_every=100", "--set", "distributed.num_workers=2",
                 "--set", "distributed.placement_strategy=STRICT_SPREAD",
                 "--set", "distributed.max_failures=3",
                 "--set", f"distributed.storage_path={shared}")
    try:
        def checkpoints():
            return [p for p in shared.glob("train-*/checkpoint_*") if p.is_dir()]

        wait_for(lambda: len(checkpoints()) >= 2, job, "a second checkpoint")
        lost = nodes.worker_node_id
        dead_after = nodes.kill_worker()  # its raylet and workers, SIGKILL
        replacement = nodes.add_worker()
        printed, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, printed[-6000:]
    assert "succeeded" in printed.lower()
    assert replacement != lost and dead_after < 30
    assert not (out / "ray").exists()  # Ray's state is in the shared storage only
    seen = nodes.run(["ls", "-A", str(outputs)], node="worker", capture_output=True, text=True,
                     timeout=30)
    assert seen.returncode == 0 and seen.stdout == ""  # the worker node never saw the output
    pointer = json.loads((out / "storage.json").read_text())
    assert pointer["root"] == str(shared)

    # MLflow, read back from the server: every step exactly once, across the restart.
    saved = json.loads((out / "mlflow_run.json").read_text())
    assert saved["uri"] == uri
    run = read_mlflow(nodes, uri, saved["run_id"])
    assert run["steps"] == list(range(1, steps + 1)), run["steps"]
    assert int(run["tags"]["ddpt.resumed_from_step"]) >= 10  # it restarted from a checkpoint
    print(f"node marked dead {dead_after:.1f} s after the kill; training resumed from step "
          f"{run['tags']['ddpt.resumed_from_step']}")
    assert set(run["shares"]) == {0.5}  # two ranks, half the LM each
    assert run["status"] == "FINISHED" and "checkpoint/model.safetensors" in run["artifacts"]

    # The exported prompt model: loadable, and the last checkpoint's in the shared storage.
    import torch

    from pipeline.training.checkpoint import load_prompt_model

    exported = load_prompt_model(out / "checkpoint")[0]
    last = max(p for p in shared.glob(f"{pointer['name']}/checkpoint_*") if p.is_dir())
    stored = load_prompt_model(last / "prompt_model")[0]
    mine, theirs = exported.state_dict(), stored.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == steps

    # The sampler pool, an actor on each node; the worker node dies mid-run.
    samples = outputs / "sample"
    job = submit(nodes, env, "sample", "--output", str(samples), *TINY,
                 "--checkpoint", str(out / "checkpoint"), "--methods", "manual,ddpt",
                 "--set", "data.max_eval_examples=16", "--set", "eval.batch_size=2",
                 "--set", "pool.num_actors=2", "--set", "pool.cpus_per_actor=1",
                 "--set", "pool.scheduling=SPREAD")
    store = samples / "samples.jsonl"
    worker = nodes.worker_node_id
    try:
        def worker_wrote():
            lines = store.read_text().splitlines() if store.is_file() else []
            return any(json.loads(line).get("actor_node") == worker for line in lines)

        wait_for(worker_wrote, job, "a batch from the worker node's actor")
        nodes.kill_worker()
        printed, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, printed[-6000:]
    records = [json.loads(line) for line in store.read_text().splitlines()]
    keys = [(r["method"], r["id"]) for r in records]
    assert len(keys) == len(set(keys)) == 2 * 16  # every example exactly once per method
    assert {r["actor_node"] for r in records} == {nodes.head_node_id, worker}


def test_training_survives_a_lost_head(cluster, tmp_path):
    """The head node (GCS, raylet, dashboard, the job's driver and Train controller) is
    SIGKILLed mid-training; the worker node gives up on it by itself; a new head and worker
    start, and the job resubmitted with ``--resume`` continues from the last checkpoint in
    ``distributed.storage_path``. MLflow, a server on the worker node, has every step once."""
    nodes, outputs = cluster
    shared, out, steps = tmp_path / "shared", outputs / "train", 12
    uri, server = mlflow_server(nodes, "worker", tmp_path / "mlflow")
    env = {"MLFLOW_TRACKING_URI": uri, "DDPT_DATA_DIR": str(shared_data_dir().resolve())}
    argv = ["train", "--output", str(out), *TINY, "--set", f"train.steps={steps}",
            "--set", "train.checkpoint_every=4", "--set", "train.log_every=100",
            "--set", "distributed.num_workers=2", "--set", f"distributed.storage_path={shared}",
            "--set", "distributed.placement_strategy=STRICT_SPREAD"]
    job = submit(nodes, env, *argv)
    first_head = nodes.head_node_id
    try:
        # Ray wrote a checkpoint into its run state: the Train controller logs its steps to
        # MLflow right after this, and the kill may land before or after it does.
        wait_for(lambda: any(shared.glob("train-*/checkpoint_manager_snapshot.json")), job,
                 "a committed checkpoint")
        worker_gone = nodes.kill_head()  # the `ray job submit` client dies with it
    finally:
        if job.poll() is None:
            job.kill()
        job.communicate()
    assert worker_gone < 30  # the raylet's GCS reconnect timeout is 5 s (local_nodes.py)
    # The worker node's raylet and Train workers are gone; the MLflow server stays. So may the
    # node's two agents: they exit once they have told the GCS that the raylet died, which a
    # dead GCS never answers (Ray's publish_error_to_driver waits 60 s); close() ends them.
    mlflow = {server.pid, *(c.pid for c in psutil.Process(server.pid).children(recursive=True))}
    deadline = time.monotonic() + 15
    while left := [name for name in map(process_name, set(nodes.pids("worker")) - mlflow)
                   if name not in ("", "ray::DashboardAgent", "ray::RuntimeEnvAgent")]:
        assert time.monotonic() < deadline, left
        time.sleep(0.2)
    nodes.start_head()
    nodes.add_worker()
    job = submit(nodes, env, *argv, "--resume")
    try:
        printed, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, printed[-6000:]
    assert nodes.head_node_id != first_head
    saved = json.loads((out / "mlflow_run.json").read_text())
    run = read_mlflow(nodes, uri, saved["run_id"])
    assert run["steps"] == list(range(1, steps + 1)), run["steps"]  # each once, none lost
    resumed = int(run["tags"]["ddpt.resumed_from_step"])
    assert 4 <= resumed < steps and resumed % 4 == 0
    assert run["status"] == "FINISHED" and "checkpoint/model.safetensors" in run["artifacts"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == steps
    print(f"the worker node left {worker_gone:.1f} s after the head died; training resumed "
          f"from step {resumed}")
