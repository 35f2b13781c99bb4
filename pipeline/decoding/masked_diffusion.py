"""Masked-diffusion decoding with Dream's arguments (docs/dllm.md sections 2, 3, 5).

The canvas is the prompt plus ``max_new_tokens`` mask ids; each of ``steps`` full forward passes
predicts every masked position (logit j comes from hidden j-1: the *shift*) and reveals some of
them: ``origin`` reveals each with probability 1 - s/t; the confidence algs (``maskgit_plus``: the
token's probability, ``topk_margin``: top-1 minus top-2, ``entropy``: -H) reveal the K most
confident (or K drawn from softmax(conf / alg_temp)), K from the linear schedule. The loop only
sees ``model_fn(x: LongTensor[B, N]) -> logits[B, N, V]``, so prompt offsets and SPA's two
canvases (:mod:`pipeline.decoding.model_fns`) plug in without touching it.

``parity=True`` reproduces the reference ``diffusion_generate`` token for token on CPU fp32, with
the global torch RNG (``torch.manual_seed(seed)`` before the call) and the reference's RNG calls,
quirks included. ``parity=False`` (the default) differs in exactly these points:

1. K per row from that row's own masked count (the reference uses one K for the whole batch,
   ``int(mean masked count * (1 - s/t))``, so rows with unequal counts get too many or too few).
2. Only still-masked *canvas* positions are ever chosen: no re-masking of decoded or prompt
   positions (the reference's ``topk`` over -inf confidences picks them when K exceeds a row's
   masked count and writes the mask id there), and a mask id inside the prompt is never decoded.
3. The mask id is never sampled (the reference leaves it a valid token; a position that draws it
   stays masked and the output may end with mask ids), nor any id >= ``valid_vocab_size``
   (the padded embedding rows beyond the tokenizer, DreamLM/Dream #54).
4. Logits are upcast to float32 before filtering and softmax (the reference stays in the model's
   dtype, so bf16 ties decide ``topk``), and filtered entries are -inf rather than finfo.min.
5. Sampling never silently falls back to argmax (the reference catches any error of
   ``Categorical``, which includes its 1e-6 simplex check failing on bf16 probabilities).
Both modes take an optional ``torch.Generator``; without one they draw from the global RNG.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DIFFUSION_ALGS as ALGS
from pipeline.decoding.model_fns import ModelFn, dream_model_fn


@dataclass(frozen=True)
class DiffusionSettings:
    """Dream's decoding arguments. ``max_new_tokens`` is the canvas length L."""

    max_new_tokens: int
    steps: int
    eps: float = 1e-3
    alg: str = "origin"
    alg_temp: float | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    parity: bool = False

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps!r}")
        if self.alg not in ALGS:
            raise ValueError(f"alg must be one of {ALGS}, got {self.alg!r}")
        if self.alg_temp is not None and not (math.isfinite(self.alg_temp) and self.alg_temp >= 0):
            raise ValueError(f"alg_temp must be None or a finite float >= 0, got {self.alg_temp!r}")
        if self.alg == "origin" and self.alg_temp:
            raise ValueError("alg_temp > 0 has no effect with alg='origin' (it samples positions "
                             "of the confidence algs); use None")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite float >= 0, got {self.temperature!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or
                                       not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if type(self.parity) is not bool:  # 0/1 are not accepted for a flag
            raise ValueError(f"parity must be a bool, got {self.parity!r}")


@dataclass
class DecodingRecord:
    """What was revealed when. Positions index the N canvas columns (prompt included)."""

    prompt_len: int
    canvas_len: int
    alg: str
    positions: list[list[torch.Tensor]]  # [B][S] long: revealed at the step, in the order chosen
    confidences: list[list[torch.Tensor]]  # [B][S] float32: their confidences, same layout
    first_step_confidence: torch.Tensor  # (B, N) float32: step-0 confidence, NaN if not masked
    num_transfer: torch.Tensor | None  # (S, B) long: K given to each row (None for origin)
    remasked: list[list[torch.Tensor]] = field(default_factory=list)  # [B][S] parity only

    def order(self, b: int) -> torch.Tensor:
        """Row b's reveal order, flattened over steps (empty steps vanish), canvas-relative
        (0..L-1)."""
        return torch.cat(self.positions[b]) - self.prompt_len

    def orders(self) -> list[torch.Tensor]:
        return [self.order(b) for b in range(len(self.positions))]


@dataclass
class DiffusionOutput:
    sequences: torch.Tensor  # (B, N) prompt + canvas
    history: list[torch.Tensor] | None  # S frames (B, N), each after its step
    record: DecodingRecord | None


# ---- notation ----------------------------------------------------------------------------------
# Variable names below, and what docs/dllm.md and Dream's reference ``diffusion_generate`` call
# them (B rows, n prompt columns, L canvas columns, N = n + L, V the vocabulary, S steps):
#   canvas           x            (B, N) long: the prompt, then the canvas; updated in place
#   masked           M_i          (B, N) bool: still masked at step i (``mask_index``)
#   logits           z            (B, N, V): the step's logits after the shift
#   t, s             t, s         the step's times, s < t: consecutive entries of
#                                 ``step_times(S, eps)`` = linspace(1, eps, S + 1) (``timesteps``)
#   reveal           K            positions a confidence step reveals: int(count * (1 - s / t)),
#                                 every one left on the last step (``number_transfer_tokens``)
#   confidence       c            per masked position: p(x0) (maskgit_plus), top-1 minus top-2
#                                 (topk_margin), or -H (entropy) (``confidence``)
#   proposal         x0           the token drawn (or the argmax) for a masked position (``x0``)
#   mask_id          m            the mask token's id (``mask_token_id``)


def step_times(steps: int, eps: float, device: torch.device | str | None = None
               ) -> torch.Tensor:
    """The S + 1 times 1 = t_0 > ... > t_S = eps, float32 as the reference: step i goes from
    t_i to t_{i+1}."""
    return torch.linspace(1, eps, steps + 1, device=device)


def reveal_count(count: torch.Tensor, t: torch.Tensor, s: torch.Tensor, *, last: bool
                 ) -> torch.Tensor:
    """K for a confidence step from time t to s: ``count`` (float32 masked counts, any shape)
    times 1 - s/t, truncated to integers; all of them on the last step."""
    return (count if last else count * (1 - s / t)).long()


# ---- the token distribution -------------------------------------------------------------------
def _filtered(logits: torch.Tensor, settings: DiffusionSettings, *, fill: float) -> torch.Tensor:
    """Temperature, then nucleus (keeps the first token past top_p), then top-k; dropped
    entries get ``fill``."""
    z = logits
    if settings.temperature > 0:
        z = z / settings.temperature
    if settings.top_p is not None and settings.top_p < 1:
        sz, si = torch.sort(z, dim=-1, descending=True)
        drop = torch.cumsum(F.softmax(sz, dim=-1), dim=-1) > settings.top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), fill)
    if settings.top_k is not None:
        kth = torch.topk(z, min(settings.top_k, z.shape[-1]))[0][..., -1:]
        z = z.masked_fill(z < kth, fill)
    return z


