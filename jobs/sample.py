"""Batch sampling job for `ray job submit --working-dir . -- python jobs/sample.py
[ddpt sample options]`. Inside a submitted job RAY_ADDRESS is set, so the sampler actors start
on that cluster (resources per actor from pool.cpus_per_actor / pool.gpus_per_actor)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's `pipeline`

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
