"""Dream / DiffuCoder as the project's own module (docs/dllm.md section 4).

A Dream model is a Qwen2-shaped decoder (RMSNorm in fp32, RoPE, GQA, SwiGLU, biases on q/k/v only)
whose attention is bidirectional: SDPA with ``is_causal=False`` always. The weight names are the
checkpoint's, so ``config.json`` + safetensors (one file or shards) load here without
``trust_remote_code`` (Dream's remote code targets transformers 4.46 and fails to import on 5.x).
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

MASK_TOKEN = "<|mask|>"


class DreamConfig(PretrainedConfig):
    """Dream's config fields and defaults (``model_type="Dream"``). ``rope_scaling`` must be None:
    Dream and DiffuCoder use plain RoPE, and nothing else is implemented here."""

    model_type = "Dream"

    def __init__(self, *, vocab_size: int = 151936, hidden_size: int = 4096,
                 intermediate_size: int = 22016, num_hidden_layers: int = 32,
                 num_attention_heads: int = 32, num_key_value_heads: int | None = 32,
                 hidden_act: str = "silu", max_position_embeddings: int = 32768,
                 initializer_range: float = 0.02, rms_norm_eps: float = 1e-6,
                 use_cache: bool = False, tie_word_embeddings: bool = False,
                 rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                 use_sliding_window: bool = False, sliding_window: int | None = 4096,
                 max_window_layers: int = 28, attention_dropout: float = 0.0,
                 mask_token_id: int = 151666, pad_token_id: int | None = 151643,
                 bos_token_id: int | None = None, eos_token_id: int | None = None, **kwargs):
        if rope_scaling is not None:
            raise ValueError(f"rope_scaling={rope_scaling!r}: only plain RoPE (None) is supported")
        kwargs.pop("auto_map", None)  # names remote .py files that are never used here
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act, self.max_position_embeddings = hidden_act, max_position_embeddings
        self.initializer_range, self.rms_norm_eps = initializer_range, rms_norm_eps
        self.use_cache, self.rope_theta = use_cache, rope_theta
        self.use_sliding_window, self.sliding_window = use_sliding_window, sliding_window
        self.max_window_layers, self.attention_dropout = max_window_layers, attention_dropout
        self.mask_token_id = mask_token_id
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (pad_token_id, bos_token_id,
                                                                   eos_token_id)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype, h = h.dtype, h.float()  # statistics in fp32, as Qwen2 / Dream do
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: DreamConfig):
        super().__init__()
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, N, _ = h.shape
        q = self.q_proj(h).view(B, N, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, N, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.heads // self.kv_heads  # GQA: repeat K/V heads, as the reference does
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False,
                                             scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, -1))


class DecoderLayer(nn.Module):
    def __init__(self, c: DreamConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h, cos, sin, mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        x, m = self.post_attention_layernorm(h), self.mlp
        return h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))


@dataclass
class DreamOutput:
    logits: torch.Tensor  # (B, N, V), raw: logit j scores token j+1 (the sampler shifts)


def padding_inputs(attention_mask: torch.Tensor | None, N: int
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The sampler's (4-D bool mask [B,1,N,N], position ids [B,N]) from a 0/1 mask of width <= N
    (right-padded with 1s: canvas masks are attended). Both None when nothing is padded."""
    if attention_mask is None or bool((attention_mask != 0).all()):
        return None, None
    am = F.pad(attention_mask.long(), (0, N - attention_mask.shape[1]), value=1).bool()
    pos = am.long().cumsum(-1) - 1
    pos = pos.masked_fill(~am, 1)  # the reference gives pads position 1
    return am[:, None, :, None] & am[:, None, None, :], pos


class DreamModel(PreTrainedModel):
    """Bidirectional Qwen2: ``model.*`` (embed_tokens, layers, norm) + ``lm_head``."""

    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        # True: each layer's activations are recomputed in the backward pass instead of kept
        # (torch's non-reentrant checkpoint, as the reference trainer's use_reentrant=False);
        # only where gradients are on. ``gradient_checkpointing_enable()`` sets it too.
        self.gradient_checkpointing = False
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                               padding_idx=config.pad_token_id)
        self.model.layers = nn.ModuleList(DecoderLayer(config)
                                          for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            # numel 0: built under deepspeed.zero.Init, a partition filled from a checkpoint
            if module.padding_idx is not None and module.weight.numel():
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Computed per call (cheap) rather than held in a buffer, so a model built on the meta
        # device needs nothing re-initialised after its state dict is loaded.
        c = self.config
        dim = c.hidden_size // c.num_attention_heads
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float,
                                                    device=pos.device) / dim))
        freqs = pos[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **_) -> DreamOutput:
        """``attention_mask``: None (attend all), 2-D 0/1 padding mask (B, N), or 4-D bool
        (B, 1, N, N) with True = attend. Returns logits (B, N, V) in the model's dtype."""
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, N, _ = h.shape
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask, pos2 = padding_inputs(attention_mask, N)
            position_ids = pos2 if position_ids is None else position_ids
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            raise ValueError("a 4-D attention_mask must be bool (True = attend)")
        if position_ids is None:
            position_ids = torch.arange(N, device=h.device)[None].expand(B, N)
        cos, sin = self._rope(position_ids, h.dtype)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:
                h = checkpoint(layer, h, cos, sin, attention_mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, attention_mask)
        return DreamOutput(logits=self.lm_head(self.model.norm(h)))


