"""Time per generated token: plain greedy vs SPA with its two streams batched (one forward of 2B
rows per token, one KV cache) vs the reference SPA (two sequential KV-cached passes per token,
like the paper's LogitsProcessor), measured side by side in one run.

    python benchmarks/spa_decoding.py                      # embedded model, 8 CoNaLa examples
    python benchmarks/spa_decoding.py --model tiny-llama   # seconds, for a quick look

Goal (issue 6): SPA batched / greedy <= 1.3. Every method generates exactly ``--new-tokens``
tokens per row (the stop tokens are switched off), so all do the same number of steps; time per
token = wall time of a whole generate call (prefill included) / (B * new tokens). Runs are
interleaved (greedy, SPA, reference, greedy, ...) and the median of ``--repeats`` is reported,
after one warm-up round. Wall time is the measure; the process's CPU time is printed next to it
because on a shared, busy machine (see the load average printed) wall time mostly measures the
neighbours. Also checked: SPA with omega = 1 gives the greedy tokens, and batched
SPA gives the reference's tokens.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def reference_spa(lm, batch, omega: float, anchors: list[str], max_new_tokens: int
                  ) -> list[list[int]]:
    """SPA as two sequential passes per token, each stream with its own KV cache (B rows)."""
    from pipeline.decoding import spa

    full = lm.prompt_embeds(batch, None)
    masked = spa.masked_stream(full, batch.anchor_mask(anchors))
    full_logits, full_state = lm.prefill(full, batch.attention_mask)
    masked_logits, masked_state = lm.prefill(masked, batch.attention_mask)
    tokens = []
    for _ in range(max_new_tokens):
        next_ids = spa.combine(full_logits.float(), masked_logits.float(), omega).argmax(-1)
        tokens.append(next_ids)
        full_logits = lm.extend(next_ids, full_state)
        masked_logits = lm.extend(next_ids, masked_state)
    return torch.stack(tokens, 1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--omega", type=float, default=1.3)
    parser.add_argument("--anchors", default="instruction", help="comma-separated span names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.config import DecodingConfig, ModelConfig, PromptConfig
    from pipeline.data.loaders import load_examples
    from pipeline.decoding.autoregressive import generate_ids
    from pipeline.lm.frozen import FrozenCodeLM
    from pipeline.lm.loader import load_model
    from pipeline.lm.template import PromptTemplate

    model, tokenizer = load_model(ModelConfig(name=args.model))
    lm = FrozenCodeLM(model, tokenizer,
                      PromptTemplate(tokenizer, PromptConfig(),
                                     is_encoder_decoder=model.config.is_encoder_decoder))
    lm.template.stop_ids = []  # force --new-tokens tokens per row: equal work for every method
    examples = load_examples("conala", "test", None, args.batch_size)
    batch = lm.collate(lm.encode(examples), with_targets=False).to(lm.device)
    anchors = args.anchors.split(",")
    spa = DecodingConfig(strategy="spa", spa_omega=args.omega, spa_anchors=anchors)
    n = args.new_tokens
    methods = {
        "greedy": lambda: generate_ids(lm, batch, None, n),
        "spa_batched": lambda: generate_ids(lm, batch, None, n, decoding=spa),
        "spa_reference": lambda: reference_spa(lm, batch, args.omega, anchors, n),
    }
    print(f"model {args.model}, batch {len(examples)}, prompt width {batch.input_ids.shape[1]}, "
          f"{n} new tokens per row, omega {args.omega}, anchors {anchors}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")

    outputs = {name: fn() for name, fn in methods.items()}  # warm-up round, kept for the checks
    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    tokens = len(examples) * n
    per_token = {name: statistics.median(t) / tokens for name, t in times.items()}
    cpu_per_token = {name: statistics.median(t) / tokens for name, t in cpu.items()}
    for name, value in per_token.items():
        print(f"{name:14s} {1000 * value:7.2f} ms/token wall, {1000 * cpu_per_token[name]:7.2f} "
              f"ms/token CPU  (wall runs: {', '.join(f'{t:.2f}' for t in times[name])} s)")
    for name in ("spa_batched", "spa_reference"):
        print(f"ratio {name} / greedy = {per_token[name] / per_token['greedy']:.2f} wall, "
              f"{cpu_per_token[name] / cpu_per_token['greedy']:.2f} CPU"
              + ("  (goal <= 1.3)" if name == "spa_batched" else ""))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    omega_one = DecodingConfig(strategy="spa", spa_omega=1.0, spa_anchors=anchors)
    print("checks: spa(omega=1) == greedy:", generate_ids(lm, batch, None, n, decoding=omega_one)
          == outputs["greedy"], "| spa_batched == spa_reference:",
          outputs["spa_batched"] == outputs["spa_reference"], "| spa changed the tokens:",
          outputs["spa_batched"] != outputs["greedy"])


if __name__ == "__main__":
    main()
