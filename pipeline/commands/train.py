"""``ddpt train``: the training job alone (Ray Train + DeepSpeed ZeRO-3 by default)."""
from __future__ import annotations

import argparse

from pipeline.commands.common import config_from_args
from pipeline.distributed.backends import train_backend
from pipeline.training.job import run_training


def main(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    outcome = run_training(config, args.output, train_backend(config), resume=args.resume,
                           progress=not args.no_progress)
    print(f"checkpoint: {outcome.checkpoint}\nMLflow run {outcome.run_id} at "
          f"{outcome.tracking_uri} ({outcome.seconds:.0f}s)")
