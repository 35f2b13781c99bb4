"""Masked-diffusion decoding with Dream's arguments (docs/dllm.md sections 2, 3, 5).

The canvas is the prompt plus ``max_new_tokens`` mask ids; each of ``steps`` full forward passes
predicts every masked position (logit j comes from hidden j-1: the *shift*) and reveals some of
them: ``origin`` reveals each with probability 1 - s/t; the confidence algs (``maskgit_plus``: the
token's probability, ``topk_margin``: top-1 minus top-2, ``entropy``: -H) reveal the K most
confident (or K drawn from softmax(conf / alg_temp)), K from the linear schedule. The loop only
sees ``model_fn(x: LongTensor[B, N]) -> logits[B, N, V]``, so prompt offsets
(:func:`dream_model_fn`) and SPA's two canvases (:func:`spa_model_fn`) plug in without touching
it.

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

from pipeline.lm.dream import padding_inputs

ModelFn = Callable[[torch.Tensor], torch.Tensor]
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


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


def transfer_schedule(L: int, S: int, eps: float = 1e-3) -> list[int]:
    """K per step for one row of L masks under the confidence algs: ``int(n * (1 - s/t))`` with
    n the masks left and (t, s) from ``linspace(1, eps, S+1)``, float32 as the reference; the
    last step takes all that is left. S = L <= 768 gives [0, 1, ..., 1, 2]."""
    tau, left, out = torch.linspace(1, eps, S + 1), L, []
    for i in range(S):
        k = int(torch.tensor(left) / 1 * (1 - tau[i + 1] / tau[i])) if i < S - 1 else left
        out.append(k)
        left -= k
    return out


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


# ---- the token distribution -------------------------------------------------------------------
def _filtered(z: torch.Tensor, s: DiffusionSettings, fill: float) -> torch.Tensor:
    """Temperature, then nucleus (keeps the first token past top_p), then top-k."""
    if s.temperature > 0:
        z = z / s.temperature
    if s.top_p is not None and s.top_p < 1:
        sz, si = torch.sort(z, dim=-1, descending=True)
        drop = torch.cumsum(F.softmax(sz, dim=-1), dim=-1) > s.top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), fill)
    if s.top_k is not None:
        kth = torch.topk(z, min(s.top_k, z.shape[-1]))[0][..., -1:]
        z = z.masked_fill(z < kth, fill)
    return z


def _draw(P: torch.Tensor, parity: bool, generator: torch.Generator | None
          ) -> torch.Tensor | None:
    """One token per row ~ P. Parity: like ``Categorical(probs=P).sample()`` (renormalised,
    1e-6 simplex check); None where the reference would fall back to argmax."""
    if not parity:
        return torch.multinomial(P, 1, True, generator=generator)[:, 0]
    P = P / P.sum(-1, keepdim=True)
    if not bool(((P >= 0).all(-1) & ((P.sum(-1) - 1).abs() < 1e-6)).all()):
        return None
    try:
        return torch.multinomial(P, 1, True, generator=generator)[:, 0]
    except RuntimeError:
        return None


def sample_tokens(z: torch.Tensor, s: DiffusionSettings, generator: torch.Generator | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, V) logits -> (confidence (M,), token (M,), probs (M, V)) for ``s.alg``."""
    fill = torch.finfo(z.dtype).min if s.parity else -math.inf
    P = F.softmax(_filtered(z, s, fill), dim=-1)
    x0 = None
    if s.temperature > 0 and P.shape[0] > 0:
        x0 = _draw(P, s.parity, generator)
    if x0 is None:
        conf, x0 = P.max(dim=-1)
    else:
        conf = P.gather(-1, x0[:, None])[:, 0]
    if s.alg == "topk_margin":
        top2 = P.topk(2, dim=-1).values if P.shape[-1] > 1 else F.pad(P, (0, 1))
        conf = top2[:, 0] - top2[:, 1]
    elif s.alg == "entropy":
        conf = (P * torch.log(P + 1e-10)).sum(-1)
    return conf, x0, P


