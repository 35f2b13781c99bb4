"""Live training lines on the driver for Ray Train runs: rank 0 puts one small record per step
into a Ray queue (an actor holding no CPU); a thread on the driver draws a
:class:`~pipeline.training.progress.StepProgress` line per job from it. A sweep shares one
relay between its trials: one line per trial.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from queue import Empty

import ray
from ray.util.queue import Full, Queue

from pipeline.training.progress import StepProgress

log = logging.getLogger(__name__)


@dataclass
class ProgressSink:
    """What a Train worker needs to report its steps: the queue and its job's line name."""

    queue: Queue
    name: str
    steps: int
    label: str = "loss"  # what the line calls the figure and the rate (StepProgress's)
    unit: str = "ex/s"

    def send(self, step: int, loss: float, examples_per_second: float) -> None:
        """Never blocks a step: a full queue (a driver gone or far behind) drops the record."""
        try:
            self.queue.put_nowait({"name": self.name, "steps": self.steps, "step": step,
                                   "loss": loss, "examples_per_second": examples_per_second,
                                   "label": self.label, "unit": self.unit})
        except Full:
            pass


class ProgressRelay:
    """Open it around ``trainer.fit()`` / ``tuner.fit()``; :meth:`sink` per job."""

    def __init__(self, *, enabled: bool = True):
        self.enabled = enabled
        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0}) if enabled else None
        self.lines: dict[str, StepProgress] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="ddpt-progress")

    def sink(self, name: str, steps: int, *, label: str = "loss", unit: str = "ex/s"
             ) -> ProgressSink | None:
        return ProgressSink(self.queue, name, steps, label, unit) if self.enabled else None

    def __enter__(self) -> ProgressRelay:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        try:  # what arrived after the thread's last look
            for item in self.queue.get_nowait_batch(self.queue.qsize()):
                self._show(item)
        except Exception as err:  # the queue actor is gone: only lines are lost
            log.debug("progress queue: %s", err)
        for line in self.lines.values():
            line.close()
        ray.kill(self.queue.actor)

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception as err:  # the queue actor died: stop drawing, never fail the run
                log.debug("progress queue: %s", err)
                return
            self._show(item)

    def _show(self, item: dict) -> None:
        name = item["name"]
        if name not in self.lines:
            self.lines[name] = StepProgress(name, item["steps"], position=len(self.lines),
                                            label=item.get("label", "loss"),
                                            unit=item.get("unit", "ex/s"))
        self.lines[name].update(item["step"], item["loss"], item["examples_per_second"])
