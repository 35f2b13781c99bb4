"""DDPT training on tiny models: the LM stays frozen, the denoiser learns, resume is exact."""
import dataclasses
import re
import shutil

import pytest
import torch

from helpers import CHECKPOINT_DAMAGE, EXAMPLES, damage_checkpoint, make_lm, write_checkpoint
from pipeline.config import PRESETS, RunConfig, SampleConfig
from pipeline.training.checkpoint import (
    CheckpointError,
    check_checkpoint,
    load_prompt_model,
    read_state,
)
from pipeline.training.loop import batch_indices, train_local
from pipeline.training.prompt_models import build_trainable, sampling_args


def tiny_config(model: str, steps: int = 6, **train) -> RunConfig:
    config = RunConfig.from_dict(PRESETS["smoke"])
    config.model = dataclasses.replace(config.model, name=model)
    config.train = dataclasses.replace(config.train, steps=steps, batch_size=3, lr=1e-2,
                                       checkpoint_every=0, **train)
    return config


def test_denoiser_output_shapes_and_zero_start(tiny_lm):
    config = tiny_config("tiny-llama")
    model = build_trainable(tiny_lm, config)[0]
    n, k, d = tiny_lm.context_length, config.denoiser.bottleneck, tiny_lm.hidden_size
    x_t, t = torch.randn(5, n, k), torch.randint(0, 100, (5,))
    assert model.denoiser(x_t, t).shape == (5, n, k)
    assert model.direction(torch.randn(5, n, k)).shape == (5, n, d)
    # zero-initialised output layer: training starts exactly at the manual prompt
    assert torch.equal(model.denoiser(x_t, t), torch.zeros(5, n, k))
    assert model.sample_directions(2, steps=5).shape == (2, n, d)


def test_fixed_up_projection_has_the_configured_scale(tiny_lm):
    config = tiny_config("tiny-llama")
    model = build_trainable(tiny_lm, config)[0]
    latents = torch.randn(4000, 1, config.denoiser.bottleneck)
    norm = model.direction(latents).norm(dim=-1).pow(2).mean().sqrt().item()
    expected = config.denoiser.up_scale * tiny_lm.mean_token_norm()
    assert norm == pytest.approx(expected, rel=0.05)
    assert not any(p is model.up.weight for p in model.parameters())  # a buffer, never trained


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_training_changes_only_the_denoiser(name):
    tiny_lm = make_lm(name)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    config = tiny_config(name, steps=4)
    init = build_trainable(tiny_lm, config)[0]
    result = train_local(config, tiny_lm, EXAMPLES, progress=False)
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "an LM weight changed"
    assert all(p.grad is None for p in tiny_lm.model.parameters()), "an LM weight got a gradient"
    changed = [k for k, v in result.model.denoiser.state_dict().items()
               if not torch.equal(v, init.denoiser.state_dict()[k])]
    assert "out.weight" in changed and len(changed) > 5
    assert result.model.x0_bar.abs().sum() > 0  # the bootstrap target moved off the manual prompt