# ---- one step ---------------------------------------------------------------------------------
Chosen = list[tuple[torch.Tensor, torch.Tensor]]  # per row: (positions, confidences) as chosen


def _origin_step(x, Mi, z, t, s_, last, st, m, gen) -> tuple[Chosen, list[int] | None, None]:
    """Each masked position is revealed with probability 1 - s/t (all on the last step): one
    ``torch.rand`` over the masked positions, then tokens for the selected ones only."""
    n = int(Mi.sum())
    x0 = torch.full((n,), m, dtype=torch.long, device=x.device)
    sel = torch.rand(n, generator=gen, device=x.device) < (1 if last else 1 - s_ / t)
    conf, tok, _ = sample_tokens(z[Mi][sel], st, gen)
    x0[sel] = tok
    x[Mi] = x0
    chosen_full = torch.zeros_like(Mi)
    chosen_full[Mi] = sel
    cf = torch.full(Mi.shape, math.nan, device=x.device)
    cf[chosen_full] = conf.float()
    rows = [chosen_full[b].nonzero()[:, 0] for b in range(x.shape[0])]
    return [(p, cf[b, p]) for b, p in enumerate(rows)], None, None


def _confidence_step(x, Mi, z, t, s_, last, st, m, gen
                     ) -> tuple[Chosen, list[int], torch.Tensor]:
    """Sample every masked position, then reveal the K most confident (or K drawn from
    softmax(conf / alg_temp)). Parity: one K from the batch's mean masked count."""
    conf, x0, _ = sample_tokens(z[Mi], st, gen)
    B = x.shape[0]
    if st.parity:
        mean = Mi.sum() / B  # float32, as the reference
        ks = [int(mean) if last else int(mean * (1 - s_ / t))] * B
    else:
        counts = Mi.sum(1) / 1
        ks = (counts if last else counts * (1 - s_ / t)).long().tolist()
    C = torch.full(Mi.shape, -math.inf, dtype=conf.dtype, device=x.device)
    C[Mi] = conf
    x_ = torch.full_like(x, m)
    x_[Mi] = x0
    kmax = max(ks)
    if kmax <= 0:
        return [(x.new_zeros(0), C.new_zeros(0)) for _ in range(B)], ks, conf
    if not st.alg_temp:
        idx = list(torch.topk(C, kmax, dim=-1).indices)  # descending confidence
    elif st.parity:  # one draw without replacement over all N columns, per row
        idx = list(torch.multinomial(F.softmax(C / st.alg_temp, dim=-1), kmax, generator=gen))
    else:  # only over the row's own masked positions
        idx = []
        for b in range(B):
            pos = Mi[b].nonzero()[:, 0]
            w = F.softmax(C[b, pos].float() / st.alg_temp, dim=-1)
            pick = torch.multinomial(w, ks[b], generator=gen) if ks[b] else pos[:0]
            idx.append(pos[pick])
    out = []
    for b in range(B):
        p = idx[b][:ks[b]]
        x[b, p] = x_[b, p]
        out.append((p, C[b, p].float()))
    return out, ks, conf


def _first_confidence(z: torch.Tensor, st: DiffusionSettings) -> torch.Tensor:
    """``origin`` computes no confidence; for the record use the filtered max probability,
    without drawing (the RNG stream is left as the reference's)."""
    fill = torch.finfo(z.dtype).min if st.parity else -math.inf
    return F.softmax(_filtered(z, st, fill), dim=-1).max(dim=-1).values


