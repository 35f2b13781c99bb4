"""The main job, for `ray job submit --working-dir . -- python jobs/run.py [ddpt run options]`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir's `pipeline`

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
