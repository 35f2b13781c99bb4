"""``ddpt compare``: a comparison's table, read back from MLflow."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.studies.comparison import (
    COMPARISON_FILE,
    comparison_table,
    find_comparison,
    format_table,
)
from pipeline.tracking import read_run_file, resolve_tracking_uri


def main(args: argparse.Namespace) -> None:
    if args.output:
        run_file = Path(args.output) / COMPARISON_FILE
        saved = read_run_file(run_file) if run_file.is_file() else {}
        uri = args.tracking_uri or saved.get("uri") or resolve_tracking_uri(args.output)
    else:
        uri = resolve_tracking_uri(None, args.tracking_uri)
    run_id = args.run_id or find_comparison(uri, args.experiment,
                                            None if args.experiment else args.output)
    table = comparison_table(uri, run_id)
    if not table:
        raise FileNotFoundError(f"MLflow run {run_id} at {uri} has no method runs")
    wanted = args.metrics.split(",") if args.metrics else None
    print(f"comparison {run_id} ({uri}):")
    print(format_table({m: {k: v for k, v in values.items() if not wanted or k in wanted}
                        for m, values in table.items()}))
