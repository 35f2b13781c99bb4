"""``distributed.storage_path``: where Ray Train and Tune keep a job's checkpoints. Checked
before Ray starts: a bad or unreachable storage fails in seconds, naming the setting."""
import json
import subprocess
import sys
import time

import pytest

from helpers import free_port
from pipeline.config import ConfigError, RunConfig
from pipeline.distributed.storage import (
    RunStorage,
    check_fresh_storage,
    check_storage,
    record_storage,
    run_storage,
)


def config_with(storage_path):
    return RunConfig.from_flat({"distributed.storage_path": storage_path})


def test_the_default_is_ray_inside_the_output_folder(tmp_path):
    storage = run_storage(RunConfig(), tmp_path / "out", "train")
    assert storage == RunStorage(str(tmp_path / "out" / "ray"), "train")
    assert storage.location == f"{tmp_path}/out/ray/train"


def test_a_shared_storage_names_each_run_after_its_output_folder(tmp_path):
    config = config_with(str(tmp_path / "shared"))
    one = run_storage(config, tmp_path / "a" / "run", "train")
    other = run_storage(config, tmp_path / "b" / "run", "train")
    assert one.root == other.root == str(tmp_path / "shared")
    assert one.name.startswith("train-run-") and other.name.startswith("train-run-")
    assert one.name != other.name  # same folder name, different paths: different runs
    assert run_storage(config, tmp_path / "a" / "run", "train") == one  # stable for --resume
    uri = run_storage(config_with("s3://bucket/prefix/"), tmp_path / "a" / "run", "train")
    assert uri.root == "s3://bucket/prefix/" and uri.location.startswith("s3://bucket/prefix/t")


def test_a_local_storage_is_written_to_and_found_again(tmp_path):
    storage = run_storage(config_with(str(tmp_path / "new" / "folder")), tmp_path / "o", "train")
    check_storage(storage)  # creates the folder, writes and removes a probe
    assert (tmp_path / "new" / "folder").is_dir()
    assert list((tmp_path / "new" / "folder").iterdir()) == []
    check_fresh_storage(storage, resume=False, what="training run")
    (tmp_path / "new" / "folder" / storage.name).mkdir()
    with pytest.raises(ConfigError, match="earlier training run: pass --resume"):
        check_fresh_storage(storage, resume=False, what="training run")
    check_fresh_storage(storage, resume=True, what="training run")


@pytest.mark.parametrize("root, words", [
    ("foo://bucket/prefix", "pyarrow cannot open it"),
    ("/proc/ddpt-storage", "cannot write there"),
])
def test_a_bad_storage_fails_naming_the_setting(tmp_path, root, words):
    with pytest.raises(ConfigError, match=f"distributed.storage_path: {root}.*{words}"):
        check_storage(run_storage(config_with(root), tmp_path / "o", "train"))


def test_an_unreachable_bucket_fails_in_seconds(tmp_path):
    # An S3 endpoint on a loopback port where nothing listens: the client retries, then gives up.
    root = f"s3://bucket/p?endpoint_override=127.0.0.1:{free_port()}&scheme=http&region=x"
    started = time.monotonic()
    with pytest.raises(ConfigError, match="distributed.storage_path: s3://bucket/p"):
        check_storage(run_storage(config_with(root), tmp_path / "o", "train"), timeout=20)
    assert time.monotonic() - started < 25


def test_resume_keeps_the_storage_the_run_started_with(tmp_path):
    first = RunStorage(str(tmp_path / "shared"), "train-o-12345678")
    assert record_storage(tmp_path, first, resume=False) == first
    assert json.loads((tmp_path / "storage.json").read_text())["root"] == first.root
    assert record_storage(tmp_path, first, resume=True) == first
    other = RunStorage(str(tmp_path / "ray"), "train")
    with pytest.raises(ConfigError, match=rf"stored at {first.location}.*storage_path="):
        record_storage(tmp_path, other, resume=True)


def test_an_empty_storage_path_is_a_config_error():
    with pytest.raises(ConfigError, match="distributed.storage_path: must not be empty"):
        config_with(" ")


def test_ddpt_train_with_a_bad_storage_fails_before_ray_starts(tmp_path):
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--output", str(tmp_path / "o"),
         "--preset", "smoke", "--set", "model.name=tiny-llama",
         "--set", "distributed.storage_path=foo://nowhere/x"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distributed.storage_path: foo://nowhere/x" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr and "Ray: " not in proc.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "o" / "ray").exists()
