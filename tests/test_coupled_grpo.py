"""Coupled-GRPO's math against hand computations of the reference's formulas, its invariants on a
tiny Dream, the mask-seed schedule and the reference sync."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.lm.coupled import coupled_from_logprobs, draw_coupled_mask
from pipeline.lm.coupled_grpo import (
    CoupledGRPOSettings,
    completion_mask,
    coupled_grpo_loss,
    mask_seed_index,
    reference_optimizer,
    reference_reward,
    rollout_round,
    round_mask_seeds,
    score,
    sync_reference,
    update,
)
from pipeline.lm.dream import random_dream, tiny_dream_config
from pipeline.method.policy_gradient import group_advantages

pytestmark = pytest.mark.usefixtures("one_thread")
MASK, END = 15, 1


def tiny_policy(seed: int = 0):
    return random_dream(tiny_dream_config(16, MASK, 0, END), seed=seed).requires_grad_(True)


def test_the_loss_on_fixed_tensors_is_the_reference_formulas_by_hand():
    g = torch.Generator().manual_seed(0)
    B, K, t, G = 4, 5, 0.3, 2
    completions = torch.tensor([[3, 4, END, 5, 6], [END, 2, 2, 2, 2], [3, 3, 3, 3, 3],
                                [4, 5, 6, END, END]])
    m_t = torch.rand(B, K, generator=g) < t
    l1, l2, l3 = (-torch.rand(B, K, generator=g) * 3 for _ in range(3))
    scores = coupled_from_logprobs(l1, l2, l3, m_t, t)
    old = scores + torch.randn(B, K, generator=g) * 0.6  # some ratios beyond 1 +- 0.5
    ref = scores + torch.randn(B, K, generator=g) * 0.3
    rewards = torch.tensor([2.5, 0.5, 1.0, 1.0])  # group 2 all equal
    settings = CoupledGRPOSettings(group_size=G)
    adv = group_advantages(rewards.view(-1, G), baseline="leave_one_out")
    mask = completion_mask(completions, END)
    out = coupled_grpo_loss(scores, old, ref, adv.advantages, mask, settings)

    total = count = clipped = 0.0
    for i in range(B):
        group = rewards.view(-1, G)[i // G].tolist()
        baseline = (sum(group) - group[i % G]) / (G - 1)  # leave-one-out, no std scaling
        a = float(rewards[i]) - baseline
        first_end = completions[i].tolist().index(END) if END in completions[i] else K - 1
        for k in range(first_end + 1):  # up to and including the first end-of-turn token
            s = (float(l1[i, k]) + (float(l2[i, k]) / t if m_t[i, k] else
                                   float(l3[i, k]) / (1 - t))) / 2
            coef_1 = math.exp(s - float(old[i, k]))
            coef_2 = min(max(coef_1, 1 - 0.5), 1 + 0.5)
            d = float(ref[i, k]) - s
            total += -min(coef_1 * a, coef_2 * a) + 0.01 * (math.exp(d) - d - 1)
            count += 1
            clipped += (coef_1 < 0.5 and a < 0) or (coef_1 > 1.5 and a > 0)
    assert count == 3 + 1 + 5 + 4
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)
    assert out.stats["clip_fraction"].item() == pytest.approx(clipped / count)
    assert 0 < clipped < count
    assert adv.informative.tolist() == [True, False] and adv.informative_share == 0.5
    torch.testing.assert_close(adv.advantages.view(-1, G).sum(1), torch.zeros(2))


def test_advantages_are_zero_mean_within_each_group():
    rewards = torch.rand(5, 7, generator=torch.Generator().manual_seed(1))
    for baseline in ("mean", "leave_one_out"):
        for scale in (False, True):
            adv = group_advantages(rewards, baseline=baseline, scale_by_std=scale)
            torch.testing.assert_close(adv.advantages.view(5, 7).mean(1), torch.zeros(5),
                                       atol=1e-6, rtol=0)
    loo = group_advantages(rewards, baseline="leave_one_out").advantages.view(5, 7)
    torch.testing.assert_close(loo, 7 / 6 * (rewards - rewards.mean(1, keepdim=True)))


def test_ratio_is_one_and_kl_and_its_gradient_zero_at_the_reference():
    policy = tiny_policy()
    reference = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(2, 15, (4, 3), generator=g)
    completions = torch.randint(2, 15, (4, 6), generator=g)
    settings = CoupledGRPOSettings(group_size=2)
    current = score(policy, prompts, completions, MASK, 7, settings)
    with torch.no_grad():
        again = score(policy, prompts, completions, MASK, 7, settings)
        ref = score(reference, prompts, completions, MASK, 7, settings)
        other = score(policy, prompts, completions, MASK, 8, settings)
    assert torch.equal(torch.exp(current - again), torch.ones_like(current))
    assert not torch.equal(current, other)  # another seed, other masks
    mask = torch.ones(4, 6)
    out = coupled_grpo_loss(current, again, ref, torch.zeros(4), mask, settings)
    assert out.stats["kl"].item() == 0.0 and out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad))
               for p in policy.parameters())
    # the whole update: its first micro-step sees ratio 1 exactly and KL 0 (same masks)
    data = rollout_round(prompts[:2], lambda p: completions[:4], lambda c: torch.arange(4.0),
                         END, settings, seed=3)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    records, step = update(policy, reference, optimizer, data, MASK, settings)
    assert step == 2 and len(records) == 4
    assert records[0]["ratio_mean"].item() == 1.0 and records[0]["kl"].item() == 0.0
    assert records[-1]["kl"].item() > 0  # the second iteration moved off the reference


def test_mu_one_with_a_kl_term_runs():
    """The reference fails here (an undefined name when mu = 1 and beta > 0)."""
    policy, settings = tiny_policy(), CoupledGRPOSettings(group_size=2, iterations=1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    prompts = torch.randint(2, 15, (1, 3), generator=torch.Generator().manual_seed(0))
    data = rollout_round(prompts, lambda p: torch.randint(2, 15, (2, 4)),
                         lambda c: torch.tensor([0.0, 1.0]), END, settings)
    records, step = update(policy, reference, torch.optim.SGD(policy.parameters(), lr=0.1),
                           data, MASK, settings)
    assert step == 1 and records[0]["ratio_mean"].item() == 1.0


def test_the_mask_schedule_gives_new_masks_per_iteration_and_the_reference_quirk_by_flag():
    default = CoupledGRPOSettings()
    seeds = round_mask_seeds(0, 0, default)
    assert len(set(seeds)) == 2 and round_mask_seeds(0, 1, default) != seeds
    assert [mask_seed_index(j, s, default) for j in (0, 1) for s in (0, 1)] == [0, 0, 1, 1]
    masks = [draw_coupled_mask((4, 32), torch.Generator().manual_seed(seed))[1]
             for seed in seeds]
    assert not torch.equal(masks[0], masks[1])
    quirk = CoupledGRPOSettings(reference_mask_schedule=True)
    # (iteration, slice) -> seed index: slice 0 keeps seed 1, slice 1 keeps seed 0
    assert [mask_seed_index(j, s, quirk) for j in (0, 1) for s in (0, 1)] == [1, 0, 1, 0]
    assert round_mask_seeds(5, 9, CoupledGRPOSettings(random_masking=False)) == [42, 42]
    # the update follows the schedule it is given
    policy = tiny_policy(1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    settings = CoupledGRPOSettings(group_size=2, reference_mask_schedule=True)
    prompts = torch.randint(2, 15, (2, 3), generator=torch.Generator().manual_seed(4))
    data = rollout_round(prompts, lambda p: torch.randint(2, 15, (4, 5)),
                         lambda c: torch.tensor([0.0, 1.0, 1.0, 0.0]), END, settings, seed=1)
    records, _ = update(policy, reference, torch.optim.SGD(policy.parameters(), lr=0.0), data,
                        MASK, settings)
    s0, s1 = data.mask_seeds
    assert [r["mask_seed"] for r in records] == [s1, s0, s1, s0]


def test_reference_sync_mixes_toward_the_policy_every_n_steps():
    policy = tiny_policy(2)
    reference = tiny_policy(3).requires_grad_(False)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    sync_reference(reference, policy, 0.6)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(value, 0.4 * before[name] + 0.6 * policy.state_dict()[name])
    synced_head = reference.lm_head.weight.clone()
    settings = CoupledGRPOSettings(group_size=2, iterations=2, ref_sync_every=2,
                                   ref_sync_alpha=1.0, beta=0.0)
    prompts = torch.randint(2, 15, (1, 3), generator=torch.Generator().manual_seed(0))
    data = rollout_round(prompts, lambda p: torch.randint(2, 15, (2, 4)),
                         lambda c: torch.tensor([0.0, 1.0]), END, settings)
    optimizer, scheduler = reference_optimizer(policy,
                                               CoupledGRPOSettings(lr=1e-2), 10)
    _, step = update(policy, reference, optimizer, data, MASK, settings, scheduler=scheduler,
                     step=1)
    assert step == 3  # the sync ran after step 2 (alpha 1: a copy), not after step 3
    assert not torch.equal(reference.lm_head.weight, synced_head)
    assert not torch.equal(reference.lm_head.weight, policy.lm_head.weight)
    assert scheduler.last_epoch == 2


def test_completion_mask_and_reward():
    ids = torch.tensor([[5, END, 6, END], [5, 6, 7, 8], [END, 5, 5, 5]])
    assert completion_mask(ids, END).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    reward = reference_reward(torch.tensor([1.0, 0.5, 1.0, 0.0]),
                              torch.tensor([1.0, 1.0, 0.5, 0.0]))
    assert reward.tolist() == [2.5, 1.5, 0.25, 0.0]


# ---- estimators of the gradient, against exact enumeration ------------------------------------
def exact_expected_score(model, prompt: torch.Tensor, completion: torch.Tensor,
                         t_range: tuple[float, float] = (0.2, 0.8)) -> torch.Tensor:
    """E over t ~ U(t_range) and the masks of the coupled (= the decoupled) score's sum, by
    enumerating every masked subset A of a (1, K) completion in one forward. For token k in A,
    f_k(A) = log p(x_k | A masked) enters through M_t = A (weight P(A | t) / t) and through
    M_t's complement = A (weight P(A^c | t) / (1 - t)):
    E = sum_k (f_k(all) + sum_{A ni k} f_k(A) E_t[t^(|A|-1) (1-t)^(K-|A|) +
    t^(K-|A|) (1-t)^(|A|-1)]) / 2, the t-integral by Gauss-Legendre (exact for polynomials)."""
    import itertools

    import numpy as np

    K, n = completion.shape[1], prompt.shape[1]
    subsets = torch.tensor([a for a in itertools.product([False, True], repeat=K) if any(a)])
    views = torch.cat([prompt.repeat(len(subsets), 1),
                       completion.repeat(len(subsets), 1).masked_fill(subsets, MASK)], 1)
    logp = model(input_ids=views).logits[:, n - 1:n - 1 + K].float().log_softmax(-1)
    f = logp.gather(-1, completion.repeat(len(subsets), 1)[..., None])[..., 0]  # (2^K - 1, K)
    nodes, weights = np.polynomial.legendre.leggauss(32)
    lo, hi = t_range
    t = torch.tensor((nodes + 1) / 2 * (hi - lo) + lo)[None]
    size = subsets.sum(1, keepdim=True).double()
    c = ((t ** (size - 1) * (1 - t) ** (K - size) + t ** (K - size) * (1 - t) ** (size - 1))
         * torch.tensor(weights / 2)[None]).sum(1).float()
    full = f[subsets.all(1)][0]
    return ((full + (c[:, None] * f * subsets).sum(0)) / 2).sum()


@pytest.mark.slow
def test_coupled_and_plain_monte_carlo_gradients_agree_with_the_exact_one():
    from pipeline.lm.coupled import coupled_scores, decoupled_scores

    model = random_dream(tiny_dream_config(16, MASK, 0, END), seed=5).requires_grad_(True)
    params = list(model.parameters())
    flat = lambda grads: torch.cat([x.reshape(-1) for x in grads])
    g = torch.Generator().manual_seed(0)
    prompt, completion = torch.randint(2, 15, (1, 3), generator=g), torch.randint(2, 15, (1, 4),
                                                                                   generator=g)
    exact = flat(torch.autograd.grad(exact_expected_score(model, prompt, completion), params))
    directions = torch.randn(8, exact.numel(), generator=torch.Generator().manual_seed(9))
    draws, variance = 150, {}
    for name, estimator, seed in (("coupled", coupled_scores, 1), ("plain", decoupled_scores, 2)):
        gen = torch.Generator().manual_seed(seed)
        grads = torch.stack([
            flat(torch.autograd.grad(estimator(model, prompt, completion, MASK, gen).sum(),
                                     params)) for _ in range(draws)])
        projected = grads @ directions.T  # (draws, 8): gradients along 8 random directions
        z = (projected.mean(0) - directions @ exact) / (projected.std(0) / draws ** 0.5)
        assert z.abs().max() < 4.5, (name, z)  # unbiased: the mean is the exact gradient
        variance[name] = grads.var(0).sum()
    assert variance["coupled"] < 0.9 * variance["plain"], variance  # measured about 0.75


def test_every_setting_is_in_the_configuration_with_the_references_default(tmp_path):
    import dataclasses

    from pipeline.config import ConfigError, DllmRLConfig, build_config
    from pipeline.lm.coupled_grpo import settings_from_config

    assert settings_from_config(DllmRLConfig()) == CoupledGRPOSettings()
    named = {f.name for f in dataclasses.fields(DllmRLConfig)}
    assert {f.name for f in dataclasses.fields(CoupledGRPOSettings)} - named == {
        "t_range", "adam_betas"}  # t_min/t_max, adam_beta1/adam_beta2
    config = build_config("smoke", overrides=["model.name=tiny-dream",
                                              "train.method=coupled_grpo", "dllm_rl.t_min=0.3",
                                              "dllm_rl.adam_beta2=0.95", "dllm_rl.iterations=1"])
    settings = settings_from_config(config.dllm_rl)
    assert settings.t_range == (0.3, 0.8) and settings.adam_betas == (0.9, 0.95)
    assert settings.iterations == 1
    # only a masked-diffusion LM: the field is named, and what the model is
    for name, kind in (("tiny-llama", "llama"), ("embedded", "llama")):
        with pytest.raises(ConfigError, match=rf"train.method: 'coupled_grpo' .* '{kind}'"):
            build_config("smoke", overrides=[f"model.name={name}", "train.method=coupled_grpo"])
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="'gpt2' model"):
        build_config("smoke", overrides=[f"model.name={folder}", "train.method=coupled_grpo"])
    with pytest.raises(ConfigError, match="dllm_rl.t_max: must be >= dllm_rl.t_min"):
        build_config("smoke", overrides=["dllm_rl.t_min=0.7", "dllm_rl.t_max=0.6"])


def test_weight_decay_spares_biases_and_norms_as_the_references_trainer():
    from pipeline.lm.coupled_grpo import decay_groups

    policy = tiny_policy()
    groups = decay_groups(policy, 0.1)
    names = {id(p): n for n, p in policy.named_parameters()}
    plain = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "norm" in n for n in plain)
    assert "model.norm.weight" in plain and "model.layers.0.self_attn.q_proj.bias" in plain
    assert len(plain) + len(groups[0]["params"]) == len(names)
    optimizer, scheduler = reference_optimizer(policy, CoupledGRPOSettings(), 1000)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.defaults["betas"] == (0.9, 0.99) and optimizer.defaults["lr"] == 1e-6
    lrs = []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-6)  # one warm-up step (ceil 1e-4 x 1000)
    assert lrs[-1] == pytest.approx(1e-7, rel=1e-3)  # cosine down to 0.1 x lr


def test_ddpt_train_refuses_coupled_grpo_for_a_model_that_is_not_a_dllm(tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--output", str(out), "--set",
                 "model.name=tiny-llama", "--set", "train.method=coupled_grpo"]) == 2
    err = capsys.readouterr().err
    assert "train.method: 'coupled_grpo' trains a masked-diffusion LM" in err, err
    assert "model.name='tiny-llama' is a 'llama' model" in err
    assert not out.exists()
