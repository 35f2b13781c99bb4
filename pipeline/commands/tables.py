"""``ddpt tables``: rewrite the marked tables of a results page (docs/results.md) from the
per-task records under a results folder (docs/results/); ``--check`` only compares
(:mod:`pipeline.studies.results_page`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.studies.results_page import ResultsPageError, update_page


def main(args: argparse.Namespace) -> None:
    page, results = Path(args.page), Path(args.results)
    for path, what in ((page, "--page"), (results, "--results")):
        if not path.exists():
            raise FileNotFoundError(f"{what} {path}: no such file or folder")
    try:
        current = update_page(page, results, check=args.check)
    except ResultsPageError as err:
        print(f"ddpt tables: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.check and not current:
        print(f"ddpt tables: {page} differs from the tables of {results}: run "
              f"`ddpt tables --results {results} --page {page}`", file=sys.stderr)
        raise SystemExit(1)
    print(f"{page}: {'up to date' if current else 'tables rewritten'} from {results}")