# ---- folders, tiny random instances -----------------------------------------------------------
def is_dream_folder(path: str | Path) -> bool:
    """True when ``path/config.json`` says ``model_type: Dream``."""
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") == "Dream"
    except (OSError, ValueError):
        return False


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded, as the 7B checkpoints ship
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_dream_config(folder: str | Path) -> DreamConfig:
    """A Dream folder's config.json as a :class:`DreamConfig` (its ``auto_map`` to remote code
    is ignored: the project's own module runs the checkpoint)."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") != "Dream":
        raise ValueError(f"{folder}: model_type is {raw.get('model_type')!r}, not 'Dream'")
    for key in ("model_type", "architectures", "auto_map", "torch_dtype", "dtype",
                "transformers_version"):
        raw.pop(key, None)
    return DreamConfig(**raw)


def load_dream(folder: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> DreamModel:
    """Load a Dream folder (config.json + safetensors) without remote code. The module is built
    on the meta device and the tensors are assigned shard by shard, cast to ``dtype`` on
    ``device``, so a 7B bf16 checkpoint never exists in fp32."""
    folder = Path(folder)
    with torch.device("meta"):
        model = DreamModel(read_dream_config(folder))
    seen: set[str] = set()
    for path in weight_files(folder):
        state = {k: v.to(dtype) for k, v in load_file(str(path), device=str(device)).items()}
        unexpected = set(state) - set(model.state_dict())
        if unexpected:
            raise ValueError(f"{path}: unexpected weights {sorted(unexpected)[:5]}")
        model.load_state_dict(state, strict=False, assign=True)
        seen |= set(state)
    if "lm_head.weight" not in seen and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        seen.add("lm_head.weight")
    missing = set(model.state_dict()) - seen
    if missing:
        raise ValueError(f"{folder}: missing weights {sorted(missing)[:5]}")
    return model.eval()


def save_dream(folder: str | Path, config: DreamConfig,
               tensors: Iterable[tuple[str, torch.Tensor]], *,
               max_shard_bytes: int = 5 * 1024 ** 3) -> Path:
    """Write a Dream folder that :func:`load_dream` (and any Dream loader) reads: config.json
    and the weights as safetensors, one ``model.safetensors`` or, past ``max_shard_bytes``,
    shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
    ``tensors`` (name, tensor) may be a generator (a ZeRO-3 gather, one parameter at a time):
    at most one shard is held in memory."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    shards: list[list[str]] = []  # the names in each written shard
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            save_file(current, str(folder / f".shard-{len(shards)}"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0
        current[name] = tensor.detach().cpu().contiguous()
        size += nbytes
    save_file(current, str(folder / f".shard-{len(shards)}"), metadata={"format": "pt"})
    shards.append(list(current))
    if len(shards) == 1:
        (folder / ".shard-0").rename(folder / "model.safetensors")
        return folder
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f".shard-{i}").rename(folder / file)
        weight_map.update(dict.fromkeys(names, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder


def tiny_dream_config(vocab_size: int, mask_token_id: int, pad_token_id: int | None,
                      eos_token_id: int | None, bos_token_id: int | None = None,
                      **overrides) -> DreamConfig:
    """The fixture's tiny shape: hidden 32, 2 layers, 4 heads, 2 KV heads, init std 0.1."""
    fields = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "initializer_range": 0.1, "sliding_window": None,
              **overrides}
    return DreamConfig(vocab_size=vocab_size, mask_token_id=mask_token_id,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                       bos_token_id=bos_token_id, **fields)


def tiny_dream_config_for(tokenizer: PreTrainedTokenizerFast, **overrides) -> DreamConfig:
    """Add ``<|mask|>`` to ``tokenizer`` (in place, as its mask token) and return the tiny
    config sized to it: vocab = len(tokenizer), mask/pad/eos ids from the tokenizer."""
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tiny_dream_config(len(tokenizer), tokenizer.mask_token_id, tokenizer.pad_token_id,
                             tokenizer.eos_token_id, tokenizer.bos_token_id, **overrides)


def random_dream(config: DreamConfig, seed: int = 0) -> DreamModel:
    """A random Dream as the fixtures make one: Dream's init under ``seed`` (the global RNG is
    left untouched), then the mask token's lm_head row zeroed so that [MASK] is rarely argmax,
    as in a trained model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DreamModel(config)
    with torch.no_grad():
        model.lm_head.weight[config.mask_token_id].zero_()
    return model.eval()
