"""Ray Train glue: DDPT training on a TorchTrainer, with DeepSpeed ZeRO-3 sharding the frozen LM.

Each worker builds the LM under a live ``HfDeepSpeedConfig`` so that ZeRO-3 partitions it while
it is built (no worker ever holds the whole model), wraps LM + prompt model in one
:class:`~pipeline.method.prompt.DDPTLoss`, hands only the prompt model's parameters to DeepSpeed's
optimizer, and runs the shared step loop (:func:`pipeline.training.loop.run_steps`) on batches streamed
from its Ray Data shard.

Checkpoints (reported with ``ray.train.report``) hold, never the LM:
    deepspeed/           DeepSpeed's per-rank shards of the prompt model + optimizer
                         (``exclude_frozen_parameters``)
    prompt_model/        the gathered prompt model in the portable format of pipeline.training.checkpoint
    train_state.json     step and data position (epoch, next batch index)
    x0_bar.json          the bootstrap target (DDPT only)
    history.jsonl        per-step records since the previous checkpoint
Metrics reach MLflow (rank 0's, through :class:`MLflowCommit` on the controller) only once the
checkpoint that covers them is persisted, so a restart after a failure never logs a step twice.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

# Only light imports at the top: Ray's Train controller imports this module too (it unpickles
# MLflowCommit and train_worker), and has no use for the model code, which train_worker and
# train_on_ray import where they run (about 3 s less for every Train run to start).
from pipeline.config import ConfigError, RunConfig
from pipeline.data.example import Example
from pipeline.tracking import RunTracker
from pipeline.training.job import load_dev_examples

log = logging.getLogger(__name__)

from pipeline.paths import PROJECT_ROOT
DEEPSPEED_DEFAULTS = {False: "cluster/deepspeed/zero3_cpu.json",
                      True: "cluster/deepspeed/zero3_gpu_bf16.json"}
HISTORY_FILE = "history.jsonl"  # in each checkpoint: the per-step records it covers
RUN_NAME = "train"  # the Ray run's name inside <output>/ray; fixed so that a restart finds it


def deepspeed_config(config: RunConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, with batch size, clipping and optimizer settings taken
    from the project config (one source of truth)."""
    dc, tc = config.distributed, config.train
    path = Path(dc.deepspeed_config or PROJECT_ROOT / DEEPSPEED_DEFAULTS[dc.use_gpu])
    if not path.is_file():
        raise ConfigError(f"distributed.deepspeed_config: {path} not found")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
    if ds.get("zero_optimization", {}).get("stage") != 3:
        log.warning("%s: zero_optimization.stage is not 3; the LM will not be sharded", path)
    ds["train_micro_batch_size_per_gpu"] = tc.batch_size // dc.num_workers
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = tc.grad_clip
    ds.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    ds["optimizer"].setdefault("params", {}).update(lr=tc.lr, weight_decay=tc.weight_decay)
    if config.model.dtype == "bfloat16":
        ds["bf16"] = {"enabled": True}
    return ds


