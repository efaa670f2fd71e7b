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
from metahpo.inner import FlatTask, InnerState, Steps, fit, train
from metahpo.optim import Hyperparameter, InnerOptimizer
from metahpo.runner import hypergradient, meta_loss, run
from metahpo.schedule import HyperSchedule, HyperSpec

__all__ = [
    "ConfigError",
    "DivergenceError",
    "FlatTask",
    "HyperSchedule",
    "HyperSpec",
    "Hyperparameter",
    "Hypergradient",
    "HypergradientEstimator",
    "InnerOptimizer",
    "InnerState",
    "Steps",
    "Task",
    "compose",
    "fit",
    "hypergradient",
    "meta_loss",
    "run",
    "train",
]
__version__ = "0.1.0"
