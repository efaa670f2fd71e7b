"""Synthetic linear regression: a quadratic inner problem, small enough for exact checks.

The training loss ``0.5 * mean((x . w - y)^2)`` is quadratic in the weights, so SGD with
momentum is a linear recurrence and hypergradients have closed forms in simple cases (see
``tests/test_forward.py``: one weight, full batch, gradient descent).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import nn

from metahpo.taskbase import SupervisedTask
from metahpo.validation import NonNegative, NonNegativeInt, PositiveInt, checked

#: Ratio of the largest to the smallest feature scale: 1 (isotropic) or more.
Condition = Annotated[float, Ge(1)]


@checked("task")
class Quadratic(SupervisedTask):
    """``y = x . w* + noise`` with ``dim`` features of geometrically spread scales.

    Args:
        dim: number of weights (no bias).
        n_train, n_val, n_test: split sizes, all drawn from the same distribution.
        condition: ratio of the largest to the smallest feature scale (curvature spread).
        noise: standard deviation of the label noise.
        data_seed: fixes the data and ``w*``; ``seed`` fixes the initial weights and batches.

    Loss hyperparameters: ``l2`` (regression has no label smoothing).
    """

    loss_hyperparameters = {"l2": SupervisedTask.loss_hyperparameters["l2"]}

    def __init__(
        self,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        dim: PositiveInt = 5,
        n_train: PositiveInt = 64,
        n_val: PositiveInt = 64,
        n_test: PositiveInt = 256,
        batch_size: PositiveInt = 16,
        condition: Condition = 10.0,
        noise: NonNegative = 0.1,
        data_seed: NonNegativeInt = 0,
    ) -> None:
        g = torch.Generator().manual_seed(data_seed)
        scales = torch.logspace(
            0, -0.5 * torch.log10(torch.tensor(float(condition))), dim, dtype=torch.float64
        )
        self.w_star = torch.randn(dim, generator=g, dtype=torch.float64)

        def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(n, dim, generator=g, dtype=torch.float64) * scales
            return x, x @ self.w_star + noise * torch.randn(n, generator=g, dtype=torch.float64)

        data = {"train": draw(n_train), "val": draw(n_val), "test": draw(n_test)}
        super().__init__(
            "quadratic",
            data,
            lambda: nn.Linear(dim, 1, bias=False),
            loss="mse",
            batch_size=batch_size,
            seed=seed,
            device=torch.device(device),
            dtype=dtype,
        )
