"""The sweep's trial scheduler: ASHA that never stops a trial on its final report and keeps
its rungs on disk across a driver restart."""
from __future__ import annotations

import os
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class SweepASHA(ASHAScheduler):
    """ASHA with two changes for sweeps of training runs.

    It never stops a trial on its final report: there is nothing left to save by stopping it,
    and Tune would kill the trial before it exports its checkpoint and closes its MLflow run.
    And it keeps its rungs in ``state_file`` after every decision, because Tune does not save a
    scheduler's state: after a resume, trials are still compared with those that reached a rung
    before the driver died.
    """

    def __init__(self, final_step: int, state_file: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._final_step = final_step  # train.steps of the base configuration
        self._state_file = state_file
        self._loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._loaded:  # the first call after a (re)start
            if os.path.exists(self._state_file):
                self.restore(self._state_file)
            self._loaded = True
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        final = int(trial.config.get("train.steps", self._final_step))
        return TrialScheduler.CONTINUE if result.get("step", 0) >= final else action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def _save(self) -> None:
        tmp = f"{self._state_file}.tmp"
        self.save(tmp)
        os.replace(tmp, self._state_file)
