"""Coupled-GRPO's reward (the reference's, through the sandbox) and its rollout prompts."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ExecutionConfig
from pipeline.data.example import Example
from pipeline.lm.loader import tiny_dream_tokenizer
from pipeline.lm.rl_prompts import (
    first_test_case,
    left_pad,
    reference_messages,
    reference_prompt_ids,
)
from pipeline.scoring.code_reward import (
    completion_texts,
    execution_rewards,
    extract_code,
    format_score,
)

TASK = Example("t1", "Set x to 3.", "x = 3",
               tests="assert isinstance(x, int)\nassert x > 1\nassert x == 3\n")


@pytest.mark.parametrize("text, score", [
    ("```python\nx = 1\n```\n", 1.0),
    ("Here is the code:\n```python\nx = 1\n```\n", 1.0),  # text before the fence is fine
    ("```python\n```\n", 1.0),  # an empty block parses
    ("```python\nx = (\n```\n", 0.5),  # the shape, a syntax error
    ("```python\nx = 1\n```", 0.0),  # must end with the fence and a newline
    ("```python\nx = 1\n```\n\n", 0.0),  # and nothing after it
    ("```python\nx = 1\n```\nmore", 0.0),
    ("```\nx\n```\n```python\nx = 1\n```\n", 0.0),  # no other fence before
    ("```py\nx = 1\n```\n", 0.0),
    ("x = 1", 0.0),
])
def test_the_format_score_is_the_references(text, score):
    assert format_score(text) == score


def test_the_code_is_the_first_block_unstripped():
    assert extract_code("a\n```python\n  x = 1\n```\n```python\ny\n```\n") == "  x = 1\n"
    assert extract_code("no block") == ""


def test_the_reward_runs_each_distinct_program_once_in_the_sandbox():
    """About 3 s: three programs in the sandbox."""
    texts = ["```python\nx = 3\n```\n",  # every case: 2 + 0.5
             "```python\nx = 2\n```\n",  # 2 of 3 cases
             "```python\nx = 3\n```\n",  # the same program: run once
             "```python\nx = (\n```\n",  # format 0.5, not run
             "x = 3",  # no fence: 0, not run
             "```python\nraise ValueError\n```\n"]  # parses, fails before any case
    reward = execution_rewards(texts, [TASK] * len(texts), ExecutionConfig(timeout_s=20))
    assert reward.rewards.tolist() == pytest.approx([2.5, 0.5 + 2 * 2 / 3, 2.5, 0.25, 0.0, 0.5])
    assert reward.format.tolist() == [1, 1, 1, 0.5, 0, 1]
    assert reward.programs_run == 3
    metrics = reward.metrics()
    assert metrics["format_rate"] == pytest.approx(4 / 6)
    assert metrics["all_cases_passed"] == pytest.approx(2 / 6)
    # the weights are settings; a cache carries verdicts over to the next call
    cache: dict = {}
    again = execution_rewards(texts[:2], [TASK] * 2, ExecutionConfig(timeout_s=20),
                              pass_weight=1.0, format_weight=0.0, cache=cache)
    assert again.rewards.tolist() == pytest.approx([1.0, 2 / 3]) and again.programs_run == 2
    cached = execution_rewards(texts[:2], [TASK] * 2, ExecutionConfig(timeout_s=20), cache=cache)
    assert cached.programs_run == 0 and cached.rewards.tolist() == pytest.approx([2.5, 0.5 + 4 / 3])
    with pytest.raises(ValueError, match="2 texts for 1 examples"):
        execution_rewards(texts[:2], [TASK], ExecutionConfig())


def test_the_text_stops_at_end_of_turn_unless_the_whole_canvas_is_asked_for():
    tokenizer = tiny_dream_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    block = tokenizer.encode("x = 3\n```\n")
    tail = tokenizer.encode("junk")
    ids = torch.tensor([block + [end] + tail, block + [tokenizer.pad_token_id] * (len(tail) + 1)])
    cut = completion_texts(tokenizer, ids, end, prefix="```python\n")
    assert cut == ["```python\nx = 3\n```\n"] * 2  # pads are special: skipped
    whole = completion_texts(tokenizer, ids, end, whole_canvas=True, prefix="```python\n")
    assert whole == ["```python\nx = 3\n```\njunk", "```python\nx = 3\n```\n"]
    assert [format_score(t) for t in cut + whole] == [1.0, 1.0, 0.0, 1.0]


def test_the_prompt_is_the_references_conversation():
    messages = reference_messages(TASK, "You are a helpful assistant.")
    assert messages == [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user",
                         "content": "Set x to 3.\nTest cases: assert isinstance(x, int)"}]
    fenced = Example("t2", "Complete:\n```\ndef f():\n```\n", "", tests="assert f() is None\n")
    assert reference_messages(fenced, "")[0]["content"] == fenced.instruction  # no test added
    humaneval = "def check(candidate):\n    '''doc'''\n    assert candidate(1) == 2\n\ncheck(f)\n"
    assert first_test_case(humaneval) == "assert candidate(1) == 2"
    assert first_test_case("x = 1\nassert x\nassert y\n") == "assert x"

    tokenizer = tiny_dream_tokenizer()
    ids = reference_prompt_ids(tokenizer, TASK, "You are a helpful assistant.", 200)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Set x to 3.\nTest cases: assert isinstance(x, int)<|im_end|>\n<|im_start|>assistant\n")
    assert reference_prompt_ids(tokenizer, TASK, "You are a helpful assistant.", 10) == ids[-10:]
    padded, mask = left_pad([[5, 6, 7], [8]], 0)
    assert padded.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
