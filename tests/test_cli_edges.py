"""Bad input at the edges fails at once, with an error naming the field or the file, before any
expensive work (no model loaded, no Ray started, no MLflow run): issue 30, item 6. One case of
each class runs the real command line, ``python -m pipeline.cli``, in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import CHECKPOINT_DAMAGE, damage_checkpoint, write_checkpoint
from pipeline.cli import main

# the commands that write an output folder, each with the arguments it needs besides --output
WRITERS = {"run": ["--preset", "smoke"], "train": ["--preset", "smoke"],
           "sample": ["--preset", "smoke", "--methods", "manual"],
           "evaluate": ["--data", "humaneval"], "experiment": ["--spec", "experiments/x.yaml"],
           "sweep": ["--preset", "smoke"], "report": []}
ENV = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # SQLite in --output


def ddpt(args: list[str], cwd: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The `ddpt` command line in a fresh process, run in ``cwd``."""
    return subprocess.run([*prefix, sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=300)


def assert_refused(done: subprocess.CompletedProcess, message: str, folder: Path) -> None:
    """Exit 2 with ``message`` and no traceback, and no MLflow store anywhere in ``folder``."""
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not [p for p in folder.rglob("*") if p.name in ("mlflow.db", "mlruns", "mlartifacts")]


@pytest.mark.slow
def test_an_unusable_limit_fails_before_any_mlflow_run(tmp_path):
    done = ddpt(["evaluate", "--data", "humaneval", "--output", "out", "--no-progress",
                 "--set", "execution.timeout_s=inf"], tmp_path)
    assert_refused(done, "execution.timeout_s: must be a finite number, got inf", tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tests_that_cannot_fail_are_refused_before_any_mlflow_run(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": name, "instruction": "one", "output": "x = 1",
                                         "tests": tests, "split": "test"}) + "\n"
                             for name, tests in (("a", "assert x == 1"), ("b", "# TODO\n"))))
    done = ddpt(["evaluate", "--data", str(tasks), "--output", "out", "--no-progress"], tmp_path)
    assert_refused(done, f"{tasks}:2: field 'tests': record 'b': the tests hold no statement",
                   tmp_path)


@pytest.mark.parametrize("command", list(WRITERS))
def test_every_command_refuses_an_output_that_is_a_file(tmp_path, capsys, command):
    (tmp_path / "file").write_text("")
    args = [command, "--output", str(tmp_path / "file"), *WRITERS[command]]
    if command == "report":  # --output is the folder it reads; the page goes to --report
        assert main(args) == 2
        assert "file: a file, not an output folder" in capsys.readouterr().err
        for page, message in ((tmp_path, "is a folder: --report names the page's file"),
                              (tmp_path / "file" / "r.html", "file is a file")):
            assert main([command, "--output", str(tmp_path), "--report", str(page)]) == 2
            assert message in capsys.readouterr().err
        return
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert f"argument --output: {tmp_path / 'file'} is a file, not a folder" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):  # a folder to create under a file
        main([command, "--output", str(tmp_path / "file" / "out"), *WRITERS[command]])
    assert f"cannot create this folder: {tmp_path / 'file'} is a file" in capsys.readouterr().err


READ_ONLY_PROBE = """
import json, sys
from pipeline.cli import main
folder, writers, codes = sys.argv[1], json.loads(sys.argv[2]), {}
for command, args in writers.items():
    output = folder if command == "report" else folder + "/new"
    try:
        codes[command] = main([command, "--output", output, *args])
    except SystemExit as exited:
        codes[command] = exited.code
print(json.dumps(codes))
"""


@pytest.mark.slow
def test_every_writing_command_refuses_a_read_only_output_folder(tmp_path):
    """A folder on a read-only mount (root writes anywhere else; a bind mount in a private mount
    namespace, so nothing outside this test sees it), or, as another user, one without write
    permission. Each command, in one fresh process (the command line's `main`), stops at its
    start naming the folder."""
    folder = tmp_path / "shelf"
    folder.mkdir()
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        prefix = ("unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                  'mount --bind -o ro "$0" "$0" && exec "$@"', str(folder))
    else:
        folder.chmod(0o555)
    done = subprocess.run([*prefix, sys.executable, "-c", READ_ONLY_PROBE, str(folder),
                           json.dumps(WRITERS)], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    if done.returncode and "mount" in done.stderr:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()[:200]}")
    assert json.loads(done.stdout.splitlines()[-1]) == {command: 2 for command in WRITERS}
    why = "a read-only file system" if prefix else "no write permission for this user"
    assert done.stderr.count(f"{folder / 'new'}: cannot create this folder: {folder} is not "
                             f"writable ({why})") == len(WRITERS) - 1
    assert f"{folder}: cannot write into this folder ({why})" in done.stderr  # report's page
    assert "Traceback" not in done.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_a_damaged_checkpoint_fails_before_any_mlflow_run(tmp_path):
    """`ddpt sample` with a cut-short model.safetensors: named at once, before the sampler's
    model is loaded and before the comparison's MLflow run exists."""
    file = damage_checkpoint(write_checkpoint(tmp_path / "ckpt"), "truncated")
    done = ddpt(["sample", "--checkpoint", "ckpt", "--methods", "manual,ddpt", "--output", "out",
                 "--no-progress", "--set", "pool.backend=local"], tmp_path)
    assert_refused(done, f"{file.resolve()}: not a complete safetensors file", tmp_path)
    assert not (tmp_path / "out" / "samples.jsonl").exists()


@pytest.mark.parametrize("how", list(CHECKPOINT_DAMAGE))
def test_sample_names_the_damaged_checkpoint_file(tmp_path, capsys, how):
    file = damage_checkpoint(write_checkpoint(tmp_path / "ckpt"), how)
    assert main(["sample", "--checkpoint", str(tmp_path / "ckpt"), "--methods", "manual,ddpt",
                 "--output", str(tmp_path / "out"), "--set", "pool.backend=local"]) == 2
    assert f"{file.resolve()}: {CHECKPOINT_DAMAGE[how][1]}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "mlflow.db").exists()


@pytest.mark.parametrize("command, job", [("train", ""), ("run", "ddpt")])
def test_resume_names_the_damaged_checkpoint_it_would_continue(tmp_path, capsys, command,
                                                                job):
    """`ddpt train --resume` and `ddpt run --resume` check the checkpoint they continue from
    before a model is loaded or Ray started."""
    out = tmp_path / "out"
    file = damage_checkpoint(write_checkpoint(out / job / "checkpoint", step=1), "empty")
    assert main([command, "--preset", "smoke", "--resume", "--output", str(out)]) == 2
    assert f"{file}: not a complete safetensors file" in capsys.readouterr().err
    assert not (out / "mlflow.db").exists() and not (out / job / "ray").exists()
