"""Masked-diffusion decoding throughput and its cost model, measured side by side in one run.

Cost model (docs/dllm.md section 1): no KV cache, every step is a full bidirectional forward over
prompt + canvas, so ``time ~= steps x forward(B, n + L) + sampler``, the sampler being the
per-step work outside the model (the shift copies B x N x V logits; softmax and the top-p sort
run over the masked rows, about B x L / 2 of them per step on average; a top-k over positions).
Tokens per second = B * L / time: halving the steps doubles it while the forward dominates, and
batching pays as long as forward(B, N) grows slower than B.

1. CPU, a random tiny Dream built in code: tokens/s at batch 1, 4, 16 and steps L, L/2, L/4,
   relative to batch 1 / steps L; predicted (steps x measured forward + the sampler, measured
   by decoding with a model_fn that costs nothing) vs measured decode time.
2. ``--gpu``: a random Qwen2.5-7B-shaped Dream (bf16, CUDA, no download): seconds per step,
   tokens/s at steps = L and steps = L/2, and ``torch.cuda.max_memory_allocated`` at a few batch
   sizes and canvas lengths. Exits with a message when no CUDA device is present.

    python benchmarks/dllm_decoding.py                       # tiny model, 1 thread
    python benchmarks/dllm_decoding.py --hidden 256 --layers 4 --vocab 4096   # a bigger toy
    python benchmarks/dllm_decoding.py --gpu --batch-sizes 1,8,32 --canvas 256,512
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from pipeline.decoding.masked_diffusion import DiffusionSettings, diffusion_generate
from pipeline.lm.dream import DreamConfig, DreamModel, random_dream, tiny_dream_config


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> tuple[float, float]:
    """Best (wall, process CPU) time of ``repeat`` calls after one warm-up, in seconds: the
    best, not the median, because this machine is shared and noise only adds time."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        _sync()
        began, began_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync()
        wall.append(time.perf_counter() - began)
        cpu.append(time.process_time() - began_cpu)
    return min(wall), min(cpu)


def _decode(model, x, L, steps, mask_id):
    s = DiffusionSettings(max_new_tokens=L, steps=steps, alg="entropy", top_p=0.95)
    return lambda: diffusion_generate(model, x, None, s, mask_id, record=False)


def _forward(model, x, L, mask_id):
    canvas = torch.nn.functional.pad(x, (0, L), value=mask_id)

    def run():
        with torch.no_grad():
            model(canvas)
    return run


def _free_model(model, x, L):
    """A model_fn that costs nothing: the same logits every step. Decoding with it measures
    the sampler's own per-step work (shift, filters, softmax, top-k) at realistic masked
    counts."""
    canvas = torch.nn.functional.pad(x, (0, L), value=model.config.mask_token_id)
    with torch.no_grad():
        logits = model(canvas).logits
    return lambda _x: logits


def cpu_table(args) -> None:
    cfg = tiny_dream_config(args.vocab, args.vocab - 1, 0, 2, hidden_size=args.hidden,
                            intermediate_size=2 * args.hidden, num_hidden_layers=args.layers)
    model = random_dream(cfg, seed=0)
    L, n, mask = args.L, args.prompt, cfg.mask_token_id
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny Dream: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{params:,} params; prompt {n}, canvas L={L}, alg entropy, top_p 0.95, "
          f"{torch.get_num_threads()} thread(s), best of {args.repeat}; times in s (CPU s)")
    print("fwd: one forward(B, n+L); sampler: the whole decode with a free model_fn;")
    print("pred = steps x fwd + sampler; meas = the decode with the model")
    print(f"{'batch':>5} {'steps':>5} {'fwd ms':>7} {'steps*fwd':>10} {'sampler':>8} "
          f"{'pred':>7} {'meas':>7} {'meas/pred':>9} {'(CPU)':>6} {'tok/s':>7} {'x base':>6}")
    base = None
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        x = torch.randint(3, mask, (B, n), generator=torch.Generator().manual_seed(B))
        fwd, fwd_cpu = timed(_forward(model, x, L, mask), args.repeat * 5)
        free = _free_model(model, x, L)
        for steps in (L, L // 2, L // 4):
            samp, samp_cpu = timed(_decode(free, x, L, steps, mask), args.repeat)
            meas, meas_cpu = timed(_decode(model, x, L, steps, mask), args.repeat)
            pred, pred_cpu = steps * fwd + samp, steps * fwd_cpu + samp_cpu
            tps = B * L / meas
            base = base or tps
            print(f"{B:>5} {steps:>5} {fwd * 1e3:>7.2f} {steps * fwd:>10.3f} {samp:>8.3f} "
                  f"{pred:>7.3f} {meas:>7.3f} {meas / pred:>9.2f} {meas_cpu / pred_cpu:>6.2f} "
                  f"{tps:>7.0f} {tps / base:>6.2f}")


def seven_b_config() -> DreamConfig:
    """Qwen2.5-7B's shape (DiffuCoder-7B), docs/dllm.md section 4."""
    return DreamConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rope_theta=1e6, max_position_embeddings=32768)


def random_on_gpu(cfg: DreamConfig) -> DreamModel:
    """Built on the meta device in bf16, then given random values on the GPU: no fp32 copy,
    no CPU initialisation of 7.6 B parameters."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = DreamModel(cfg)
    finally:
        torch.set_default_dtype(before)
    model = model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, cfg.initializer_range)
    return model.eval()


def gpu_table(args) -> None:
    if not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA device here; the 7B-shaped benchmark needs one (skipped)")
    cfg = seven_b_config()
    model = random_on_gpu(cfg)
    weights = torch.cuda.memory_allocated() / 2**30
    print(f"7B-shaped random Dream, bf16, {sum(p.numel() for p in model.parameters()):,} "
          f"params, weights {weights:.1f} GiB; prompt {args.prompt}; {args.gpu_steps} timed "
          f"steps per decode (cost per step does not depend on the reveal schedule)")
    print(f"{'batch':>5} {'L':>5} {'s/step':>8} {'tok/s S=L':>10} {'tok/s S=L/2':>12} "
          f"{'peak GiB':>9}")
    for L in [int(v) for v in args.canvas.split(",")]:
        for B in [int(b) for b in args.batch_sizes.split(",")]:
            x = torch.randint(3, cfg.mask_token_id, (B, args.prompt), device="cuda")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                t, _ = timed(_decode(model, x, L, args.gpu_steps, cfg.mask_token_id), 2)
            except torch.OutOfMemoryError:
                print(f"{B:>5} {L:>5} {'out of memory':>30}")
                continue
            per_step = t / args.gpu_steps
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"{B:>5} {L:>5} {per_step:>8.3f} {B / per_step:>10.1f} "
                  f"{2 * B / per_step:>12.1f} {peak:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the 7B-shaped CUDA benchmark")
    parser.add_argument("--batch-sizes", default=None, help="default 1,4,16 (CPU), 1,8,32 (GPU)")
    parser.add_argument("--L", type=int, default=64, help="canvas length on CPU")
    parser.add_argument("--canvas", default="256,512", help="canvas lengths on the GPU")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gpu-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        args.batch_sizes = args.batch_sizes or "1,8,32"
        gpu_table(args)
    else:
        args.batch_sizes = args.batch_sizes or "1,4,16"
        cpu_table(args)


if __name__ == "__main__":
    main()
