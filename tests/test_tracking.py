"""The MLflow tracking layer against real MLflow on SQLite (no mocks), plus one real server."""
from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import free_port, start_mlflow_server
from pipeline.tracking import (
    RunTracker,
    TrackingError,
    check_tracking_uri,
    child_runs,
    flatten,
    resolve_tracking_uri,
)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its tables costs about 5 s."""
    return resolve_tracking_uri(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(autouse=True)
def _no_file_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_params_metrics_artifacts_round_trip(uri, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("a")
    (tmp_path / "out" / "sub").mkdir()
    (tmp_path / "out" / "sub" / "b.txt").write_text("b")
    (tmp_path / "single.txt").write_text("s")
    params = {f"p{i}": i for i in range(150)}  # more than one log_batch of params
    params["nested"] = {"lr": 0.001, "layers": [1, 2, 3]}
    with RunTracker.start(uri, "round-trip", "r1", params=params, tags={"kind": "test"}) as t:
        for step in range(3):
            t.log_metrics({"loss": 1.0 / (step + 1), "eval": {"bleu": 0.5}}, step=step)
        t.log_metrics({"nan": float("nan"), "skip": None, "text": "oops", "flag": True})
        t.log_artifact(tmp_path / "single.txt")
        t.log_artifacts(tmp_path / "out", artifact_path="outputs")
        t.log_dict({"x": [1, 2]}, "metrics.json")
        t.set_tag("stage", "done")

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == t.experiment_id
    assert run.info.run_name == "r1"
    assert run.data.params["p149"] == "149" and run.data.params["nested.lr"] == "0.001"
    assert run.data.params["nested.layers"] == "[1, 2, 3]"
    assert run.data.tags["kind"] == "test" and run.data.tags["stage"] == "done"
    m = run.data.metrics
    assert m["loss"] == pytest.approx(1 / 3) and m["eval.bleu"] == 0.5 and m["flag"] == 1.0
    assert math.isnan(m["nan"]) and "skip" not in m and "text" not in m
    history = client.get_metric_history(t.run_id, "loss")
    assert [(h.step, h.value) for h in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert {a.path for a in client.list_artifacts(t.run_id)} == {
        "single.txt", "outputs", "metrics.json"}
    assert {a.path for a in client.list_artifacts(t.run_id, "outputs/sub")} == {
        "outputs/sub/b.txt"}
    # artifacts live beside the database, not in ./mlruns under the working directory
    db_dir = Path(uri[len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts" / "round-trip").as_uri())
    assert (Path(client.download_artifacts(t.run_id, "metrics.json", str(tmp_path)))
            .read_text().replace(" ", "").replace("\n", "") == '{"x":[1,2]}')


def test_long_and_odd_param_values(uri):
    with RunTracker.start(uri, "params", params={"long": "x" * 7000, "items": ["a", "b"],
                                                 "tuple": (1, 2), "none": None}) as t:
        t.log_params({"path": Path("/tmp/x")})
    params = MlflowClient(tracking_uri=uri).get_run(t.run_id).data.params
    assert params["long"] == "x" * 6000
    assert params["items"] == '["a", "b"]' and params["tuple"] == "[1, 2]"
    assert params["none"] == "None" and params["path"] == "/tmp/x"


def test_parent_with_two_children(uri):
    with RunTracker.start(uri, "sweep", "parent") as parent:
        kids = []
        for i in range(2):
            with RunTracker.start(uri, "sweep", f"trial-{i}", params={"i": i},
                                  parent_run_id=parent.run_id) as child:
                child.log_metrics({"score": i})
            kids.append(child.run_id)
    found = child_runs(uri, parent.run_id)
    assert sorted(r.info.run_id for r in found) == sorted(kids)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.run_id for r in found)
    assert child_runs(uri, kids[0]) == []


def test_failure_marks_run_failed_and_reraises(uri):
    with pytest.raises(RuntimeError, match="boom"):
        with RunTracker.start(uri, "failures", "bad") as t:
            raise RuntimeError("boom " + "y" * 6000)
    run = MlflowClient(tracking_uri=uri).get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("RuntimeError: boom")
    assert len(run.data.tags["error"]) == 5000
    with pytest.raises(KeyboardInterrupt):
        with RunTracker.start(uri, "failures", "interrupted") as t:
            raise KeyboardInterrupt
    assert MlflowClient(tracking_uri=uri).get_run(t.run_id).info.status == "KILLED"


def test_resume_appends_to_the_same_run(uri):
    with RunTracker.start(uri, "resume", "job", params={"lr": 0.1}) as first:
        first.log_metrics({"loss": 2.0}, step=0)
        first.log_metrics({"loss": 1.5}, step=1)
    with RunTracker.resume(uri, first.run_id) as again:
        assert again.run_id == first.run_id and again.experiment_id == first.experiment_id
        assert MlflowClient(tracking_uri=uri).get_run(first.run_id).info.status == "RUNNING"
        again.log_params({"lr": 0.1})  # re-logging an unchanged param is allowed
        again.log_metrics({"loss": 1.0}, step=2)
    client = MlflowClient(tracking_uri=uri)
    assert [h.step for h in client.get_metric_history(first.run_id, "loss")] == [0, 1, 2]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    with pytest.raises(TrackingError, match="no-such-run"):
        RunTracker.resume(uri, "no-such-run")


def test_a_checkpoints_records_logged_again_are_kept_once(uri, tmp_path):
    """A Train controller that dies after Ray persisted a checkpoint may or may not have logged
    its records: the restored run logs them again, with the times the steps ran, and MLflow
    keeps each (key, value, step, time) once; a new time for a step would show it twice."""
    import json

    from ray.train import Checkpoint

    from pipeline.distributed.checkpoints import HISTORY_FILE, MLflowCommit

    records = [{"step": s, "code_loss": 1.0 / s, "time_ms": 1_700_000_000_000 + s}
               for s in (1, 2, 3)]
    (tmp_path / HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpoint = Checkpoint.from_directory(str(tmp_path))
    with RunTracker.start(uri, "relog", "train") as tracker:
        commit = MLflowCommit(tracker)
        commit.log_history(checkpoint)
        commit.log_history(checkpoint)  # the restored run, and the driver after the last
        tracker.log_metrics({"code_loss": 1.0}, step=1)  # the same step at another time
    history = MlflowClient(tracking_uri=uri).get_metric_history(tracker.run_id, "code_loss")
    seen = sorted((m.timestamp, m.step, m.value) for m in history)
    assert seen[:3] == [(1_700_000_000_000 + s, s, 1.0 / s) for s in (1, 2, 3)]
    assert len(seen) == 4  # steps 1, 2, 3 once each, and step 1 again at a new time


def test_tracker_pickles_as_uri_and_run_id(uri):
    tracker = RunTracker.start(uri, "pickle")
    copy = pickle.loads(pickle.dumps(tracker))
    copy.log_metrics({"from_worker": 1.0})
    tracker.end()
    assert copy.run_id == tracker.run_id and copy.uri == uri
    assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics == {
        "from_worker": 1.0}


def test_experiment_created_once(uri):
    a = RunTracker.start(uri, "same name/with slash")
    b = RunTracker.start(uri, "same name/with slash")
    a.end(), b.end("KILLED"), b.end("FAILED")  # a second end is a no-op
    assert a.experiment_id == b.experiment_id
    assert MlflowClient(tracking_uri=uri).get_run(b.run_id).info.status == "KILLED"
    with pytest.raises(ValueError, match="status"):
        a.end("DONE")


@pytest.mark.parametrize("bad", ["foo://x", "::::", "sqlite:/relative.db", "http://"])
def test_malformed_uris(bad):
    with pytest.raises(TrackingError) as err:
        check_tracking_uri(bad)
    assert repr(bad) in str(err.value)


def test_unreachable_server_fails_fast():
    bad = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match="no MLflow server answers") as err:
        check_tracking_uri(bad)
    assert time.monotonic() - start < 5 and bad in str(err.value)
    with pytest.raises(TrackingError):
        RunTracker.start(bad, "never")


def test_file_store_needs_env_var(tmp_path, monkeypatch):
    for bad in (f"file://{tmp_path}/mlruns", "mlruns"):
        with pytest.raises(TrackingError, match="MLFLOW_ALLOW_FILE_STORE") as err:
            check_tracking_uri(bad)
        assert repr(bad) in str(err.value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri(f"file://{tmp_path}/mlruns")


def test_sqlite_checks(tmp_path):
    fresh = tmp_path / "a" / "b"
    check_tracking_uri(f"sqlite:///{fresh}/mlflow.db")
    assert fresh.is_dir()
    (tmp_path / "blocker").write_text("a file where a folder should be")
    bad = f"sqlite:///{tmp_path}/blocker/sub/mlflow.db"
    with pytest.raises(TrackingError, match="cannot create") as err:
        check_tracking_uri(bad)
    assert repr(bad) in str(err.value)
    with pytest.raises(TrackingError, match="is a folder"):
        check_tracking_uri(f"sqlite:///{tmp_path}")
    for ok in ("postgresql://u@db/x", "mysql+pymysql://u@db/x", "databricks"):
        check_tracking_uri(ok)


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    out = tmp_path / "runs" / "x"
    assert resolve_tracking_uri(out) == f"sqlite:///{out.resolve()}/mlflow.db"
    assert out.is_dir()
    assert resolve_tracking_uri(out, "http://h:5000") == "http://h:5000"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(out) == "http://env:5000"
    assert resolve_tracking_uri(None, "sqlite:///explicit.db") == "sqlite:///explicit.db"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": 3}) == {"a.b": 1, "a.c.d": [2], "e": 3}
    assert flatten({"x": 1}, "p") == {"p.x": 1} and flatten({}) == {}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_mlflow_server(tmp_path):
    server, uri = start_mlflow_server(f"sqlite:///{tmp_path}/server.db",
                                      tmp_path / "artifacts", tmp_path)
    try:
        check_tracking_uri(uri)
        (tmp_path / "note.txt").write_text("hello")
        with RunTracker.start(uri, "served", "parent", params={"a": 1}) as parent:
            with RunTracker.start(uri, "served", "child", parent_run_id=parent.run_id) as child:
                child.log_metrics({"m": 2.0}, step=4)
                child.log_artifact(tmp_path / "note.txt")
        client = MlflowClient(tracking_uri=uri)
        assert client.get_run(parent.run_id).data.params == {"a": "1"}
        assert [r.info.run_id for r in child_runs(uri, parent.run_id)] == [child.run_id]
        assert [h.step for h in client.get_metric_history(child.run_id, "m")] == [4]
        assert [a.path for a in client.list_artifacts(child.run_id)] == ["note.txt"]
        assert list((tmp_path / "artifacts").rglob("note.txt"))
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
