"""The frozen LM: the single model loader, the prompt template, FrozenCodeLM (embeddings, the
prompt injection, the code loss, one decoding step), and the project's own Dream / DiffuCoder
model (a bidirectional Qwen2) with the coupled likelihood estimator."""
