"""Scoring: measures of generated records and prompts, each a function of its inputs (no model
training, no Ray): text metrics, pass@k, running the code in the sandbox, held-out code
cross-entropy, AR-ness of masked-diffusion decoding, prompt diversity, WordNet for METEOR, the
append-only results store, paired statistics and the per-task records a comparison rests on."""
