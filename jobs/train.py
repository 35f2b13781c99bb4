"""Training job for `ray job submit --working-dir . -- python jobs/train.py [ddpt train options]`.

Inside a submitted job RAY_ADDRESS is set, so the trainer joins that cluster."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's `pipeline`

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