def _draw(probs: torch.Tensor, generator: torch.Generator | None, *, parity: bool
          ) -> torch.Tensor | None:
    """One token per row ~ ``probs`` (M, V). Parity: like ``Categorical(probs=P).sample()``
    (renormalised, 1e-6 simplex check); None where the reference would fall back to argmax."""
    if not parity:
        return torch.multinomial(probs, 1, True, generator=generator)[:, 0]
    P = probs / probs.sum(-1, keepdim=True)
    if not bool(((P >= 0).all(-1) & ((P.sum(-1) - 1).abs() < 1e-6)).all()):
        return None
    try:
        return torch.multinomial(P, 1, True, generator=generator)[:, 0]
    except RuntimeError:
        return None


def _fill(settings: DiffusionSettings, dtype: torch.dtype) -> float:
    """What filtering writes: the reference's finfo.min in parity mode, else -inf."""
    return torch.finfo(dtype).min if settings.parity else -math.inf


def sample_tokens(logits: torch.Tensor, settings: DiffusionSettings,
                  generator: torch.Generator | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, V) logits of M masked positions -> (confidence (M,), proposal x0 (M,), probs
    (M, V)) for ``settings.alg``."""
    probs = F.softmax(_filtered(logits, settings, fill=_fill(settings, logits.dtype)), dim=-1)
    x0 = None
    if settings.temperature > 0 and probs.shape[0] > 0:
        x0 = _draw(probs, generator, parity=settings.parity)
    if x0 is None:
        confidence, x0 = probs.max(dim=-1)
    else:
        confidence = probs.gather(-1, x0[:, None])[:, 0]
    if settings.alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values if probs.shape[-1] > 1 else F.pad(probs, (0, 1))
        confidence = top2[:, 0] - top2[:, 1]
    elif settings.alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, x0, probs


# ---- one step ---------------------------------------------------------------------------------
Chosen = list[tuple[torch.Tensor, torch.Tensor]]  # per row: (positions, confidences) as chosen


@dataclass(frozen=True)
class StepContext:
    """What every step of one decoding shares: the settings, the mask token's id and the
    random stream."""

    settings: DiffusionSettings
    mask_id: int
    generator: torch.Generator | None


def origin_step(canvas: torch.Tensor, masked: torch.Tensor, logits: torch.Tensor,
                t: torch.Tensor, s: torch.Tensor, *, last: bool, context: StepContext
                ) -> tuple[Chosen, None, None]:
    """``origin``: each masked position is revealed with probability 1 - s/t (all on the last
    step): one ``torch.rand`` over the masked positions, then tokens for the selected ones only.
    Updates ``canvas``; returns what each row revealed (no K, no step-wide confidence)."""
    count = int(masked.sum())
    proposal = torch.full((count,), context.mask_id, dtype=torch.long, device=canvas.device)
    reveal = torch.rand(count, generator=context.generator, device=canvas.device) < (
        1 if last else 1 - s / t)
    confidence, tokens, _ = sample_tokens(logits[masked][reveal], context.settings,
                                          context.generator)
    proposal[reveal] = tokens
    canvas[masked] = proposal
    revealed = torch.zeros_like(masked)
    revealed[masked] = reveal
    confidences = torch.full(masked.shape, math.nan, device=canvas.device)
    confidences[revealed] = confidence.float()
    rows = [revealed[b].nonzero()[:, 0] for b in range(canvas.shape[0])]
    return [(p, confidences[b, p]) for b, p in enumerate(rows)], None, None


def _reveal_per_row(masked: torch.Tensor, t: torch.Tensor, s: torch.Tensor, *, last: bool,
                    parity: bool) -> list[int]:
    """K for each row: from its own masked count, or (parity) one K for the whole batch from
    the mean masked count, float32 as the reference."""
    if parity:
        return [int(reveal_count(masked.sum() / masked.shape[0], t, s, last=last))] * \
            masked.shape[0]
    return reveal_count(masked.sum(1) / 1, t, s, last=last).tolist()


def confidence_step(canvas: torch.Tensor, masked: torch.Tensor, logits: torch.Tensor,
                    t: torch.Tensor, s: torch.Tensor, *, last: bool, context: StepContext
                    ) -> tuple[Chosen, list[int], torch.Tensor]:
    """The confidence algs: a proposal for every masked position, then the K most confident
    revealed (or K drawn from softmax(confidence / alg_temp)). Updates ``canvas``; returns what
    each row revealed, each row's K and the confidence of every masked position."""
    settings, generator = context.settings, context.generator
    confidence, x0, _ = sample_tokens(logits[masked], settings, generator)
    B = canvas.shape[0]
    reveal = _reveal_per_row(masked, t, s, last=last, parity=settings.parity)
    scores = torch.full(masked.shape, -math.inf, dtype=confidence.dtype, device=canvas.device)
    scores[masked] = confidence
    proposal = torch.full_like(canvas, context.mask_id)
    proposal[masked] = x0
    most = max(reveal)
    if most <= 0:
        return [(canvas.new_zeros(0), scores.new_zeros(0)) for _ in range(B)], reveal, confidence
    if not settings.alg_temp:
        order = list(torch.topk(scores, most, dim=-1).indices)  # descending confidence
    elif settings.parity:  # one draw without replacement over all N columns, per row
        order = list(torch.multinomial(F.softmax(scores / settings.alg_temp, dim=-1), most,
                                       generator=generator))
    else:  # only over the row's own masked positions
        order = []
        for b in range(B):
            positions = masked[b].nonzero()[:, 0]
            weights = F.softmax(scores[b, positions].float() / settings.alg_temp, dim=-1)
            pick = (torch.multinomial(weights, reveal[b], generator=generator) if reveal[b]
                    else positions[:0])
            order.append(positions[pick])
    chosen = []
    for b in range(B):
        p = order[b][:reveal[b]]
        canvas[b, p] = proposal[b, p]
        chosen.append((p, scores[b, p].float()))
    return chosen, reveal, confidence