class _Recorder:
    def __init__(self, B: int, n: int, L: int, alg: str):
        self.n, self.L, self.alg = n, L, alg
        self.pos: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.conf: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.remasked: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.ks: list[list[int]] = []
        self.first: torch.Tensor | None = None

    def add(self, prev, x, chosen: Chosen, ks, m: int) -> None:
        if ks is not None:
            self.ks.append(ks)
        for b, (p, c) in enumerate(chosen):
            keep = (prev[b, p] == m) & (x[b, p] != m)  # drops mask draws and re-mask picks
            self.pos[b].append(p[keep].cpu())
            self.conf[b].append(c[keep].cpu())
            self.remasked[b].append(((prev[b] != m) & (x[b] == m)).nonzero()[:, 0].cpu())

    def first_step(self, Mi: torch.Tensor, conf: torch.Tensor) -> None:
        self.first = torch.full(Mi.shape, math.nan)
        self.first[Mi.cpu()] = conf.float().cpu()

    def done(self) -> DecodingRecord:
        nt = torch.tensor(self.ks, dtype=torch.long) if self.ks else None
        return DecodingRecord(self.n, self.L, self.alg, self.pos, self.conf, self.first, nt,
                              self.remasked)


def _suppress(z: torch.Tensor, m: int, valid_vocab_size: int | None) -> torch.Tensor:
    z[..., m] = -math.inf
    if valid_vocab_size is not None and valid_vocab_size < z.shape[-1]:
        z[..., valid_vocab_size:] = -math.inf
    return z


