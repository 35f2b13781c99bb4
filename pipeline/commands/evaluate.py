"""``ddpt evaluate``: run a data set's programs against its tests in the sandbox (pass@k;
:mod:`pipeline.studies.evaluate_job`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands.common import overrides
from pipeline.config import build_config
from pipeline.distributed.backends import CONFIGURED
from pipeline.scoring.task_records import FILENAME
from pipeline.studies.evaluate_job import run_evaluate
from pipeline.studies.paired import folder_paired_text, is_paired_metric


def main(args: argparse.Namespace) -> None:
    # --limit before --set (an explicit --set wins), --data last (it is the command's subject;
    # the main job's extra evaluation sets are not this command's)
    config = build_config(args.preset, args.config, [
        f"data.max_eval_examples={args.limit}", *overrides(args), f"data.dataset={args.data}",
        "data.extra_eval=[]"])
    metrics = run_evaluate(config, args.output, methods=args.method or ["canonical"],
                           backends=CONFIGURED, resume=args.resume,
                           progress=not args.no_progress)
    for method, values in metrics.items():
        print(f"{method}: {values['passed']}/{values['total']} passed; " + ", ".join(
            f"{k} {v:.4f}" for k, v in values.items()
            if k.startswith(("pass_at", "select_pass")) and not is_paired_metric(k)))
    paired = folder_paired_text(Path(args.output), config.eval.reference_method)
    if paired:
        print(f"\n{paired}\n")
    print(f"wrote {args.output}/metrics.json, {args.output}/{FILENAME} and "
          f"{args.output}/samples.jsonl")
