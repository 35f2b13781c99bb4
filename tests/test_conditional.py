"""Per-task DDPT: the condition, classifier-free guidance, the objectives that keep a
distribution, the EMA teacher, and exact resume with the new state."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import EXAMPLES, make_lm
from pipeline.config import PRESETS, RunConfig
from pipeline.config import PROMPT_MODELS as CONFIG_PROMPT_MODELS
from pipeline.method.objectives import OBJECTIVES
from pipeline.method.prompt import DiffusionPrompt
from pipeline.training.checkpoint import load_prompt_model
from pipeline.training.loop import train_local
from pipeline.training.prompt_models import PROMPT_MODELS, build_trainable, parameter_count


def tiny_config(steps: int = 4, objective: str = "bootstrap", condition: str = "instruction",
                **train) -> RunConfig:
    config = RunConfig.from_dict(PRESETS["smoke"])
    config.denoiser = dataclasses.replace(config.denoiser, condition=condition)
    config.train = dataclasses.replace(config.train, steps=steps, batch_size=3, lr=2e-2,
                                       checkpoint_every=0, objective=objective, **train)
    return config


def trained(config: RunConfig, **kwargs):
    return train_local(config, make_lm("tiny-llama"), EXAMPLES, progress=False, **kwargs)


def test_registry_and_configuration_name_the_same_prompt_models():
    assert tuple(PROMPT_MODELS) == CONFIG_PROMPT_MODELS
    assert set(OBJECTIVES) == {"bootstrap", "bootstrap_teacher", "unrolled", "spread",
                               "deterministic", "soft_min"}


def conditions(lm, examples):
    return lm.condition(lm.collate(lm.encode(examples)))


@pytest.mark.parametrize("objective", ["bootstrap", "bootstrap_teacher", "unrolled", "spread",
                                       "deterministic"])
def test_the_condition_changes_the_prompt(objective):
    lm = make_lm("tiny-llama")
    model = trained(tiny_config(objective=objective)).model
    c = conditions(lm, EXAMPLES[:2])
    noise = [torch.Generator().manual_seed(0) for _ in range(2)]  # the same noise for both
    first, second = model.sample_directions(2, noise, steps=3, condition=c)
    assert not torch.allclose(first, second), "two instructions got the same prompt"


def test_guidance_zero_is_the_unconditional_prompt():
    lm = make_lm("tiny-llama")
    model = trained(tiny_config()).model
    c = conditions(lm, EXAMPLES[:3])
    seeded = lambda: [torch.Generator().manual_seed(i) for i in range(3)]
    unconditional = model.sample_directions(3, seeded(), steps=5, condition=None)
    torch.testing.assert_close(model.sample_directions(3, seeded(), steps=5, condition=c,
                                                       guidance=0.0), unconditional)
    assert not torch.allclose(model.sample_directions(3, seeded(), steps=5, condition=c),
                              unconditional)
    strong = model.sample_directions(3, seeded(), steps=5, condition=c, guidance=3.0)
    assert not torch.allclose(strong, model.sample_directions(3, seeded(), steps=5,
                                                              condition=c))


def test_the_ema_teacher_never_gets_gradients_and_follows_the_denoiser():
    lm = make_lm("tiny-llama")
    config = tiny_config(steps=3, objective="bootstrap_teacher")
    model, _ = build_trainable(lm, config)
    assert model.teacher is not None and not list(model.teacher.parameters())  # buffers only
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert all(p.requires_grad is False for p in model.teacher.buffers())
    result = trained(config)
    teacher, student = result.model.teacher.state_dict(), result.model.denoiser.state_dict()
    moved = [k for k in before if not torch.equal(before[k], teacher[k])]
    assert moved and all(not torch.equal(teacher[k], student[k]) for k in ("out.weight",))
    assert parameter_count(result.model) == sum(
        p.numel() for p in result.model.denoiser.parameters())  # the teacher is not counted


@pytest.mark.parametrize("objective", ["bootstrap_teacher", "unrolled"])
def test_resume_stays_exact_with_the_new_state(tmp_path, objective):
    straight = trained(tiny_config(steps=6, objective=objective))
    folder = tmp_path / "c"
    trained(tiny_config(steps=3, objective=objective), checkpoint_dir=folder)
    resumed = trained(tiny_config(steps=6, objective=objective), checkpoint_dir=folder,
                      resume=True)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert [h["code_loss"] for h in resumed.history] == pytest.approx(
        [h["code_loss"] for h in straight.history[3:]], abs=1e-6)
    loaded, _, _ = load_prompt_model(folder)
    for key, value in straight.model.state_dict().items():  # teacher and condition stats too
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


def test_condition_statistics_come_from_the_training_data():
    lm = make_lm("tiny-llama")
    model = trained(tiny_config(steps=1)).model
    c = conditions(lm, EXAMPLES)
    torch.testing.assert_close(model.denoiser.cond_mean, c.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.denoiser.cond_scale, c.std(0, unbiased=False),
                               atol=1e-5, rtol=1e-4)


def test_the_deterministic_ablation_ignores_the_noise():
    lm = make_lm("tiny-llama")
    model = trained(tiny_config(objective="deterministic")).model
    c = conditions(lm, EXAMPLES[:2])
    a = model.sample_directions(2, [torch.Generator().manual_seed(i) for i in (0, 1)],
                                condition=c)
    b = model.sample_directions(2, [torch.Generator().manual_seed(i) for i in (5, 6)],
                                condition=c)
    torch.testing.assert_close(a, b)


def test_an_unconditional_model_is_unchanged_by_the_new_options():
    """condition: none builds exactly the model the project had (same parameters, same init)."""
    lm = make_lm("tiny-llama")
    config = tiny_config(condition="none")
    model, _ = build_trainable(lm, config)
    assert isinstance(model, DiffusionPrompt) and not model.conditional
    assert model.teacher is None and not hasattr(model.denoiser, "null")
    conditional, _ = build_trainable(lm, tiny_config(condition="instruction"))
    for name, value in model.denoiser.state_dict().items():  # built first, so the same init
        torch.testing.assert_close(conditional.denoiser.state_dict()[name], value)


def test_spread_keeps_a_distribution_where_unrolled_does_not_have_to():
    """Two noises, one condition: 'spread' rewards their prompts being apart; its DDPM-like
    and DDIM samples then differ, as they do for every chain model with fresh noise."""
    from pipeline.scoring.diversity import pairwise_spread

    lm = make_lm("tiny-llama")
    c = conditions(lm, EXAMPLES[:1]).repeat(4, 1)
    spreads = {}
    for objective in ("unrolled", "spread"):
        config = tiny_config(steps=12, objective=objective, spread_weight=1.0,
                             target_spread=0.5)
        model = trained(config).model
        draws = model.sample_directions(4, [torch.Generator().manual_seed(i) for i in range(4)],
                                        sampler="ddim", condition=c)
        spreads[objective] = pairwise_spread(draws)
        ddpm = model.sample_directions(4, [torch.Generator().manual_seed(i) for i in range(4)],
                                       sampler="ddpm", condition=c)
        assert not torch.allclose(ddpm, draws)
    assert spreads["spread"] > spreads["unrolled"], spreads


@pytest.mark.parametrize("objective, asked, expected", [
    ("unrolled", ("ddpm", 50, 0.0), ("ddim", 3, 1.0)),     # its own 3-step chain, fresh noise
    ("unrolled", ("ddim", 50, 0.0), ("ddim", 3, 0.0)),
    ("deterministic", ("ddpm", 50, 0.0), ("deterministic", 1, 0.0)),
    ("bootstrap", ("ddpm", 50, 0.0), ("ddpm", 100, 0.0)),  # all T of the smoke preset
    ("bootstrap", ("ddim", 7, 0.5), ("ddim", 7, 0.5)),
])
def test_chain_names_the_reverse_process_that_sampling_runs(objective, asked, expected):
    """What MLflow records as a method's chain (comparison.method_params) is what ran."""
    from pipeline.method.samplers import sample

    lm = make_lm("tiny-llama")
    model = trained(tiny_config(steps=2, objective=objective, unroll_steps=3)).model
    assert model.chain(*asked) == expected
    if expected[0] == "deterministic":
        return
    c = conditions(lm, EXAMPLES[:2])
    seeded = lambda: [torch.Generator().manual_seed(i) for i in range(2)]
    sampler, steps, eta = asked
    drawn = model.sample_latents(2, seeded(), sampler=sampler, steps=steps, eta=eta, condition=c)
    sampler, steps, eta = expected
    model.eval()
    with torch.no_grad():
        direct = sample(lambda x, t: model.predict(x, t, c), model.schedule, drawn.shape,
                        sampler=sampler, steps=steps, eta=eta, generator=seeded())
    torch.testing.assert_close(drawn, direct)
