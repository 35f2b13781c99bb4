"""Coupled-GRPO's learner: the masked-diffusion policy under DeepSpeed ZeRO-3, one per Ray Train
worker (gloo on CPU, NCCL on GPU; docs/dllm.md, "The learner under ZeRO-3").

Each rank builds the Dream policy inside ``deepspeed.zero.Init`` (it only ever holds its
partition of every parameter) and fills it parameter by parameter from the checkpoint (or, for
``tiny-dream``, from the random model rank 0 builds), then wraps it in a DeepSpeed engine with a
torch AdamW (no C++ op is built) on :func:`~pipeline.lm.coupled_grpo.decay_groups` and the
reference's warm-up + cosine schedule. The reference policy is a second ZeRO-3 engine built
the same way, without an optimizer; its TR-DPO sync mixes each rank's own partitions (the two
models are partitioned alike), so it moves no data between ranks.

:func:`learner_update` takes one round's rollouts (every rank the whole round; each trains on
its ``micro_batches`` slices) and runs :func:`~pipeline.lm.coupled_grpo.run_update` on the
engines: per-rank gradient accumulation, the all-reduced, clipped gradient, one AdamW step per
iteration. A round of R rows on W workers gives the single-process update of R rows in
``W x micro_batches`` slices. :func:`save_learner` / :func:`restore_learner` hold everything a
resume needs; :func:`export_dream` writes a Dream folder that ``load_dream`` and ``ddpt evaluate``
read.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, RunConfig
from pipeline.distributed.train import read_deepspeed_file
from pipeline.lm.coupled_grpo import (
    CoupledGRPOSettings,
    CoupledRollout,
    decay_groups,
    rank_slices,
    reference_scheduler,
    run_update,
    settings_from_config,
)

TAG = "coupled_grpo"  # the DeepSpeed checkpoint's tag
STATE_FILE = "learner_state.json"
REFERENCE_DIR = "reference"
DREAM_DIR = "dream"  # in a checkpoint: the policy as a Dream folder


@dataclass
class Learner:
    """One rank's coupled-GRPO state: the policy's DeepSpeed engine (optimizer, scheduler), the
    reference's (no optimizer), the tokenizer's ids, and the optimizer steps and rounds done."""

    config: RunConfig
    settings: CoupledGRPOSettings
    rank: int
    world: int
    policy: Any  # deepspeed.DeepSpeedEngine
    reference: Any  # deepspeed.DeepSpeedEngine without an optimizer
    tokenizer: Any
    mask_id: int
    end_id: int
    step: int = 0
    rounds: int = 0


def learner_deepspeed_config(config: RunConfig, rows_per_round: int, world: int
                             ) -> dict[str, Any]:
    """The policy engine's DeepSpeed JSON: ``distributed.deepspeed_config`` (default: the
    project's ZeRO-3 file for CPU or GPU) without its optimizer (a torch AdamW is handed in),
    with the micro-batch rows, the accumulation steps and the clipping of ``dllm_rl``."""
    rl = config.dllm_rl
    path, ds = read_deepspeed_file(config)
    if ds.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(f"{path}: zero_optimization.stage must be 3 for train.method="
                          "coupled_grpo (the policy and its reference are partitioned)")
    parts = world * rl.micro_batches
    if rows_per_round % parts:
        raise ConfigError(f"dllm_rl: a round's {rows_per_round} rows (prompts_per_round x "
                          f"group_size) do not split into {world} workers x micro_batches "
                          f"{rl.micro_batches}")
    for key in ("optimizer", "scheduler", "train_batch_size"):
        ds.pop(key, None)
    ds["train_micro_batch_size_per_gpu"] = rows_per_round // parts
    ds["gradient_accumulation_steps"] = rl.micro_batches
    ds["gradient_clipping"] = rl.max_grad_norm
    ds["bf16"] = {"enabled": config.model.dtype == "bfloat16"}
    ds["fp16"] = {"enabled": config.model.dtype == "float16"}
    ds["steps_per_print"] = 1 << 30
    return ds


def prepare_deepspeed(*, use_gpu: bool):
    """Import DeepSpeed for this rank's device: on CPU, said up front (no probing) and without
    the shared-memory all-reduce it would JIT-build (ZeRO-3 training never calls it)."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _source(config: RunConfig, dream_config
            ) -> tuple[set[str], Callable[[str], torch.Tensor]]:
    """The names and a name -> tensor reader of the model to start from: a Dream folder's
    safetensors (memory-mapped, read one tensor at a time), or tiny-dream's random weights
    under ``train.seed``."""
    from safetensors import safe_open

    from pipeline.lm.dream import random_dream, weight_files
    from pipeline.lm.loader import TINY_DREAM

    if config.model.name == TINY_DREAM:
        state = random_dream(dream_config, seed=config.train.seed).state_dict()
        return set(state), state.__getitem__
    where = {}
    for path in weight_files(Path(config.model.name)):
        shard = safe_open(str(path), framework="pt")
        where.update(dict.fromkeys(shard.keys(), shard))
    return set(where), lambda name: where[name].get_tensor(name)