# ---- inside each Ray Train worker ----------------------------------------------------------------
def train_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.method.prompt import DDPTLoss, build_trainable
    from pipeline.lm.frozen import FrozenCodeLM
    from pipeline.lm.loader import load_model
    from pipeline.distributed.data import shard_batches
    from pipeline.lm.template import PromptTemplate
    from pipeline.training.loop import run_steps

    config = RunConfig.from_dict(loop_config["config"])
    tc = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not config.distributed.use_gpu:
        per_node = max(1, context.get_local_world_size())
        torch.set_num_threads(config.distributed.torch_threads
                              or max(1, (os.cpu_count() or 1) // per_node))
    ds_config = loop_config["deepspeed"]
    # Alive while the model is built: transformers then builds it inside deepspeed.zero.Init.
    hf_deepspeed = HfDeepSpeedConfig(ds_config)  # noqa: F841
    model, tokenizer = load_model(config.model, seed=tc.seed)
    lm = FrozenCodeLM(model, tokenizer,
                      PromptTemplate(tokenizer, config.prompt, model.config.is_encoder_decoder))
    embedding = model.get_input_embeddings()
    with deepspeed.zero.GatheredParameters([embedding.weight]):  # partitioned outside forward
        token_norm = embedding.weight.float().norm(dim=-1).mean().item()
        context = lm.context_embedding().clone()
    prompt_model, objective = build_trainable(lm, config, token_norm, context)
    module = DDPTLoss(prompt_model, lm, objective)
    trainable = [p for p in prompt_model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=trainable,
                                           config=ds_config)
    # The largest share of the LM that any rank holds: 1/world when ZeRO-3 shards it evenly.
    shares = [None] * world
    torch.distributed.all_gather_object(shares, _shard_share(model))
    shard_share = max(shares)
    dev = lm.encode([Example(**item) for item in loop_config.get("dev", [])])

    def dev_loss() -> float:
        """Code cross-entropy on the dev examples given one prompt sampled as evaluation does;
        all ranks together."""
        from pipeline.evaluation.heldout import sharded_code_loss  # not at the top: it imports the metrics

        generator = torch.Generator().manual_seed(config.sample.seed)
        delta = prompt_model.sample_directions(1, config.sample, generator)[0]
        return sharded_code_loss(lm, dev, delta, config.eval.batch_size, rank, world)

    start, epoch, next_index = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(os.path.join(folder, "deepspeed"), tag="ddpt",
                                   load_module_strict=False)
            state = json.loads(Path(folder, "train_state.json").read_text())
            x0_bar_file = Path(folder, "x0_bar.json")
            if x0_bar_file.is_file():  # DDPT only; the soft prompt has no target
                prompt_model.x0_bar.copy_(torch.tensor(json.loads(x0_bar_file.read_text())))
        start, epoch, next_index = state["step"], state["epoch"], state["next_index"]
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, start, epoch,
                 next_index)

    position = {"epoch": epoch, "next_index": next_index}
    stream = shard_batches(ray.train.get_dataset_shard("train"), lm, tc.batch_size // world,
                           tc.seed, epoch, next_index)

    def batches():
        for epoch_now, index, batch in stream:
            position.update(epoch=epoch_now, next_index=index + 1)
            yield batch

    def step_fn(batch, generator):
        loss, stats = engine(batch, generator)
        engine.backward(loss)
        engine.step()
        module.objective.after_step(prompt_model)
        return stats

    pending: list[dict] = []  # per-step records since the last checkpoint

    def on_step(step: int, record: dict) -> None:
        record = {**record, "examples_per_second": tc.batch_size / record["step_seconds"],
                  "lm_shard_share": shard_share}
        if dev and tc.eval_every and (step == tc.steps or step % tc.eval_every == 0):
            record["dev_loss"] = dev_loss()  # in history.jsonl: MLflow gets it exactly once
        pending.append(record)
        every = tc.checkpoint_every
        if step == tc.steps or (every and step % every == 0):
            with tempfile.TemporaryDirectory() as folder:
                engine.save_checkpoint(os.path.join(folder, "deepspeed"), tag="ddpt",
                                       exclude_frozen_parameters=True)
                with deepspeed.zero.GatheredParameters(list(prompt_model.parameters())):
                    if rank == 0:
                        save_checkpoint(Path(folder, "prompt_model"), prompt_model, config, step)
                if rank == 0:
                    Path(folder, "train_state.json").write_text(
                        json.dumps({"step": step, **position}))
                    if hasattr(prompt_model, "x0_bar"):
                        Path(folder, "x0_bar.json").write_text(
                            json.dumps(prompt_model.x0_bar.tolist()))
                    # The steps since the last checkpoint; MLflowCommit logs them from here.
                    Path(folder, HISTORY_FILE).write_text(
                        "".join(json.dumps(item) + "\n" for item in pending))
                ray.train.report({**_report_metrics(record), "resumed_from_step": start},
                                 checkpoint=Checkpoint.from_directory(folder))
            pending.clear()
        elif step % tc.log_every == 0:
            ray.train.report({**_report_metrics(record), "resumed_from_step": start})

    run_steps(step_fn, batches(), start, tc.steps, tc.seed, rank=rank, on_step=on_step,
              progress=False, device=lm.device)


def _shard_share(model: torch.nn.Module) -> float:
    """The share of the LM's elements this rank holds (1/world under ZeRO-3)."""
    params = list(model.parameters())
    if not all(hasattr(p, "ds_numel") for p in params):
        return 1.0
    return sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)


def _report_metrics(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}


class MLflowCommit(ray.train.UserCallback):
    """Logs the per-step records of rank 0 to MLflow when Ray has persisted the checkpoint
    that covers them (runs on the Train controller, after *all* workers reported). Steps after
    the last committed checkpoint are re-run after a failure, and only then logged: MLflow sees
    every step exactly once."""

    def __init__(self, tracker: RunTracker):
        self.tracker = tracker

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if checkpoint is None or not metrics:
            return
        if metrics[0].get("resumed_from_step"):
            self.tracker.set_tag("ddpt.resumed_from_step", metrics[0]["resumed_from_step"])
        with checkpoint.as_directory() as folder:
            lines = Path(folder, HISTORY_FILE).read_text().splitlines()
        for record in map(json.loads, lines):
            self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"},
                                     step=record["step"])


