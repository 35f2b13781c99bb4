"""Language-model modules of the project: Dream / DiffuCoder and helpers."""
