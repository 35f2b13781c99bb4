"""The frozen LM: the single model loader, the prompt template and FrozenCodeLM (embeddings,
the prompt injection, the code loss, one decoding step)."""
