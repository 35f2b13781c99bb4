"""Autoregressive decoding with a frozen LM: greedy, sampled, or SPA, one batched loop with a
KV cache for causal and encoder-decoder models.

Everything takes an optional context direction ``delta`` ((n, d) or (B, n, d)); the prompt is
``X_ctx + delta`` (None: the manual prompt).
"""
from __future__ import annotations

import torch

from pipeline.config import DecodingConfig
from pipeline.data.example import Example
from pipeline.decoding import spa
from pipeline.decoding.sampling import sample
from pipeline.lm.frozen import Batch, FrozenCodeLM
from pipeline.lm.template import extract_code


@torch.no_grad()
def generate_ids(lm: FrozenCodeLM, batch: Batch, delta: torch.Tensor | None = None,
                 max_new_tokens: int = 128, *, decoding: DecodingConfig | None = None,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Decode the whole batch at once with a KV cache; each row stops at a stop token (not
    included). Returns the new token ids per row.

    ``decoding.strategy`` (default greedy): 'greedy' takes the argmax; 'sample' draws with
    ``temperature`` and ``top_p`` from ``generator`` (default: seeded with ``decoding.seed``);
    'spa' runs the full and the anchor-masked prompt as ONE batch of 2B rows sharing the loop
    and the KV cache, and takes the argmax of the SPA logits (a draw when
    ``decoding.spa_sample``). Both streams carry ``X_ctx + delta`` in the context unless
    'context' is an anchor.
    """
    decoding = decoding or DecodingConfig()
    embeds = lm.prompt_embeds(batch, delta)
    mask = batch.attention_mask
    bsz = embeds.shape[0]
    use_spa = decoding.strategy == "spa"
    if use_spa:
        embeds, mask = spa.two_streams(embeds, mask, batch.anchor_mask(decoding.spa_anchors))
    draw = decoding.strategy == "sample" or (use_spa and decoding.spa_sample)
    if draw and generator is None:
        generator = torch.Generator(embeds.device).manual_seed(decoding.seed)
    logits, state = lm.prefill(embeds, mask)
    stops = lm.template.stop_ids
    stop = torch.tensor(stops, dtype=torch.long, device=embeds.device)
    generated = []
    done = torch.zeros(bsz, dtype=torch.bool, device=embeds.device)
    for _ in range(max_new_tokens):
        if use_spa:
            logits = spa.split_combine(logits, decoding.spa_omega)
        if draw:
            next_ids = sample(logits, decoding.temperature, decoding.top_p, generator)
        else:
            next_ids = logits.argmax(-1)
        next_ids = torch.where(done, torch.full_like(next_ids, lm.pad_id), next_ids)
        generated.append(next_ids)
        done |= torch.isin(next_ids, stop)
        if done.all():
            break
        # Both SPA streams continue with the same (combined) token.
        logits = lm.extend(torch.cat([next_ids, next_ids]) if use_spa else next_ids, state)
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(bsz)]
    return [row[:next((i for i, tok in enumerate(row) if tok in stops), len(row))]
            for row in tokens]


def decode_code(lm: FrozenCodeLM, rows: list[list[int]]) -> list[str]:
    """Token ids -> text -> the code in it (the first markdown fence, if any)."""
    texts = lm.tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [extract_code(text, lm.template.kind) for text in texts]


def generate(lm: FrozenCodeLM, examples: list[Example], delta: torch.Tensor | None = None,
             max_new_tokens: int = 128, *, decoding: DecodingConfig | None = None,
             generator: torch.Generator | None = None) -> list[str]:
    """Code for each example (decoded, code extracted from markdown fences); greedy unless
    ``decoding`` says otherwise (see :func:`generate_ids`)."""
    batch = lm.collate(lm.encode(examples), with_targets=False).to(lm.device)
    return decode_code(lm, generate_ids(lm, batch, delta, max_new_tokens, decoding=decoding,
                                        generator=generator))


def generate_samples(lm: FrozenCodeLM, examples: list[Example], num_samples: int,
                     delta: torch.Tensor | None = None, max_new_tokens: int = 128, *,
                     decoding: DecodingConfig | None = None,
                     generator: torch.Generator | None = None) -> list[list[str]]:
    """``num_samples`` generations per example (pass@k), as one batch of B * n rows (each
    example's row repeated n times; chunk the examples to bound memory). Use a sampling decoding
    ('sample', or 'spa' with ``spa_sample``); greedy gives n equal copies. Draws are
    reproducible for the same examples, order, n and seed."""
    encoded = [e for e in lm.encode(examples) for _ in range(num_samples)]
    if delta is not None and delta.dim() == 3:  # per-example prompts follow their rows
        delta = delta.repeat_interleave(num_samples, dim=0)
    batch = lm.collate(encoded, with_targets=False).to(lm.device)
    texts = decode_code(lm, generate_ids(lm, batch, delta, max_new_tokens, decoding=decoding,
                                         generator=generator))
    return [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]
