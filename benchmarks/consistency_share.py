"""What ``train.consistency_weight`` (lambda) does to the ``bootstrap`` objectives: the
consistency term's share of the loss, and what the trained prompts come out as, for several
lambdas trained side by side in one process (same data, steps, seed and noise).

For each lambda: the term's share of the loss, ``lambda * C / (CE + lambda * C)`` (mean over
the last half of the steps, C = ``||x0_hat - x0_bar||^2`` per example); the training code loss
(mean of the last 5 steps); the spread of 8 DDIM prompts from different noise (pairwise
distance over mean norm: how much of a distribution is left); and the held-out code
cross-entropy of one DDIM prompt on the first ``--dev`` tasks of MBPP's validation split.

    python benchmarks/consistency_share.py                       # embedded model, 28 steps of 8
    python benchmarks/consistency_share.py --model tiny-llama    # minutes
    python benchmarks/consistency_share.py --lambdas 0 0.1 --set train.objective=bootstrap_teacher

The ``--old`` arm is lambda / (n k): what lambda did before the term became a sum over the
latent (it was a mean over the n x k entries), so the three arms compare off, before and now.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument("--old", type=float, default=0.01,
                        help="also train lambda / (n k): this lambda as the mean made it")
    parser.add_argument("--dev", type=int, default=32, help="MBPP validation tasks scored")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args()

    from pipeline.config import build_config
    from pipeline.data.splits import dev_examples, train_examples
    from pipeline.lm.loader import build_lm

    # The paper's DDPT (the bootstrap objective, one prompt distribution, a fixed up-projection)
    # at the main job's data, caps and budget; --set changes any of it.
    config = build_config("main", overrides=[
        f"model.name={args.model}", f"train.steps={args.steps}", "train.checkpoint_every=0",
        "train.objective=bootstrap", "denoiser.condition=none", "denoiser.up_projection=fixed",
        "distributed.backend=local", f"data.max_dev_examples={args.dev}", *args.set])
    lm = build_lm(config)
    train, dev = train_examples(config.data), dev_examples(config.data)
    latent = lm.context_length * config.denoiser.bottleneck
    lambdas = list(args.lambdas) + ([args.old / latent] if args.old else [])
    results = [measure(config, lm, train, dev, weight) for weight in lambdas]
    print(json.dumps({"model": args.model, "steps": args.steps, "n": lm.context_length,
                      "k": config.denoiser.bottleneck, "objective": config.train.objective,
                      "arms": results}, indent=1))


def measure(config, lm, train, dev, weight: float) -> dict:
    """Train with ``train.consistency_weight = weight``; the figures of the module docstring."""
    from pipeline.scoring.diversity import pairwise_spread
    from pipeline.scoring.heldout import heldout_code_loss
    from pipeline.training.loop import train_local

    run = config.with_overrides([f"train.consistency_weight={weight}"])
    began = time.perf_counter()
    result = train_local(run, lm, train, progress=False)
    seconds = time.perf_counter() - began
    late = result.history[len(result.history) // 2:]
    shares = [weight * h["consistency"] / h["loss"] for h in late]
    generator = torch.Generator().manual_seed(0)
    samples = result.model.sample_directions(8, generator, sampler="ddim", steps=50, eta=0.0)
    one = samples[:1].to(lm.device)
    return {
        "consistency_weight": weight,
        "term_share_of_loss": round(statistics.fmean(shares), 4),
        "consistency_late_mean": round(statistics.fmean(h["consistency"] for h in late), 4),
        "code_loss_last5": round(statistics.fmean(h["code_loss"]
                                                  for h in result.history[-5:]), 4),
        "prompt_spread_8_noises": round(pairwise_spread(samples), 4),
        "direction_norm_last": round(result.history[-1]["direction_norm"], 4),
        "dev_code_ce": round(heldout_code_loss(lm, dev, one[0], config.eval.batch_size), 4),
        "train_seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    main()
