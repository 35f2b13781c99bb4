"""DDPT's math in one folder: noise schedules, reverse chains, the denoiser, the prompt model and
its training objectives. Plain values in, tensors out: nothing here knows the configuration,
DeepSpeed, MLflow or Ray."""
