"""Generation and prompt-sampling speed, measured side by side in one run:

1. batched vs one-at-a-time greedy generation throughput (generated tokens per second), same
   examples, same model, same token budget, for each batch size in ``--batch-sizes`` (goal:
   batched >= 4x on 2 cores at the default ``eval.batch_size``);
2. time to sample one prompt with DDPM (T = 2000 steps) vs DDIM (S = 50 steps), against the
   DDPT paper's ~30 s per prompt;
3. prompt sampling's share of total generation time with DDIM: a prompt per batch (the
   ``per_example`` worst case: one DDIM prompt per example) and one shared prompt for the whole
   evaluation set (goal: <= 2%).

    python benchmarks/generation.py                         # embedded model, 16 examples
    python benchmarks/generation.py --model tiny-llama      # seconds, for a quick look
    python benchmarks/generation.py --checkpoint runs/main/ddpt/checkpoint   # a trained model
    python benchmarks/generation.py --threads 1 --examples 32 --max-new-tokens 128  # as in make run
"""
from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-sizes", default="8,16",
                        help="comma-separated batch sizes compared with one at a time; the "
                        "last one is used for parts 2 and 3")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", help="a trained DDPT checkpoint (default: untrained "
                        "weights of the default config; the sampling cost is the same)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); a sampler actor gets the "
                        "node's cores / pool.num_actors")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline.config import build_config
    from pipeline.data.loaders import load_examples
    from pipeline.decoding.autoregressive import generate_ids
    from pipeline.lm.loader import build_lm
    from pipeline.training.checkpoint import load_prompt_model
    from pipeline.training.prompt_models import build_trainable

    config = build_config("main", overrides=[f"model.name={args.model}"])
    lm = build_lm(config)
    examples = load_examples("conala", "test", config.data.data_dir, args.examples)
    if args.checkpoint:
        prompt_model = load_prompt_model(args.checkpoint)[0]
    else:
        prompt_model = build_trainable(lm, config)[0]
    tokens = args.max_new_tokens
    print(f"model {args.model}, {len(examples)} CoNaLa test examples, up to {tokens} new tokens, "
          f"{torch.get_num_threads()} torch threads")

    # 1. Batched vs one at a time: count the tokens actually generated (rows stop early).
    def generate(batch_size: int) -> int:
        count = 0
        for i in range(0, len(examples), batch_size):
            batch = lm.collate(lm.encode(examples[i : i + batch_size]), with_targets=False)
            count += sum(len(row) for row in generate_ids(lm, batch.to(lm.device), None, tokens))
        return count

    sizes = [int(size) for size in args.batch_sizes.split(",")]
    generate(sizes[-1])  # warm-up (allocator, first-call overheads)
    counts, seconds = {}, {}
    for size in [1, *sizes]:
        began = time.perf_counter()
        counts[size] = generate(size)
        seconds[size] = time.perf_counter() - began
    one = counts[1] / seconds[1]
    print(f"\n1. greedy generation, default eval.batch_size {config.eval.batch_size}: one at a "
          f"time {one:.1f} tokens/s ({counts[1]} tokens, {seconds[1]:.1f}s)")
    for size in sizes:
        many = counts[size] / seconds[size]
        print(f"   batch {size}: {many:.1f} tokens/s ({counts[size]} tokens, "
              f"{seconds[size]:.1f}s), {many / one:.2f}x one at a time (goal >= 4x)")
    batch_size = sizes[-1]

    # 2. One prompt: DDPM with T steps vs DDIM with S steps.
    ddpm = {"sampler": "ddpm"}
    ddim = {"sampler": "ddim", "steps": 50}
    generator = torch.Generator().manual_seed(0)
    ddpm_s = timed(lambda: prompt_model.sample_directions(1, generator, **ddpm))
    ddim_s = timed(lambda: prompt_model.sample_directions(1, generator, **ddim), repeat=3)
    steps = prompt_model.schedule.timesteps
    print(f"\n2. one prompt: DDPM-{steps} {ddpm_s:.3f}s, DDIM-50 {ddim_s * 1000:.1f}ms "
          f"(DDPM/DDIM {ddpm_s / ddim_s:.0f}x); the paper: ~30 s per prompt "
          f"(DDPM here is {30 / ddpm_s:.0f}x faster than that, DDIM {30 / ddim_s:.0f}x)")

    # 3. Prompt sampling's share of generation time with DDIM.
    batch = lm.collate(lm.encode(examples[:batch_size]), with_targets=False).to(lm.device)
    generate_batch_s = timed(lambda: generate_ids(lm, batch, None, tokens))

    def seeded() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(batch_size)]

    # The sampler runs an evaluation batch's per-example chains as one batch (a generator per
    # row); one chain after the other is shown next to it.
    per_example_s = timed(lambda: prompt_model.sample_directions(batch_size, seeded(), **ddim),
                          repeat=3)
    one_by_one_s = timed(lambda: [prompt_model.sample_directions(1, [g], **ddim)
                                  for g in seeded()])
    total_s = seconds[batch_size]
    print(f"\n3. DDIM prompt share of generation time: one prompt per example "
          f"{per_example_s / (per_example_s + generate_batch_s):.2%} (batch of "
          f"{batch_size}: {per_example_s * 1000:.0f}ms for its {batch_size} prompts as one "
          f"batch, {one_by_one_s * 1000:.0f}ms one after the other; {generate_batch_s:.1f}s "
          f"generation); one shared prompt for the {len(examples)} examples "
          f"{ddim_s / (ddim_s + total_s):.3%} (goal <= 2%)")


if __name__ == "__main__":
    main()
