"""Split each example into ``context | instruction (+ input) -> code`` token pieces.

Only the context is tunable. It sits at a known token span so the frozen LM adapter can swap its
embeddings for ``X_ctx + delta``; the instruction and the code stay plain tokens. The template also
records where the context, the instruction and the input sit, the spans SPA decoding can anchor.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from pipeline.config import SPANS, PromptConfig
from pipeline.data.example import Example

_SYSTEM_SLOT, _USER_SLOT = "\x00DDPT_SYSTEM\x00", "\x00DDPT_USER\x00"
_FENCE = re.compile(r"```[ \t]*[\w+#-]*[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
SPAN_NAMES = SPANS  # the anchorable spans of every prompt (decoding.spa_anchors' choices)
ANCHORS_META_KEY = "anchors"  # Example.meta key: data-given anchors inside the instruction


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example. ``prompt_ids = prefix + context + source``."""

    id: str
    prompt_ids: list[int]
    context_start: int  # index of the first context token in prompt_ids
    target_ids: list[int]  # the reference code followed by the end-of-turn token
    # Token positions in prompt_ids of each anchorable span ('context', 'instruction', 'input'),
    # sorted; empty for a span the example lacks (no input) or where it was not recorded.
    spans: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)


class PromptTemplate:
    """Renders examples for one tokenizer.

    'chat': the context goes where the chat template puts a system message, the instruction is
    the user turn, the code is the assistant's reply. 'plain': the CodeAlpaca text template.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PromptConfig, *,
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

    def _input_separator(self) -> str:
        return "\n\n" if self.kind == "chat" else "\n\n### Input:\n"

    def user_text(self, example: Example) -> str:
        return example.instruction + (self._input_separator() + example.input if example.input
                                      else "")

    def _char_spans(self, example: Example) -> dict[str, list[tuple[int, int]]]:
        """Character spans of the anchorable parts inside :meth:`user_text`. Data may narrow the
        instruction anchor: ``meta['anchors']`` lists substrings of the instruction (every
        occurrence) or ``[start, end)`` character offsets into it."""
        instruction = [(0, len(example.instruction))]
        given = example.meta.get(ANCHORS_META_KEY) if example.meta else None
        if given:
            instruction = []
            for anchor in given:
                if isinstance(anchor, str):
                    instruction += [(m.start(), m.end()) for m in
                                    re.finditer(re.escape(anchor), example.instruction)]
                else:
                    start, end = anchor
                    instruction.append((int(start), int(end)))
        spans = {"instruction": instruction, "input": []}
        if example.input:
            start = len(example.instruction) + len(self._input_separator())
            spans["input"] = [(start, start + len(example.input))]
        return spans

    def _user_ids(self, example: Example) -> tuple[list[int], dict[str, tuple[int, ...]]]:
        """Token ids of the user text (cut to max_source_tokens) and the token indices (into
        those ids) of each character span. A token belongs to a span if its characters overlap
        it. Fast tokenizers give exact character offsets; slow ones are approximated by the token
        counts of text prefixes."""
        text, limit = self.user_text(example), self.config.max_source_tokens
        char_spans = self._char_spans(example)
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"][:limit], enc["offset_mapping"][:limit]
            spans = {
                name: tuple(i for i, (s, e) in enumerate(offsets)
                            if e > s and any(s < b and e > a for a, b in ranges))
                for name, ranges in char_spans.items()
            }
            return ids, spans
        ids = self._ids(text)[:limit]
        spans = {}
        for name, ranges in char_spans.items():
            positions: set[int] = set()
            for a, b in ranges:
                first, last = len(self._ids(text[:a])), len(self._ids(text[:b]))
                positions.update(range(first, min(last, len(ids))))
            spans[name] = tuple(sorted(positions))
        return ids, spans

    def encode(self, example: Example) -> EncodedExample:
        user, user_spans = self._user_ids(example)
        source = self._middle_ids + user + self._suffix_ids
        if self.is_encoder_decoder and self.tokenizer.eos_token_id is not None:
            source = source + [self.tokenizer.eos_token_id]  # T5-style encoders end with </s>
        target = self._ids(example.output)[: self.config.max_target_tokens] + [self.end_id]
        context_start = len(self._prefix_ids)
        user_start = context_start + len(self.context_ids) + len(self._middle_ids)
        spans = {"context": tuple(range(context_start, context_start + len(self.context_ids)))}
        spans.update({name: tuple(user_start + i for i in positions)
                      for name, positions in user_spans.items()})
        return EncodedExample(
            id=example.id,
            prompt_ids=self._prefix_ids + self.context_ids + source,
            context_start=context_start,
            target_ids=target,
            spans=spans,
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
