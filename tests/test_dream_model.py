"""The project's Dream module: fixture logits, equality with Qwen2ForCausalLM, loading."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from helpers import DREAM_FIXTURES
from pipeline.decoding.masked_diffusion import (
    DiffusionSettings,
    completion_ids,
    diffusion_generate,
)
from pipeline.lm.dream import (
    DreamModel,
    is_dream_folder,
    load_dream,
    random_dream,
    tiny_dream_config,
    tiny_dream_config_for,
)

pytestmark = pytest.mark.usefixtures("one_thread")



TINY = DREAM_FIXTURES / "tiny-dream"
needs_fixtures = pytest.mark.skipif(not (TINY / "model.safetensors").is_file(),
                                    reason=f"Dream fixtures absent at {TINY}")


@needs_fixtures
def test_forward_check_logits_reproduced():
    model = load_dream(TINY)
    fc = load_file(str(TINY / "forward_check.safetensors"))
    with torch.no_grad():
        single = model(fc["single.input_ids"]).logits
        batch = model(fc["batch.input_ids"], attention_mask=fc["batch.attention_mask"]).logits
        am = fc["batch.attention_mask"].bool()
        explicit = model(fc["batch.input_ids"], attention_mask=am[:, None, :, None] &
                         am[:, None, None, :], position_ids=fc["batch.position_ids"]).logits
    # Exact on the fixture's machine; fp32 GEMM blocking differs across CPUs by ~1e-6.
    torch.testing.assert_close(single, fc["single.logits"], atol=2e-6, rtol=0)
    # Pad rows attend to nothing; their logits mean nothing, so compare attended rows only.
    torch.testing.assert_close(batch[am], fc["batch.logits"][am], atol=2e-6, rtol=0)
    assert torch.equal(explicit[am], batch[am])
    # The check can fail: a causal model or unshifted positions are far off.
    assert (single[:, :-1] - fc["single.logits"][:, 1:]).abs().max() > 1e-2


def _qwen2_twin(model: DreamModel) -> Qwen2ForCausalLM:
    c = model.config
    qc = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                     intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers,
                     num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                     rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                     tie_word_embeddings=False, attn_implementation="sdpa")
    qwen = Qwen2ForCausalLM(qc).eval()
    qwen.load_state_dict(model.state_dict(), strict=True)  # same 27 weight names
    return qwen


def test_equals_qwen2_with_attend_all_mask():
    model = random_dream(tiny_dream_config(80, 79, 0, 2, rope_theta=1e4), seed=3)
    qwen = _qwen2_twin(model)
    x = torch.randint(3, 79, (2, 14), generator=torch.Generator().manual_seed(0))
    full = torch.ones(2, 1, 14, 14, dtype=torch.bool)
    with torch.no_grad():
        ours, theirs = model(x).logits, qwen(x, attention_mask=full).logits
        causal = qwen(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert (ours - causal).abs().max() > 1e-2  # Qwen2 without the 4-D mask is causal


def test_equals_qwen2_with_padding():
    model = random_dream(tiny_dream_config(80, 79, 0, 2), seed=4)
    qwen = _qwen2_twin(model)
    x = torch.randint(3, 79, (2, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, :4] = 0
    x[0, :4] = 0
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
    m4 = am.bool()[:, None, :, None] & am.bool()[:, None, None, :]
    with torch.no_grad():
        ours = model(x, attention_mask=am).logits
        theirs = qwen(x, attention_mask=m4, position_ids=pos).logits
        alone = model(x[:1, 4:]).logits
    keep = am.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[0, 4:], alone[0], atol=1e-5, rtol=0)
    assert not torch.isnan(ours).any()


@needs_fixtures
def test_sharded_folder_and_dtype(tmp_path):
    state = load_file(str(TINY / "model.safetensors"))
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / fname))
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((TINY / "config.json").read_text())
    assert is_dream_folder(tmp_path) and is_dream_folder(TINY)
    assert not is_dream_folder(tmp_path / "nowhere")
    one, sharded = load_dream(TINY), load_dream(tmp_path)
    for (k, a), (k2, b) in zip(one.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    bf = load_dream(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in bf.parameters())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    save_file({k: state[k] for k in halves["model-00002-of-00002.safetensors"][1:]},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match="missing weights"):
        load_dream(tmp_path)


def _tiny_tokenizer():
    try:  # the tokenizer is moving to pipeline/lm/loader.py
        from pipeline.lm.loader import tiny_tokenizer
    except ImportError:
        from pipeline.models import tiny_tokenizer
    return tiny_tokenizer()


def test_tiny_dream_from_tokenizer_decodes_text():
    tok = _tiny_tokenizer()
    size = len(tok)
    config = tiny_dream_config_for(tok)
    assert len(tok) == size + 1 and tok.mask_token == "<|mask|>"
    assert config.vocab_size == len(tok) and config.mask_token_id == tok.mask_token_id
    model = random_dream(config, seed=0)
    enc = tok(["def add(a, b):", "x ="], padding=True, padding_side="left", return_tensors="pt")
    s = DiffusionSettings(max_new_tokens=8, steps=8, alg="entropy")
    out = diffusion_generate(model, enc["input_ids"], enc["attention_mask"], s,
                             tok.mask_token_id, valid_vocab_size=len(tok))
    rows = completion_ids(out.sequences, enc["input_ids"].shape[1],
                          {tok.eos_token_id, tok.pad_token_id} - {None},
                          mask_id=tok.mask_token_id, vocab_size=len(tok))
    texts = tok.batch_decode(rows)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert not (out.sequences[:, enc["input_ids"].shape[1]:] == tok.mask_token_id).any()
