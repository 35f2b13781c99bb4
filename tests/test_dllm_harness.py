"""Masked-diffusion LMs through the project's harness: the one loader, the sampler's methods
(with AR-ness in every record), DDPT prompts and SPA on a dLLM, and `ddpt evaluate` end to end
through the sandbox and MLflow."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from helpers import DREAM_FIXTURES, EXAMPLES
from pipeline.cli import main
from pipeline.config import ConfigError, ModelConfig, build_config
from pipeline.generation.sampler import BatchSampler
from pipeline.lm.dream import DreamModel, load_dream
from pipeline.lm.loader import build_lm, is_diffusion_model, load_hf_config, load_model
from pipeline.scoring.results import ResultStore
from pipeline.tracking import read_run_file

FIXTURE = DREAM_FIXTURES / "tiny-dream"
DREAM = ["model.name=tiny-dream", "decoding.strategy=diffusion", "eval.max_new_tokens=12",
         "pool.backend=local"]


def dream_config(*extra: str):
    return build_config("smoke", overrides=[*DREAM, *extra])


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="no dream fixtures")
def test_a_dream_folder_goes_through_the_one_loader_without_remote_code():
    config = ModelConfig(name=str(FIXTURE))
    assert is_diffusion_model(config) and not is_diffusion_model(ModelConfig(name="tiny-llama"))
    assert load_hf_config(config).model_type == "Dream"
    ids = torch.tensor([[5, 9, 13, 2]])
    direct = load_dream(FIXTURE)(input_ids=ids).logits
    with pytest.raises(FileNotFoundError, match="tokenizer"):  # the fixture ships no tokenizer
        load_model(config)
    assert direct.shape == (1, 4, 64)


def test_tiny_dream_is_built_in_code_with_a_mask_token():
    model, tokenizer = load_model(ModelConfig(name="tiny-dream"))
    assert isinstance(model, DreamModel)
    assert tokenizer.mask_token_id == model.config.mask_token_id == len(tokenizer) - 1
    assert not any(p.requires_grad for p in model.parameters())


def test_the_sampler_decodes_with_diffusion_and_records_arness():
    sampler = BatchSampler(dream_config(), {})
    manual = sampler.run("manual", EXAMPLES[:3])
    spa = sampler.run("spa", EXAMPLES[:3])
    for record in manual + spa:
        assert len(record["arness_local"]) == 9 and len(record["arness_global"]) == 4
        assert all(0 <= v <= 1 for v in record["arness_local"] + record["arness_global"])
        assert len(record["first_step_confidence"]) == 12
        assert torch.isfinite(torch.tensor(record["code_ce"]))
    # the same batch decodes the same way (seeded by its ids)
    assert [r["generation"] for r in sampler.run("manual", EXAMPLES[:3])] == \
        [r["generation"] for r in manual]


def test_decoding_must_match_the_model():
    with pytest.raises(ConfigError, match="set decoding.strategy=diffusion"):
        BatchSampler(build_config("smoke", overrides=["model.name=tiny-dream"]), {})
    with pytest.raises(ConfigError, match="needs a masked-diffusion LM"):
        BatchSampler(build_config("smoke", overrides=["decoding.strategy=diffusion"]), {})


def test_a_ddpt_prompt_offsets_the_dllm_context():
    """The coupled loss is differentiable in the prompt direction (DDPT trains on a dLLM with
    it), and a direction changes what the dLLM writes."""
    lm = build_lm(dream_config())
    batch = lm.collate(lm.encode(EXAMPLES[:4]))
    delta = torch.zeros(lm.context_length, lm.hidden_size, requires_grad=True)
    loss = lm.code_loss(batch, delta)
    loss.backward()
    assert delta.grad.abs().sum() > 0
    again = lm.code_loss(batch, delta.detach())  # a fixed seed: the same held-out score
    assert again.item() == pytest.approx(loss.item())
    from pipeline.decoding.dllm import generate_ids_diffusion

    prompts = lm.collate(lm.encode(EXAMPLES[:4]), with_targets=False)
    decoding = dream_config().decoding
    plain, _ = generate_ids_diffusion(lm, prompts, None, 12, decoding)
    pushed, _ = generate_ids_diffusion(lm, prompts, torch.randn(lm.context_length,
                                                                lm.hidden_size) * 3, 12, decoding)
    assert plain != pushed


def test_ddpt_trains_against_a_dllm(tmp_path):
    from pipeline.training.loop import train_local

    config = dream_config("train.steps=3", "train.batch_size=3", "train.lr=1e-2")
    lm = build_lm(config)
    result = train_local(config, lm, EXAMPLES, checkpoint_dir=tmp_path / "c", progress=False)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["direction_norm"] > 0


def evaluate(out: Path, *extra: str) -> int:
    return main(["evaluate", "--data", "humaneval", "--limit", "3", "--method", "manual",
                 "--method", "spa", "--output", str(out), "--no-progress",
                 *[item for pair in (("--set", s) for s in (*DREAM, *extra)) for item in pair]])


def test_evaluate_runs_a_dllm_through_the_sandbox_and_mlflow(tmp_path):
    out = tmp_path / "ev"
    assert evaluate(out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"manual", "spa"}
    for values in metrics.values():
        assert values["total"] == 3 and "arness_global_at_1" in values and "bleu4" in values
    records = ResultStore(out / "samples.jsonl").load()  # the last record per (method, id)
    assert len(records) == 6
    assert {r["status"] for r in records} <= {"passed", "failed", "error", "timeout"}
    saved = read_run_file(out / "evaluate_run.json")
    client = MlflowClient(tracking_uri=saved["uri"])
    logged = client.get_run(saved["run_id"]).data.metrics
    assert "manual.arness_local_at_1" in logged and "spa.pass_at_1" in logged
    artifacts = {a.path for a in client.list_artifacts(saved["run_id"], "arness")}
    assert "arness/manual_arness.png" in artifacts


@pytest.mark.slow
def test_evaluate_a_dllm_on_the_ray_sampler_pool(tmp_path):
    out = tmp_path / "ray"
    assert evaluate(out, "pool.backend=ray", "pool.num_actors=1") == 0
    records = ResultStore(out / "samples.jsonl").load()
    assert len({(r["method"], r["id"]) for r in records}) == len(records) == 6
    assert all("actor_pid" in r and "arness_local" in r and "status" in r for r in records)


def test_parity_mode_is_a_setting():
    config = dream_config("decoding.diffusion_parity=true", "decoding.diffusion_steps=6")
    from pipeline.decoding.dllm import diffusion_settings

    settings = diffusion_settings(config.decoding, 12)
    assert settings.parity and settings.steps == 6 and settings.alg == "entropy"
    assert dataclasses.replace(config.decoding, diffusion_steps=0).diffusion_steps == 0
    assert diffusion_settings(dataclasses.replace(config.decoding, diffusion_steps=0),
                              12).steps == 12


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="no dream fixtures")
def test_the_dllm_page_example_runs(monkeypatch):
    """The in-process example of docs/dllm.md, verbatim (its paths are the clone's)."""
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "dllm.md").read_text()
    start = page.index("## In-process API")
    block = re.search(r"```python\n(.*?)```", page[start:], re.DOTALL).group(1)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    namespace: dict = {}
    exec(compile(block, "docs/dllm.md", "exec"), namespace)  # the project's code
    out = namespace["out"]
    assert out.sequences.shape == (2, 21) and len(out.history) == 16
    assert sum(len(p) for p in out.record.positions[0]) == 16


def test_a_mismatched_decoding_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "--set", "model.name=tiny-dream", "--output",
                 str(out)]) == 2
    assert "set decoding.strategy=diffusion" in capsys.readouterr().err
    assert not out.exists()  # nothing trained, nothing written
