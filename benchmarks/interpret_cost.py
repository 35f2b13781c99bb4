"""The prompts' pictures against the t-SNE map they replaced: CPU and wall seconds of each, side
by side in one process, on one thread.

The old map is ``pipeline/studies/interpret.py`` as it was at ``--before`` (read with ``git
show`` and loaded as a module of its own); the new pictures are ``directions.png`` and
``positions.png`` (:mod:`pipeline.studies.prompt_pictures`). Both draw the same directions,
shaped as ``make run``'s: a per-task model (8 tasks x 4 noise draws; the old map drew the 8 used
ones) and one shared prompt, on the model's own context. Arms alternate; a warm-up round of each
first (imports, matplotlib's fonts).

    python benchmarks/interpret_cost.py [--model embedded] [--before 785732e] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def old_module(commit: str) -> types.ModuleType:
    """The t-SNE module at ``commit``, loaded from git without touching the work tree."""
    source = subprocess.run(["git", "show", f"{commit}:pipeline/studies/interpret.py"],
                            cwd=REPO, check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("interpret_before")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source, f"{commit}:pipeline/studies/interpret.py", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--before", default="785732e", help="a commit with the t-SNE map")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the t-SNE ran: one core

    from pipeline.config import ModelConfig, PromptConfig
    from pipeline.lm.frozen import FrozenCodeLM
    from pipeline.lm.loader import load_model
    from pipeline.lm.template import PromptTemplate
    from pipeline.studies.prompt_pictures import PromptSet, direction_map, position_map

    model, tokenizer = load_model(ModelConfig(name=args.model))
    lm = FrozenCodeLM(model, tokenizer, PromptTemplate(tokenizer, PromptConfig(),
                      is_encoder_decoder=model.config.is_encoder_decoder))
    before = old_module(args.before)
    context = lm.context_embedding().float()  # (n, d)
    generator = torch.Generator().manual_seed(0)
    scale = 0.66 * lm.mean_token_norm() / context.shape[1] ** 0.5  # |delta| ~ 0.66 token norms
    per_task = scale * torch.randn(8, 4, *context.shape, generator=generator)
    shared = scale * torch.randn(1, 1, *context.shape, generator=generator)
    tasks = [f"task{i}" for i in range(8)]
    new_sets = {"prompt_tuning": PromptSet(shared, None, "prompt_tuning"),
                "ddpt_ddim": PromptSet(per_task, tasks, "ddpt_ddim")}
    old_sets = {"prompt_tuning": before.PromptSet(context + shared[:, 0]),
                "ddpt": before.PromptSet(context + per_task[:, 0], tasks)}
    folder = Path(tempfile.mkdtemp(prefix="interpret-cost-"))
    token_norm = lm.mean_token_norm()
    arms = {
        "t-SNE map (before)": lambda: before.tsne_plot(lm, old_sets, folder / "tsne.png"),
        "directions + positions": lambda: (
            direction_map(new_sets, folder / "directions.png", token_norm=token_norm),
            position_map(lm, new_sets, folder / "positions.png")),
    }
    print(f"model {args.model} (context n={context.shape[0]}, d={context.shape[1]}, vocabulary "
          f"{lm.model.get_input_embeddings().weight.shape[0]}), 1 thread, load average "
          f"{os.getloadavg()[0]:.2f}; pictures in {folder}")
    for arm in arms.values():  # warm-up
        arm()
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, arm in arms.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            arm()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    first = next(iter(arms))
    for name in arms:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:24s} wall {w:6.2f} s  cpu {c:6.2f} s  ratio to the t-SNE map: wall "
              f"{w / statistics.median(wall[first]):.3f}, cpu "
              f"{c / statistics.median(cpu[first]):.3f}")


if __name__ == "__main__":
    main()
