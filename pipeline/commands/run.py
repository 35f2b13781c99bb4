"""``ddpt run``, the main job (:mod:`pipeline.studies.main_job`): train DDPT and the
prompt-tuning baseline, then compare every method."""
from __future__ import annotations

import argparse

from pipeline.commands.common import config_from_args, print_tables
from pipeline.distributed.backends import CONFIGURED
from pipeline.studies.chains import chains_text, comparison_chains
from pipeline.studies.main_job import run_main


def main(args: argparse.Namespace) -> None:
    config = config_from_args(args)  # before the heavy work: a bad option fails in a second
    metrics = run_main(config, args.output, backends=CONFIGURED, resume=args.resume,
                       progress=not args.no_progress)
    print_tables(config, metrics, args.output)
    print(chains_text(comparison_chains(args.output)))
