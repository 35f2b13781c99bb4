"""Experiment job for `ray job submit --working-dir . -- python jobs/experiment.py --spec
experiments/ddpt_variants.yaml --output runs/exp [--resume]`.

Inside a submitted job RAY_ADDRESS is set, so every training run and sampler pool joins that
cluster."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's `pipeline`

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", *sys.argv[1:]]))