def test_code_loss_falls():
    lm = make_lm("tiny-llama")
    config = tiny_config("tiny-llama", steps=40, consistency_weight=0.01)
    config.train = dataclasses.replace(config.train, batch_size=6)  # the whole set every step
    history = train_local(config, lm, EXAMPLES, progress=False).history
    first = sum(h["code_loss"] for h in history[:5]) / 5
    last = sum(h["code_loss"] for h in history[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_resume_continues_exactly(tmp_path):
    lm = make_lm("tiny-llama")
    straight = train_local(tiny_config("tiny-llama", steps=6), lm, EXAMPLES, progress=False)
    ckpt = tmp_path / "ckpt"
    train_local(tiny_config("tiny-llama", steps=3), lm, EXAMPLES, checkpoint_dir=ckpt,
                progress=False)
    assert read_state(ckpt)["step"] == 3
    resumed = train_local(tiny_config("tiny-llama", steps=6), lm, EXAMPLES,
                          checkpoint_dir=ckpt, resume=True, progress=False)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]  # no step counted twice
    assert [h["code_loss"] for h in resumed.history] == pytest.approx(
        [h["code_loss"] for h in straight.history[3:]], rel=1e-5)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_samples_the_same_prompt(tmp_path):
    lm = make_lm("tiny-llama")
    result = train_local(tiny_config("tiny-llama", steps=3), lm, EXAMPLES,
                         checkpoint_dir=tmp_path / "c", progress=False)
    loaded, config, state = load_prompt_model(tmp_path / "c")
    assert state["step"] == 3 and config.model.name == "tiny-llama"
    sample = sampling_args(SampleConfig(ddim_steps=5))
    a = result.model.sample_directions(2, torch.Generator().manual_seed(0), **sample)
    b = loaded.sample_directions(2, torch.Generator().manual_seed(0), **sample)
    assert torch.equal(a, b)


def test_batch_indices_visit_every_example_once_per_epoch():
    seen = [i for step in range(5) for i in batch_indices(10, 2, step, seed=3)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(10, 4, 7, seed=3) == batch_indices(10, 4, 7, seed=3)
    assert len(batch_indices(3, 8, 0, seed=0)) == 8  # batches larger than the data wrap around


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_prompt_tuning_baseline_learns_only_its_prompt(name, tmp_path):
    lm = make_lm(name)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    config = tiny_config(name, steps=30, method="prompt_tuning")
    config.train = dataclasses.replace(config.train, batch_size=6, lr=5e-2)
    result = train_local(config, lm, EXAMPLES, checkpoint_dir=tmp_path / "pt", progress=False)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    history = result.history
    assert history[0]["consistency"] == 0.0
    # Step 1 starts at the manual prompt (P = X_ctx), and the loss falls from there.
    assert history[-1]["code_loss"] < history[0]["code_loss"] - 0.1
    assert history[0]["direction_norm"] == 0.0 and history[-1]["direction_norm"] > 0
    loaded, saved_config, _ = load_prompt_model(tmp_path / "pt")
    assert saved_config.train.method == "prompt_tuning"
    torch.testing.assert_close(loaded.sample_directions(3)[2], result.model.direction())


def test_training_job_ends_its_own_run_but_not_a_callers(tmp_path):
    """``run_training`` ends the MLflow run it opens; a run the caller passes in (a sweep's
    trial run, which only the driver may end) stays open, even when training raises."""
    from mlflow import MlflowClient

    from pipeline.tracking import RunTracker
    from pipeline.training.job import local_backend, run_training

    config = tiny_config("tiny-llama", steps=2).with_overrides(["distributed.backend=local"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    owned = run_training(config, tmp_path / "own", local_backend(), examples=EXAMPLES,
                         progress=False)
    assert MlflowClient(tracking_uri=owned.tracking_uri).get_run(owned.run_id).info.status == \
        "FINISHED"

    caller = RunTracker.start(uri, "exp", "trial")
    outcome = run_training(config, tmp_path / "trial", local_backend(), examples=EXAMPLES,
                           progress=False, tracker=caller)
    run = client.get_run(caller.run_id)
    assert outcome.run_id == caller.run_id and run.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(caller.run_id, "code_loss")] == [1, 2]

    broken = RunTracker.start(uri, "exp", "broken")
    with pytest.raises(ValueError):
        run_training(config, tmp_path / "broken", local_backend(), examples=[], progress=False,
                     tracker=broken)
    run = client.get_run(broken.run_id)
    assert run.info.status == "RUNNING" and "error" not in run.data.tags


def test_checkpoint_writes_replace_the_old_folder_atomically(tmp_path):
    from pipeline.training.checkpoint import replace_folder, resolve, save_checkpoint

    lm = make_lm("tiny-llama")
    config = tiny_config("tiny-llama", steps=1)
    model = train_local(config, lm, EXAMPLES, progress=False).model
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, config, step=1)
    save_checkpoint(folder, model, config, step=2)
    assert read_state(folder)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left beside it
    # A crash between the two renames: the new folder is not in place yet, the old one is
    # aside. The old one is found and read; the next write cleans up.
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt-previous")
    assert resolve(folder) == tmp_path / ".ckpt-previous"
    assert read_state(folder)["step"] == 2 and load_prompt_model(folder)[2]["step"] == 2
    save_checkpoint(folder, model, config, step=3)
    assert read_state(folder)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    new = tmp_path / "new"
    new.mkdir()
    (new / "x").write_text("1")
    replace_folder(new, tmp_path / "other")
    assert (tmp_path / "other" / "x").read_text() == "1" and not new.exists()


@pytest.mark.parametrize("how", list(CHECKPOINT_DAMAGE))
def test_a_damaged_checkpoint_is_refused_by_file_before_use(tmp_path, how):
    """A cut-short or empty model.safetensors, a malformed or incomplete state.json: a
    CheckpointError naming the file from the cheap check and from loading."""
    folder = write_checkpoint(tmp_path / "ckpt")
    assert check_checkpoint(folder)["step"] == 0  # the intact one passes
    file = damage_checkpoint(folder, how)
    message = CHECKPOINT_DAMAGE[how][1]
    for read in (check_checkpoint, load_prompt_model):
        with pytest.raises(CheckpointError, match=re.escape(message)) as err:
            read(folder)
        assert str(err.value).startswith(f"{file}: ")


def test_weights_that_are_not_the_configured_model_are_named(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt")
    other = write_checkpoint(tmp_path / "other", hidden_dim=8)
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    check_checkpoint(folder)  # a whole file: the format is fine
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not hold the ddpt "
                       r"prompt model that .*config\.yaml and state\.json describe"):
        load_prompt_model(folder)


@pytest.mark.parametrize("objective", ["bootstrap", "bootstrap_teacher"])
def test_the_consistency_term_is_lambda_times_each_examples_squared_norm(objective):
    """method.md's `lambda ||x0_hat - target||^2`: per example, the squared L2 distance summed
    over the whole (n, k) latent, averaged over the batch (not a mean over the n k entries,
    which made lambda n k = 288 times weaker on the embedded model)."""
    from pipeline.method.objectives import OBJECTIVES, squared_distance
    from pipeline.method.prompt import DiffusionPrompt

    x0_hat = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]],
                           [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])  # (B=2, n=3, k=2)
    assert squared_distance(x0_hat, torch.zeros(3, 2)).item() == (5 + 6) / 2  # by hand

    torch.manual_seed(0)
    model = DiffusionPrompt(3, 8, 1.0, bottleneck=2, hidden_dim=16, timesteps=50,
                            teacher=objective == "bootstrap_teacher")
    torch.nn.init.normal_(model.denoiser.out.weight)  # predictions off zero, off the target
    model.x0_bar.fill_(0.5)
    if model.teacher is not None:
        model.update_teacher(0.5)  # a teacher half way: its samples differ from the denoiser's
    weight, ce = 0.25, torch.tensor(1.5)
    objective_ = OBJECTIVES[objective](consistency_weight=weight, cfg_dropout=0.0)
    generator = torch.Generator().manual_seed(1)
    output = objective_.loss(model, lambda direction, per_example=False: ce, 4, generator)
    consistency = output.stats["consistency"]
    assert output.loss.item() == pytest.approx(1.5 + weight * consistency.item())
    if objective == "bootstrap":  # the prediction is returned: check the sum by hand
        by_hand = sum(((row - 0.5) ** 2).sum().item() for row in output.x0_hat) / 4
        assert consistency.item() == pytest.approx(by_hand)
        mean_over_entries = ((output.x0_hat - 0.5) ** 2).mean().item()
        assert consistency.item() == pytest.approx(3 * 2 * mean_over_entries)
    assert consistency.item() > 0.1