def _first_confidence(logits: torch.Tensor, settings: DiffusionSettings) -> torch.Tensor:
    """``origin`` computes no confidence; for the record use the filtered max probability,
    without drawing (the RNG stream is left as the reference's)."""
    filtered = _filtered(logits, settings, fill=_fill(settings, logits.dtype))
    return F.softmax(filtered, dim=-1).max(dim=-1).values


class _Recorder:
    """Builds the :class:`DecodingRecord` step by step."""

    def __init__(self, B: int, n: int, L: int, alg: str):
        self.n, self.L, self.alg = n, L, alg
        self.pos: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.conf: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.remasked: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.reveal: list[list[int]] = []
        self.first: torch.Tensor | None = None

    def add(self, before: torch.Tensor, after: torch.Tensor, chosen: Chosen,
            reveal: list[int] | None, mask_id: int) -> None:
        """One step: the canvas ``before`` and ``after`` it, what it chose, its K per row."""
        if reveal is not None:
            self.reveal.append(reveal)
        m = mask_id
        for b, (p, c) in enumerate(chosen):
            keep = (before[b, p] == m) & (after[b, p] != m)  # drops mask draws, re-mask picks
            self.pos[b].append(p[keep].cpu())
            self.conf[b].append(c[keep].cpu())
            self.remasked[b].append(((before[b] != m) & (after[b] == m)).nonzero()[:, 0].cpu())

    def first_step(self, masked: torch.Tensor, confidence: torch.Tensor) -> None:
        self.first = torch.full(masked.shape, math.nan)
        self.first[masked.cpu()] = confidence.float().cpu()

    def done(self) -> DecodingRecord:
        reveal = torch.tensor(self.reveal, dtype=torch.long) if self.reveal else None
        return DecodingRecord(self.n, self.L, self.alg, self.pos, self.conf, self.first, reveal,
                              self.remasked)


