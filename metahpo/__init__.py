"""metahpo: learn hyperparameter schedules by gradient descent on the final validation loss.

import metahpo
cfg = metahpo.compose(["estimator=forward", "task=digits"])  # the CLI's overrides
hg = metahpo.hypergradient(cfg)    # at the schedule's initial values
hg.meta_loss, hg.grads["lr"]       # tensor [n_lr_segments]
out = metahpo.run(cfg)             # the whole outer loop; the same dict as results.json
"""

from metahpo.config import compose
from metahpo.core import (
    ConfigError,
    DivergenceError,
    Hypergradient,
    HypergradientEstimator,
    Task,
)
from metahpo.inner import FlatTask, InnerState, fit, sgd_step, train
from metahpo.runner import hypergradient, meta_loss, run
from metahpo.schedule import HYPERPARAMETERS, HyperSchedule, HyperSpec

__all__ = [
    "HYPERPARAMETERS",
    "ConfigError",
    "DivergenceError",
    "FlatTask",
    "HyperSchedule",
    "HyperSpec",
    "Hypergradient",
    "HypergradientEstimator",
    "InnerState",
    "Task",
    "compose",
    "fit",
    "hypergradient",
    "meta_loss",
    "run",
    "sgd_step",
    "train",
]
__version__ = "0.1.0"
