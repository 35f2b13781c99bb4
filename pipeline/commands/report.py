"""``ddpt report``: one self-contained HTML page (metrics table, pictures, examples side by side)
from a finished ``ddpt run`` / ``sample`` / ``evaluate`` / ``experiment`` output folder; reads
files only (:mod:`pipeline.studies.report`)."""
from __future__ import annotations

import argparse

from pipeline.studies.report import write_report


def main(args: argparse.Namespace) -> None:
    print(write_report(args.output, args.report, args.examples))
