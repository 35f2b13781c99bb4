"""The ``ddpt`` command. Thin: parse, build the config, call the library."""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.config import PRESETS, ConfigError, build_config
from pipeline.data.loaders import DataError
from pipeline.tracking import TrackingError


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", choices=list(PRESETS),
                        help="starting configuration (smoke: tiny random model, seconds)")
    parser.add_argument("--config", help="YAML/JSON config file applied on top of the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="override one field (repeatable)")
    parser.add_argument("--data-dir", help="data folder (default $DDPT_DATA_DIR, ../shared/data)")


def _config(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return build_config(args.preset, args.config, overrides)


def cmd_run(args: argparse.Namespace) -> None:
    from pipeline.run import format_table, run_main

    config = _config(args)
    metrics = run_main(config, args.output, resume=args.resume, progress=not args.no_progress)
    print(f"\n{config.data.dataset} / {config.data.eval_split} ({config.model.name}):")
    print(format_table(metrics))
    print(f"\nwrote {args.output}/metrics.json and {args.output}/samples.jsonl")


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.training_job import run_training

    outcome = run_training(_config(args), args.output, resume=args.resume,
                           progress=not args.no_progress)
    print(f"checkpoint: {outcome.checkpoint}\nMLflow run {outcome.run_id} at "
          f"{outcome.tracking_uri} ({outcome.seconds:.0f}s)")


def cmd_config(args: argparse.Namespace) -> None:
    print(_config(args))


def cmd_prepare(args: argparse.Namespace) -> None:
    from pipeline.models import prepare_embedded
    from pipeline.wordnet import ensure_wordnet

    print(f"embedded model: {prepare_embedded(force=args.force)}")
    print(f"WordNet for METEOR: {ensure_wordnet()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpt", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job: train DDPT, sample, compare with manual")
    _config_args(run)
    run.add_argument("--output", default="runs/main", help="output folder")
    run.add_argument("--resume", action="store_true",
                     help="continue from the output folder's checkpoint and samples")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train the DDPT prompt model (Ray Train + DeepSpeed)")
    _config_args(train)
    train.add_argument("--output", default="runs/train", help="output folder")
    train.add_argument("--resume", action="store_true",
                       help="continue from the output folder's latest checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    show = sub.add_parser("config", help="print the resolved configuration")
    _config_args(show)
    show.set_defaults(func=cmd_config)

    prepare = sub.add_parser("prepare", help="convert the embedded model and set up WordNet once")
    prepare.add_argument("--force", action="store_true", help="convert again")
    prepare.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's import chatter
    try:
        args.func(args)
    except (ConfigError, DataError, TrackingError, FileNotFoundError) as err:
        print(f"ddpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