def partitioned_dream(config: RunConfig, ds_config: dict, rank: int):
    """The run's Dream model built inside ``deepspeed.zero.Init`` (each rank holds its
    partitions) and filled one parameter at a time: gathered, written by rank 0, partitioned
    again. Returns (model, tokenizer); ConfigError for a model that is not a Dream."""
    import deepspeed

    from pipeline.lm.dream import DreamModel
    from pipeline.lm.loader import load_hf_config, load_tokenizer

    dream_config = load_hf_config(config.model)
    if dream_config.model_type != "Dream":
        raise ConfigError(f"train.method: 'coupled_grpo' needs a Dream model; model.name="
                          f"{config.model.name!r} is a {dream_config.model_type!r} model")
    # The dtype comes from the config's bf16/fp16 sections (model.dtype): DeepSpeed 0.19's
    # zero.Init(dtype=torch.float32) on a CPU gives bfloat16 (an operator-precedence slip).
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = DreamModel(dream_config)
    names, read = _source(config, dream_config)  # every rank checks, rank 0 reads
    missing = set(dict(model.named_parameters())) - names
    if missing:
        raise ValueError(f"{config.model.name}: missing weights {sorted(missing)[:5]}")
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    param.copy_(read(name).to(param.dtype))
    model.gradient_checkpointing = config.dllm_rl.gradient_checkpointing
    return model, load_tokenizer(config.model)


