"""ddpt: diffusion-driven prompt tuning for frozen code LLMs, on Ray, DeepSpeed and MLflow.

The command is thin: it parses, builds the config and calls the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return overrides


def _config(args: argparse.Namespace):
    return build_config(args.preset, args.config, _overrides(args))


def build_config_on(base, args: argparse.Namespace):
    """``base`` (a RunConfig), then --config, then --set."""
    if args.config:
        from pipeline.config import merge_file

        base = merge_file(base, args.config)
    return base.with_overrides(_overrides(args))


def cmd_run(args: argparse.Namespace) -> None:
    config = _config(args)  # before the heavy imports: a bad option fails in a second
    from pipeline.commands.run import format_table, run_main

    metrics = run_main(config, args.output, resume=args.resume, progress=not args.no_progress)
    print(f"\n{config.data.dataset} / {config.data.eval_split} ({config.model.name}):")
    print(format_table(metrics))
    print(f"\nwrote {args.output}/metrics.json and {args.output}/samples.jsonl")


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.training.job import run_training

    outcome = run_training(_config(args), args.output, resume=args.resume,
                           progress=not args.no_progress)
    print(f"checkpoint: {outcome.checkpoint}\nMLflow run {outcome.run_id} at "
          f"{outcome.tracking_uri} ({outcome.seconds:.0f}s)")


def _methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def cmd_sample(args: argparse.Namespace) -> None:
    from pipeline.config import RunConfig
    from pipeline.commands.run import format_table, run_sample

    sources = {name: value for name, value in
               (("ddpt", args.checkpoint), ("prompt_tuning", args.prompt_tuning)) if value}
    if args.preset is None and args.checkpoint and Path(args.checkpoint, "config.yaml").is_file():
        # Sample with the model and template the prompt model was trained with.
        # Its tracking URI was the training run's: this comparison gets its own.
        base = RunConfig.load(Path(args.checkpoint, "config.yaml")).with_overrides(
            ["tracking.uri=null"])
        config = build_config_on(base, args)
    else:
        args.preset = args.preset or "default"
        config = _config(args)
    metrics = run_sample(config, args.output, sources, _methods(args.methods),
                         resume=args.resume, progress=not args.no_progress)
    print(format_table(metrics))
    print(f"\nwrote {args.output}/metrics.json and {args.output}/samples.jsonl")


def cmd_compare(args: argparse.Namespace) -> None:
    from pipeline.evaluation.comparison import comparison_table, find_comparison
    from pipeline.commands.run import format_table
    from pipeline.tracking import resolve_tracking_uri

    if args.output:
        saved = json.loads((Path(args.output) / "mlflow_comparison.json").read_text()) \
            if (Path(args.output) / "mlflow_comparison.json").is_file() else {}
        uri = args.tracking_uri or saved.get("uri") or resolve_tracking_uri(args.output)
    else:
        uri = resolve_tracking_uri(None, args.tracking_uri)
    run_id = args.run_id or find_comparison(uri, args.experiment,
                                            None if args.experiment else args.output)
    table = comparison_table(uri, run_id)
    if not table:
        raise FileNotFoundError(f"MLflow run {run_id} at {uri} has no method runs")
    print(f"comparison {run_id} ({uri}):")
    print(format_table({m: {k: v for k, v in values.items()
                            if not args.metrics or k in args.metrics.split(",")}
                        for m, values in table.items()}))


def cmd_sweep(args: argparse.Namespace) -> None:
    from pipeline.distributed.tune import run_sweep
    from pipeline.training.sweep import default_space_file, format_trials, load_sweep

    sweep = None
    if args.resume:
        if args.space or args.preset or args.config or args.overrides:
            logging.warning("--resume continues with the space and configuration saved in %s; "
                            "--space, --preset, --config and --set are ignored", args.output)
    else:
        space = args.space or default_space_file(args.preset)
        sweep = load_sweep(space, args.preset, args.config, _overrides(args))
    outcome = run_sweep(sweep, args.output, resume=args.resume, progress=not args.no_progress)
    print(format_trials(outcome.sweep, outcome.trials, outcome.best))
    print(f"\nMLflow: parent run {outcome.parent_run_id} at {outcome.tracking_uri} "
          f"({outcome.seconds:.0f}s)")
    if outcome.best is None:
        raise SystemExit(f"ddpt sweep: error: no trial reported {outcome.sweep.metric}; see "
                         f"{outcome.output}/trials.json")
    print(f"best: trial {outcome.best.trial_id}, {outcome.sweep.metric} "
          f"{outcome.best.metric:.4f}; train it with: ddpt train --config {outcome.best_config}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pipeline.commands.evaluate import run_evaluate

    # --limit before --set (an explicit --set wins), --data last (it is the command's subject)
    overrides = [f"data.max_eval_examples={args.limit}", *_overrides(args),
                 f"data.dataset={args.data}"]
    config = build_config(args.preset, args.config, overrides)
    metrics = run_evaluate(config, args.output, methods=args.method or ["canonical"],
                           resume=args.resume, progress=not args.no_progress)
    for method, values in metrics.items():
        print(f"{method}: {values['passed']}/{values['total']} passed; " + ", ".join(
            f"{k} {v:.4f}" for k, v in values.items() if k.startswith("pass_at")))
    print(f"wrote {args.output}/metrics.json and {args.output}/samples.jsonl")


def cmd_config(args: argparse.Namespace) -> None:
    print(_config(args))


def cmd_prepare(args: argparse.Namespace) -> None:
    from pipeline.lm.loader import prepare_embedded
    from pipeline.evaluation.wordnet import ensure_wordnet

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

    sample = sub.add_parser("sample", help="sample prompts and generate code with trained "
                            "prompt models on a pool of Ray actors; compare methods in MLflow")
    _config_args(sample)
    sample.set_defaults(preset=None)
    sample.add_argument("--checkpoint", help="DDPT checkpoint folder or MLflow run id (its "
                        "config is the base configuration unless --preset is given)")
    sample.add_argument("--prompt-tuning", help="prompt-tuning checkpoint folder or run id")
    sample.add_argument("--methods", default="manual,ddpt,ddpt_ddim",
                        help="comma-separated methods (manual, prompt_tuning, ddpt, ddpt_ddim, "
                        "spa, ddpt_spa)")
    sample.add_argument("--output", default="runs/sample", help="output folder")
    sample.add_argument("--resume", action="store_true", help="skip what samples.jsonl holds")
    sample.add_argument("--no-progress", action="store_true", help="no progress bars")
    sample.set_defaults(func=cmd_sample)

    compare = sub.add_parser("compare", help="print a comparison's table from MLflow")
    compare.add_argument("--output", help="the output folder of a `ddpt run` or `ddpt sample`")
    compare.add_argument("--tracking-uri", help="MLflow URI (default: the output folder's, "
                         "$MLFLOW_TRACKING_URI)")
    compare.add_argument("--experiment", help="latest comparison in this MLflow experiment")
    compare.add_argument("--run-id", help="the comparison's parent run id")
    compare.add_argument("--metrics", help="comma-separated metrics to show (default: all)")
    compare.set_defaults(func=cmd_compare)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep of training runs (ASHA on the dev "
                           "loss); MLflow parent run with a child run per trial")
    _config_args(sweep)
    sweep.set_defaults(preset=None)  # the space file's sweep.preset unless given
    sweep.add_argument("--space", help="search-space file (default: tune/smoke.yaml with "
                       "--preset smoke, else tune/default.yaml)")
    sweep.add_argument("--output", default="runs/sweep", help="output folder")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep in --output "
                       "after its driver died (finished trials are kept)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress tables")
    sweep.set_defaults(func=cmd_sweep)

    evaluate = sub.add_parser("evaluate", help="run a data set's programs against its tests in "
                              "the sandbox (pass@k); `--method canonical` self-checks the data")
    _config_args(evaluate)
    evaluate.add_argument("--data", required=True, metavar="NAME_OR_FILE",
                          help="humaneval, mbpp or a .jsonl file with tests (sets data.dataset)")
    evaluate.add_argument("--method", action="append", metavar="NAME",
                          help="what to execute (repeatable; default canonical: the reference "
                          "solutions)")
    evaluate.add_argument("--limit", type=int, default=0,
                          help="only the first N examples of data.eval_split (default 0: all)")
    evaluate.add_argument("--output", default="runs/evaluate", help="output folder")
    evaluate.add_argument("--resume", action="store_true", help="skip ids already scored")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_evaluate)

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
