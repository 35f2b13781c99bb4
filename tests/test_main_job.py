"""The main job through the `ddpt` command: smoke preset end to end, resume, early errors."""
import json
import subprocess
import sys

import pytest

from pipeline.results import ResultStore

DDPT = [sys.executable, "-m", "pipeline.cli"]
METRICS = {"bleu4", "codebleu", "meteor", "chrf", "rouge_l", "exact_match", "code_ce"}


def ddpt(*args, check=True):
    return subprocess.run([*DDPT, *args], capture_output=True, text=True, check=check,
                          timeout=600)


@pytest.mark.slow
def test_smoke_run_writes_metrics_and_samples(tmp_path):
    out = tmp_path / "run"
    proc = ddpt("run", "--preset", "smoke", "--output", str(out), "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"manual", "ddpt"}
    for values in metrics.values():
        assert METRICS <= set(values)
        assert all(0 <= values[m] <= 1 for m in METRICS - {"code_ce"})
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["method"] for s in samples} == {"manual", "ddpt"}
    assert len(samples) == 2 * 8 and {"id", "method", "generation", "reference"} <= set(samples[0])
    assert "manual" in proc.stdout and "codebleu" in proc.stdout  # the printed table
    assert (out / "checkpoint" / "model.safetensors").is_file()

    # A re-run with --resume keeps the samples and regenerates nothing that is done.
    store = ResultStore(out / "samples.jsonl")
    store.path.write_text("".join(line + "\n" for line in
                                  store.path.read_text().splitlines()[:-3]))
    ddpt("run", "--preset", "smoke", "--output", str(out), "--no-progress", "--resume")
    again = ResultStore(out / "samples.jsonl").load()
    assert len(again) == 16 and len({(s["method"], s["id"]) for s in again}) == 16


@pytest.mark.parametrize("args, message", [
    (["--set", "train.steps=-1"], "train.steps: must be > 0"),
    (["--data-dir", "/nonexistent/data"], "/nonexistent/data"),
    (["--set", "data.dataset=nosuch"], "unknown data set 'nosuch'"),
    (["--set", "eval.metrics=[bleu4, bleu5]"], "unknown ['bleu5']"),
])
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, args, message):
    proc = ddpt("run", "--preset", "smoke", "--output", str(tmp_path / "o"), *args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "o" / "checkpoint").exists()  # nothing expensive started


def test_help_lists_subcommands():
    out = ddpt("--help").stdout
    assert "run" in out and "prepare" in out
