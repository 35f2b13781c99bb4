"""Sweep job for `ray job submit --working-dir . -- python jobs/sweep.py [ddpt sweep options]`.

Inside a submitted job RAY_ADDRESS is set, so Tune and every trial's trainer join that cluster."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's `pipeline`

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
