"""ddpt: diffusion-driven prompt tuning for frozen code LLMs, on Ray, DeepSpeed and MLflow.

This module only parses: each subcommand is a module of :mod:`pipeline.commands`, imported when
it runs (so ``ddpt --help`` and a bad option answer at once)."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline.config import PRESETS, ConfigError
from pipeline.data.loaders import DataError
from pipeline.paths import OutputFolderError, writable_folder
from pipeline.quiet import VERBOSE_ENV, quiet_process
from pipeline.tracking import TrackingError
from pipeline.training.checkpoint import CheckpointError
from pipeline.training.prompt_models import PROMPT_MODELS


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="main", choices=list(PRESETS),
                        help="starting configuration (main: the main job on MBPP and HumanEval, "
                        "the configuration's defaults; paper: the paper's set-up on CoNaLa; "
                        "smoke: the paper's set-up on a tiny random model, a few steps)")
    parser.add_argument("--config", help="YAML/JSON config file applied on top of the preset")
    _override_args(parser, "override one field (repeatable)")


def _override_args(parser: argparse.ArgumentParser, set_help: str) -> None:
    """--set and --data-dir (``commands.common.overrides`` reads both)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help=set_help)
    parser.add_argument("--data-dir", help="data folder (default $DDPT_DATA_DIR, ../shared/data)")


def output_folder(text: str) -> str:
    """``--output``'s check, before anything runs: a folder this process can write."""
    try:
        writable_folder(text)
    except OutputFolderError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _output_args(parser: argparse.ArgumentParser, output: str, resume: str,
                 progress: str = "no progress bars") -> None:
    parser.add_argument("--output", default=output, type=output_folder, help="output folder")
    parser.add_argument("--resume", action="store_true", help=resume)
    parser.add_argument("--no-progress", action="store_true", help=progress)


def _add_jobs(sub) -> None:
    """run and train: the training jobs."""
    jobs = [("run", "run", "runs/main", "the main job: train DDPT, sample, compare methods"),
            ("train", "train", "runs/train", "train the prompt model (Ray Train + DeepSpeed)")]
    for name, module, output, text in jobs:
        job = sub.add_parser(name, help=text)
        _config_args(job)
        _output_args(job, output,
                     "continue from the output folder's last checkpoint (and samples)")
        job.set_defaults(command_module=module)


def _add_sample(sub) -> None:
    sample = sub.add_parser("sample", help="sample prompts and generate code with trained "
                            "prompt models on a pool of Ray actors; compare methods in MLflow")
    _config_args(sample)
    sample.set_defaults(preset=None)
    for name, spec in PROMPT_MODELS.items():  # --checkpoint (DDPT), --prompt-tuning, ...
        sample.add_argument(spec.checkpoint_flag, dest=f"checkpoint_{name}",
                            metavar="FOLDER_OR_RUN_ID",
                            help=f"trained {name} checkpoint folder (or the training output folder "
                            f"holding it, runs/main/{name}) or MLflow run id ({spec.help})"
                            + ("; its config is the base configuration unless --preset is given"
                               if name == "ddpt" else ""))
    sample.add_argument("--methods", default="manual,ddpt,ddpt_ddim",
                        help="comma-separated methods (manual, prompt_tuning, ddpt, ddpt_ddim, "
                        "spa, ddpt_spa)")
    _output_args(sample, "runs/sample", "skip what samples.jsonl holds")
    sample.set_defaults(command_module="sample")


def _add_compare(sub) -> None:
    compare = sub.add_parser("compare", help="print a comparison's table from MLflow and each "
                             "method against the reference (paired interval, McNemar p)")
    compare.add_argument("--output", help="the output folder of a `ddpt run` or `ddpt sample`")
    compare.add_argument("--tracking-uri", help="MLflow URI (default: the output folder's, "
                         "$MLFLOW_TRACKING_URI)")
    compare.add_argument("--experiment", help="latest comparison in this MLflow experiment")
    compare.add_argument("--run-id", help="the comparison's parent run id")
    compare.add_argument("--metrics", help="comma-separated metrics to show (default: all)")
    compare.add_argument("--reference", metavar="METHOD",
                         help="pair every method with this one (default: the comparison's "
                         "eval.reference_method), from the per-task table")
    compare.set_defaults(command_module="compare")


