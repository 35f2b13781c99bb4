"""The clipped surrogate's reports, checked against values worked out by hand."""
import math

import torch

from pipeline.method.policy_gradient import clipped_policy_loss


def test_the_clipped_loss_and_its_reports_by_hand():
    # two rows of two elements; row 0 favoured (advantage +1), row 1 not (-1); one element masked
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.1]]))
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    out = clipped_policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, eps_low=0.2,
                              eps_high=0.2)
    # per element -min(r A, clip(r) A): row 0: -min(1.5, 1.2) = -1.2, -1.0; row 1: -min(-0.5, -0.8)
    assert math.isclose(float(out.loss), (-1.2 - 1.0 + 0.8) / 3, rel_tol=1e-6)
    assert math.isclose(float(out.stats["clip_fraction"]), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(out.stats["ratio_mean"]), (1.5 + 1.0 + 0.5) / 3, rel_tol=1e-6)
    assert float(out.stats["elements"]) == 3


def test_nothing_counted_reports_the_ratio_of_no_update():
    logp = torch.randn(2, 3)
    out = clipped_policy_loss(logp, logp.clone(), torch.zeros(2), torch.zeros(2, 3))
    assert float(out.loss) == 0 and float(out.stats["elements"]) == 0
    for key in ("ratio_mean", "ratio_min", "ratio_max"):
        assert float(out.stats[key]) == 1.0, key
