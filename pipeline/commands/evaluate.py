"""``ddpt evaluate``: run a data set's programs against its tests in the sandbox (pass@k;
:mod:`pipeline.studies.evaluate_job`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.common import overrides
from pipeline.config import RunConfig, build_config, read_mapping
from pipeline.data.loaders import DATASETS
from pipeline.data.records import ALL_RECORDS
from pipeline.distributed.backends import CONFIGURED
from pipeline.scoring.task_records import FILENAME
from pipeline.studies.evaluate_job import run_evaluate
from pipeline.studies.paired import folder_paired_text, is_paired_metric


def evaluate_config(args: argparse.Namespace) -> RunConfig:
    """The command's configuration: --limit before --set (an explicit --set wins), --split and
    --data last (they are the command's subject; the main job's extra evaluation sets are not
    this command's)."""
    return build_config(args.preset, args.config, [
        f"data.max_eval_examples={args.limit}", *whole_file(args), *overrides(args),
        *([f"data.eval_split={args.split}"] if args.split else []),
        f"data.dataset={args.data}", "data.extra_eval=[]"])


def main(args: argparse.Namespace) -> None:
    config = evaluate_config(args)
    metrics = run_evaluate(config, args.output, methods=args.method or ["canonical"],
                           backends=CONFIGURED, resume=args.resume,
                           progress=not args.no_progress)
    first = next(iter(metrics.values()))
    print(f"{int(first['total'])} of the {int(first['records_in_data'])} records of "
          f"{args.data} judged (" + ("every split" if config.data.eval_split == ALL_RECORDS
                                     else f"split {config.data.eval_split!r}") + ")")
    for method, values in metrics.items():
        print(f"{method}: {values['passed']}/{values['total']} passed; " + ", ".join(
            f"{k} {v:.4f}" for k, v in values.items()
            if k.startswith(("pass_at", "select_pass")) and not is_paired_metric(k)))
    paired = folder_paired_text(Path(args.output), config.eval.reference_method)
    if paired:
        print(f"\n{paired}\n")
    print(f"wrote {args.output}/metrics.json, {args.output}/{FILENAME} and "
          f"{args.output}/samples.jsonl")


def whole_file(args: argparse.Namespace) -> list[str]:
    """``data.eval_split=all`` for your own data (not a built-in data set) when no split is
    asked for (by --split, --set data.eval_split=... or a --config file's data.eval_split):
    a file is judged whole. A built-in data set keeps data.eval_split (test)."""
    asked = args.split or any(item.partition("=")[0].strip() == "data.eval_split"
                              for item in args.overrides)
    if args.config and not asked:
        asked = "eval_split" in (read_mapping(args.config).get("data") or {})
    return [] if asked or args.data in DATASETS else [f"data.eval_split={ALL_RECORDS}"]
