"""SPA decoding (method.md section 2) and sampled decoding, on the tiny causal and enc-dec models.

The SPA path under test is always the real two-stream one: nothing in the code special-cases
omega = 1, so the omega = 1 tests would fail if the masked stream leaked into the result.
"""
import pytest
import torch

from helpers import EXAMPLES, make_lm
from pipeline.config import DecodingConfig
from pipeline.data.example import Example
from pipeline.decoding import spa
from pipeline.decoding.autoregressive import generate, generate_ids, generate_samples
from pipeline.decoding.sampling import top_p_filter
from pipeline.lm.frozen import Batch, FrozenCodeLM

ALL_ANCHORS = ["instruction", "input", "context"]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-t5"])
def tiny_lm(request) -> FrozenCodeLM:
    """The conftest models with a 16-token context: the byte-level test tokenizer makes the
    manual context ~100 tokens, and the reference decoder below reruns the whole prompt."""
    return make_lm(request.param, context_tokens=16)


def _spa(omega: float, anchors: list[str] | None = None, **kw) -> DecodingConfig:
    return DecodingConfig(strategy="spa", spa_omega=omega,
                          spa_anchors=anchors or ["instruction"], **kw)


def _delta(lm: FrozenCodeLM, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(lm.context_length, lm.hidden_size,
                           generator=torch.Generator().manual_seed(seed))


def _batch(lm: FrozenCodeLM, examples: list[Example]) -> Batch:
    return lm.collate(lm.encode(examples), with_targets=False)


# ---- spans ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, template", [("tiny-llama", "chat"), ("tiny-llama", "plain"),
                                            ("tiny-t5", "auto")])
def test_anchor_spans_are_the_instruction_input_and_context_tokens(name, template):
    lm = make_lm(name, template=template, context_tokens=16)
    batch = _batch(lm, EXAMPLES)  # left-padded (causal) or right-padded (enc-dec) rows
    decode = lambda row, key: lm.tokenizer.decode(batch.input_ids[row][batch.spans[key][row]])
    for row, example in enumerate(EXAMPLES):
        assert decode(row, "instruction") == example.instruction
        assert decode(row, "input") == example.input  # "" where the example has no input
        assert torch.equal(batch.spans["context"][row], batch.context_mask[row])
    union = batch.anchor_mask(ALL_ANCHORS)
    assert torch.equal(union, batch.spans["instruction"] | batch.spans["input"]
                       | batch.context_mask)
    assert not (union & ~batch.attention_mask.bool()).any()  # never a padding position


def test_data_anchors_narrow_the_instruction_span():
    lm = make_lm("tiny-llama")
    example = Example("x", "sort dict `d` by value", "y",
                      meta={"anchors": ["by value", [0, 4]]})
    encoded = lm.encode([example])[0]
    text = lm.tokenizer.decode([encoded.prompt_ids[i] for i in encoded.spans["instruction"]])
    assert text == "sortby value"


def test_batch_without_spans_refuses_to_anchor():
    lm = make_lm("tiny-llama")
    encoded = [e.__class__(e.id, e.prompt_ids, e.context_start, e.target_ids)
               for e in lm.encode(EXAMPLES[:2])]  # as rebuilt from Ray Data columns
    with pytest.raises(ValueError, match="no span"):
        lm.collate(encoded).anchor_mask(["instruction"])


# ---- logit arithmetic and sampling helpers ------------------------------------------------------
def test_combine_is_the_paper_formula_and_exact_at_omega_one():
    full, masked = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(spa.combine(full, masked, 1.0), full)
    torch.testing.assert_close(spa.combine(full, masked, 1.4), masked + 1.4 * (full - masked))


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    keep = lambda p: top_p_filter(logits, p).isfinite()[0].tolist()
    assert keep(0.5) == [True, False, False, False]
    assert keep(0.7) == [True, True, False, False]
    assert keep(0.9) == [True, True, True, False]
    assert keep(1.0) == [True] * 4
    assert keep(1e-9) == [True, False, False, False]


# ---- SPA decoding -------------------------------------------------------------------------------
@pytest.mark.parametrize("anchors", [["instruction"], ALL_ANCHORS])
@pytest.mark.parametrize("with_delta", [False, True])
def test_omega_one_is_greedy_token_for_token(tiny_lm, examples, anchors, with_delta):
    batch = _batch(tiny_lm, examples)
    delta = _delta(tiny_lm) if with_delta else None
    greedy = generate_ids(tiny_lm, batch, delta, 12)
    assert generate_ids(tiny_lm, batch, delta, 12, decoding=_spa(1.0, anchors)) == greedy


def _reference_spa(lm: FrozenCodeLM, example: Example, anchors: list[str], omega: float,
                   max_new_tokens: int, delta: torch.Tensor | None = None) -> list[int]:
    """SPA the slow, obvious way: one unpadded example, two full forwards per token (full and
    masked prompt), no KV cache, the paper's formula on the logits."""
    encoded = lm.template.encode(example)
    full = lm.embed(torch.tensor(encoded.prompt_ids))
    if delta is not None:
        start, n = encoded.context_start, lm.context_length
        full[start : start + n] = lm.context_embedding() + delta
    masked = full.clone()
    for name in anchors:
        masked[list(encoded.spans[name])] = spa.MASK_FILL
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = []
        for stream in (full, masked):
            if lm.is_encoder_decoder:
                start_id = lm.model.config.decoder_start_token_id
                decoder_ids = torch.tensor([[start_id] + generated])
                out = lm.model(inputs_embeds=stream[None], decoder_input_ids=decoder_ids)
            else:
                new = lm.embed(torch.tensor(generated, dtype=torch.long))
                out = lm.model(inputs_embeds=torch.cat([stream, new])[None])
            logits.append(out.logits[0, -1])
        full_logits, masked_logits = logits
        token = int((masked_logits + omega * (full_logits - masked_logits)).argmax())
        if token in lm.template.stop_ids:
            break
        generated.append(token)
    return generated


