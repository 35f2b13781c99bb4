"""Decoding strategies over a frozen LM: the autoregressive loop (greedy, sampled, SPA), the
token samplers, and SPA's logit arithmetic."""
