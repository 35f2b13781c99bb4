"""One interface to a frozen code LM, causal or encoder-decoder.

Everything takes an optional context *direction* ``delta`` of shape (n, d) or (B, n, d); the
context's embeddings become ``X_ctx + delta`` (``delta=None`` is the manual prompt). Gradients
flow through the LM's activations into ``delta``; the LM's own weights never get any.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.data.example import Example
from pipeline.lm.template import SPAN_NAMES, EncodedExample, PromptTemplate

IGNORE = -100


@dataclass
class Batch:
    """Padded tensors for B examples. Causal: prompt + target left-padded into ``input_ids``.
    Encoder-decoder: the prompt in ``input_ids`` (right-padded), the target in ``labels``."""

    ids: list[str]
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    context_mask: torch.Tensor  # (B, L) bool, exactly n True per row
    labels: torch.Tensor | None  # causal: (B, L), enc-dec: (B, L_target); IGNORE off target
    # (B, L) bool per anchorable span ('context', 'instruction', 'input'; template.SPAN_NAMES),
    # in the same padded layout as input_ids; empty when the encoded examples carry no spans.
    spans: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> Batch:
        move = lambda x: None if x is None else x.to(device)
        return Batch(self.ids, move(self.input_ids), move(self.attention_mask),
                     move(self.context_mask), move(self.labels),
                     {name: mask.to(device) for name, mask in self.spans.items()})

    def anchor_mask(self, anchors: list[str] | tuple[str, ...]) -> torch.Tensor:
        """(B, L) bool: the union of the named spans (several anchors share one masked stream)."""
        missing = [name for name in anchors if name not in self.spans]
        if missing:
            raise ValueError(f"batch has no span {missing} (it has {sorted(self.spans)}); collate "
                             "examples encoded by PromptTemplate.encode to anchor them")
        mask = torch.zeros_like(self.context_mask)
        for name in anchors:
            mask |= self.spans[name]
        return mask


class FrozenCodeLM:
    """Wraps a HF model + tokenizer + :class:`PromptTemplate`; never updates the model."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 template: PromptTemplate):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        model.eval()
        model.requires_grad_(False)
        self.pad_id = tokenizer.pad_token_id
        # Prefill computes the logits of the last position only where the model allows it
        # (the full (B, L, V) logits of a long prompt are large and unused).
        self._keep_last = ("logits_to_keep" in inspect.signature(model.forward).parameters
                           and not self.is_encoder_decoder)

    @property
    def is_diffusion(self) -> bool:
        """A masked-diffusion LM (Dream, DiffuCoder): bidirectional, decoded by
        :mod:`pipeline.decoding.masked_diffusion`, scored by the coupled estimator."""
        return getattr(self.model.config, "model_type", None) == "Dream"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def context_length(self) -> int:
        return len(self.template.context_ids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, d), the input-embedding table the prompt enters."""
        return self.model.get_input_embeddings()(input_ids)

    @torch.no_grad()
    def context_embedding(self) -> torch.Tensor:
        """X_ctx: (n, d), detached."""
        ids = torch.tensor(self.template.context_ids, device=self.device)
        return self.embed(ids[None])[0].detach()

    @torch.no_grad()
    def mean_token_norm(self) -> float:
        return self.model.get_input_embeddings().weight.float().norm(dim=-1).mean().item()

    @torch.no_grad()
    def condition(self, batch: Batch, spans: tuple[str, ...] = ("instruction", "input")
                  ) -> torch.Tensor:
        """Each example's task as a vector: the mean of its input embeddings over the named
        spans (the instruction and input), (B, d) float32, no gradient. An embedding lookup,
        no forward: cheap enough to compute for every batch instead of caching."""
        if not all(name in batch.spans for name in spans):
            raise ValueError(f"batch has spans {sorted(batch.spans)}, not {list(spans)}: collate "
                             "examples encoded by PromptTemplate.encode")
        mask = batch.anchor_mask(spans)  # (B, L), the union of the spans
        embeds = self.embed(batch.input_ids).float()
        counts = mask.sum(-1, keepdim=True).clamp(min=1)
        return (embeds * mask[..., None]).sum(1) / counts

    # ---- batching ------------------------------------------------------------------------------
    def encode(self, examples: list[Example]) -> list[EncodedExample]:
        return [self.template.encode(example) for example in examples]

    def collate(self, encoded: list[EncodedExample], *, with_targets: bool = True) -> Batch:
        """Pad a list of encoded examples. Causal sequences are left-padded so that generation
        continues every row from the same last column."""
        n = self.context_length
        if self.is_encoder_decoder:
            rows = [e.prompt_ids for e in encoded]
            width = max(map(len, rows))
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            context = torch.zeros_like(input_ids, dtype=torch.bool)
            spans = self._span_masks(encoded, input_ids.shape, [0] * len(rows))
            for i, (row, e) in enumerate(zip(rows, encoded)):
                input_ids[i, : len(row)] = torch.tensor(row)
                attention[i, : len(row)] = 1
                context[i, e.context_start : e.context_start + n] = True
            labels = None
            if with_targets:
                t_width = max(len(e.target_ids) for e in encoded)
                labels = torch.full((len(rows), t_width), IGNORE, dtype=torch.long)
                for i, e in enumerate(encoded):
                    labels[i, : len(e.target_ids)] = torch.tensor(e.target_ids)
            return Batch([e.id for e in encoded], input_ids, attention, context, labels, spans)

        rows = [e.prompt_ids + (e.target_ids if with_targets else []) for e in encoded]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        context = torch.zeros_like(input_ids, dtype=torch.bool)
        labels = torch.full_like(input_ids, IGNORE) if with_targets else None
        spans = self._span_masks(encoded, input_ids.shape, [width - len(row) for row in rows])
        for i, (row, e) in enumerate(zip(rows, encoded)):
            pad = width - len(row)
            input_ids[i, pad:] = torch.tensor(row)
            attention[i, pad:] = 1
            context[i, pad + e.context_start : pad + e.context_start + n] = True
            if with_targets:
                start = pad + len(e.prompt_ids)
                labels[i, start:] = torch.tensor(e.target_ids)
        return Batch([e.id for e in encoded], input_ids, attention, context, labels, spans)

    @staticmethod
    def _span_masks(encoded: list[EncodedExample], shape: torch.Size, offsets: list[int]
                    ) -> dict[str, torch.Tensor]:
        """(B, L) bool mask per span name, each row's positions shifted by its left padding.
        Empty when the examples carry no spans (e.g. rebuilt from Ray Data columns)."""
        if not all(e.spans for e in encoded):
            return {}
        masks = {}
        for name in SPAN_NAMES:
            mask = torch.zeros(shape, dtype=torch.bool)
            for i, (e, offset) in enumerate(zip(encoded, offsets)):
                positions = e.spans.get(name, ())
                if positions:
                    mask[i, torch.tensor(positions) + offset] = True
            masks[name] = mask
        return masks

    # ---- forward -------------------------------------------------------------------------------
    def prompt_embeds(self, batch: Batch, delta: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings with the context replaced by ``X_ctx + delta``: (B, L, d)."""
        return self.inject(self.embed(batch.input_ids), batch.context_mask, delta)

    def inject(self, embeds: torch.Tensor, context_mask: torch.Tensor,
               delta: torch.Tensor | None) -> torch.Tensor:
        """``embeds`` (R, L, d) with the n ``context_mask`` positions of each row replaced by
        ``X_ctx + delta`` (delta (n, d), or (B, n, d) with R a multiple of B)."""
        if delta is None:
            return embeds
        rows, n, d = embeds.shape[0], self.context_length, embeds.shape[-1]
        context = self.context_embedding().to(embeds.dtype)
        prompt = context + delta.to(embeds.dtype)
        if prompt.dim() == 3 and prompt.shape[0] != rows:
            prompt = prompt.repeat(rows // prompt.shape[0], 1, 1)
        # masked_scatter fills the n masked positions of each row in order, and is differentiable
        # with respect to `prompt`.
        return embeds.masked_scatter(context_mask[..., None],
                                     prompt.expand(rows, n, d).contiguous())

    @staticmethod
    def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
        # Left padding: real tokens start at position 0 in every row.
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def code_loss(self, batch: Batch, delta: torch.Tensor | None = None, *,
                  per_example: bool = False, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
        """Cross-entropy on the code tokens only. Returns the token mean over the batch, or (B,)
        per-example means when ``per_example``. A masked-diffusion LM sees the whole sequence,
        so its "cross-entropy" is the coupled estimator's negative log-likelihood proxy
        (:func:`pipeline.lm.coupled.coupled_scores_at`; masks drawn from ``generator``, else
        from a fixed seed, so held-out scores are reproducible)."""
        if batch.labels is None:
            raise ValueError("code_loss needs a batch collated with targets")
        if self.is_diffusion:
            return self._diffusion_code_loss(batch, delta, per_example=per_example,
                                             generator=generator)
        embeds = self.prompt_embeds(batch, delta)
        if self.is_encoder_decoder:
            logits = self.model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                labels=batch.labels).logits
            labels = batch.labels
        else:
            # Logits only from the first labelled column on (targets are right-aligned under
            # left padding): the (B, L, V) logits of the prompt positions are never formed.
            width = batch.labels.shape[1]
            first = int((batch.labels != IGNORE).any(0).nonzero().min()) if self._keep_last else 1
            keep = {"logits_to_keep": width - first + 1} if self._keep_last else {}
            logits = self.model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                position_ids=self._positions(batch.attention_mask),
                                **keep).logits
            # logit j predicts token j + 1
            logits, labels = logits[:, :-1], batch.labels[:, width - logits.shape[1] + 1:]
        token_loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
            ignore_index=IGNORE, reduction="none",
        ).view(labels.shape)
        counts = (labels != IGNORE).sum(-1)
        if per_example:
            return token_loss.sum(-1) / counts.clamp(min=1)
        return token_loss.sum() / counts.sum().clamp(min=1)

    def _diffusion_code_loss(self, batch: Batch, delta: torch.Tensor | None, *,
                             per_example: bool, generator: torch.Generator | None
                             ) -> torch.Tensor:
        from pipeline.lm.coupled import coupled_scores_at
        from pipeline.lm.dream import padding_inputs

        targets = batch.labels != IGNORE
        mask4, positions = padding_inputs(batch.attention_mask, batch.input_ids.shape[1])
        if mask4 is not None:
            mask4, positions = mask4.repeat(3, 1, 1, 1), positions.repeat(3, 1)
        context = batch.context_mask.repeat(3, 1)

        def model_fn(views: torch.Tensor) -> torch.Tensor:
            embeds = self.inject(self.embed(views), context, delta)
            return self.model(inputs_embeds=embeds, attention_mask=mask4,
                              position_ids=positions).logits

        generator = generator or torch.Generator(self.device).manual_seed(0)
        scores = coupled_scores_at(model_fn, batch.input_ids, targets,
                                   self.model.config.mask_token_id, generator)
        counts = targets.sum(-1)
        if per_example:
            return -scores.sum(-1) / counts.clamp(min=1)
        return -scores.sum() / counts.sum().clamp(min=1)

    # ---- one decoding step at a time (the loops are in pipeline.decoding) ----------------------
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, DecodeState]:
        """Run R prompt rows ((R, L, d) embeddings, (R, L) mask); return the (R, V) logits of the
        first new token and the KV-cache state to extend."""
        if self.is_encoder_decoder:
            encoder_outputs = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
            start = self.model.config.decoder_start_token_id
            step_ids = torch.full((embeds.shape[0], 1), start, dtype=torch.long,
                                  device=embeds.device)
            out = self.model(encoder_outputs=encoder_outputs, attention_mask=mask,
                             decoder_input_ids=step_ids, use_cache=True)
            return out.logits[:, -1], DecodeState(out.cache, mask, None, encoder_outputs)
        positions = self._positions(mask)
        keep = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         use_cache=True, **keep)
        return out.logits[:, -1], DecodeState(out.cache, mask, positions[:, -1:] + 1)

    def extend(self, next_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Feed one new token per row ((R,) ids) through the cache; return the next (R, V)
        logits. Updates ``state`` in place."""
        if self.is_encoder_decoder:
            out = self.model(encoder_outputs=state.encoder_outputs, attention_mask=state.mask,
                             decoder_input_ids=next_ids[:, None], cache=state.cache,
                             use_cache=True)
        else:
            state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], 1)
            out = self.model(input_ids=next_ids[:, None], attention_mask=state.mask,
                             position_ids=state.position, cache=state.cache, use_cache=True)
            state.position = state.position + 1
        state.cache = out.cache
        return out.logits[:, -1]


@dataclass
class DecodeState:
    """What one decoding step hands the next: the KV cache, the (R, L') attention mask, the next
    (R, 1) positions (causal) or the encoder outputs (encoder-decoder)."""

    cache: object  # transformers' Cache (DynamicCache / EncoderDecoderCache)
    mask: torch.Tensor
    position: torch.Tensor | None
    encoder_outputs: object = None
