"""scikit-learn's bundled 8x8 digits with an MLP: the embedded default task (no download)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import torch
from annotated_types import Ge, Lt
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from metahpo.core import ConfigError
from metahpo.taskbase import SupervisedTask
from metahpo.tasks.models import Activation, make_activation, positive_ints
from metahpo.validation import Fraction, NonNegativeInt, PositiveInt, checked

#: A dropout probability: 0 (none) up to, not including, 1.
DropoutRate = Annotated[float, Ge(0), Lt(1)]
#: A share of training labels to flip: 0 (none) up to, not including, 1.
NoiseRate = Annotated[float, Ge(0), Lt(1)]


def flip_labels(y: Tensor, fraction: float, n_classes: int, seed: int) -> Tensor:
    """``y`` with ``round(fraction len(y))`` labels, chosen by ``seed``, each replaced by one of
    the other ``n_classes - 1`` classes drawn uniformly: exactly that share is wrong."""
    g = torch.Generator().manual_seed(seed)
    n = round(fraction * len(y))
    idx = torch.randperm(len(y), generator=g)[:n]
    shift = torch.randint(1, n_classes, (n,), generator=g)
    out = y.clone()
    out[idx] = (y[idx] + shift) % n_classes
    return out


def mlp(
    n_in: int, hidden: Sequence[int], n_out: int, activation: str, dropout: float = 0.0
) -> nn.Sequential:
    """``Linear -> activation (-> dropout)`` for every hidden width, then a linear read-out."""
    make_activation(activation, key="task.activation")  # fail before building anything
    layers: list[nn.Module] = []
    for width in positive_ints("task.hidden", hidden):
        layers += [nn.Linear(n_in, width), make_activation(activation, "task.activation")]
        layers += [nn.Dropout(dropout)] if dropout > 0 else []
        n_in = width
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@checked("task")
class Digits(SupervisedTask):
    name = "digits"

    """1797 8x8 grey-level digits (10 classes), standardised with training statistics.

    The test split is stratified and fixed by ``split_seed``; the validation split (the meta
    objective) is held out from the rest. ``n_train`` caps the training set (small test configs).
    ``dropout`` after every hidden layer draws its masks per step from the step's seed
    (:class:`metahpo.taskbase.SupervisedTask`): runs are reproducible and exact.
    ``label_noise`` flips that share of the training labels to another class, chosen by
    ``label_noise_seed`` (:func:`flip_labels`); validation and test labels stay clean, so the
    meta-objective measures generalisation to clean labels (where learning the loss's
    hyperparameters, e.g. label smoothing, can help).
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: PositiveInt = 128,
        hidden: Sequence[PositiveInt] = (128,),
        activation: Activation = "relu",
        dropout: DropoutRate = 0.0,
        val_fraction: Fraction = 0.2,
        test_fraction: Fraction = 0.2,
        n_train: PositiveInt | None = None,
        split_seed: NonNegativeInt = 0,
        label_noise: NoiseRate = 0.0,
        label_noise_seed: NonNegativeInt = 0,
    ) -> None:
        x, y = load_digits(return_X_y=True)
        try:  # stratified: every split must hold each of the 10 classes
            x_rest, x_test, y_rest, y_test = train_test_split(
                x, y, test_size=test_fraction, random_state=split_seed, stratify=y
            )
        except ValueError as e:
            raise ConfigError(f"task.test_fraction={test_fraction}: {_first_line(e)}") from None
        try:
            x_train, x_val, y_train, y_val = train_test_split(
                x_rest, y_rest, test_size=val_fraction, random_state=split_seed, stratify=y_rest
            )
        except ValueError as e:
            raise ConfigError(f"task.val_fraction={val_fraction}: {_first_line(e)}") from None
        if n_train is not None:
            x_train, y_train = x_train[:n_train], y_train[:n_train]
        scaler = StandardScaler().fit(x_train)

        def tensors(xs, ys):  # type: ignore[no-untyped-def]
            return torch.as_tensor(scaler.transform(xs)), torch.as_tensor(ys, dtype=torch.long)

        train = tensors(x_train, y_train)
        if label_noise > 0:
            train = (train[0], flip_labels(train[1], label_noise, 10, label_noise_seed))
        data = {
            "train": train,
            "val": tensors(x_val, y_val),
            "test": tensors(x_test, y_test),
        }
        hidden = tuple(hidden)
        super().__init__(
            self.name,
            data,
            self._model(hidden, activation, dropout),
            loss="cross_entropy",
            batch_size=batch_size,
            seed=seed,
            device=torch.device(device),
            dtype=dtype,
        )

    @staticmethod
    def _model(hidden: tuple[int, ...], activation: str, dropout: float) -> Callable[[], nn.Module]:
        return lambda: mlp(64, hidden, 10, activation, dropout)


class PerClassLinear(nn.Module):
    """Multinomial logistic regression's linear map with one ``Linear(n_in, 1)`` per class:
    parameters ``classes.<c>.weight`` and ``classes.<c>.bias``, so that a group of parameters
    per class is the pattern ``classes.<c>.*`` (a per-class L2 coefficient)."""

    def __init__(self, n_in: int, n_classes: int) -> None:
        super().__init__()
        self.classes = nn.ModuleList(nn.Linear(n_in, 1) for _ in range(n_classes))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([c(x) for c in self.classes], dim=-1)


@checked("task")
class DigitsLogReg(Digits):
    """Multinomial logistic regression on the digits (``task=digits_logreg``): the data and
    splits of :class:`Digits`, the model :class:`PerClassLinear` (650 parameters).

    With ``l2 > 0`` on every parameter the training loss is strongly convex (cross-entropy is
    convex in the logits; the L2 penalty removes the softmax's shift invariance), so it has one
    minimiser and the implicit hypergradient there has a closed form (``tests/test_implicit.py``
    computes it with a dense Hessian). ``experiment=logreg_l2`` learns one L2
    coefficient per class.
    """

    name = "digits_logreg"

    def __init__(
        self,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: PositiveInt = 128,
        val_fraction: Fraction = 0.2,
        test_fraction: Fraction = 0.2,
        n_train: PositiveInt | None = None,
        split_seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__(
            seed=seed,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            n_train=n_train,
            split_seed=split_seed,
        )

    @staticmethod
    def _model(hidden: tuple[int, ...], activation: str, dropout: float) -> Callable[[], nn.Module]:
        return lambda: PerClassLinear(64, 10)
