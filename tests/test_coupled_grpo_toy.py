"""Coupled-GRPO on a toy verifiable task, in one process: a tiny Dream over 21 tokens learns to
write code that the sandbox passes. ``python tests/test_coupled_grpo_toy.py`` prints the
figures docs/dllm.md quotes (reward and AR-ness before and after, per seed).

The task (two of them, A and B): the prompt is the task's token and the assistant's opening
``"```python\\nx = "`` (the reference's bootstrap: it starts the reward's text); the canvas is 3
tokens over digits, ``" + "``, parentheses, ``x``, the closing fence ``"\\n```\\n"`` and the
end-of-turn token. The reward is the reference's, computed by the sandbox: 0.5 x format (the
fenced block, ending right after its fence, 1 if it parses) + 2 x the share of the task's three
test cases passed (``isinstance(x, int)``, ``x > 1``, ``x == N``). A random policy almost never
closes the fence in the right place; ``3\\n```\\n<|im_end|>`` earns 0.5 + 2 x 2/3.
"""
from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from pipeline.config import ExecutionConfig
from pipeline.data.example import Example
from pipeline.decoding.masked_diffusion import DiffusionSettings, diffusion_generate
from pipeline.lm.coupled_grpo import CoupledGRPOSettings, rollout_round, summarise, update
from pipeline.lm.dream import random_dream, tiny_dream_config
from pipeline.scoring.arness import rollout_arness
from pipeline.scoring.code_reward import completion_texts, execution_rewards

SPECIAL = ["<pad>", "<|im_end|>"]
CODE = [*"0123456789", " + ", "(", ")", "x", "\n```\n"]
PROMPT = ["A", "B", "```python\nx = ", "<|mask|>"]  # never generated (valid_vocab_size)
VOCAB = {token: i for i, token in enumerate(SPECIAL + CODE + PROMPT)}
TARGETS = {"A": 2, "B": 5}
BOOTSTRAP = "```python\nx = "
GROUP, ROUNDS, SAMPLES = 16, 16, 16  # G; rounds of training; evaluation draws per task


def toy_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<pad>"))
    backend.decoder = decoders.Fuse()  # the tokens' text, joined as it is
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   mask_token="<|mask|>", additional_special_tokens=["<|im_end|>"])


TASKS = [Example(name, f"task {name}", f"x = {n}",
                 tests=f"assert isinstance(x, int)\nassert x > 1\nassert x == {n}\n")
         for name, n in TARGETS.items()]
PROMPTS = torch.tensor([[VOCAB[name], VOCAB[BOOTSTRAP]] for name in TARGETS])
DECODING = DiffusionSettings(max_new_tokens=3, steps=3, alg="entropy", alg_temp=0.0,
                             temperature=1.0, top_p=0.95)  # the reference's rollouts


class Toy:
    """The toy's rollouts and sandbox reward (verdicts cached over the run: a tiny policy
    writes the same programs again and again)."""

    def __init__(self):
        self.tokenizer, self.cache = toy_tokenizer(), {}
        self.end, self.mask = VOCAB["<|im_end|>"], VOCAB["<|mask|>"]
        self.execution = ExecutionConfig(timeout_s=20)

    def generate(self, model, prompts: torch.Tensor, generator: torch.Generator):
        return diffusion_generate(model, prompts, None, DECODING, self.mask, generator=generator,
                                  valid_vocab_size=len(SPECIAL + CODE))

    def rewards(self, completions: torch.Tensor, per_task: int):
        texts = completion_texts(self.tokenizer, completions, self.end, prefix=BOOTSTRAP)
        tasks = [task for task in TASKS for _ in range(per_task)]
        return execution_rewards(texts, tasks, self.execution, cache=self.cache)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean reward, format rate and AR-ness of SAMPLES draws per task (a fixed stream)."""
        out = self.generate(model, PROMPTS.repeat_interleave(SAMPLES, 0),
                            torch.Generator().manual_seed(7))
        reward = self.rewards(out.sequences[:, PROMPTS.shape[1]:], SAMPLES)
        return {**reward.metrics(), **rollout_arness(out.record, k_local=2, k_global=2)}


def run_toy(seed: int, rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """Train a random tiny Dream for ``rounds`` rounds; the policy's and the frozen control's
    figures after, the policy's before, and the training rounds' mean rewards."""
    toy = Toy()
    config = tiny_dream_config(len(VOCAB), toy.mask, VOCAB["<pad>"], toy.end)
    policy = random_dream(config, seed=seed).requires_grad_(True)
    control = copy.deepcopy(policy).requires_grad_(False)  # frozen: never updated
    reference = copy.deepcopy(policy).requires_grad_(False)
    settings = CoupledGRPOSettings(group_size=GROUP, ref_sync_every=8)
    # lr 5e-3 (the reference's 1e-6 is for a 7B model); no weight decay on a toy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-3, betas=settings.adam_betas,
                                  weight_decay=0.0)
    before = toy.evaluate(policy)
    generator, step, curve = torch.Generator().manual_seed(100 + seed), 0, []
    n = PROMPTS.shape[1]

    def generate(prompts):
        return toy.generate(policy, prompts, generator).sequences[:, n:]

    for index in range(rounds):
        data = rollout_round(PROMPTS, generate,
                             lambda c: toy.rewards(c, GROUP).rewards, toy.end, settings,
                             seed=seed, round_index=index)
        records, step = update(policy, reference, optimizer, data, toy.mask, settings, step=step)
        curve.append(summarise(data, records)["reward_mean"])
    return {"before": before, "after": toy.evaluate(policy), "control": toy.evaluate(control),
            "rounds": {"first_quarter": sum(curve[:rounds // 4]) / (rounds // 4),
                       "last_quarter": sum(curve[-(rounds // 4):]) / (rounds // 4)}}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_coupled_grpo_raises_a_sandbox_reward_over_three_seeds_against_a_frozen_control():
    """About 50 s on 2 busy cores (3 seeds x 16 rounds; the sandbox runs each distinct program
    once)."""
    for seed in range(3):
        result = run_toy(seed)
        after, control = result["after"], result["control"]
        assert after["reward_mean"] - control["reward_mean"] > 0.5, (seed, result)
        assert after["format_rate"] > control["format_rate"] + 0.2, (seed, result)
        assert result["rounds"]["last_quarter"] > result["rounds"]["first_quarter"] + 0.5
        for figures in (result["before"], after):
            assert 0 <= figures["arness_local_at_1"] <= 1
            assert 0 < figures["arness_global_at_1"] <= 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    keys = ("reward_mean", "format_rate", "arness_local_at_1", "arness_global_at_1")
    print("seed | " + " | ".join(f"{k} before / after / control" for k in keys))
    for seed in range(3):
        result = run_toy(seed)
        print(seed, " | ".join(f"{result['before'][k]:.3f} / {result['after'][k]:.3f} / "
                               f"{result['control'][k]:.3f}" for k in keys), result["rounds"])
