"""Split each example into ``context | instruction (+ input) -> code`` token pieces.

Only the context is tunable. It sits at a known token span so the frozen LM adapter can swap its
embeddings for ``X_ctx + delta``; the instruction and the code stay plain tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pipeline.config import PromptConfig
from pipeline.data.example import Example

_SYSTEM_SLOT, _USER_SLOT = "\x00DDPT_SYSTEM\x00", "\x00DDPT_USER\x00"
_FENCE = re.compile(r"```[ \t]*[\w+#-]*[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example. ``prompt_ids = prefix + context + source``."""

    id: str
    prompt_ids: list[int]
    context_start: int  # index of the first context token in prompt_ids
    target_ids: list[int]  # the reference code followed by the end-of-turn token


class PromptTemplate:
    """Renders examples for one tokenizer.

    'chat': the context goes where the chat template puts a system message, the instruction is
    the user turn, the code is the assistant's reply. 'plain': the CodeAlpaca text template.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PromptConfig,
                 is_encoder_decoder: bool = False):
        self.tokenizer, self.config = tokenizer, config
        self.is_encoder_decoder = is_encoder_decoder
        kind = config.template
        if kind == "auto":
            kind = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt.template='chat' but the tokenizer has no chat template")
        self.kind = kind
        if kind == "chat":
            rendered = tokenizer.apply_chat_template(
                [{"role": "system", "content": _SYSTEM_SLOT},
                 {"role": "user", "content": _USER_SLOT}],
                tokenize=False, add_generation_prompt=True,
            )
            prefix, rest = rendered.split(_SYSTEM_SLOT)
            middle, suffix = rest.split(_USER_SLOT)
        else:
            prefix, middle, suffix = "", "\n\n### Instruction:\n", "\n\n### Response:\n"
        self._prefix_ids = self._ids(prefix)
        self._middle_ids, self._suffix_ids = self._ids(middle), self._ids(suffix)
        self.context_ids = self._context_ids(config)
        # The end-of-turn token ends every target; generation stops at it or at EOS.
        end = "<|im_end|>" if kind == "chat" and "<|im_end|>" in tokenizer.get_vocab() else None
        self.end_id = tokenizer.convert_tokens_to_ids(end) if end else tokenizer.eos_token_id
        self.stop_ids = sorted({self.end_id, tokenizer.eos_token_id} - {None})

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _context_ids(self, config: PromptConfig) -> list[int]:
        ids = self._ids(config.context)
        n = config.context_tokens or len(ids)
        # Padding with the pad token gives the denoiser extra free slots to write into.
        return (ids + [self.tokenizer.pad_token_id] * n)[:n]

    def user_text(self, example: Example) -> str:
        if self.kind == "chat":
            return example.instruction + (f"\n\n{example.input}" if example.input else "")
        return example.instruction + (f"\n\n### Input:\n{example.input}" if example.input else "")

    def encode(self, example: Example) -> EncodedExample:
        user = self._ids(self.user_text(example))[: self.config.max_source_tokens]
        source = self._middle_ids + user + self._suffix_ids
        if self.is_encoder_decoder and self.tokenizer.eos_token_id is not None:
            source = source + [self.tokenizer.eos_token_id]  # T5-style encoders end with </s>
        target = self._ids(example.output)[: self.config.max_target_tokens] + [self.end_id]
        return EncodedExample(
            id=example.id,
            prompt_ids=self._prefix_ids + self.context_ids + source,
            context_start=len(self._prefix_ids),
            target_ids=target,
        )

    def render(self, example: Example) -> str:
        """The whole prompt as text with the manual context (for logs and samples)."""
        return self.tokenizer.decode(self.encode(example).prompt_ids)


def extract_code(generation: str, template_kind: str = "chat") -> str:
    """The code in a generation: the first fenced block if there is one, else the text up to a
    new '### ' section (plain template), stripped."""
    match = _FENCE.search(generation)
    if match:
        return match.group(1).strip()
    if template_kind == "plain":
        generation = generation.split("\n### ")[0]
    generation = generation.strip()
    if len(generation) > 1 and generation[0] == generation[-1] == "`" and "\n" not in generation:
        generation = generation.strip("`")  # inline code: `x = 1`
    return generation
