"""``ddpt sweep``: a Ray Tune sweep of training runs (ASHA on the dev loss)."""
from __future__ import annotations

import argparse
import logging

from pipeline.commands.common import overrides
from pipeline.studies.sweep import default_space_file, format_trials, load_sweep


def main(args: argparse.Namespace) -> None:
    from pipeline.distributed.tune import run_sweep

    sweep = None
    if args.resume:
        if args.space or args.preset or args.config or args.overrides:
            logging.warning("--resume continues with the space and configuration saved in %s; "
                            "--space, --preset, --config and --set are ignored", args.output)
    else:
        space = args.space or default_space_file(args.preset)
        sweep = load_sweep(space, args.preset, args.config, overrides(args))
    outcome = run_sweep(sweep, args.output, resume=args.resume, progress=not args.no_progress)
    print(format_trials(outcome.sweep, outcome.trials, outcome.best))
    print(f"\nMLflow: parent run {outcome.parent_run_id} at {outcome.tracking_uri} "
          f"({outcome.seconds:.0f}s)")
    if outcome.best is None:
        raise SystemExit(f"ddpt sweep: error: no trial reported {outcome.sweep.metric}; see "
                         f"{outcome.output}/trials.json")
    print(f"best: trial {outcome.best.trial_id}, {outcome.sweep.metric} "
          f"{outcome.best.metric:.4f}; train it with: ddpt train --config {outcome.best_config}")
