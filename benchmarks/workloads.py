"""What the benchmark runs: three tasks at two sizes, their schedules, and the estimators.

The full sizes are chosen so that the whole benchmark fits in about half an hour on a 2-core CPU
(docs/benchmarks.md states them); ``--quick`` shrinks every model and horizon so that the smoke
test runs it in seconds. LeNet and the WRN see random tensors of MNIST and CIFAR-10's shapes (a
step's cost does not depend on pixel values; nothing to download); the MLP sees scikit-learn's
bundled digits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from benchmarks.naive import NaiveForward
from metahpo.core import HypergradientEstimator, Task
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.greedy import Greedy
from metahpo.estimators.truncated_reverse import TruncatedReverse
from metahpo.optim import SGD_NAMES as HYPERPARAMETERS
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.taskbase import SupervisedTask
from metahpo.tasks.digits import Digits
from metahpo.tasks.models import LeNet, WideResNet
from metahpo.tasks.vision import CropFlip

TASKS = ("digits", "lenet", "wrn")
# "plain" is training alone (no hypergradient): the denominator of every time ratio
ESTIMATORS = ("forward", "naive", "exact_reverse", "truncated_reverse", "greedy")
METHODS = ("plain", *ESTIMATORS)
TRUNCATION = 50  # truncated reverse's K (capped at the horizon)
GREEDY_WINDOW = 10  # greedy's W (capped at the horizon)


@dataclass(frozen=True)
class Workload:
    """One task at one size.

    Attributes:
        name: ``digits``, ``lenet`` or ``wrn``.
        label: what it is, for tables.
        build: makes the task (float32, CPU unless told otherwise).
        segments: shared values per learned hyperparameter type.
        horizons: inner steps per hypergradient to measure.
        values: the schedule's values (constant over segments).
        learn: the learned types (the others are fixed, one segment).
        limits: the longest horizon at which a method runs here (to keep the whole benchmark
            near half an hour); longer ones are skipped and the table says so.
    """

    name: str
    label: str
    build: Callable[[torch.device], Task]
    segments: int
    horizons: tuple[int, ...]
    values: dict[str, float]
    learn: tuple[str, ...] = HYPERPARAMETERS
    limits: dict[str, int] = field(default_factory=dict)

    @property
    def columns(self) -> int:
        return self.segments * len(self.learn)

    def schedule(self, horizon: int) -> HyperSchedule:
        specs = {
            n: HyperSpec(min(self.segments, horizon), (0.0, 1.0))
            if n in self.learn
            else HyperSpec(1, (0.0, 1.0), learn=False)
            for n in HYPERPARAMETERS
        }
        return HyperSchedule(horizon, specs, self.values)


def _synthetic(
    name: str,
    shape: tuple[int, int, int],
    model: Callable[[], nn.Module],
    batch: int,
    device: torch.device,
    augment: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SupervisedTask:
    """Random images of ``shape`` and random labels: 8 training batches, 2 of validation."""
    g = torch.Generator().manual_seed(0)
    sizes = {"train": 8 * batch, "val": 2 * batch, "test": batch}
    data = {
        split: (torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
        for split, n in sizes.items()
    }
    return SupervisedTask(
        name,
        data,
        model,
        loss="cross_entropy",
        batch_size=batch,
        seed=0,
        device=device,
        dtype=dtype,
        augment=CropFlip(4, True) if augment else None,
    )


VALUES = {"lr": 0.05, "momentum": 0.5, "weight_decay": 1e-3}
FULL_HORIZONS = (50, 200, 800, 3200)

FULL = {
    "digits": Workload(
        "digits",
        "MLP 64-128-10 on digits (8x8), batch 128, 5 segments x 3 types (15 columns)",
        lambda dev: Digits(hidden=(128,), batch_size=128, device=dev),
        segments=5,
        horizons=FULL_HORIZONS,
        values={"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3},
    ),
    "lenet": Workload(
        "lenet",
        "LeNet-5 on random 28x28x1 (MNIST shape), batch 16, 3 segments x 3 types (9 columns)",
        lambda dev: _synthetic("lenet", (1, 28, 28), lambda: LeNet(1, 28, 10), 16, dev),
        segments=3,
        horizons=FULL_HORIZONS,
        values=VALUES,
        limits={"naive": 200, "exact_reverse": 800, "truncated_reverse": 800, "greedy": 800},
    ),
    "wrn": Workload(
        "wrn",
        "WRN-10-1 (4 stem channels, batch-norm, crop + flip) on random 32x32x3 (CIFAR shape), "
        "batch 8, the learning rate learned as 1 segment (1 column)",
        lambda dev: _synthetic(
            "wrn",
            (3, 32, 32),
            lambda: WideResNet(3, 32, 10, depth=10, base_channels=4),
            8,
            dev,
            augment=True,
        ),
        segments=1,
        horizons=FULL_HORIZONS,
        values=VALUES,
        learn=("lr",),
        limits={"naive": 200, "exact_reverse": 800, "truncated_reverse": 200, "greedy": 200},
    ),
}

QUICK = {
    "digits": Workload(
        "digits",
        "MLP 64-16-10 on digits, batch 32, 2 segments x 3 types",
        lambda dev: Digits(hidden=(16,), batch_size=32, n_train=256, device=dev),
        segments=2,
        horizons=(4, 8),
        values=VALUES,
    ),
    "lenet": Workload(
        "lenet",
        "LeNet (2-4 channels, 8 hidden) on random 28x28x1, batch 4, 1 segment x 3 types",
        lambda dev: _synthetic(
            "lenet", (1, 28, 28), lambda: LeNet(1, 28, 10, channels=(2, 4), hidden=(8,)), 4, dev
        ),
        segments=1,
        horizons=(2, 4),
        values=VALUES,
    ),
    "wrn": Workload(
        "wrn",
        "WRN-10-1 (2 stem channels) on random 32x32x3, batch 4, 1 segment x 3 types",
        lambda dev: _synthetic(
            "wrn",
            (3, 32, 32),
            lambda: WideResNet(3, 32, 10, depth=10, base_channels=2),
            4,
            dev,
            augment=True,
        ),
        segments=1,
        horizons=(2, 4),
        values=VALUES,
    ),
}


def workloads(quick: bool) -> dict[str, Workload]:
    return QUICK if quick else FULL


def make_estimator(
    name: str, horizon: int, forward: ForwardMode | None = None
) -> HypergradientEstimator:
    """The estimator ``name`` for a run of ``horizon`` steps (``forward``: the configured one)."""
    if name == "forward":
        return forward or ForwardMode()
    if name == "naive":
        return NaiveForward()
    if name == "exact_reverse":
        return ExactReverse()
    if name == "truncated_reverse":
        return TruncatedReverse(K=min(TRUNCATION, horizon))
    if name == "greedy":
        return Greedy(W=min(GREEDY_WINDOW, horizon))
    raise ValueError(f"estimator {name!r} is unknown; allowed: {', '.join(ESTIMATORS)}")
