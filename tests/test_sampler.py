"""The comparison harness in one process: methods, per-example prompts that do not depend on the
batch, interpretability, and the MLflow parent/child layout read back through MlflowClient."""
import dataclasses
import json

import pytest
import torch
from mlflow import MlflowClient

from helpers import EXAMPLES, make_lm, write_checkpoint
from pipeline.cli import main
from pipeline.config import PRESETS, RunConfig
from pipeline.decoding.autoregressive import generate
from pipeline.generation.sampler import METHODS, BatchSampler
from pipeline.studies.interpret import nearest_tokens
from pipeline.training.loop import train_local

ALL_METHODS = ",".join(METHODS)
TEXT_METRICS = {"bleu4", "codebleu", "meteor", "chrf", "rouge_l", "exact_match"}


def smoke_config(**sections) -> RunConfig:
    config = RunConfig.from_dict(PRESETS["smoke"]).with_overrides(
        ["pool.backend=local", "distributed.backend=local", "train.steps=3",
         "train.batch_size=3", "data.max_eval_examples=4"])
    return dataclasses.replace(config, **sections)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny DDPT and prompt-tuning checkpoints, trained for a few steps in this process."""
    folder = tmp_path_factory.mktemp("checkpoints")
    lm = make_lm("tiny-llama")
    paths = {}
    for method in ("ddpt", "prompt_tuning"):
        config = smoke_config().with_overrides([f"train.method={method}", "train.lr=5e-2"])
        config.prompt = lm.template.config  # the template the tiny LM was built with
        train_local(config, lm, EXAMPLES, checkpoint_dir=folder / method, progress=False)
        paths[method] = folder / method
    return paths


def sampler_for(checkpoints, **sample) -> BatchSampler:
    config = smoke_config()
    config.sample = dataclasses.replace(config.sample, **sample)
    return BatchSampler(config, checkpoints, lm=make_lm("tiny-llama"))


def test_records_do_not_depend_on_the_batch(checkpoints):
    sampler = sampler_for(checkpoints, prompts="per_example")
    whole = sampler.run("ddpt_ddim", EXAMPLES)
    pieces = [r for i in range(0, 6, 2) for r in sampler.run("ddpt_ddim", EXAMPLES[i:i + 2])]
    assert [r["generation"] for r in whole] == [r["generation"] for r in pieces]
    assert [r["code_ce"] for r in whole] == pytest.approx([r["code_ce"] for r in pieces],
                                                          rel=1e-5)
    deltas = sampler.directions("ddpt_ddim", EXAMPLES[:2])
    assert not torch.equal(deltas[0], deltas[1])  # per example: different prompts


def test_methods_get_their_prompts(checkpoints):
    sampler = sampler_for(checkpoints)
    assert sampler.directions("manual", EXAMPLES) is None
    shared = sampler.directions("ddpt", EXAMPLES[:3])
    assert shared.shape[0] == 3 and torch.equal(shared[0], shared[2])  # one prompt for all
    assert not torch.equal(shared[0], sampler.directions("ddpt_ddim", EXAMPLES[:1])[0])
    soft = sampler.prompt_models["prompt_tuning"].direction()
    torch.testing.assert_close(sampler.directions("prompt_tuning", EXAMPLES[:2])[1], soft)
    manual = sampler.run("manual", EXAMPLES[:2])
    assert [r["generation"] for r in manual] == generate(sampler.lm, EXAMPLES[:2], None, 16)


def test_nearest_tokens_of_the_manual_context_are_its_tokens():
    lm = make_lm("tiny-llama")
    context = lm.context_embedding()
    found = nearest_tokens(lm, context, k=3)
    assert found["summary"]["still_nearest"] == pytest.approx(1.0, abs=0.05)
    moved = context.clone()
    target = 77  # move position 0 onto another token's embedding
    moved[0] = lm.model.get_input_embeddings().weight[target]
    found = nearest_tokens(lm, moved, k=3)
    assert found["positions"][0]["nearest"][0][0] == lm.tokenizer.decode([target])
    assert found["positions"][0]["cosine_to_context"] < 0.99


def what_ran_lines(printed: str) -> dict[str, str]:
    """The "what ran" lines `ddpt run` and `ddpt sample` print: {method: chain label}."""
    lines = printed.split("what ran (a DDPT prompt's chain, then the decoding):\n")[1]
    return dict(line.strip().split(maxsplit=1) for line in lines.strip().splitlines())


def test_sample_compares_every_method_in_mlflow(checkpoints, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["sample", "--preset", "smoke", "--checkpoint", str(checkpoints["ddpt"]),
            "--prompt-tuning", str(checkpoints["prompt_tuning"]), "--methods", ALL_METHODS,
            "--output", str(out), "--no-progress", "--set", "pool.backend=local",
            "--set", "data.max_eval_examples=4"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == list(METHODS)
    names = set(metrics["manual"])
    assert TEXT_METRICS | {"code_ce", "prompt_seconds", "prompt_share"} <= names
    assert all(set(values) == names for values in metrics.values())

    saved = json.loads((out / "mlflow_comparison.json").read_text())
    client = MlflowClient(saved["uri"])
    parent = client.get_run(saved["run_id"])
    assert parent.data.tags["ddpt.role"] == "comparison"
    assert parent.info.status == "FINISHED"
    experiment = client.get_experiment(parent.info.experiment_id).name
    assert experiment == "ddpt-conala-tiny-llama"  # one experiment per data set and model
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_method = {c.data.tags["ddpt.method"]: c for c in children}
    assert set(by_method) == set(METHODS) and len(children) == len(METHODS)
    for method, child in by_method.items():
        assert child.info.run_name == method and child.data.tags["ddpt.role"] == "method"
        assert set(child.data.metrics) == names  # the same names: MLflow's compare lines up
        assert child.data.metrics["bleu4"] == pytest.approx(metrics[method]["bleu4"])
    ddpt_child = by_method["ddpt"]
    assert ddpt_child.data.params["sampler"] == "ddpm"
    assert by_method["ddpt_ddim"].data.params["sampler"] == "ddim"
    # The chain that ran: the smoke preset's bootstrap model samples as asked, DDPM over all T.
    assert (ddpt_child.data.params["chain"], ddpt_child.data.params["steps"]) == ("ddpm", "100")
    assert by_method["ddpt_ddim"].data.params["steps"] == "10"
    artifacts = {a.path for a in client.list_artifacts(ddpt_child.info.run_id, "interpret")}
    assert {"interpret/nearest_tokens.json", "interpret/directions.png",
            "interpret/positions.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "metrics.json", "samples.jsonl"}

    what_ran = what_ran_lines(capsys.readouterr().out)  # under the tables
    assert what_ran == {"manual": "greedy", "prompt_tuning": "greedy",
                        "ddpt": "ddpm-100 eta=0 + greedy", "ddpt_ddim": "ddim-10 eta=0 + greedy",
                        "spa": "spa", "ddpt_spa": "ddim-10 eta=0 + spa"}
    assert main(["compare", "--output", str(out), "--metrics", "bleu4,code_ce"]) == 0
    printed = capsys.readouterr().out
    assert all(method in printed for method in METHODS) and "code_ce" in printed
    # Found again by experiment name alone: the latest comparison in it.
    assert main(["compare", "--tracking-uri", saved["uri"], "--experiment", experiment]) == 0
    assert saved["run_id"] in capsys.readouterr().out


def test_sample_needs_the_checkpoints_its_methods_use(tmp_path, capsys):
    code = main(["sample", "--preset", "smoke", "--methods", "manual,ddpt",
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "--checkpoint" in capsys.readouterr().err
    code = main(["sample", "--preset", "smoke", "--methods", "manual,ddpt", "--checkpoint",
                 "nosuchfolder", "--output", str(tmp_path / "o")])
    assert code == 2 and "neither a checkpoint folder nor an MLflow run id" in \
        capsys.readouterr().err
    assert main(["sample", "--preset", "smoke", "--methods", "bogus",
                 "--output", str(tmp_path / "o")]) == 2


def test_a_training_output_folder_resolves_to_its_checkpoint(tmp_path):
    """``--checkpoint runs/main/ddpt`` works as well as ``runs/main/ddpt/checkpoint``."""
    from pipeline.config import ConfigError
    from pipeline.studies.sample_job import resolve_checkpoint

    job = tmp_path / "ddpt"
    write_checkpoint(job / "checkpoint")
    for source in (job, job / "checkpoint"):
        found = resolve_checkpoint(str(source), "ddpt", smoke_config(), tmp_path / "out")
        assert found == (job / "checkpoint").resolve()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "empty"), "ddpt", smoke_config(), tmp_path / "out")
    # a prompt-tuning checkpoint given as DDPT's
    config = job / "checkpoint" / "config.yaml"
    config.write_text(config.read_text().replace("method: ddpt", "method: prompt_tuning"))
    with pytest.raises(ConfigError, match=r"holds a prompt_tuning prompt model, not a ddpt one: "
                       r"pass it with --prompt-tuning"):
        resolve_checkpoint(str(job), "ddpt", smoke_config(), tmp_path / "out")


def test_data_with_tests_gets_pass_at_k(checkpoints, tmp_path):
    out = tmp_path / "mbpp"
    assert main(["sample", "--preset", "smoke", "--checkpoint", str(checkpoints["ddpt"]),
                 "--methods", "manual,ddpt_ddim", "--output", str(out), "--no-progress",
                 "--set", "pool.backend=local", "--set", "data.dataset=mbpp",
                 "--set", "data.max_eval_examples=3", "--set", "execution.num_samples=2",
                 "--set", "execution.ks=[1, 2]"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for values in metrics.values():
        assert {"pass_at_1", "pass_at_2", "passed", "total"} <= set(values)
        assert values["total"] == 3 and 0 <= values["pass_at_1"] <= values["pass_at_2"] <= 1
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    latest = {(r["method"], r["id"]): r for r in records}
    assert len(latest) == 6
    for record in latest.values():
        assert record["status"] in {"passed", "failed", "timeout", "error"}
        assert len(record["samples"]) == 2 and len(record["statuses"]) == 2


def test_prompt_samples_decode_one_prompt_per_draw(checkpoints):
    """execution.prompt_samples: a DDPT method's n samples are greedy decodings under n prompts
    from n noises (pass@k from the prompt distribution); manual still samples by temperature."""
    from pipeline.generation.sampler import example_seed, method_sample_config
    from pipeline.training.prompt_models import sampling_args

    sampler = sampler_for(checkpoints)
    sampler.config.execution = dataclasses.replace(
        sampler.config.execution, num_samples=3, ks=[1, 3], prompt_samples=True)
    examples = EXAMPLES[:2]
    records = sampler.run("ddpt_ddim", examples)
    model = sampler.prompt_models["ddpt"]
    for record, example in zip(records, examples):
        generators = [torch.Generator().manual_seed(
            example_seed(sampler.config.sample.seed, f"{example.id}#{j}")) for j in range(3)]
        args = sampling_args(method_sample_config(METHODS["ddpt_ddim"], sampler.config.sample),
                             model)
        deltas = model.sample_directions(3, generators, **args)
        assert not torch.equal(deltas[0], deltas[1])  # three noises, three prompts
        expected = [generate(sampler.lm, [example], deltas[j:j + 1], 16)[0] for j in range(3)]
        assert record["samples"] == expected
    again = sampler.run("ddpt_ddim", examples[::-1])[::-1]  # seeded by id and draw
    assert [r["samples"] for r in again] == [r["samples"] for r in records]
    manual = sampler.run("manual", examples)
    assert all(len(r["samples"]) == 3 for r in manual)  # temperature samples, as before


def test_sample_compares_on_the_extra_sets_as_run_does(checkpoints, tmp_path, capsys):
    """`ddpt sample` compares on data.extra_eval too (its own folder, executed), and a data set
    that is already the evaluated test split is not compared a second time."""
    out = tmp_path / "cmp"
    common = ["--preset", "smoke", "--checkpoint", str(checkpoints["ddpt"]), "--methods",
              "manual,ddpt_ddim", "--no-progress", "--set", "pool.backend=local",
              "--set", "data.max_eval_examples=2", "--set", "data.max_extra_eval_examples=2",
              "--set", "eval.max_new_tokens=4"]
    assert main(["sample", *common, "--output", str(out), "--set", "data.dataset=mbpp",
                 "--set", "data.extra_eval=[humaneval]"]) == 0
    assert "humaneval / test" in capsys.readouterr().out
    extra = json.loads((out / "humaneval" / "metrics.json").read_text())
    assert set(extra) == {"manual", "ddpt_ddim"}
    assert all(values["total"] == 2 and "pass_at_1" in values for values in extra.values())
    ids = {json.loads(line)["id"] for line in (out / "humaneval" / "samples.jsonl").open()}
    assert ids == {"HumanEval/0", "HumanEval/1"}

    again = tmp_path / "again"
    assert main(["sample", *common, "--output", str(again), "--set", "data.dataset=humaneval",
                 "--set", "data.extra_eval=[humaneval]"]) == 0
    assert not (again / "humaneval").exists()
    assert "humaneval / test" in capsys.readouterr().out  # the evaluation split's table


def test_a_model_trained_through_its_chain_is_named_by_that_chain(tmp_path, capsys):
    """An `unrolled` model samples on the 3-step DDIM chain it was trained through, whatever
    sample.ddim_steps (50) asks: `ddpt sample` prints, MLflow records and an experiment's table
    names ddim-3, never DDIM-50 (ddpt: the same chain with fresh noise, eta 1)."""
    lm = make_lm("tiny-llama")
    config = smoke_config().with_overrides(["train.objective=unrolled", "train.steps=1",
                                            "sample.ddim_steps=50"])
    config.prompt = lm.template.config
    train_local(config, lm, EXAMPLES, checkpoint_dir=tmp_path / "ddpt", progress=False)
    out = tmp_path / "cmp"
    assert main(["sample", "--checkpoint", str(tmp_path / "ddpt"), "--methods", "ddpt_ddim,ddpt",
                 "--output", str(out), "--no-progress", "--set", "pool.backend=local",
                 "--set", "data.max_eval_examples=1", "--set", "data.extra_eval=[]",
                 "--set", "eval.max_new_tokens=2", "--set", "eval.metrics=[bleu4]",
                 "--set", "eval.reference_method=ddpt_ddim"]) == 0
    assert what_ran_lines(capsys.readouterr().out) == {"ddpt_ddim": "ddim-3 eta=0 + greedy",
                                                       "ddpt": "ddim-3 eta=1 + greedy"}
    from pipeline.studies.chains import comparison_chains
    from pipeline.studies.experiment import Row, markdown_table

    chains = comparison_chains(out)
    assert chains == {"ddpt_ddim": "ddim-3 eta=0 + greedy", "ddpt": "ddim-3 eta=1 + greedy"}
    row = Row("mbpp", "ddpt_conditional_unrolled", "ddpt_ddim", 3, {"x": 0.5}, {"x": 0.0},
              chains["ddpt_ddim"])
    assert "| ddpt_conditional_unrolled | ddpt_ddim (ddim-3 eta=0 + greedy) | 3 |" in \
        markdown_table([row], ["x"], "mbpp")