def _suppress(logits: torch.Tensor, mask_id: int, valid_vocab_size: int | None) -> torch.Tensor:
    """The mask id, and ids at or beyond ``valid_vocab_size``, never drawn (default mode)."""
    logits[..., mask_id] = -math.inf
    if valid_vocab_size is not None and valid_vocab_size < logits.shape[-1]:
        logits[..., valid_vocab_size:] = -math.inf
    return logits


# ---- the loop ---------------------------------------------------------------------------------
@torch.no_grad()
def diffusion_generate(model_fn: ModelFn | nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None, settings: DiffusionSettings,
                       mask_token_id: int, *, generator: torch.Generator | None = None,
                       record: bool = True, output_history: bool = False,
                       valid_vocab_size: int | None = None,
                       tokens_hook: Callable | None = None,
                       logits_hook: Callable | None = None) -> DiffusionOutput:
    """Decode a left-padded batch ``input_ids`` (B, n) into a (B, n + L) canvas.

    ``model_fn`` maps x (B, N) to raw logits (B, N, V); a DreamModel is wrapped with
    :func:`dream_model_fn` and ``attention_mask`` (B, n) (otherwise the mask is the model_fn's
    business). ``valid_vocab_size`` (default mode only): ids at or above it are never produced.
    Hooks as the reference's: ``tokens_hook(step, x, logits) -> x`` (once with None before the
    loop), ``logits_hook(step, x, logits) -> logits`` after the shift."""
    if isinstance(model_fn, nn.Module):
        model_fn = dream_model_fn(model_fn, attention_mask)
    context = StepContext(settings, mask_token_id, generator)
    B, n = input_ids.shape
    L, S = settings.max_new_tokens, settings.steps
    canvas = F.pad(input_ids, (0, L), value=mask_token_id)
    is_canvas = torch.arange(n + L, device=canvas.device) >= n
    times = step_times(S, settings.eps, canvas.device)
    recorder = _Recorder(B, n, L, settings.alg) if record else None
    history: list[torch.Tensor] | None = [] if output_history else None
    step = origin_step if settings.alg == "origin" else confidence_step
    if tokens_hook is not None:
        canvas = tokens_hook(None, canvas, None)
    for i in range(S):
        masked = canvas == mask_token_id
        if not settings.parity:
            masked &= is_canvas
        logits = model_fn(canvas)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # logit j from hidden j-1
        if not settings.parity:
            logits = _suppress(logits.float(), mask_token_id, valid_vocab_size)
        if logits_hook is not None:
            logits = logits_hook(i, canvas, logits)
        before = canvas.clone()
        chosen, reveal, confidence = step(canvas, masked, logits, times[i], times[i + 1],
                                          last=i == S - 1, context=context)
        if recorder is not None:
            if i == 0:
                recorder.first_step(masked, confidence if confidence is not None
                                    else _first_confidence(logits[masked], settings))
            recorder.add(before, canvas, chosen, reveal, mask_token_id)
        if tokens_hook is not None:
            canvas = tokens_hook(i, canvas, logits)
        if history is not None:
            history.append(canvas.clone())
    return DiffusionOutput(canvas, history, recorder.done() if recorder is not None else None)


def completion_ids(sequences: torch.Tensor, prompt_len: int, stop_ids: set[int] | tuple[int, ...],
                   *, mask_id: int, vocab_size: int | None = None) -> list[list[int]]:
    """Each row's canvas (the columns after ``prompt_len``) cut at its first stop id, without
    leftover mask ids and, given ``vocab_size``, without ids outside [0, vocab_size) (the padded
    embedding rows beyond the tokenizer)."""
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        cut = next((j for j, token in enumerate(row) if token in stop_ids), len(row))
        rows.append([token for token in row[:cut] if token != mask_id
                     and (vocab_size is None or 0 <= token < vocab_size)])
    return rows