# ---- on the driver -------------------------------------------------------------------------------
# Ray Train's defaults suit clusters. On one machine (a laptop, CI) the controller polls its
# workers every 0.2 s instead of 2 s and starts no spot-preemption watcher (one more actor per
# run): measured on 2 cores, a 24-step tiny run took 51 s instead of 68 s.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                 "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (as under ``ray job submit``) or start a local one
    (with :data:`LOCAL_RAY_ENV`, unless the environment sets those variables itself)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS", "local") == "local":
        use_local_ray_env()
    ray.init(log_to_driver=True)


def use_local_ray_env() -> None:
    """Set :data:`LOCAL_RAY_ENV` where the environment does not; call before a local
    ``ray.init``: the raylet it starts, and so every worker, inherits the variables."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def _check_resources(config: RunConfig) -> None:
    """Fail now, not hang later: the workers and the tokenizer actor must fit at once."""
    dc = config.distributed
    cpus = ray.cluster_resources().get("CPU", 0)
    gpus = ray.cluster_resources().get("GPU", 0)
    need = dc.num_workers * dc.cpus_per_worker + dc.data_cpus
    if need > cpus:
        raise ConfigError(f"distributed: {dc.num_workers} workers x cpus_per_worker "
                          f"{dc.cpus_per_worker} + data_cpus {dc.data_cpus} = {need} CPUs, but "
                          f"the Ray cluster has {cpus}")
    if dc.use_gpu and dc.num_workers > gpus:
        raise ConfigError(f"distributed: {dc.num_workers} GPU workers, but the Ray cluster has "
                          f"{gpus} GPUs")


def train_on_ray(config: RunConfig, examples: list[Example], output_dir: str | Path,
                 tracker: RunTracker | None = None, resume: bool = False,
                 progress: bool = True, dev_examples: list[Example] | None = None,
                 callbacks: list | None = None, dataset: ray.data.Dataset | None = None
                 ) -> Path:
    """Train on a TorchTrainer; blocks until done and returns the exported portable checkpoint
    (``<output>/checkpoint``). Raises if the run failed for good. With ``train.eval_every``
    the workers report ``dev_loss`` on ``dev_examples`` (default: the config's dev split);
    ``callbacks`` are extra Ray Train ``UserCallback`` s (a sweep's report to Tune);
    ``dataset`` is ``examples`` tokenized already (:func:`tokenized_dataset`)."""
    from pipeline.lm.loader import prepare_embedded
    from pipeline.distributed.data import tokenized_dataset

    dc, tc = config.distributed, config.train
    output = Path(output_dir).resolve()
    if len(examples) < tc.batch_size:
        raise ConfigError(f"train.batch_size is {tc.batch_size} examples per step, but the "
                          f"training split has {len(examples)}")
    if dev_examples is None and tc.eval_every:
        dev_examples = load_dev_examples(config)
    dev = [{"id": e.id, "instruction": e.instruction, "input": e.input, "output": e.output}
           for e in (dev_examples or [])] if tc.eval_every else []
    ds_config = deepspeed_config(config)
    storage = output / "ray"
    if (storage / RUN_NAME).exists() and not resume:
        raise ConfigError(f"{storage / RUN_NAME} holds an earlier training run: pass --resume "
                          "to continue it, or choose another --output")
    if config.model.name == "embedded":
        prepare_embedded()  # convert once here, not in every worker at the same time
    ensure_ray()
    _check_resources(config)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    if dataset is None:
        dataset = tokenized_dataset(examples, config)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "deepspeed": ds_config, "dev": dev},
        scaling_config=ScalingConfig(num_workers=dc.num_workers, use_gpu=dc.use_gpu,
                                     resources_per_worker={"CPU": dc.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=dc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # MLflowCommit first: a step's metrics are in MLflow before a sweep hears of it.
            callbacks=[*([MLflowCommit(tracker)] if tracker else []), *(callbacks or [])],
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("Ray Train run finished without a checkpoint")
    exported = output / "checkpoint"
    with result.checkpoint.as_directory() as folder:
        if exported.exists():
            shutil.rmtree(exported)
        shutil.copytree(Path(folder) / "prompt_model", exported)
    return exported
