"""GPU paths: bf16, NCCL, one Ray Train worker per GPU. Skipped without CUDA; the config-building
part runs everywhere."""
import json
import subprocess
import sys

import pytest
import torch

from pipeline.config import build_config
from pipeline.distributed.train import deepspeed_config

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_deepspeed_config_is_bf16_zero3():
    config = build_config("main", overrides=["distributed.use_gpu=true",
                                                 "model.dtype=bfloat16", "train.batch_size=4"])
    ds = deepspeed_config(config)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["train_micro_batch_size_per_gpu"] == 4 // config.distributed.num_workers


def test_cpu_deepspeed_config_is_fp32_zero3():
    ds = deepspeed_config(build_config("smoke", overrides=["distributed.num_workers=2"]))
    assert ds["zero_optimization"]["stage"] == 3 and not ds.get("bf16", {}).get("enabled")
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no C++ op build on CPU


def test_one_worker_runs_stage_0_unless_zero3_is_asked_for_or_offloads():
    assert deepspeed_config(build_config("smoke"))["zero_optimization"] == {"stage": 0}
    kept = build_config("smoke", overrides=["distributed.zero3_single_worker=true"])
    assert deepspeed_config(kept)["zero_optimization"]["stage"] == 3
    offload = build_config("main", overrides=[
        "distributed.num_workers=1", "distributed.use_gpu=true", "model.dtype=bfloat16",
        "distributed.deepspeed_config=cluster/deepspeed/zero3_gpu_bf16_offload.json"])
    zero = deepspeed_config(offload)["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]  # one GPU that needs host memory


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
def test_ray_train_on_gpu_bf16(tmp_path):
    workers = min(torch.cuda.device_count(), 2)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "--preset", "smoke", "--no-progress",
         "--output", str(tmp_path / "gpu"), "--set", "distributed.use_gpu=true",
         "--set", f"distributed.num_workers={workers}", "--set", "model.dtype=bfloat16",
         "--set", "model.device=cuda", "--set", "train.steps=4"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "gpu" / "checkpoint" / "state.json").read_text())["step"] == 4