# ---- the loop ---------------------------------------------------------------------------------
@torch.no_grad()
def diffusion_generate(model_fn: ModelFn | nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None, settings: DiffusionSettings,
                       mask_token_id: int, generator: torch.Generator | None = None,
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
    st, m = settings, mask_token_id
    if isinstance(model_fn, nn.Module):
        model_fn = dream_model_fn(model_fn, attention_mask)
    B, n = input_ids.shape
    L, S = st.max_new_tokens, st.steps
    x = F.pad(input_ids, (0, L), value=m)
    canvas = torch.arange(n + L, device=x.device) >= n
    tau = torch.linspace(1, st.eps, S + 1, device=x.device)
    rec = _Recorder(B, n, L, st.alg) if record else None
    history: list[torch.Tensor] | None = [] if output_history else None
    step = _origin_step if st.alg == "origin" else _confidence_step
    if tokens_hook is not None:
        x = tokens_hook(None, x, None)
    for i in range(S):
        Mi = (x == m) if st.parity else (x == m) & canvas
        z = model_fn(x)
        z = torch.cat([z[:, :1], z[:, :-1]], dim=1)  # logit j from hidden j-1
        if not st.parity:
            z = _suppress(z.float(), m, valid_vocab_size)
        if logits_hook is not None:
            z = logits_hook(i, x, z)
        prev = x.clone()
        chosen, ks, conf_all = step(x, Mi, z, tau[i], tau[i + 1], i == S - 1, st, m, generator)
        if rec is not None:
            if i == 0:
                rec.first_step(Mi, conf_all if conf_all is not None
                               else _first_confidence(z[Mi], st))
            rec.add(prev, x, chosen, ks, m)
        if tokens_hook is not None:
            x = tokens_hook(i, x, z)
        if history is not None:
            history.append(x.clone())
    return DiffusionOutput(x, history, rec.done() if rec is not None else None)


# ---- model functions --------------------------------------------------------------------------
def _span_mask(prompt_mask: torch.Tensor, N: int, n_ctx: int) -> torch.Tensor:
    mask = F.pad(prompt_mask.bool(), (0, N - prompt_mask.shape[1]), value=False)
    if not bool((mask.sum(1) == n_ctx).all()):
        raise ValueError(f"prompt_mask must mark exactly n_ctx={n_ctx} positions in every row, "
                         f"got {mask.sum(1).tolist()}")
    return mask


def _embed(model: nn.Module, x: torch.Tensor, prompt_embeds: torch.Tensor | None,
           span: torch.Tensor | None) -> torch.Tensor:
    emb = model.get_input_embeddings()(x)
    if prompt_embeds is not None:  # replace the span's embeddings, row-major within each row
        emb = emb.masked_scatter(span[..., None], prompt_embeds.to(emb.dtype))
    return emb


def dream_model_fn(model: nn.Module, attention_mask: torch.Tensor | None = None,
                   prompt_embeds: torch.Tensor | None = None,
                   prompt_mask: torch.Tensor | None = None) -> ModelFn:
    """x (B, N) -> logits (B, N, V). The 4-D mask and positions are built once from the 0/1
    ``attention_mask`` (B, n <= N), as the reference does (only when something is padded).
    With ``prompt_embeds`` (B, n_ctx, d) and ``prompt_mask`` (B, n <= N) bool marking n_ctx
    positions per row, those positions' input embeddings are replaced at every step."""
    if (prompt_embeds is None) != (prompt_mask is None):
        raise ValueError("prompt_embeds and prompt_mask go together")
    cache: dict[int, tuple] = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        N = x.shape[1]
        if N not in cache:
            span = (None if prompt_mask is None
                    else _span_mask(prompt_mask.to(x.device), N, prompt_embeds.shape[1]))
            cache[N] = (*padding_inputs(attention_mask, N), span)
        mask4, pos, span = cache[N]
        if prompt_embeds is None:
            return model(input_ids=x, attention_mask=mask4, position_ids=pos).logits
        return model(inputs_embeds=_embed(model, x, prompt_embeds, span),
                     attention_mask=mask4, position_ids=pos).logits

    return fn


def combine_streams(two_stream_fn: ModelFn, omega: float) -> ModelFn:
    """SPA over one canvas: ``two_stream_fn`` maps (2B, N) -> (2B, N, V), rows [:B] the full
    prompt and [B:] the anchor-masked one; the combined logits are ``masked + omega * (full -
    masked)`` in float32, written ``full + (omega - 1) * (full - masked)`` so that omega = 1
    gives ``full`` bit for bit. Both canvases are the same x, so they update identically."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        full, masked = two_stream_fn(torch.cat([x, x])).float().chunk(2)
        return full + (omega - 1.0) * (full - masked)

    return fn


def spa_model_fn(model: nn.Module, attention_mask: torch.Tensor | None,
                 anchor_mask: torch.Tensor, omega: float, fill: float = 0.0,
                 prompt_embeds: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None) -> ModelFn:
    """SPA with a Dream model: the anchored positions ((B, n <= N) bool) get the embedding
    ``fill`` (the zero vector, as pipeline.spa) in the second stream; positions and attention
    are kept. Prompt offsets as in :func:`dream_model_fn` apply to both streams."""
    am2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
    cache: dict[int, tuple] = {}

    def two(x2: torch.Tensor) -> torch.Tensor:
        N, B = x2.shape[1], x2.shape[0] // 2
        if N not in cache:
            anchor = F.pad(anchor_mask.bool().to(x2.device), (0, N - anchor_mask.shape[1]))
            span = (None if prompt_mask is None
                    else _span_mask(prompt_mask.to(x2.device), N, prompt_embeds.shape[1]))
            cache[N] = (*padding_inputs(am2, N), anchor, span)
        mask4, pos, anchor, span = cache[N]
        emb = _embed(model, x2[:B], prompt_embeds, span)
        emb = torch.cat([emb, emb.masked_fill(anchor[..., None], fill)])
        return model(inputs_embeds=emb, attention_mask=mask4, position_ids=pos).logits

    return combine_streams(two, omega)


def decode_completions(sequences: torch.Tensor, prompt_len: int, tokenizer,
                       stop_ids: tuple[int, ...] | list[int] = ()) -> list[str]:
    """Cut each row's canvas at the first eos / pad / stop id, drop ids outside the tokenizer
    (>= len(tokenizer), or negative) and leftover mask ids, decode."""
    stops = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id, *stop_ids)
             if i is not None}
    mask_id, size = getattr(tokenizer, "mask_token_id", None), len(tokenizer)
    out = []
    for row in sequences[:, prompt_len:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        ids = [t for t in row[:cut] if 0 <= t < size and t != mask_id]
        out.append(tokenizer.decode(ids, skip_special_tokens=False))
    return out
