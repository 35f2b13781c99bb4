"""The coupled per-token score against plain Monte Carlo on a tiny Dream model."""
from __future__ import annotations

import pytest
import torch

from pipeline.lm.coupled import coupled_from_logprobs, coupled_scores, decoupled_scores
from pipeline.lm.dream import random_dream, tiny_dream_config

CALLS, ROWS, K = 400, 8, 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    model = random_dream(tiny_dream_config(64, 63, 0, 2), seed=5)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 63, (1, 7), generator=g).repeat(ROWS, 1)
    completion = torch.randint(3, 63, (1, K), generator=g).repeat(ROWS, 1)
    return model, prompt, completion


def _draws(fn, setup, seed: int) -> torch.Tensor:
    """(CALLS, ROWS, K) scores; t is shared within a call, so calls are the i.i.d. unit."""
    model, prompt, completion = setup
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.stack([fn(model, prompt, completion, 63, g) for _ in range(CALLS)])


def test_same_mean_lower_variance(setup):
    c, d = _draws(coupled_scores, setup, 1), _draws(decoupled_scores, setup, 2)
    assert c.dtype == torch.float32 and c.shape == (CALLS, ROWS, K)
    # Means per token, with standard errors from the spread of per-call means.
    cm, dm = c.mean(1), d.mean(1)
    se = (cm.var(0) / CALLS + dm.var(0) / CALLS).sqrt()
    z = (cm.mean(0) - dm.mean(0)) / se
    assert z.abs().max() < 4.0, z  # 10 tokens, 4 sigma each
    seq_z = (cm.sum(1).mean() - dm.sum(1).mean()) / (
        (cm.sum(1).var() / CALLS + dm.sum(1).var() / CALLS).sqrt())
    assert seq_z.abs() < 3.0
    # One draw's variance (pooled over rows and calls): the antithetic pair wins clearly.
    vc, vd = c.reshape(-1, K).var(0), d.reshape(-1, K).var(0)
    assert vc.sum() < 0.6 * vd.sum(), (vc.sum(), vd.sum())
    # and the full-mask term alone is not what is being measured (the pair adds information)
    assert (c.mean((0, 1)) - _full_mask_logprob(setup)).abs().max() > 0.05


def _full_mask_logprob(setup) -> torch.Tensor:
    model, prompt, completion = setup
    x = torch.cat([prompt[:1], torch.full_like(completion[:1], 63)], 1)
    with torch.no_grad():
        logits = model(x).logits[:, prompt.shape[1] - 1:-1]
    return logits.log_softmax(-1).gather(-1, completion[:1, :, None])[0, :, 0]


def test_coupled_formula_and_generator(setup):
    model, prompt, completion = setup
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    with torch.no_grad():
        a = coupled_scores(model, prompt, completion, 63, g1)
        b = coupled_scores(model, prompt, completion, 63, g2)
        c = coupled_scores(model, prompt, completion, 63, g1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    l1, l2, l3 = torch.full((1, 3), -1.0), torch.full((1, 3), -2.0), torch.full((1, 3), -4.0)
    m = torch.tensor([[True, False, True]])
    expect = torch.tensor([[(-1 - 2 / 0.25) / 2, (-1 - 4 / 0.75) / 2, (-1 - 2 / 0.25) / 2]])
    torch.testing.assert_close(coupled_from_logprobs(l1, l2, l3, m, 0.25), expect)
    with pytest.raises(ValueError, match="t_range"):
        coupled_scores(model, prompt, completion, 63, g1, t_range=(0.0, 0.8))
