"""Step time on the Ray Train + DeepSpeed path vs the single-process path, same model, data and
batch, measured side by side in one run; and the share of step time spent waiting for data on
the Ray path.

Arms, in this order: the single-process loop (plain AdamW); DeepSpeed ZeRO-3 on one rank in this
process without Ray (as configured, then with every parameter persistent, so that ZeRO-3
partitions nothing but its hooks still run); the Ray Train job on one worker as it runs by
default (ZeRO stage 0: one rank has nothing to shard); the Ray Train job with ZeRO-3 kept
(``distributed.zero3_single_worker=true``).

    python benchmarks/train_step.py                      # embedded model, batch 8, 12 steps
    python benchmarks/train_step.py --model tiny-llama   # seconds, for a quick look

Goals (issues 3, 14): Ray/local step-time ratio <= 1.10 on one worker; data wait <= 5% of step
time. The first ``--warmup`` steps of each arm are left out (allocation, the first gathers).
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
    config = build_config("main", overrides=[
        f"model.name={args.model}", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", "train.checkpoint_every=0",
        "distributed.num_workers=1", "distributed.cpus_per_worker=1",
        f"train.log_every={args.steps}", *args.set,
    ])
    examples = train_examples(config.data)[: 64 * args.batch_size]

    # Single process: the same step loop, plain AdamW.
    local = local_steps(config, examples, args)

    # DeepSpeed ZeRO-3 on one rank in this process, no Ray: what DeepSpeed alone costs; and
    # with every parameter persistent (ZeRO-3 partitions nothing, its hooks still run).
    engines = {name: deepspeed_steps(config, examples, args, zero)
               for name, zero in (("zero3", "partitioned"), ("zero3_persistent", "persistent"),
                                  ("stage0", "stage0"))}

    # Ray Train, one worker, through the real training job: as it runs, and with ZeRO-3 kept.
    keep = ["distributed.zero3_single_worker=true"]
    rays = {name: ray_steps(config.with_overrides(extra), examples)
            for name, extra in (("ray", []), ("ray_zero3", keep))}

    # The single-process loop again, last: how much the machine drifted during the run.
    local_again = local_steps(config, examples, args)

    skip = args.warmup
    local_step = statistics.median(r["step_seconds"] for r in local[skip:])
    local_again_step = statistics.median(r["step_seconds"] for r in local_again[skip:])
    in_process = {name: statistics.median(r["step_seconds"] for r in steps[skip:])
                  for name, steps in engines.items()}
    ray_step = {name: statistics.median(h["step_seconds"][skip:]) for name, (h, _) in rays.items()}
    history, wall = rays["ray"]
    ray_data = sum(history["data_seconds"][skip:])
    ray_total = sum(history["step_seconds"][skip:]) + ray_data
    result = {
        "model": args.model, "batch_size": args.batch_size, "steps_timed": args.steps - skip,
        "local_step_seconds": round(local_step, 4),
        "local_again_step_seconds": round(local_again_step, 4),
        **{f"{name}_in_process_step_seconds": round(t, 4) for name, t in in_process.items()},
        **{f"{name}_step_seconds": round(t, 4) for name, t in ray_step.items()},
        "ray_over_local": round(ray_step["ray"] / local_step, 3),
        **{f"{name}_in_process_over_local": round(t / local_step, 3)
           for name, t in in_process.items()},
        "ray_zero3_over_local": round(ray_step["ray_zero3"] / local_step, 3),
        "ray_zero3_over_zero3_in_process": round(ray_step["ray_zero3"] / in_process["zero3"], 3),
        "ray_data_wait_share": round(ray_data / ray_total, 4),
        "ray_job_wall_seconds": round(wall, 1),
    }
    print(json.dumps(result, indent=2))
    print(f"step time ratio Ray Train (one worker) / single process: {result['ray_over_local']:.3f}"
          f" (goal <= 1.10); with ZeRO-3 kept: {result['ray_zero3_over_local']:.3f}, of which "
          f"Ray's own share {result['ray_zero3_over_zero3_in_process']:.3f}x DeepSpeed in one "
          f"process; data wait share: {100 * result['ray_data_wait_share']:.2f}% (goal <= 5%)")


def local_steps(config, examples, args) -> list[dict]:
    """The single-process loop: the same step loop, plain AdamW."""
    from pipeline.lm.loader import build_lm
    from pipeline.training.loop import batch_indices, local_step_fn, run_steps
    from pipeline.training.prompt_models import PromptLoss, build_trainable

    lm = build_lm(config)
    encoded = lm.encode(examples)
    model, objective = build_trainable(lm, config)
    step_fn, _ = local_step_fn(PromptLoss(model, lm, objective, config.train.lm_autocast),
                               config.train)
    batches = (lm.collate([encoded[i] for i in batch_indices(len(encoded), args.batch_size, s,
                                                             config.train.seed)])
               for s in range(args.steps))
    return run_steps(step_fn, batches, 0, args.steps, config.train.seed, progress=False)


def ray_steps(config, examples) -> tuple[dict[str, list[float]], float]:
    """The Ray Train job's per-step ``step_seconds`` / ``data_seconds`` (from its MLflow run)
    and its wall time."""
    from pipeline.distributed.train import ray_backend
    from pipeline.training.job import run_training

    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        outcome = run_training(config, Path(tmp) / "ray", ray_backend(), examples=examples,
                               progress=False)
        wall = time.perf_counter() - began
        client = MlflowClient(outcome.tracking_uri)
        history = {key: [m.value for m in sorted(client.get_metric_history(outcome.run_id, key),
                                                 key=lambda m: m.step)]
                   for key in ("step_seconds", "data_seconds")}
    return history, wall


def deepspeed_steps(config, examples, args, zero: str) -> list[dict]:
    """The Ray worker's own engine (``build_worker``) on one rank in this process, gloo. ``zero``:
    'partitioned' (ZeRO-3 as configured), 'persistent' (ZeRO-3 partitioning nothing), 'stage0'
    (what one Ray worker runs)."""
    import os
    import socket

    import deepspeed
    import torch.distributed

    from pipeline.distributed.train import build_worker, deepspeed_config, step_fn
    from pipeline.training.loop import batch_indices, run_steps

    if not torch.distributed.is_initialized():  # once: DeepSpeed caches the process group
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        deepspeed.init_distributed(dist_backend="gloo")
    ds = deepspeed_config(config.with_overrides(
        [f"distributed.zero3_single_worker={zero != 'stage0'}"]))
    if zero == "persistent":
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 10 ** 12
    worker = build_worker({"config": config.to_dict(), "deepspeed": ds}, ranks=(0, 1, 1))
    encoded = worker.lm.encode(examples)
    batches = (worker.lm.collate([encoded[i] for i in batch_indices(
        len(encoded), args.batch_size, s, config.train.seed)]) for s in range(args.steps))
    history = run_steps(step_fn(worker), batches, 0, args.steps, config.train.seed,
                        progress=False)
    worker.engine.destroy()
    return history


if __name__ == "__main__":
    main()
