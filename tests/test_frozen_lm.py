"""The frozen LM adapter: the same tests for a causal and an encoder-decoder model."""
import pytest
import torch

from helpers import EXAMPLES, make_lm
from pipeline.decoding.autoregressive import generate_ids
from pipeline.lm.frozen import IGNORE


def test_context_span_is_marked_once_per_row(tiny_lm, examples):
    batch = tiny_lm.collate(tiny_lm.encode(examples))
    assert (batch.context_mask.sum(-1) == tiny_lm.context_length).all()
    ids = torch.tensor(tiny_lm.template.context_ids)
    for row in range(len(examples)):
        assert torch.equal(batch.input_ids[row][batch.context_mask[row]], ids)


def test_override_replaces_exactly_the_context(tiny_lm, examples):
    batch = tiny_lm.collate(tiny_lm.encode(examples))
    delta = torch.randn(tiny_lm.context_length, tiny_lm.hidden_size)
    plain = tiny_lm.prompt_embeds(batch, None)
    tuned = tiny_lm.prompt_embeds(batch, delta)
    mask = batch.context_mask
    assert torch.equal(tuned[~mask], plain[~mask])
    expected = (tiny_lm.context_embedding() + delta).repeat(len(examples), 1)
    torch.testing.assert_close(tuned[mask], expected)


def test_zero_delta_is_the_manual_prompt(tiny_lm, examples):
    batch = tiny_lm.collate(tiny_lm.encode(examples))
    zero = torch.zeros(tiny_lm.context_length, tiny_lm.hidden_size)
    torch.testing.assert_close(tiny_lm.code_loss(batch, zero), tiny_lm.code_loss(batch, None))


def test_loss_matches_hf_loss_on_code_tokens_only(tiny_lm, examples):
    """One unpadded example through the model's own loss, labels -100 off the code."""
    encoded = tiny_lm.encode(examples[:1])[0]
    prompt, target = torch.tensor([encoded.prompt_ids]), torch.tensor([encoded.target_ids])
    model = tiny_lm.model
    if tiny_lm.is_encoder_decoder:
        expected = model(input_ids=prompt, labels=target).loss
    else:
        ids = torch.cat([prompt, target], dim=1)
        labels = torch.cat([torch.full_like(prompt, IGNORE), target], dim=1)
        expected = model(input_ids=ids, labels=labels).loss
    got = tiny_lm.code_loss(tiny_lm.collate([encoded]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_per_example_loss(tiny_lm, examples):
    batch = tiny_lm.collate(tiny_lm.encode(examples))
    together = tiny_lm.code_loss(batch, per_example=True)
    alone = torch.stack([tiny_lm.code_loss(tiny_lm.collate(tiny_lm.encode([e]))) for e in examples])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_gradients_reach_delta_and_never_the_lm(tiny_lm, examples):
    batch = tiny_lm.collate(tiny_lm.encode(examples))
    delta = torch.zeros(len(examples), tiny_lm.context_length, tiny_lm.hidden_size,
                        requires_grad=True)
    tiny_lm.code_loss(batch, delta).backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in tiny_lm.model.parameters())


def test_batched_greedy_equals_one_at_a_time(tiny_lm, examples):
    batch = tiny_lm.collate(tiny_lm.encode(examples), with_targets=False)
    together = generate_ids(tiny_lm, batch, max_new_tokens=12)
    alone = [generate_ids(tiny_lm, tiny_lm.collate(tiny_lm.encode([e]), with_targets=False),
                                  max_new_tokens=12)[0] for e in examples]
    assert together == alone
    assert len({tuple(row) for row in together}) > 1  # the test model does not degenerate


def test_greedy_equals_hf_generate(tiny_lm, examples):
    encoded = tiny_lm.encode(examples[:1])[0]
    prompt = torch.tensor([encoded.prompt_ids])
    out = tiny_lm.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=12, do_sample=False,
                                 eos_token_id=tiny_lm.template.stop_ids,
                                 pad_token_id=tiny_lm.pad_id)[0]
    new = out[1:] if tiny_lm.is_encoder_decoder else out[prompt.shape[1]:]
    new = new.tolist()
    stop = next((i for i, tok in enumerate(new) if tok in tiny_lm.template.stop_ids), len(new))
    mine = generate_ids(tiny_lm, tiny_lm.collate([encoded], with_targets=False), max_new_tokens=12)
    assert mine[0] == new[:stop]


def test_delta_changes_generation(tiny_lm, examples):
    batch = tiny_lm.collate(tiny_lm.encode(examples), with_targets=False)
    delta = 3 * torch.randn(tiny_lm.context_length, tiny_lm.hidden_size,
                            generator=torch.Generator().manual_seed(0))
    assert generate_ids(tiny_lm, batch, delta, 8) != generate_ids(tiny_lm, batch, None, 8)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_templates_keep_instruction_and_code_plain(template):
    lm = make_lm("tiny-llama", template=template)
    text = lm.template.render(EXAMPLES[3])
    assert EXAMPLES[3].instruction in text and EXAMPLES[3].input in text
    assert lm.template.context_ids == lm.tokenizer(lm.template.config.context,
                                                   add_special_tokens=False)["input_ids"]


def test_context_tokens_pads_or_cuts():
    assert make_lm("tiny-llama", context_tokens=5).context_length == 5
    lm = make_lm("tiny-llama", context_tokens=300)
    assert lm.context_length == 300 and lm.template.context_ids[-1] == lm.pad_id


@pytest.mark.parametrize("text, code", [
    ("Here you go:\n```python\nx = 1\n```\nDone.", "x = 1"),
    ("```\ny = 2\n", "y = 2"),  # an unclosed fence (generation cut by the length limit)
    ("`len(xs)`", "len(xs)"),
    ("  a + b  ", "a + b"),
])
def test_extract_code(text, code):
    from pipeline.lm.template import extract_code

    assert extract_code(text) == code


def test_extract_code_plain_template_stops_at_a_new_section():
    from pipeline.lm.template import extract_code

    assert extract_code("a + b\n### Instruction:\nmore", "plain") == "a + b"
