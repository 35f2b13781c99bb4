"""Training the prompt models: the step loop shared by every backend, checkpoints, the
registry of prompt models, the training job, and sweep specifications (no Ray here: the Ray
backend is handed in by the caller)."""
