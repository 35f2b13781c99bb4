"""``ddpt experiment``: every arm of an experiment spec with every seed, and the tables of mean
and standard deviation over the seeds (:mod:`pipeline.studies.experiment_job`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.common import overrides
from pipeline.distributed.backends import CONFIGURED
from pipeline.studies.experiment import load_experiment
from pipeline.studies.experiment_job import RESULTS, SUMMARY, TABLES, run_experiment


def main(args: argparse.Namespace) -> None:
    # every run's configuration checked first
    arms = [name.strip() for name in args.arms.split(",")] if args.arms else None
    experiment = load_experiment(args.spec, overrides(args), arms)
    rows = run_experiment(experiment, args.output, backends=CONFIGURED, resume=args.resume,
                          progress=not args.no_progress)
    print((Path(args.output) / TABLES).read_text())
    print(f"{len(rows)} rows; wrote {args.output}/{TABLES}, {SUMMARY} and {RESULTS}")