def build_learner(config: RunConfig, rows_per_round: int, total_steps: int,
                  ranks: tuple[int, int] | None = None) -> Learner:
    """This rank's learner for rounds of ``rows_per_round`` rows and a schedule of
    ``total_steps`` optimizer steps. ``ranks``: (rank, world size), from Ray Train's context
    unless given (torch.distributed already set up)."""
    if ranks is None:
        import ray.train

        context = ray.train.get_context()
        ranks = (context.get_world_rank(), context.get_world_size())
    rank, world = ranks
    deepspeed = prepare_deepspeed(use_gpu=config.distributed.use_gpu)
    settings = settings_from_config(config.dllm_rl)
    ds_config = learner_deepspeed_config(config, rows_per_round, world)
    policy, tokenizer = partitioned_dream(config, ds_config, rank)
    policy.requires_grad_(True)
    optimizer = torch.optim.AdamW(decay_groups(policy, settings.weight_decay), lr=settings.lr,
                                  betas=settings.adam_betas, eps=settings.adam_eps)
    engine, _, _, _ = deepspeed.initialize(
        model=policy, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda basic: reference_scheduler(basic, settings, total_steps))
    # The reference keeps nothing whole, so that its partitions are all there is to sync.
    zero = {**ds_config["zero_optimization"], "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0}
    reference_config = {**ds_config, "zero_optimization": zero}
    reference, _ = partitioned_dream(config, reference_config, rank)
    reference.requires_grad_(False)
    reference_engine, _, _, _ = deepspeed.initialize(model=reference, config=reference_config)
    reference_engine.eval()
    end_id = tokenizer.convert_tokens_to_ids(settings.end_of_turn)
    if end_id is None or end_id == tokenizer.unk_token_id:
        raise ConfigError(f"dllm_rl.end_of_turn: {settings.end_of_turn!r} is not a token of "
                          f"{config.model.name}'s tokenizer")
    return Learner(config, settings, rank, world, engine, reference_engine, tokenizer,
                   tokenizer.mask_token_id, end_id)


@torch.no_grad()
def sync_partitions(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's ``ref <- (1 - alpha) ref + alpha policy`` on this rank's ZeRO-3 partitions
    (``ds_tensor``), parameter by name. Both modules are partitioned alike (the same model, world
    and ZeRO stage); the reference keeps no parameter whole (persistent), so the next forward
    gathers what was mixed. A persistent parameter of the policy keeps its partition current
    too (the optimizer writes the partition, then gathers it)."""
    policy_params = dict(policy.named_parameters())
    for name, ref_param in reference.named_parameters():
        param = policy_params[name]
        if ref_param.ds_tensor.shape != param.ds_tensor.shape or ref_param.ds_persist:
            raise RuntimeError(f"{name}: the reference is not partitioned as the policy")
        ref_param.ds_tensor.mul_(1 - alpha).add_(param.ds_tensor.to(ref_param.dtype),
                                                 alpha=alpha)


@dataclass
class ZeroOptimisation:
    """:class:`~pipeline.lm.coupled_grpo.Optimisation` on DeepSpeed engines: the engine scales
    each micro-batch's loss by 1 / gradient_accumulation_steps, averages the gradients over
    the ranks, clips their global norm and steps the optimizer and the scheduler on every
    ``micro_batches``-th ``engine.step()``."""

    policy: Any
    reference: Any

    def accumulate(self, loss: torch.Tensor, count: int) -> None:
        if count != self.policy.gradient_accumulation_steps():
            raise ValueError(f"{count} micro-batches per step, the engine accumulates "
                             f"{self.policy.gradient_accumulation_steps()}")
        self.policy.backward(loss)
        self.policy.step()  # the optimizer step only on the accumulation boundary

    def apply(self) -> torch.Tensor | None:
        if not self.policy.was_step_applied():
            raise RuntimeError("the engine did not step at the end of an iteration")
        norm = self.policy.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))

    def sync_reference(self, alpha: float) -> None:
        sync_partitions(self.reference.module, self.policy.module, alpha)


def learner_update(learner: Learner, data: CoupledRollout) -> list[dict]:
    """Train on one round (every rank passes the whole round): ``iterations`` optimizer steps,
    each rank on its slices. Returns every rank's micro-step records (floats), in the single
    process's order: by iteration, then ``micro_batch`` (the slice's index in the round)."""
    settings = learner.settings
    data = data.to(learner.policy.device)
    slices = rank_slices(data.completion_ids.shape[0], settings, learner.rank, learner.world)
    records, learner.step = run_update(
        learner.policy, learner.reference, data, learner.mask_id, settings,
        optimisation=ZeroOptimisation(learner.policy, learner.reference), slices=slices,
        step=learner.step)
    learner.rounds += 1
    plain = [{**{k: float(v) for k, v in r.items()},
              "micro_batch": r["micro_batch"] + learner.rank * settings.micro_batches,
              "iteration": r["iteration"], "mask_seed": r["mask_seed"]} for r in records]
    gathered: list[list[dict]] = [[] for _ in range(learner.world)]
    torch.distributed.all_gather_object(gathered, plain)
    merged = [r for part in gathered for r in part]
    return sorted(merged, key=lambda r: (r["iteration"], r["micro_batch"]))


# ---- checkpoints -------------------------------------------------------------------------------
def save_learner(learner: Learner, folder: str | Path, *, dream: bool = True) -> Path:
    """Everything a resume needs, every rank its part (all ranks call it): the policy engine's
    DeepSpeed checkpoint (partitions, AdamW states, scheduler, the step count), each rank's
    reference partitions, and the steps and rounds done; with ``dream``, the policy as a Dream
    folder in ``<folder>/dream`` (:func:`export_dream`). Resuming needs the same workers."""
    from safetensors.torch import save_file

    folder = Path(folder)
    learner.policy.save_checkpoint(str(folder / "deepspeed"), tag=TAG,
                                   client_state={"step": learner.step, "rounds": learner.rounds})
    (folder / REFERENCE_DIR).mkdir(parents=True, exist_ok=True)
    partitions = {name: param.ds_tensor.detach().cpu().contiguous()
                  for name, param in learner.reference.module.named_parameters()}
    save_file(partitions, str(folder / REFERENCE_DIR / f"rank{learner.rank}.safetensors"),
              metadata={"world": str(learner.world)})
    if learner.rank == 0:
        state = {"step": learner.step, "rounds": learner.rounds, "world": learner.world}
        (folder / STATE_FILE).write_text(json.dumps(state))
    if dream:
        export_dream(learner, folder / DREAM_DIR)
    torch.distributed.barrier()
    return folder


def restore_learner(learner: Learner, folder: str | Path) -> None:
    """Load :func:`save_learner`'s folder into a learner built as before (the same workers)."""
    from safetensors import safe_open

    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    if state["world"] != learner.world:
        raise ConfigError(f"{folder}: saved by {state['world']} workers; distributed."
                          f"num_workers={learner.world} cannot resume it (ZeRO-3 partitions)")
    _, client = learner.policy.load_checkpoint(str(folder / "deepspeed"), tag=TAG)
    learner.step, learner.rounds = client["step"], client["rounds"]
    path = folder / REFERENCE_DIR / f"rank{learner.rank}.safetensors"
    with safe_open(str(path), framework="pt") as saved, torch.no_grad():
        for name, param in learner.reference.module.named_parameters():
            param.ds_tensor.copy_(saved.get_tensor(name))


def gathered_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of each parameter of a ZeRO-3 module, gathered one at a time on
    every rank (a collective: every rank must iterate it to the end)."""
    import deepspeed

    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            yield name, param.detach().cpu().clone()


def export_dream(learner: Learner, folder: str | Path, *, reference: bool = False
                 ) -> Path | None:
    """Write the policy (or the reference) as a Dream folder (config.json, safetensors, the
    tokenizer) from rank 0; all ranks call it. Returns the folder on rank 0, None elsewhere."""
    from pipeline.lm.dream import save_dream

    module = (learner.reference if reference else learner.policy).module
    tensors = gathered_tensors(module)
    if learner.rank != 0:
        for _ in tensors:  # take part in every gather
            pass
        torch.distributed.barrier()
        return None
    folder = save_dream(folder, module.config, tensors)
    learner.tokenizer.save_pretrained(folder)
    torch.distributed.barrier()
    return folder
