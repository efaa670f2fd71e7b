"""An estimator whose rank 1 fails at its second estimate, for the dead-rank tests."""

from __future__ import annotations

import os
import time
from typing import Any

from metahpo import distributed
from metahpo.core import Hypergradient, Task
from metahpo.estimators.forward import ForwardMode
from metahpo.schedule import HyperSchedule


class DyingForward(ForwardMode):
    """Forward mode, except that rank 1 exits abruptly (``how="exit"``, no clean-up) or stops
    answering (``how="hang"``) at its second estimate."""

    def __init__(self, how: str = "exit", **kw: Any) -> None:
        super().__init__(**kw)
        self.how = how
        self.calls = 0

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.calls += 1
        if self.calls == 2 and distributed.rank() == 1:
            if self.how == "hang":
                time.sleep(3600)
            os._exit(3)
        return super().hypergradient(task, schedule)
