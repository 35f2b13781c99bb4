"""Generation: the batch sampler (a method's prompts and code for a batch of examples, one record
per example) and its progress lines. It produces records and scores nothing; the Ray actor pool
(:mod:`pipeline.distributed.sampler_pool`) runs one sampler per actor."""
