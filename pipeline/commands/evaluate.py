"""``ddpt evaluate``: run a data set's programs against its tests in the sandbox (pass@k;
:mod:`pipeline.studies.evaluate_job`)."""
from __future__ import annotations

import argparse

from pipeline.commands.common import overrides
from pipeline.config import build_config
from pipeline.distributed.backends import CONFIGURED
from pipeline.studies.evaluate_job import run_evaluate


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
            f"{k} {v:.4f}" for k, v in values.items() if k.startswith("pass_at")))
    print(f"wrote {args.output}/metrics.json and {args.output}/samples.jsonl")
