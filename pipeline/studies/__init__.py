"""Evaluation: text metrics, held-out loss, the results store, execution and pass@k, AR-ness of
masked-diffusion decoding, interpretability, the batch sampler and the comparison harness."""
