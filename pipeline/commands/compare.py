"""``ddpt compare``: a comparison's table, read back from MLflow, and each method against the
reference method on the same tasks, from the comparison's per-task table (the output folder's,
else the MLflow artifact of the comparison's parent run)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pipeline.scoring.task_records import FILENAME, read_table
from pipeline.studies.comparison import (
    COMPARISON_FILE,
    comparison_table,
    find_comparison,
    format_table,
)
from pipeline.studies.paired import REFERENCE_FIELD, check_reference, format_paired, paired_figures
from pipeline.tracking import read_run_file, resolve_tracking_uri


def main(args: argparse.Namespace) -> None:
    saved = {}
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
    folder = Path(args.output) if args.output and saved.get("run_id") == run_id else None
    print()
    print(paired_text(uri, run_id, list(table), folder, args.reference))


def paired_text(uri: str, run_id: str, methods: list[str], folder: Path | None,
                reference: str | None) -> str:
    """The paired table of comparison ``run_id`` from its per-task table: ``folder``'s when
    given and there, else the parent run's artifact. ``reference``: default the comparison's
    ``eval.reference_method``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    field = "--reference" if reference else REFERENCE_FIELD
    reference = (reference or run.data.tags.get("ddpt.reference_method")
                 or run.data.params.get(REFERENCE_FIELD, "manual"))
    if check_reference(reference, methods, field) is None:
        return "one method: nothing to pair"
    if folder is not None and (folder / FILENAME).is_file():
        rows = read_table(folder / FILENAME)
    else:
        with tempfile.TemporaryDirectory(prefix="ddpt-compare-") as scratch:
            try:
                path = MlflowClient(tracking_uri=uri).download_artifacts(run_id, FILENAME,
                                                                         scratch)
            except (MlflowException, OSError):
                return (f"no per-task table ({FILENAME}) in this comparison (made before "
                        "per-task records were kept): no paired figures")
            rows = read_table(path)
    return format_paired(paired_figures(rows, reference, order=methods), reference)
