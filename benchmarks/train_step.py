"""Step time on the Ray Train + DeepSpeed ZeRO-3 path vs the single-process path, same model,
data and batch, measured side by side in one run; and the share of step time spent waiting for
data on the Ray path.

    python benchmarks/train_step.py                      # embedded model, batch 8, 12 steps
    python benchmarks/train_step.py --model tiny-llama   # seconds, for a quick look

Goals (issue 3): Ray/local step-time ratio <= 1.15 on one worker; data wait <= 5% of step time.
The first ``--warmup`` steps of each path are left out (allocation, DeepSpeed's first gathers).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override for both paths (repeatable)")
    args = parser.parse_args()

    from pipeline.config import build_config
    from pipeline.data.splits import train_examples
    from pipeline.distributed.train import ray_backend
    from pipeline.lm.loader import build_lm
    from pipeline.training.job import run_training
    from pipeline.training.loop import batch_indices, local_step_fn, run_steps
    from pipeline.training.prompt_models import PromptLoss, build_trainable

    config = build_config("default", overrides=[
        f"model.name={args.model}", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", "train.checkpoint_every=0",
        "distributed.num_workers=1", "distributed.cpus_per_worker=1",
        f"train.log_every={args.steps}", *args.set,
    ])
    examples = train_examples(config.data)[: 64 * args.batch_size]

    # Single process: the same step loop, plain AdamW.
    lm = build_lm(config)
    encoded = lm.encode(examples)
    model, objective = build_trainable(lm, config)
    step_fn, _ = local_step_fn(PromptLoss(model, lm, objective, config.train.lm_autocast),
                               config.train)
    batches = (lm.collate([encoded[i] for i in batch_indices(len(encoded), args.batch_size, s,
                                                             config.train.seed)])
               for s in range(args.steps))
    local = run_steps(step_fn, batches, 0, args.steps, config.train.seed, progress=False)
    del lm, model

    # DeepSpeed ZeRO-3 on one rank in this process, no Ray: what DeepSpeed alone costs; and
    # with every parameter persistent (ZeRO-3 partitions nothing, its hooks still run).
    engines = {name: deepspeed_steps(config, examples, args, persistent)
               for name, persistent in (("zero3", False), ("zero3_persistent", True))}

    # Ray Train + DeepSpeed ZeRO-3, one worker, through the real training job.
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        outcome = run_training(config, Path(tmp) / "ray", ray_backend(), examples=examples,
                               progress=False)
        wall = time.perf_counter() - began
        client = MlflowClient(outcome.tracking_uri)
        history = {key: [m.value for m in sorted(client.get_metric_history(outcome.run_id, key),
                                                 key=lambda m: m.step)]
                   for key in ("step_seconds", "data_seconds")}

    skip = args.warmup
    local_step = statistics.median(r["step_seconds"] for r in local[skip:])
    in_process = {name: statistics.median(r["step_seconds"] for r in steps[skip:])
                  for name, steps in engines.items()}
    ray_step = statistics.median(history["step_seconds"][skip:])
    ray_data = sum(history["data_seconds"][skip:])
    ray_total = sum(history["step_seconds"][skip:]) + ray_data
    result = {
        "model": args.model, "batch_size": args.batch_size, "steps_timed": args.steps - skip,
        "local_step_seconds": round(local_step, 4), "ray_step_seconds": round(ray_step, 4),
        "ray_over_local": round(ray_step / local_step, 3),
        **{f"{name}_in_process_step_seconds": round(t, 4) for name, t in in_process.items()},
        **{f"{name}_in_process_over_local": round(t / local_step, 3)
           for name, t in in_process.items()},
        "ray_over_zero3_in_process": round(ray_step / in_process["zero3"], 3),
        "ray_data_wait_share": round(ray_data / ray_total, 4),
        "ray_job_wall_seconds": round(wall, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"step time ratio Ray+DeepSpeed / single process: {result['ray_over_local']:.3f} "
          f"(goal <= 1.15); data wait share: {100 * result['ray_data_wait_share']:.2f}% "
          f"(goal <= 5%)")


def deepspeed_steps(config, examples, args, persistent: bool) -> list[dict]:
    """The Ray worker's own engine (``build_worker``) on one rank in this process, gloo."""
    import os
    import socket

    import deepspeed
    import torch.distributed

    from pipeline.distributed.train import build_worker, deepspeed_config, step_fn
    from pipeline.training.loop import batch_indices, run_steps

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo")
    ds = deepspeed_config(config)
    if persistent:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 10 ** 12
    worker = build_worker({"config": config.to_dict(), "deepspeed": ds}, ranks=(0, 1, 1))
    encoded = worker.lm.encode(examples)
    batches = (worker.lm.collate([encoded[i] for i in batch_indices(
        len(encoded), args.batch_size, s, config.train.seed)]) for s in range(args.steps))
    history = run_steps(step_fn(worker), batches, 0, args.steps, config.train.seed,
                        progress=False)
    worker.engine.destroy()
    torch.distributed.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
