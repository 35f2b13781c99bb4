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


DIFFUCODER_TRAIN = "cluster/configs/diffucoder-7b-coupled-grpo.yaml"


def test_the_diffucoder_training_config_is_the_reference_on_eight_zero3_gpus():
    """Runs everywhere: the 7B configuration's settings and its learner's DeepSpeed JSON."""
    import dataclasses

    from pipeline.config import DllmRLConfig
    from pipeline.distributed.dllm_learner import learner_deepspeed_config

    config = build_config("main", DIFFUCODER_TRAIN)
    assert config.train.method == "coupled_grpo" and config.model.dtype == "bfloat16"
    # every value written out is the reference's default; a rank and an actor share each GPU
    defaults = dataclasses.replace(DllmRLConfig(), learner_gpu_share=0.5)
    assert {f.name: getattr(config.dllm_rl, f.name) for f in dataclasses.fields(defaults)} == \
        dataclasses.asdict(defaults)
    assert (config.pool.num_actors, config.pool.gpus_per_actor) == (8, 0.5)
    rl = config.dllm_rl
    rows = rl.prompts_per_round * rl.group_size
    ds = learner_deepspeed_config(config, rows, config.distributed.num_workers)
    assert rows == 80 and ds["train_micro_batch_size_per_gpu"] == 5
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.2
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}


def coupled_grpo_gpu_worker(loop: dict) -> None:
    """One round of the learner on this GPU: bf16, NCCL, gradient checkpointing."""
    import ray.train

    from pipeline.distributed.dllm_learner import build_learner, learner_update
    from pipeline.lm.coupled_grpo import rollout_round

    config = build_config("smoke", overrides=loop["overrides"])
    learner = build_learner(config, 8, 2)
    g = torch.Generator().manual_seed(0)
    completions = torch.randint(3, 200, (8, 16), generator=g)
    data = rollout_round(torch.randint(3, 200, (4, 8), generator=g), lambda p: completions,
                         lambda c: torch.rand(8, generator=g), learner.end_id, learner.settings)
    records = learner_update(learner, data)
    assert next(learner.policy.module.parameters()).dtype == torch.bfloat16
    assert learner.policy.device.type == "cuda" and learner.step == 2
    ray.train.report({"loss": records[-1]["loss"], "memory_gb":
                      torch.cuda.max_memory_allocated() / 2 ** 30})


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
def test_the_coupled_grpo_learner_on_a_gpu(tmp_path):
    import math

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.distributed.session import ensure_ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    overrides = ["model.name=tiny-dream", "model.dtype=bfloat16", "model.device=cuda",
                 "train.method=coupled_grpo", "distributed.use_gpu=true",
                 "distributed.num_workers=1", "dllm_rl.group_size=2",
                 "dllm_rl.prompts_per_round=4"]
    ensure_ray()
    result = TorchTrainer(coupled_grpo_gpu_worker, train_loop_config={"overrides": overrides},
                          scaling_config=ScalingConfig(num_workers=1, use_gpu=True),
                          run_config=RunConfig(storage_path=str(tmp_path))).fit()
    assert result.error is None and math.isfinite(result.metrics["loss"])
