"""The live line of a training job: step / steps, loss, examples per second, time left.

One :class:`StepProgress` per job, fed one record per step, in this process (the local loop) or
on the driver from a Ray Train run's rank 0 (:mod:`pipeline.distributed.progress`). Time left
comes from the wall-clock time between the last few updates, so checkpoints and data waits count.
"""
from __future__ import annotations

import time
from collections import deque

from tqdm.auto import tqdm

FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:20}| "  # then the text of update()


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``'1m15s'``; ``3700`` -> ``'1h01m'``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class StepProgress:
    """A tqdm line for ``steps`` optimizer steps named ``name``; :meth:`update` per step.
    ``label`` and ``unit`` name the figure and the rate (RL rounds: reward, programs/s)."""

    def __init__(self, name: str, steps: int, *, enabled: bool = True,
                 position: int | None = None, window: int = 10, label: str = "loss",
                 unit: str = "ex/s"):
        self.steps, self.label, self.unit = steps, label, unit
        self.bar = tqdm(total=steps, desc=name, bar_format=FORMAT, disable=not enabled,
                        position=position, leave=True, dynamic_ncols=True)
        self.times: deque[float] = deque(maxlen=window + 1)  # wall-clock times of updates
        self.postfix = ""
        self.loss: float | None = None

    def update(self, step: int, loss: float | None, examples_per_second: float) -> None:
        """Step ``step`` (1-based) is done; ``loss``: its code cross-entropy (None: keep the
        last one shown, so that callers need not synchronise every step)."""
        self.loss = self.loss if loss is None else loss
        self.times.append(time.monotonic())
        left = ""
        if len(self.times) > 1:
            per_step = (self.times[-1] - self.times[0]) / (len(self.times) - 1)
            left = f" · {format_seconds(per_step * (self.steps - step))} left"
        shown = "-" if self.loss is None else f"{self.loss:.3f}"
        self.postfix = f"{self.label} {shown} · {examples_per_second:.1f} {self.unit}{left}"
        self.bar.n = step
        self.bar.bar_format = FORMAT + self.postfix.replace("{", "{{").replace("}", "}}")
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
