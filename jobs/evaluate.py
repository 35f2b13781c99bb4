"""Sandboxed evaluation job for `ray job submit --working-dir . -- python jobs/evaluate.py
[ddpt evaluate options]`, e.g. `--data humaneval --method canonical`. Programs run
in the sandbox on the node the driver lands on (execution.workers in parallel)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's `pipeline`

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
