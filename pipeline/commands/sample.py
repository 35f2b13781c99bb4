"""``ddpt sample``: compare methods with trained prompt models
(:mod:`pipeline.studies.sample_job`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.common import config_from_args, config_on, print_tables
from pipeline.config import RunConfig
from pipeline.distributed.backends import CONFIGURED
from pipeline.studies.chains import chains_text, comparison_chains
from pipeline.studies.sample_job import run_sample
from pipeline.training.prompt_models import PROMPT_MODELS


def main(args: argparse.Namespace) -> None:
    sources = {name: getattr(args, f"checkpoint_{name}") for name in PROMPT_MODELS
               if getattr(args, f"checkpoint_{name}", None)}
    ddpt_checkpoint = sources.get("ddpt")
    if args.preset is None and ddpt_checkpoint and Path(ddpt_checkpoint, "config.yaml").is_file():
        # Sample with the model and template the prompt model was trained with.
        # Its tracking URI was the training run's: this comparison gets its own.
        base = RunConfig.load(Path(ddpt_checkpoint, "config.yaml")).with_overrides(
            ["tracking.uri=null"])
        config = config_on(base, args)
    else:
        config = config_from_args(args)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    metrics = run_sample(config, args.output, sources, methods, backends=CONFIGURED,
                         resume=args.resume, progress=not args.no_progress)
    print_tables(config, metrics, args.output)
    print(chains_text(comparison_chains(args.output)))
