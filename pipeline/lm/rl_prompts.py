"""Coupled-GRPO's rollout prompts as the reference builds them (apple/ml-diffucoder
``src/open_r1/grpo.py`` and its trainer; docs/dllm.md, "Coupled-GRPO: the reward").

A conversation of a system message (``dllm_rl.system_prompt``, "You are a helpful assistant.")
and one user turn: the task's question, then ``"\\nTest cases: "`` and its first test case
(unless the question already holds a code fence, ``"\\n```\\n"``); rendered with the tokenizer's
chat template and the assistant's generation prompt, tokenized without special tokens and cut
to the last ``max_prompt_length`` tokens; a batch is left-padded with an attention mask.
"""
from __future__ import annotations

import ast
import warnings

import torch
from transformers import PreTrainedTokenizerBase

import pipeline.sandbox.cases as cases
from pipeline.data.example import Example

TEST_CASES_SEPARATOR = "\nTest cases: "


def first_test_case(tests: str) -> str:
    """The source of the first test case of ``tests`` (the sandbox's split: the first
    statement holding an assert; HumanEval's ``check`` body is flattened, so its first assert
    reads ``candidate(...)``). ValueError for tests that hold no statement."""
    steps = cases.split(tests)
    node = next(node for kind, node in steps if kind == "case")
    with warnings.catch_warnings():  # "\." in a plain string: the data's business
        warnings.simplefilter("ignore")
        text = ast.get_source_segment(tests, node) if hasattr(node, "lineno") else None
    return text if text is not None else tests.strip()


def question(example: Example) -> str:
    """The task as the user asks it: the instruction, and the input after a blank line."""
    return example.instruction + ("\n\n" + example.input if example.input else "")


def reference_messages(example: Example, system_prompt: str) -> list[dict[str, str]]:
    """The reference's conversation for ``example`` (a system message unless it is empty)."""
    user = question(example)
    if "\n```\n" not in user and (example.tests or "").strip():
        user += TEST_CASES_SEPARATOR + first_test_case(example.tests)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": user}]


def reference_prompt_ids(tokenizer: PreTrainedTokenizerBase, example: Example,
                         system_prompt: str, max_prompt_length: int) -> list[int]:
    """The prompt's token ids: the chat template with the generation prompt, no special
    tokens added, the last ``max_prompt_length`` kept (the reference cuts from the left)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("coupled-GRPO's prompts need a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(reference_messages(example, system_prompt),
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_length:]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, n), attention mask (B, n)) of rows left-padded with ``pad_id`` to the longest."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids, mask
