"""Decoding strategies over a frozen LM: the autoregressive loop (greedy, sampled, SPA), the
token samplers, SPA's logit arithmetic, and masked-diffusion decoding for dLLMs (Dream,
DiffuCoder)."""
