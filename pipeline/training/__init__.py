"""Training the prompt models: the step loop shared by every backend, checkpoints, the
registry of prompt models and the training job (no Ray here: the Ray backend is handed in by the
caller)."""