def test_prompt_tuning_can_start_from_random_vocabulary_tokens():
    """train.prompt_init=vocab (PEFT's SAMPLE_VOCAB, Lester et al.'s sampled vocabulary): P
    starts at n rows of the LM's embedding table drawn with train.seed; 'context' (the
    default) starts at the manual prompt."""
    lm = make_lm("tiny-llama")
    table = lm.model.get_input_embeddings().weight.detach()
    config = tiny_config("tiny-llama", method="prompt_tuning", prompt_init="vocab")
    model, _ = build_trainable(lm, config)
    start = model.prompt.embedding.weight.detach()
    rows = [torch.isclose(table, row).all(-1).nonzero().flatten().tolist() for row in start]
    assert all(len(found) >= 1 for found in rows)  # each position is a vocabulary token
    assert len({found[0] for found in rows}) > 1
    assert torch.equal(build_trainable(lm, config)[0].prompt.embedding.weight, start)
    other = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=1))
    assert not torch.equal(build_trainable(lm, other)[0].prompt.embedding.weight, start)
    manual = build_trainable(lm, tiny_config("tiny-llama", method="prompt_tuning"))[0]
    assert manual.direction().abs().max() == 0  # the paper preset's start: the manual prompt


def test_prompt_tuning_trains_at_its_own_rate_where_one_is_set(tmp_path):
    """`ddpt run` trains DDPT and prompt tuning from one configuration: train.prompt_tuning_lr
    is prompt tuning's rate (each arm tuned on its own), train.lr DDPT's; a sweep that
    searches train.lr for prompt tuning while prompt_tuning_lr is set would change nothing and
    is refused."""
    import yaml

    from pipeline.config import ConfigError, TrainConfig
    from pipeline.studies.sweep import load_sweep
    from pipeline.training.loop import local_step_fn
    from pipeline.training.prompt_models import PromptLoss

    both = TrainConfig(lr=3e-3, prompt_tuning_lr=0.1)
    assert dataclasses.replace(both, method="prompt_tuning").method_lr == 0.1
    assert both.method_lr == 3e-3  # ddpt
    assert dataclasses.replace(both, method="prompt_tuning", prompt_tuning_lr=None).method_lr \
        == 3e-3
    lm = make_lm("tiny-llama")
    config = tiny_config("tiny-llama", method="prompt_tuning", prompt_tuning_lr=0.1)
    model, objective = build_trainable(lm, config)
    _, optimizer = local_step_fn(PromptLoss(model, lm, objective), config.train)
    assert optimizer.param_groups[0]["lr"] == 0.1
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "sweep": {"preset": "smoke", "eval_every": 2},
        "fixed": {"train.method": "prompt_tuning", "train.prompt_tuning_lr": 0.1},
        "space": {"train.lr": {"grid": [1e-3, 1e-2]}}}))
    with pytest.raises(ConfigError, match="search train.prompt_tuning_lr"):
        load_sweep(space)
