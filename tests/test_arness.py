"""AR-ness metrics: stubs with a known decoding order, hand-computed orders, the tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.decoding.masked_diffusion import DiffusionSettings, diffusion_generate
from pipeline.lm.dream import random_dream, tiny_dream_config
from pipeline.scoring.arness import (
    arness_curves,
    arness_from_record,
    global_arness,
    global_ranks,
    local_arness,
    order_from_history,
    plot_arness,
    plot_first_step_confidence,
    rollout_arness,
)

V, MASK = 32, 31


pytestmark = pytest.mark.usefixtures("one_thread")


def _ramp_stub(direction: int):
    """Logits whose peak at canvas position j gets sharper to the left (direction=+1) or to the
    right (-1): the sampler's confidence then rises in that direction. Raw logit j feeds
    position j+1 (the shift), which keeps the ramp monotone."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape
        height = 12.0 - direction * 0.3 * torch.arange(N, dtype=torch.float)
        z = torch.zeros(B, N, V)
        z[..., 5] = height
        return z
    return fn


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin"])
@pytest.mark.parametrize("steps", [16, 4])  # one per step (first 0, last 2) and 4 per step
def test_left_to_right_stub_is_fully_ar(alg, steps):
    x = torch.randint(3, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    s = DiffusionSettings(max_new_tokens=16, steps=steps, alg=alg)
    rec = diffusion_generate(_ramp_stub(+1), x, None, s, MASK).record
    assert [o.tolist() for o in rec.orders()] == [list(range(16))] * 2
    c = arness_from_record(rec, k_local=9, k_global=4)
    assert np.all(c.local == 1.0) and np.all(c.global_ == 1.0)


def test_a_rollout_batch_gets_its_mean_arness_as_loggable_floats():
    """A batch of one left-to-right and one right-to-left decode: local AR-ness@k is their mean
    (1 and 0), global@1 the mean of 1 and 1/16; the names the comparisons use."""
    x = torch.randint(3, 30, (1, 6), generator=torch.Generator().manual_seed(2))
    s = DiffusionSettings(max_new_tokens=16, steps=16, alg="entropy")
    forward = diffusion_generate(_ramp_stub(+1), x, None, s, MASK).record
    backward = diffusion_generate(_ramp_stub(-1), x, None, s, MASK).record
    forward.positions += backward.positions  # one record of the two rows
    metrics = rollout_arness(forward, k_local=3, k_global=2)
    assert list(metrics) == ["arness_local_at_1", "arness_local_at_2", "arness_local_at_3",
                             "arness_global_at_1", "arness_global_at_2"]
    assert metrics["arness_local_at_1"] == 0.5 and metrics["arness_local_at_3"] == 0.5
    assert metrics["arness_global_at_1"] == pytest.approx((1 + 1 / 16) / 2)
    assert all(type(v) is float for v in metrics.values())


def test_right_to_left_stub():
    x = torch.randint(3, 30, (1, 6), generator=torch.Generator().manual_seed(1))
    s = DiffusionSettings(max_new_tokens=16, steps=16, alg="entropy")
    rec = diffusion_generate(_ramp_stub(-1), x, None, s, MASK).record
    assert rec.order(0).tolist() == list(range(15, -1, -1))
    c = arness_from_record(rec, k_local=9, k_global=4)
    assert np.all(c.local == 0.0)
    assert c.global_[0, 0] == pytest.approx(1 / 16)  # only the forced last reveal
    for normalize in ("T", "T-k"):
        assert np.all(arness_curves(rec.orders(), 16, normalize=normalize).local == 0.0)


def test_hand_computed_orders_for_each_convention():
    order = [1, 2, 0, 3]
    assert global_ranks(order).tolist() == [2, 2, 1, 1]
    assert global_arness(order, [1, 2, 3]).tolist() == [0.5, 1.0, 1.0]
    assert local_arness(order, [1, 2]).tolist() == [0.25, 0.0]
    ar = list(range(6))
    assert local_arness(ar, [1, 2, 3]).tolist() == [1.0, 1.0, 1.0]
    assert local_arness(ar, [1, 2, 3], prompt_prefix=False).tolist() == [5 / 6, 4 / 6, 3 / 6]
    assert local_arness(ar, [1, 2, 3], normalize="T-k").tolist() == [1.0, 1.0, 1.0]
    # 0 1 then jumps: steps 1-2 continue the prompt prefix, steps 4 and 6 their predecessor
    o = [0, 1, 4, 5, 2, 3]
    assert local_arness(o, [1, 2]).tolist() == [4 / 6, 2 / 6]
    assert local_arness(o, [1, 2], prompt_prefix=False).tolist() == [3 / 6, 0.0]
    assert local_arness(o, [1, 2], normalize="T-k").tolist() == [3 / 5, 0.0]
    o = [2, 3, 4, 0, 1, 5]  # runs 0 1 2 0 1 0
    assert local_arness(o, [1, 2]).tolist() == [3 / 6, 1 / 6]
    assert local_arness(o, [1, 2], normalize="T-k").tolist() == [3 / 5, 1 / 4]
    assert global_arness(o, [1, 2, 3]).tolist() == [3 / 6, 3 / 6, 1.0]  # ranks 3 3 3 1 1 1
    assert np.isnan(local_arness([0, 1], [2], normalize="T-k")[0])
    # T = L: a decode that left position 3 masked counts that step as 0
    assert global_arness([0, 1, 2], [1], L=4).tolist() == [0.75]
    assert local_arness([0, 1, 2], [1], L=4).tolist() == [0.75]
    with pytest.raises(ValueError):
        local_arness([0, 0, 1], [1])
    with pytest.raises(ValueError):
        local_arness([0, 1], [1], normalize="T+k")


def test_order_from_history_matches_the_record():
    model = random_dream(tiny_dream_config(V, MASK, 0, 2), seed=0)
    x = torch.randint(3, 30, (2, 5), generator=torch.Generator().manual_seed(2))
    s = DiffusionSettings(max_new_tokens=12, steps=12, alg="entropy")
    out = diffusion_generate(model, x, None, s, MASK, output_history=True)
    x0 = torch.nn.functional.pad(x, (0, 12), value=MASK)
    hist = order_from_history(out.history, x0, 5, MASK)
    for b in range(2):  # equal up to the order inside the last (2-token) step
        assert hist[b][:-2].tolist() == out.record.order(b)[:-2].tolist()
        assert sorted(hist[b].tolist()) == list(range(12))


def test_temperature_raises_the_spread_over_samples():
    """Spread = std of local AR-ness@1 over 8 samples of each prompt, averaged over prompts. At
    T = 0 the decode is deterministic (spread exactly 0); sampling makes it vary."""
    model = random_dream(tiny_dream_config(64, 63, 0, 2), seed=0)
    prompts = torch.randint(3, 63, (4, 6), generator=torch.Generator().manual_seed(0))
    spread = {}
    for T in (0.0, 0.3, 1.0):
        s = DiffusionSettings(max_new_tokens=16, steps=16, alg="entropy", temperature=T)
        out = diffusion_generate(model, prompts.repeat_interleave(8, 0), None, s, 63,
                                 generator=torch.Generator().manual_seed(1))
        c = arness_from_record(out.record, k_local=1, k_global=1)
        spread[T] = float(c.local[:, 0].reshape(4, 8).std(1).mean())
    assert spread[0.0] == 0.0
    assert spread[0.3] > 0.02 and spread[1.0] > 0.02


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    orders = [rng.permutation(12) for _ in range(3)]
    curves = {"random": arness_curves(orders), "ar": arness_curves([np.arange(12)] * 3)}
    p = plot_arness(curves, tmp_path / "arness.png")
    q = plot_first_step_confidence(torch.rand(3, 12), tmp_path / "conf.png")
    for path in (p, q):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
