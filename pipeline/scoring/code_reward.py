"""Coupled-GRPO's reward through the project's sandbox, with the reference's definition
(apple/ml-diffucoder ``src/open_r1/rewards.py``; docs/dllm.md, "Coupled-GRPO: the reward").

``reward = pass_weight x pass fraction + format_weight x format`` per completion (2.0 and 0.5):

- format (``code_format_reward``): 1 when the whole text is ``<anything without a fence>
  ```python\\n <code without a fence> ```\\n`` (ending right there) and the first block, stripped,
  parses (``ast.parse``); 0.5 when it has that shape but does not parse; 0 otherwise;
- pass fraction (``code_reward``): only for format 1 (else 0): the share of the task's test
  cases that pass with the first ```` ```python ```` block (not stripped) as the program. The
  reference runs ``code + case`` for each case in a fresh process (5 s each); here the sandbox
  judges each case of one run (``ExecResult.cases_passed / cases_total``, docs/execution.md):
  a case that hangs uses up the program's wall-clock limit and the cases after it count as
  failed, and what a case changes is seen by the next.

The text scored is the completion decoded with special tokens skipped, after the assistant's
prefix when the prompt ends with one (the reference's "bootstrap"); by default cut at the first
end-of-turn token, where the loss stops (``dllm_rl.reward_whole_canvas=true``: the whole canvas,
as the reference).
"""
from __future__ import annotations

import ast
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config import ExecutionConfig
from pipeline.data.example import Example
from pipeline.lm.coupled_grpo import reference_reward
from pipeline.sandbox import run_programs
from pipeline.scoring.execution import program_for

# The reference's format pattern for Python, matched against the whole text.
FORMAT = re.compile(r"^(?:(?!```)[\s\S])*?```python\n(?:(?!```)[\s\S])*?```\n$", re.DOTALL)
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def format_score(text: str) -> float:
    """1.0 (the fenced shape and the block parses), 0.5 (the shape, a syntax error) or 0.0."""
    if not FORMAT.fullmatch(text):
        return 0.0
    blocks = BLOCK.findall(text)
    if not blocks:
        return 0.0
    try:
        with warnings.catch_warnings():  # "\." in a plain string: the completion's business
            warnings.simplefilter("ignore")
            ast.parse(blocks[0].strip())
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return 0.5
    return 1.0


def extract_code(text: str) -> str:
    """The first ```` ```python ```` block of ``text`` as it stands (not stripped); "" if none."""
    blocks = BLOCK.findall(text)
    return blocks[0] if blocks else ""


def completion_texts(tokenizer: PreTrainedTokenizerBase, completion_ids: torch.Tensor,
                     end_id: int, *, whole_canvas: bool = False, prefix: str = "") -> list[str]:
    """``prefix`` + each row of ``completion_ids`` (B, K) decoded without special tokens: up to
    its first ``end_id`` (the tokens the loss counts), or the whole canvas (the reference)."""
    rows = completion_ids.tolist()
    if not whole_canvas:
        rows = [row[:row.index(end_id)] if end_id in row else row for row in rows]
    return [prefix + text for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


@dataclass
class RewardBreakdown:
    """Per completion (B,) float tensors: ``rewards``, ``format`` (1, 0.5, 0) and
    ``pass_fraction`` (0 where the format is not 1); ``programs_run``: sandbox runs made
    (identical programs run once)."""

    rewards: torch.Tensor
    format: torch.Tensor
    pass_fraction: torch.Tensor
    programs_run: int

    def metrics(self) -> dict[str, float]:
        """A round's figures: mean reward, format rate (share with format 1), mean format score,
        mean pass fraction, share passing every case."""
        return {"reward_mean": float(self.rewards.mean()),
                "format_rate": float((self.format == 1).float().mean()),
                "format_mean": float(self.format.mean()),
                "pass_fraction_mean": float(self.pass_fraction.mean()),
                "all_cases_passed": float((self.pass_fraction == 1).float().mean())}


def execution_rewards(texts: Sequence[str], examples: Sequence[Example],
                      execution: ExecutionConfig, *, pass_weight: float = 2.0,
                      format_weight: float = 0.5,
                      cache: dict[tuple[str, str], float] | None = None) -> RewardBreakdown:
    """The reference's reward of each text against its example (``examples[i]`` for
    ``texts[i]``; a round repeats each example G times). Only format-1 texts run, each distinct
    (example, code) once per call; ``cache`` ({(example id, code): pass fraction}) carries
    verdicts across calls (a toy's many repeats), updated in place."""
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} texts for {len(examples)} examples")
    formats = [format_score(text) for text in texts]
    keys = [(ex.id, extract_code(text)) if f == 1 else None
            for text, ex, f in zip(texts, examples, formats)]
    known = dict(cache or {})
    todo = {}
    for key, ex in zip(keys, examples):
        if key is not None and key not in known and key not in todo:
            todo[key] = program_for(ex, key[1])
    results = run_programs(list(todo.values()), execution) if todo else []
    for key, result in zip(todo, results):
        known[key] = result.cases_passed / result.cases_total if result.cases_total else 0.0
    if cache is not None:
        cache.update(known)
    passed = torch.tensor([known[key] if key is not None else 0.0 for key in keys])
    fmt = torch.tensor(formats)
    rewards = reference_reward(passed, fmt, pass_weight=pass_weight,
                               format_weight=format_weight)
    return RewardBreakdown(rewards, fmt, passed, len(todo))
