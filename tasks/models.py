"""Architectures of the vision tasks: LeNet and the Wide-ResNet (with batch-norm).

Every model takes ``(in_channels, image_size, n_classes)`` first, which the task fills in from
its data, and its own options as keywords, which come from the config (``task.model``). Models
are plain ``nn.Module``s; tasks evaluate them functionally, so nothing here is metahpo-specific.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from annotated_types import Ge, Gt, Le
from torch import Tensor, nn

from metahpo.core import ConfigError
from metahpo.validation import PositiveInt, checked

Activation = Literal["relu", "tanh", "gelu", "softplus"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "softplus": nn.Softplus,
}


def positive_ints(key: str, values: Sequence[int]) -> list[int]:
    """Layer widths as ints; ConfigError naming ``key`` unless every one is a positive integer."""
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)
    if not ok:
        raise ConfigError(f"{key}={list(values)} must be a list of positive integers")
    return [int(v) for v in values]


def make_activation(name: str, key: str = "task.model.activation") -> nn.Module:
    """A fresh activation module by name; ConfigError naming ``key`` when unknown."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"{key}={name!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


@checked("task.model")
class LeNet(nn.Sequential):
    """LeNet-5: two 5x5 convolutions with 2x2 max-pooling, then three linear layers.

    With the defaults this is the classic 6-16 / 120-84 network (44k parameters on 28x28
    grey-level images, 62k on 32x32 colour ones).

    Args:
        in_channels, image_size, n_classes: from the dataset.
        channels: output channels of the two convolutions.
        hidden: widths of the hidden linear layers.
        activation: ``relu`` | ``tanh`` | ``gelu`` | ``softplus``.
        pool: ``max`` (classic) or ``avg`` (smooth everywhere, for exactness tests).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        n_classes: int,
        *,
        channels: tuple[PositiveInt, PositiveInt] = (6, 16),
        hidden: Sequence[PositiveInt] = (120, 84),
        activation: Activation = "relu",
        pool: Literal["max", "avg"] = "max",
    ) -> None:
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ConfigError(
                f"LeNet needs images of at least 12x12 pixels, not {image_size}x{image_size}"
            )
        pooling = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        c1, c2 = int(channels[0]), int(channels[1])
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, c1, 5),
            make_activation(activation),
            pooling(2),
            nn.Conv2d(c1, c2, 5),
            make_activation(activation),
            pooling(2),
            nn.Flatten(),
        ]
        width = c2 * side * side
        for h in positive_ints("task.model.hidden", hidden):
            layers += [nn.Linear(width, h), make_activation(activation)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        super().__init__(*layers)


class _WideBlock(nn.Module):
    """Pre-activation residual block: BN-act-conv3x3-BN-act-conv3x3 plus a shortcut.

    When the shape changes (stride or width), the shortcut is a 1x1 convolution of the
    pre-activated input, as in Zagoruyko & Komodakis (2016).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, act: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = make_activation(act)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = make_activation(act)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


@checked("task.model")
class WideResNet(nn.Module):
    """WRN-``depth``-``width``: three groups of ``(depth - 4) / 6`` residual blocks.

    Group widths are ``base_channels * (1, width, 2 width, 4 width)`` after a 3x3 stem, with
    strides 1, 2, 2; then batch-norm, activation, global average pooling and a linear read-out.
    WRN-16-1 (the defaults) has 175k parameters and 13 batch-norm layers.

    Args:
        in_channels, image_size, n_classes: from the dataset (any image size works: the
            pooling is global).
        depth: ``6 n + 4`` (10, 16, 22, 28, 40...).
        width: the widening factor k.
        base_channels: the stem's width (16 in the paper; smaller for tests).
        activation: ``relu`` | ``tanh`` | ``gelu`` | ``softplus``.
        bn_momentum: batch-norm's running-statistics momentum (torch's convention).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        n_classes: int,
        *,
        depth: Annotated[int, Ge(10)] = 16,
        width: PositiveInt = 1,
        base_channels: PositiveInt = 16,
        activation: Activation = "relu",
        bn_momentum: Annotated[float, Gt(0), Le(1)] = 0.1,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(
                f"task.model.depth={depth} must be 6n+4 with n >= 1 (10, 16, 22, 28...)"
            )
        n = (depth - 4) // 6
        widths = [
            base_channels,
            base_channels * width,
            2 * base_channels * width,
            4 * base_channels * width,
        ]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for group, stride in zip((1, 2, 3), (1, 2, 2), strict=True):
            for i in range(n):
                blocks.append(_WideBlock(c_in, widths[group], stride if i == 0 else 1, activation))
                c_in = widths[group]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.act = make_activation(activation)
        self.fc = nn.Linear(c_in, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.mean(out, dim=(-2, -1)))
