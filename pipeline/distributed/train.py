"""Ray Train glue: training a prompt model on a TorchTrainer, with DeepSpeed ZeRO-3 sharding the
frozen LM.

Each worker builds the LM under a live ``HfDeepSpeedConfig`` so that ZeRO-3 partitions it while
it is built (no worker ever holds the whole model), wraps LM + prompt model in one
:class:`~pipeline.training.prompt_models.PromptLoss`, hands only the prompt model's parameters to
DeepSpeed's optimizer, and runs the shared step loop (:func:`pipeline.training.loop.run_steps`)
on batches streamed from its Ray Data shard. The worker loop is four parts: build, restore,
step, save-and-report.

The checkpoints it reports (``ray.train.report``) and how their steps reach MLflow:
:mod:`pipeline.distributed.checkpoints`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

# Only light imports at the top: Ray's Train controller imports this module too (it unpickles
# MLflowCommit and train_worker), and has no use for the model code, which the worker and
# train_on_ray import where they run (about 3 s less for every Train run to start).
from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example
from pipeline.distributed.checkpoints import (
    TIME_KEY,
    MLflowCommit,
    report_metrics,
    restore,
    save_and_report,
)
from pipeline.distributed.progress import ProgressRelay, ProgressSink
from pipeline.distributed.session import check_fits, ensure_ray, training_resources
from pipeline.distributed.storage import (
    RunStorage,
    prepare_storage,
)
from pipeline.paths import PROJECT_ROOT
from pipeline.quiet import quiet_worker, verbose
from pipeline.training.job import CHECKPOINT, TrainRequest

log = logging.getLogger(__name__)

DEEPSPEED_DEFAULTS = {False: "cluster/deepspeed/zero3_cpu.json",
                      True: "cluster/deepspeed/zero3_gpu_bf16.json"}
RUN_NAME = "train"  # the Ray run's name (storage.py adds the output's name to a shared storage)


def read_deepspeed_file(config: RunConfig) -> tuple[Path, dict[str, Any]]:
    """``distributed.deepspeed_config`` (default: the project's ZeRO-3 file for CPU or GPU) and
    its JSON; a missing or malformed file is a ConfigError naming it."""
    dc = config.distributed
    path = Path(dc.deepspeed_config or PROJECT_ROOT / DEEPSPEED_DEFAULTS[dc.use_gpu])
    if not path.is_file():
        raise ConfigError(f"distributed.deepspeed_config: {path} not found")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err


def deepspeed_config(config: RunConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, with batch size, clipping and optimizer settings taken
    from the project config (one source of truth)."""
    dc, tc = config.distributed, config.train
    path, ds = read_deepspeed_file(config)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        log.warning("%s: zero_optimization.stage is not 3; the LM will not be sharded", path)
    elif dc.num_workers == 1 and not dc.zero3_single_worker and not (
            zero.get("offload_param") or zero.get("offload_optimizer")):
        # One rank holds the whole LM anyway, and ZeRO-3 would still gather and release every
        # module's parameters on every pass: 1.57x the single-process step, against 0.98x
        # for Ray itself (benchmarks/train_step.py). Stage 0 trains the same prompt model.
        log.info("one worker: ZeRO stage 0 (nothing to shard; distributed.zero3_single_worker"
                 "=true keeps stage 3)")
        ds["zero_optimization"] = {"stage": 0}
    ds["train_micro_batch_size_per_gpu"] = tc.batch_size // dc.num_workers
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = tc.grad_clip
    ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    ds["optimizer"].setdefault("params", {}).update(lr=tc.method_lr, weight_decay=tc.weight_decay)
    if config.model.dtype == "bfloat16":
        ds["bf16"] = {"enabled": True}
    return ds


# ---- inside each Ray Train worker ----------------------------------------------------------------
@dataclass
class Worker:
    """One rank's training state: the config, the LM, the prompt model, its loss module and the
    DeepSpeed engine around them."""

    config: RunConfig
    rank: int
    world: int
    lm: Any  # FrozenCodeLM
    prompt_model: torch.nn.Module
    module: torch.nn.Module  # PromptLoss
    engine: Any  # deepspeed.DeepSpeedEngine
    shard_share: float  # the largest share of the LM any rank holds (1/world under ZeRO-3)


def build_worker(loop_config: dict[str, Any], ranks: tuple[int, int, int] | None = None
                 ) -> Worker:
    """Build the LM inside ZeRO-3's partitioning, the prompt model and the DeepSpeed engine.
    ``ranks``: (rank, world size, ranks on this node), from Ray Train's context unless given
    (benchmarks/train_step.py builds one rank in its own process, torch.distributed set up)."""
    config = RunConfig.from_dict(loop_config["config"])
    if not config.distributed.use_gpu:  # said, so DeepSpeed need not probe (and warn)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    if not config.distributed.use_gpu:
        # Never JIT-build DeepSpeed's shared-memory CPU all-reduce: ZeRO-3 training never
        # calls it (why and what it cost: docs/training.md).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    from pipeline.lm.frozen import FrozenCodeLM
    from pipeline.lm.loader import load_model
    from pipeline.lm.template import PromptTemplate
    from pipeline.training.prompt_models import PromptLoss, build_trainable

    if ranks is None:
        context = ray.train.get_context()
        ranks = (context.get_world_rank(), context.get_world_size(),
                 context.get_local_world_size())
    rank, world, per_node = ranks
    if not config.distributed.use_gpu:
        per_node = max(1, per_node)
        torch.set_num_threads(config.distributed.torch_threads
                              or max(1, (os.cpu_count() or 1) // per_node))
    ds_config = loop_config["deepspeed"]
    # Alive while the model is built: transformers then builds it inside deepspeed.zero.Init.
    hf_deepspeed = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model, tokenizer = load_model(config.model, seed=config.train.seed)
    lm = FrozenCodeLM(model, tokenizer,
                      PromptTemplate(tokenizer, config.prompt,
                                     is_encoder_decoder=model.config.is_encoder_decoder))
    embedding = model.get_input_embeddings()
    with deepspeed.zero.GatheredParameters([embedding.weight]):  # partitioned outside forward
        token_norm = embedding.weight.float().norm(dim=-1).mean().item()
        context_embedding = lm.context_embedding().clone()
    prompt_model, objective = build_trainable(lm, config, token_norm, context_embedding)
    module = PromptLoss(prompt_model, lm, objective, config.train.lm_autocast)
    trainable = [p for p in prompt_model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable,
                                           config=ds_config)
    shares = [None] * world
    torch.distributed.all_gather_object(shares, _shard_share(model))
    return Worker(config, rank, world, lm, prompt_model, module, engine, max(shares))


def standardise_conditions(worker: Worker, shard) -> None:
    """A conditional prompt model standardises conditions with the training data's mean and
    std: every rank sums over its shard, the sums are all-reduced (no-op otherwise)."""
    from pipeline.distributed.data import one_pass
    from pipeline.training.prompt_models import condition_stats, is_conditional, set_condition_stats

    if not is_conditional(worker.prompt_model):
        return
    batch = worker.config.train.batch_size // worker.world
    total, square, count = condition_stats(worker.lm, one_pass(shard, worker.lm, batch))
    sums = torch.cat([total, square, torch.tensor([float(count)], dtype=total.dtype)])
    torch.distributed.all_reduce(sums)
    d = total.shape[0]
    set_condition_stats(worker.prompt_model, sums[:d], sums[d:2 * d], int(sums[-1].item()))


def step_fn(worker: Worker):
    """The optimizer step on the engine, for :func:`~pipeline.training.loop.run_steps`."""
    import deepspeed

    def step(batch, generator):
        loss, output = worker.engine(batch, generator)
        worker.engine.backward(loss)
        worker.engine.step()
        worker.module.after_step(output, gather=deepspeed.zero.GatheredParameters)
        return output.stats

    return step


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop of one rank: build, restore, then steps with periodic dev loss,
    checkpoints and reports."""
    from pipeline.distributed.data import shard_batches
    from pipeline.training.dev_losses import dev_losses_record
    from pipeline.training.loop import plain_record, run_steps

    quiet_worker()  # after Ray Train's own logging set-up in this process
    worker = build_worker(loop_config)
    tc = worker.config.train
    shard = ray.train.get_dataset_shard("train")
    standardise_conditions(worker, shard)
    start, epoch, next_index, carried = restore(worker)
    dev = worker.lm.encode([Example(**item) for item in loop_config.get("dev", [])])
    position = {"epoch": epoch, "next_index": next_index}
    stream = shard_batches(shard, worker.lm, tc.batch_size // worker.world, tc.seed, epoch,
                           next_index)

    def batches():
        for epoch_now, index, batch in stream:
            position.update(epoch=epoch_now, next_index=index + 1)
            yield batch

    pending: list[dict] = list(carried)  # step records since the last checkpoint
    sink = loop_config.get("progress") if worker.rank == 0 else None

    def on_step(step: int, record: dict) -> None:
        record = {**record, "lm_shard_share": worker.shard_share,
                  "examples_per_second": tc.batch_size / record["step_seconds"],
                  TIME_KEY: int(time.time() * 1000)}
        if sink is not None:  # the driver's live line
            sink.send(step, float(record["code_loss"]), record["examples_per_second"])
        final_losses = None  # the last step's per-task dev losses, kept in its checkpoint
        if dev and tc.eval_every and (step == tc.steps or step % tc.eval_every == 0):
            losses = dev_losses(worker, dev)
            record["dev_loss"] = losses.mean().item()  # in history.jsonl: logged exactly once
            if step == tc.steps:
                final_losses = dev_losses_record(step, [e.id for e in dev], losses.tolist())
        pending.append(record)
        every = tc.checkpoint_every
        if step == tc.steps or (every and step % every == 0):
            save_and_report(worker, step, position, pending, start, dev_losses=final_losses)
            pending.clear()
        elif step % tc.log_every == 0:
            ray.train.report({**report_metrics(plain_record(record)),
                              "resumed_from_step": start})

    run_steps(step_fn(worker), batches(), start, tc.steps, tc.seed, rank=worker.rank,
              on_step=on_step, progress=False, device=worker.lm.device)


def dev_losses(worker: Worker, dev: list) -> torch.Tensor:
    """Each dev example's code cross-entropy, (len(dev),) in dev order, given one prompt sampled
    as evaluation does; all ranks together, every rank gets all of them."""
    from pipeline.scoring.heldout import sharded_example_losses  # it imports the metrics
    from pipeline.training.prompt_models import is_conditional, sampling_args

    config, model, lm = worker.config, worker.prompt_model, worker.lm
    args = sampling_args(config.sample, model)
    seed = config.sample.seed
    if not is_conditional(model):
        delta = model.sample_directions(1, torch.Generator().manual_seed(seed), **args)[0]
    else:  # a prompt per example, the same noise for each (sample.prompts 'shared')
        def delta(batch):
            rows = batch.input_ids.shape[0]
            generators = [torch.Generator().manual_seed(seed) for _ in range(rows)]
            return model.sample_directions(rows, generators, condition=lm.condition(batch),
                                           **args)
    return sharded_example_losses(lm, dev, delta, config.eval.batch_size, worker.rank,
                                  worker.world)


def _shard_share(model: torch.nn.Module) -> float:
    """The share of the LM's elements this rank holds (1/world under ZeRO-3)."""
    params = list(model.parameters())
    if not all(hasattr(p, "ds_numel") for p in params):
        return 1.0
    return sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)


# ---- on the driver -------------------------------------------------------------------------------
def ray_backend(callbacks: list | None = None, dataset: ray.data.Dataset | None = None,
                progress: ProgressSink | None = None):
    """The training job's Ray backend. ``callbacks``: extra Ray Train ``UserCallback`` s (a
    sweep's report to Tune); ``dataset``: the examples tokenized already (a sweep tokenizes
    once for its trials); ``progress``: where rank 0 sends its steps (a sweep's relay; by
    default the job draws its own line when the request asks for progress)."""

    def train(request: TrainRequest) -> Path:
        return train_on_ray(request, callbacks, dataset, progress)

    return train


def train_on_ray(request: TrainRequest, callbacks: list | None = None,
                 dataset: ray.data.Dataset | None = None,
                 progress: ProgressSink | None = None) -> Path:
    """Train on a TorchTrainer; blocks until done and returns the exported portable checkpoint
    (``<output>/checkpoint``). Raises if the run failed for good."""
    from pipeline.distributed.data import tokenized_dataset
    from pipeline.lm.loader import prepare_embedded

    config, output = request.config, request.output
    dc, tc = config.distributed, config.train
    if config.runs_rounds:
        raise ConfigError(f"train.objective={tc.objective} / train.method={tc.method} is RL: "
                          "its Ray backend is "
                          "pipeline.distributed.rl (ddpt train picks it); sweeps of it are not "
                          "built")
    if len(request.examples) < tc.batch_size:
        raise ConfigError(f"train.batch_size is {tc.batch_size} examples per step, but the "
                          f"training split has {len(request.examples)}")
    dev = [{"id": e.id, "instruction": e.instruction, "input": e.input, "output": e.output}
           for e in request.dev] if tc.eval_every else []
    ds_config = deepspeed_config(config)
    storage = prepare_storage(config, output, RUN_NAME, "training run", resume=request.resume)
    if config.model.name == "embedded":
        prepare_embedded()  # convert once here, not in every worker at the same time
    ensure_ray()
    check_fits(training_resources(config), f"distributed: {dc.num_workers} workers x "
               f"cpus_per_worker {dc.cpus_per_worker} + data_cpus {dc.data_cpus}"
               + (" (one GPU each)" if dc.use_gpu else ""))
    if dataset is None:
        dataset = tokenized_dataset(request.examples, config)
    with ProgressRelay(enabled=request.progress and progress is None) as relay:
        sink = progress or relay.sink(f"train {output.name}", tc.steps)
        result = _fit(request, storage, callbacks, dataset, ds_config, dev=dev, sink=sink)
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("Ray Train run finished without a checkpoint")
    MLflowCommit(request.tracker).log_history(result.checkpoint)  # again: see MLflowCommit
    keep_dev_losses(result.checkpoint, output, request.tracker)  # before the export marks it done
    return export(result.checkpoint, output / CHECKPOINT)


def _fit(request: TrainRequest, storage: RunStorage, callbacks: list | None,
         dataset: ray.data.Dataset, ds_config: dict, *, dev: list[dict],
         sink: ProgressSink | None) -> ray.train.Result:
    config, dc = request.config, request.config.distributed
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "deepspeed": ds_config, "dev": dev,
                           "progress": sink},
        scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu,
                                     resources_per_worker={"CPU": dc.cpus_per_worker},
                                     placement_strategy=dc.placement_strategy),
        run_config=ray.train.RunConfig(
            name=storage.name, storage_path=storage.root,
            failure_config=FailureConfig(max_failures=dc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # MLflowCommit first: a step's metrics are in MLflow before a sweep hears of it.
            callbacks=[MLflowCommit(request.tracker), *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets={"train": dataset},
    )
    return trainer.fit()


def keep_dev_losses(checkpoint: Checkpoint, output: Path, tracker) -> None:
    """The last step's per-task dev losses, if the final checkpoint has them (a run with dev
    evaluations), into ``output`` and onto the run's MLflow run as an artifact."""
    from pipeline.training.dev_losses import DEV_LOSSES_FILE

    with checkpoint.as_directory() as folder:
        source = Path(folder) / DEV_LOSSES_FILE
        if not source.is_file():
            return
        shutil.copyfile(source, output / DEV_LOSSES_FILE)
    tracker.log_artifact(output / DEV_LOSSES_FILE)


def export(checkpoint: Checkpoint, target: Path) -> Path:
    """Copy a Ray checkpoint's portable prompt model to ``target`` (atomically)."""
    from pipeline.training.checkpoint import replace_folder

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-new-"))
    try:
        with checkpoint.as_directory() as folder:
            shutil.copytree(Path(folder) / "prompt_model", tmp, dirs_exist_ok=True)
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
