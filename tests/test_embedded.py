"""The embedded SmolLM2-135M-Instruct through the same loader and adapter (slow: real weights)."""
import pytest
import torch

from pipeline.config import ModelConfig, PromptConfig
from pipeline.data.loaders import load_examples
from pipeline.decoding.autoregressive import generate
from pipeline.lm.frozen import FrozenCodeLM
from pipeline.lm.loader import load_model
from pipeline.lm.template import PromptTemplate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded_lm() -> FrozenCodeLM:
    model, tokenizer = load_model(ModelConfig(name="embedded"))
    return FrozenCodeLM(model, tokenizer, PromptTemplate(tokenizer, PromptConfig()))


def test_embedded_model_is_the_documented_one(embedded_lm):
    model = embedded_lm.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert embedded_lm.hidden_size == 576 and embedded_lm.template.kind == "chat"
    assert embedded_lm.tokenizer.decode(embedded_lm.template.context_ids).startswith("Below is")


def test_embedded_model_writes_code_and_scores_references(embedded_lm):
    examples = load_examples("conala", "test", limit=2)
    loss = embedded_lm.code_loss(embedded_lm.collate(embedded_lm.encode(examples)))
    assert 0.3 < loss.item() < 4.0  # a pretrained model, not a random one (that is ~10.8)
    outputs = generate(embedded_lm, examples, max_new_tokens=24)
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)
    delta = torch.zeros(embedded_lm.context_length, embedded_lm.hidden_size, requires_grad=True)
    embedded_lm.code_loss(embedded_lm.collate(embedded_lm.encode(examples)), delta).backward()
    assert delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in embedded_lm.model.parameters())