def _add_sweep(sub) -> None:
    sweep = sub.add_parser("sweep", help="Ray Tune sweep of training runs (ASHA on the dev "
                           "loss); MLflow parent run with a child run per trial")
    _config_args(sweep)
    sweep.set_defaults(preset=None)  # the space file's sweep.preset unless given
    sweep.add_argument("--space", help="search-space file (default: tune/smoke.yaml with "
                       "--preset smoke, else tune/default.yaml)")
    _output_args(sweep, "runs/sweep", "continue the sweep in --output after its driver died "
                 "(finished trials are kept)", "no progress tables")
    sweep.set_defaults(command_module="sweep")


def _add_evaluate(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="run a data set's programs against its tests in "
                              "the sandbox (pass@k); `--method canonical` self-checks the data")
    _config_args(evaluate)
    evaluate.add_argument("--data", required=True, metavar="NAME_OR_FILE",
                          help="humaneval, mbpp or your own file with tests (sets data.dataset; "
                          "docs/data.md)")
    evaluate.add_argument("--method", action="append", metavar="NAME",
                          help="what to execute (repeatable): canonical (the reference "
                          "solutions, the default), or manual / spa (generated by model.name "
                          "with the configured decoding, e.g. a masked-diffusion LM with "
                          "--set decoding.strategy=diffusion)")
    evaluate.add_argument("--split", metavar="NAME",
                          help="judge this split only (sets data.eval_split; 'all': every "
                          "record). Default: your own file whole, whatever its records' "
                          "splits; a built-in data set's data.eval_split (test)")
    evaluate.add_argument("--limit", type=int, default=0,
                          help="only N tasks of what is judged, chosen as data.eval_sample "
                          "says (spread over it, seeded; default 0: all)")
    _output_args(evaluate, "runs/evaluate", "skip ids already scored", "no progress bar")
    evaluate.set_defaults(command_module="evaluate")


def _add_experiment(sub) -> None:
    experiment = sub.add_parser("experiment", help="train every arm of an experiment spec with "
                                "every seed, compare them, and tabulate mean and std over seeds")
    experiment.add_argument("--spec", required=True, help="experiment file (experiments/*.yaml)")
    experiment.add_argument("--arms", help="comma-separated arms of the spec to run, and "
                            "'baseline' for its baseline methods (default: all); the others can "
                            "run later into the same --output with --resume")
    _override_args(experiment, "one more of the spec's fixed settings, e.g. "
                   "distributed.use_gpu=true (repeatable; data sets and arms still win)")
    _output_args(experiment, "runs/experiment",
                 "skip finished runs and continue the one cut short")
    experiment.set_defaults(command_module="experiment")


def _add_report(sub) -> None:
    report = sub.add_parser("report", help="write one self-contained HTML page (metrics, "
                            "pictures, examples) from a finished output folder")
    report.add_argument("--output", required=True,
                        help="a finished `ddpt run`, `sample`, `evaluate` or `experiment` folder")
    report.add_argument("--report", metavar="FILE", help="the page (default <output>/report.html)")
    report.add_argument("--examples", type=int, default=4,
                        help="examples shown side by side per comparison (default 4)")
    report.set_defaults(command_module="report")


def _add_tables(sub) -> None:
    tables = sub.add_parser("tables", help="rewrite the marked tables of a results page from "
                            "the records of each task (docs/results/README.md)")
    tables.add_argument("--results", default="docs/results",
                        help="folder of <name>.csv.gz per-task tables (and <name>.json)")
    tables.add_argument("--page", default="docs/results.md",
                        help="the page whose '<!-- table: <name> -->' blocks are rewritten")
    tables.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if the page differs from its records")
    tables.set_defaults(command_module="tables")


def _add_setup(sub) -> None:
    """config and prepare."""
    show = sub.add_parser("config", help="print the resolved configuration")
    _config_args(show)
    show.set_defaults(command_module="show_config")

    prepare = sub.add_parser("prepare", help="convert the embedded model and set up WordNet once")
    prepare.add_argument("--force", action="store_true", help="convert again")
    prepare.set_defaults(command_module="prepare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpt", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the libraries' routine output (Ray, Ray Data, "
                        "DeepSpeed, MLflow, transformers) that is off by default")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_jobs, _add_sample, _add_compare, _add_sweep, _add_evaluate,
                _add_experiment, _add_report, _add_tables, _add_setup):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # Ray workers inherit it
    quiet_process()  # before the libraries are imported: some read it from the environment
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's import chatter
    try:
        importlib.import_module(f"pipeline.commands.{args.command_module}").main(args)
    except (ConfigError, DataError, TrackingError, OutputFolderError, CheckpointError,
            FileNotFoundError) as err:
        print(f"ddpt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
