"""ddpt: diffusion-driven prompt tuning for frozen code LLMs, on Ray, DeepSpeed and MLflow.

The command is thin: it parses, builds the config and calls the library."""
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

    jobs = [("run", cmd_run, "runs/main", "the main job: train DDPT, sample, compare methods"),
            ("train", cmd_train, "runs/train", "train the prompt model (Ray Train + DeepSpeed)")]
    for name, func, output, text in jobs:
        job = sub.add_parser(name, help=text)
        _config_args(job)
        job.add_argument("--output", default=output, help="output folder")
        job.add_argument("--resume", action="store_true",
                         help="continue from the output folder's last checkpoint (and samples)")
        job.add_argument("--no-progress", action="store_true", help="no progress bars")
        job.set_defaults(func=func)

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