@pytest.mark.parametrize("omega, anchors, with_delta", [(2.0, ["instruction"], False),
                                                         (0.5, ["instruction"], True),
                                                         (3.0, ALL_ANCHORS, True)])
def test_spa_equals_the_reference_and_changes_outputs(tiny_lm, omega, anchors, with_delta):
    examples = EXAMPLES[:4]  # one of them has an input
    batch, delta = _batch(tiny_lm, examples), _delta(tiny_lm, seed=1) if with_delta else None
    mine = generate_ids(tiny_lm, batch, delta, 8, decoding=_spa(omega, anchors))
    with torch.no_grad():
        reference = [_reference_spa(tiny_lm, e, anchors, omega, 8, delta) for e in examples]
    assert mine == reference
    assert mine != generate_ids(tiny_lm, batch, delta, 8)  # SPA does something here


def test_batched_spa_equals_one_at_a_time(tiny_lm, examples):
    decoding, delta = _spa(2.5, ["instruction", "input"]), _delta(tiny_lm, seed=2)
    together = generate_ids(tiny_lm, _batch(tiny_lm, examples), delta, 12, decoding=decoding)
    alone = [generate_ids(tiny_lm, _batch(tiny_lm, [e]), delta, 12, decoding=decoding)[0]
             for e in examples]
    assert together == alone


def _record_prompt_inputs(lm: FrozenCodeLM) -> tuple[list[dict], object]:
    """Record every forward of the module that receives the prompt embeddings."""
    calls: list[dict] = []
    module = lm.model.get_encoder() if lm.is_encoder_decoder else lm.model

    def hook(_module, args, kwargs):
        calls.append({"embeds": kwargs.get("inputs_embeds"), "mask": kwargs.get("attention_mask"),
                      "rows": (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds")
                               is not None else kwargs.get("input_ids")).shape[0]})

    return calls, module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("anchors", [["instruction"], ["context", "input"]])
def test_masked_stream_masks_exactly_the_anchors_in_one_forward(tiny_lm, examples, anchors):
    batch, delta = _batch(tiny_lm, examples), _delta(tiny_lm)
    bsz = len(examples)
    calls, handle = _record_prompt_inputs(tiny_lm)
    try:
        generate_ids(tiny_lm, batch, delta, 6, decoding=_spa(1.5, anchors))
    finally:
        handle.remove()
    prompt = [c for c in calls if c["embeds"] is not None]
    assert len(prompt) == 1  # the prompt runs once, both streams stacked
    embeds, mask = prompt[0]["embeds"], prompt[0]["mask"]
    assert embeds.shape[0] == 2 * bsz and torch.equal(mask[:bsz], mask[bsz:])
    full, masked = embeds[:bsz], embeds[bsz:]
    assert torch.equal(full, tiny_lm.prompt_embeds(batch, delta))  # context = X_ctx + delta
    anchored = batch.anchor_mask(anchors)
    assert anchored.sum() > 0
    assert (masked[anchored] == spa.MASK_FILL).all()
    assert torch.equal(masked[~anchored], full[~anchored])
    if not tiny_lm.is_encoder_decoder:  # every decoding step is one forward of 2B rows
        assert all(c["rows"] == 2 * bsz for c in calls)


# ---- sampling -----------------------------------------------------------------------------------
def test_sampling_is_reproducible_and_seeded(tiny_lm, examples):
    batch = _batch(tiny_lm, examples)
    sample = lambda seed: generate_ids(tiny_lm,
        batch, None, 10,
        decoding=DecodingConfig(strategy="sample", temperature=1.0, top_p=1.0, seed=seed))
    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0) != generate_ids(tiny_lm, batch, None, 10)


@pytest.mark.parametrize("settings", [{"temperature": 1e-4, "top_p": 1.0},
                                      {"temperature": 1.0, "top_p": 1e-6}])
def test_near_deterministic_sampling_is_greedy(tiny_lm, examples, settings):
    batch, delta = _batch(tiny_lm, examples), _delta(tiny_lm)
    drawn = generate_ids(tiny_lm, batch, delta, 10,
                         decoding=DecodingConfig(strategy="sample", **settings))
    assert drawn == generate_ids(tiny_lm, batch, delta, 10)
    spa_drawn = generate_ids(tiny_lm, batch, delta, 10,
                             decoding=_spa(2.0, spa_sample=True, **settings))
    assert spa_drawn == generate_ids(tiny_lm, batch, delta, 10, decoding=_spa(2.0))


def test_generate_samples_gives_n_reproducible_draws_per_example():
    lm = make_lm("tiny-llama")
    decoding = DecodingConfig(strategy="sample", temperature=1.0, seed=3)
    samples = generate_samples(lm, EXAMPLES[:3], 4, max_new_tokens=8, decoding=decoding)
    assert [len(s) for s in samples] == [4, 4, 4]
    assert samples == generate_samples(lm, EXAMPLES[:3], 4, max_new_tokens=8, decoding=decoding)
    assert any(len(set(s)) > 1 for s in samples)
    greedy = generate_samples(lm, EXAMPLES[:2], 2, max_new_tokens=8)
    assert greedy == [[g, g] for g in generate(lm, EXAMPLES[:2], max_new_tokens=8)]
