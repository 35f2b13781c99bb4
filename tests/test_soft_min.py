"""The set-level objective ``soft_min``: K prompts per example, a soft minimum of their
cross-entropies from one batched LM forward."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import EXAMPLES, make_lm
from pipeline.config import PRESETS, ConfigError, RunConfig
from pipeline.method.objectives import SoftMinObjective, soft_min
from pipeline.training.loop import train_local
from pipeline.training.prompt_models import PromptLoss, build_trainable

pytestmark = pytest.mark.usefixtures("one_thread")


def soft_min_config(steps: int = 4, condition: str = "instruction", **train) -> RunConfig:
    config = RunConfig.from_dict(PRESETS["smoke"])
    config.denoiser = dataclasses.replace(config.denoiser, condition=condition)
    train = {"batch_size": 3, "lr": 2e-2, **train}
    config.train = dataclasses.replace(config.train, steps=steps, checkpoint_every=0,
                                       objective="soft_min", **train)
    return config


def test_soft_min_weights_every_loss_and_tends_to_the_hard_minimum():
    losses = torch.tensor([[2.0, 1.0], [1.5, 3.0], [1.7, 0.5]], requires_grad=True)  # (K, B)
    value = soft_min(losses, 0.5)
    value.sum().backward()
    weights = torch.softmax(-losses.detach() / 0.5, dim=0)
    torch.testing.assert_close(losses.grad, weights)  # each loss weighed by its softmax
    assert (losses.grad > 0).all() and (value < losses.min(0).values).all()
    hard = losses.detach().min(0).values
    gaps = [float((hard - soft_min(losses.detach(), tau)).max()) for tau in (1.0, 0.1, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2] >= 0 and gaps[2] < 1e-3 * 1.0 + 1e-6
    assert gaps[0] <= 1.0 * torch.log(torch.tensor(3.0)) + 1e-6  # below min by <= tau log K
    losses.grad = None
    soft_min(losses, 1e-3).sum().backward()  # the gradient tends to the argmin's one-hot
    onehot = torch.nn.functional.one_hot(losses.detach().argmin(0), 3).T.float()
    torch.testing.assert_close(losses.grad, onehot, atol=1e-4, rtol=0)


def test_one_forward_scores_every_prompt_and_the_gradient_reaches_all_of_them():
    lm = make_lm("tiny-llama")
    config = soft_min_config(soft_min_prompts=4, soft_min_temperature=0.2)
    model, objective = build_trainable(lm, config)
    assert isinstance(objective, SoftMinObjective) and objective.prompts == 4
    assert objective.temperature == 0.2
    assert model.chain("ddpm", 50, 0.0) == ("ddim", config.train.unroll_steps, 1.0)
    torch.nn.init.normal_(model.denoiser.out.weight, std=0.5)  # off the zero start
    module = PromptLoss(model, lm, objective)
    batch = lm.collate(lm.encode(EXAMPLES[:3]))
    seen, calls = {}, []
    handle = lm.model.register_forward_hook(lambda *args: calls.append(1))

    def code_loss(direction, per_example=False):
        direction.retain_grad()
        seen["direction"] = direction
        seen["ce"] = module._code_loss(batch, direction, None, per_example=per_example)
        return seen["ce"]

    condition = lm.condition(batch)
    output = objective.loss(model, code_loss, 3, torch.Generator().manual_seed(0), condition)
    handle.remove()
    assert len(calls) == 1, "the K prompts were not scored in one LM forward"
    direction, ce = seen["direction"], seen["ce"].view(4, 3)
    with torch.no_grad():  # the tiling: row k * B + b is example b under prompt k
        for k in range(4):
            torch.testing.assert_close(
                lm.code_loss(batch, direction[k * 3:(k + 1) * 3], per_example=True), ce[k],
                rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(output.loss, soft_min(ce, 0.2).mean())
    output.loss.backward()
    per_prompt = direction.grad.view(4, 3, -1).norm(dim=-1)
    assert (per_prompt > 0).all(), per_prompt
    assert float(output.stats["best_code_loss"]) <= float(output.stats["code_loss"])


def test_soft_min_trains_in_the_single_process_loop():
    lm = make_lm("tiny-llama")
    config = soft_min_config(steps=12, condition="none", batch_size=6)
    result = train_local(config, lm, EXAMPLES, progress=False)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert {"best_code_loss", "consistency", "code_loss"} <= set(result.history[0])
    with pytest.raises(ValueError, match="prompts >= 2"):
        SoftMinObjective(prompts=1)
    with pytest.raises(ConfigError, match="train.soft_min_prompts: must be >= 2"):
        soft_min_config(soft_min_prompts=1)
