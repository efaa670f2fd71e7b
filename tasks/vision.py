"""Image classification through torchvision's dataset classes, implemented once for every dataset.

A dataset module (``tasks/mnist.py``...) only describes its files and how torchvision opens
them (a :class:`Source`) and picks its default model. This module does the rest: errors for
missing or corrupt files, loading each split into tensors once, the seeded validation split,
per-channel normalisation, and random crop / flip as batched tensor operations on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from metahpo.core import ConfigError
from metahpo.taskbase import SupervisedTask
from metahpo.validation import Fraction, NonNegativeInt, PositiveInt, checked

# (root, train, download) -> (uint8 images [N, C, H, W], int64 labels [N]), through torchvision.
Reader = Callable[[Path, bool, bool], tuple[Tensor, Tensor]]
# A present file -> why it cannot be used (None: it looks fine). Only called to explain a failure.
FileCheck = Callable[[Path], str | None]


@dataclass(frozen=True)
class Source:
    """Where a torchvision dataset keeps its files under the data root, and how to read it.

    Attributes:
        id: the task's name in results (``"cifar10"``).
        name: the dataset's name in messages (``"CIFAR-10"``).
        folder: the files' directory relative to the data root (``"MNIST/raw"``).
        files: every file torchvision needs (both splits), relative to ``folder``.
        read: loads one split with torchvision's dataset class.
        check_file: explains why a present file is unusable (checksum, format); only called
            after ``read`` failed, to name the culprit.
        n_classes: number of labels (``0 .. n_classes - 1``).
    """

    id: str
    name: str
    folder: str
    files: tuple[str, ...]
    read: Reader
    check_file: FileCheck
    n_classes: int = 10


def error_summary(e: BaseException) -> str:
    """``"Type: first line of the message"``: an exception in one line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text and text[0] else type(e).__name__


def load_split(source: Source, root: Path, *, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    """One split as ``(uint8 [N, C, H, W], int64 [N])`` CPU tensors, read by torchvision.

    Raises:
        ConfigError: files missing (naming the root, the files and ``task.download``), a file
            corrupt (naming it), or a download that failed; always one line.
    """
    split = "train" if train else "test"
    try:
        x, y = source.read(root, train, download)
    except MemoryError:
        raise
    except Exception as e:  # torchvision raises RuntimeError, AssertionError, pickle errors...
        raise _explain(source, root, download, e) from None
    where = f"task.root={str(root)!r}: {source.name} {split} split"
    if x.dtype != torch.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise ConfigError(
            f"{where} is corrupt: images {tuple(x.shape)} ({x.dtype}) do not match labels "
            f"{tuple(y.shape)}; delete {source.folder or 'its files'} and set task.download=true"
        )
    if int(y.min()) < 0 or int(y.max()) >= source.n_classes:
        raise ConfigError(
            f"{where} is corrupt: labels span {int(y.min())}..{int(y.max())}, expected "
            f"0..{source.n_classes - 1}; delete its files and set task.download=true"
        )
    return x, y.long()


def _explain(source: Source, root: Path, download: bool, error: Exception) -> ConfigError:
    """The one-line reason why torchvision could not read ``source`` under ``root``."""
    folder = root / source.folder
    shown = f"{source.folder}/" if source.folder else ""
    expected = f"{shown}{{{', '.join(source.files)}}}"
    missing = [f for f in source.files if not (folder / f).is_file()]
    where = f"task.root={str(root)!r}"
    if missing:
        if download:
            return ConfigError(
                f"{where}: downloading {source.name} failed ({error_summary(error)}); put "
                f"{expected} there by hand"
            )
        gaps = "" if len(missing) == len(source.files) else f" ({', '.join(missing)} missing)"
        return ConfigError(
            f"{where}: {source.name} not found, expected {expected}{gaps}; set "
            "task.download=true to download it"
        )
    for f in source.files:
        reason = source.check_file(folder / f)
        if reason is not None:
            return ConfigError(
                f"{where}: {source.name} file {shown}{f} is corrupt ({reason}); delete it and "
                "set task.download=true to download it again"
            )
    return ConfigError(f"{where}: could not read {source.name}: {error_summary(error)}")


# -- augmentation ------------------------------------------------------------------------------
class CropFlip:
    """Random crop after padding, and random horizontal flip, for a whole batch at once.

    The same as torchvision's ``RandomCrop(size, padding)`` (constant fill) followed by
    ``RandomHorizontalFlip()``, applied per image, but as one gather on the batch's device. The
    offsets and flips are drawn from the generator (on its device), so a batch is a
    deterministic function of (images, generator state).

    Args:
        padding: pixels added on every side before cropping back to the original size (0: no
            crop).
        flip: flip each image left-right with probability 1/2.
        fill: per-channel value of the padding (normalised black for normalised images).
    """

    def __init__(self, padding: int, flip: bool, fill: Tensor | None = None) -> None:
        if padding < 0:
            raise ConfigError(f"task.crop_padding={padding} must be >= 0")
        self.padding = int(padding)
        self.flip = bool(flip)
        self.fill = fill

    def __bool__(self) -> bool:
        return self.padding > 0 or self.flip

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Row offsets, column offsets (``0 .. 2 padding``) and flip flags for ``n`` images."""
        dev = generator.device
        span = 2 * self.padding + 1
        top = torch.randint(span, (n,), generator=generator, device=dev)
        left = torch.randint(span, (n,), generator=generator, device=dev)
        if self.flip:
            flips = torch.rand(n, generator=generator, device=dev) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool, device=dev)
        return top, left, flips

    def apply(self, x: Tensor, top: Tensor, left: Tensor, flips: Tensor) -> Tensor:
        """Crop ``x`` [B, C, H, W] at the given offsets of its padded copy, then flip."""
        b, c, h, w = x.shape
        p = self.padding
        dev = x.device
        top, left, flips = top.to(dev), left.to(dev), flips.to(dev)
        if p > 0:
            fill = torch.zeros(c, dtype=x.dtype, device=dev) if self.fill is None else self.fill
            padded = fill.to(device=dev, dtype=x.dtype).view(1, c, 1, 1)
            padded = padded.expand(b, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p : p + h, p : p + w] = x
        else:
            padded = x
        rows = top[:, None] + torch.arange(h, device=dev)  # [B, H]
        cols = left[:, None] + torch.arange(w, device=dev)  # [B, W]
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(b, device=dev)[:, None, None, None]
        chan = torch.arange(c, device=dev)[None, :, None, None]
        return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, *self.draw(len(x), generator))


# -- the task ----------------------------------------------------------------------------------
ModelFactory = Callable[..., nn.Module]


@checked("task")
class VisionTask(SupervisedTask):
    """A torchvision dataset and a model: validation held out from training, official test split.

    Subclasses set :attr:`source`, :attr:`default_model` and the augmentation defaults; the
    constructor below is every dataset's.

    Args:
        root: the data root (``MNIST/``, ``cifar-10-batches-py/``, ``SVHN/``... live under it).
        download: let torchvision download missing files into ``root``.
        model: ``(in_channels, image_size, n_classes) -> nn.Module`` (a Hydra partial of
            ``metahpo.tasks.models.LeNet`` or ``WideResNet``); None: the dataset's default.
        val_fraction: share of the official training set held out as the validation split
            (the meta objective), drawn with ``split_seed``.
        split_seed: fixes which images are held out (independent of ``seed``).
        n_train, n_test: caps on the training and test images (None: all), for quick runs.
        crop_padding: random-crop padding for training batches (0: off; None: the dataset's
            default).
        flip: random horizontal flips of training batches (None: the dataset's default).
        batch_size: training batch size.
        eval_batch_size: chunk size of validation and test passes.
        seed, device, dtype: see :class:`metahpo.taskbase.SupervisedTask`.

    Images are scaled by per-channel mean and standard deviation measured on the training
    split (after the validation split is held out); the padding of random crops is black.
    """

    source: ClassVar[Source]
    default_model: ClassVar[ModelFactory]
    default_crop_padding: ClassVar[int] = 0
    default_flip: ClassVar[bool] = False

    def __init__(
        self,
        *,
        root: str | Path = "data",
        download: bool = True,
        model: ModelFactory | None = None,
        val_fraction: Fraction = 0.05,
        split_seed: NonNegativeInt = 0,
        n_train: PositiveInt | None = None,
        n_test: PositiveInt | None = None,
        crop_padding: NonNegativeInt | None = None,
        flip: bool | None = None,
        batch_size: PositiveInt = 256,
        eval_batch_size: PositiveInt = 1000,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        device = torch.device(device)
        root = Path(root).expanduser()
        x_all, y_all = load_split(self.source, root, train=True, download=download)
        x_test, y_test = load_split(self.source, root, train=False, download=download)
        _, c, h, w = x_all.shape
        if tuple(x_test.shape[1:]) != (c, h, w) or h != w:
            raise ConfigError(
                f"task.root={str(root)!r}: {self.source.name} images must be square and alike "
                f"in both splits; got {tuple(x_all.shape[1:])} and {tuple(x_test.shape[1:])}"
            )

        n = len(y_all)
        n_val = round(val_fraction * n)
        if not 1 <= n_val < n:
            raise ConfigError(
                f"task.val_fraction={val_fraction} of {n} training images leaves an empty split"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed)))
        val_idx = order[:n_val].sort().values
        train_idx = order[n_val:][:n_train].sort().values
        test_idx = slice(None, n_test)

        # Images go to the device as uint8 once, and are scaled there (no float copy on the host).
        x_train = x_all[train_idx].to(device)
        mean, std = _channel_stats(x_train)
        data = {
            "train": (_normalise(x_train, mean, std, dtype), y_all[train_idx]),
            "val": (_normalise(x_all[val_idx].to(device), mean, std, dtype), y_all[val_idx]),
            "test": (_normalise(x_test[test_idx].to(device), mean, std, dtype), y_test[test_idx]),
        }
        self.mean, self.std = mean, std  # of the raw 0..255 pixels, float64, per channel
        padding = self.default_crop_padding if crop_padding is None else int(crop_padding)
        augment = CropFlip(
            padding,
            self.default_flip if flip is None else bool(flip),
            fill=(-mean / std).to(dtype),  # black after normalisation
        )
        make = model if model is not None else type(self).default_model
        super().__init__(
            self.source.id,
            data,
            lambda: make(c, h, self.source.n_classes),
            loss="cross_entropy",
            batch_size=batch_size,
            seed=seed,
            device=device,
            dtype=dtype,
            augment=augment if augment else None,
            eval_batch_size=eval_batch_size,
        )


def _channel_stats(x: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of uint8 images, accumulated in float64."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].to(torch.float64).transpose(0, 1).reshape(c, -1)
        total += part.sum(1)
        squares += part.pow(2).sum(1)
    count = x.numel() // c
    mean = total / count
    var = (squares / count - mean.pow(2)).clamp_min(0.0)
    return mean, var.sqrt().clamp_min(1e-3)  # a constant channel is centred, not blown up


def _normalise(x: Tensor, mean: Tensor, std: Tensor, dtype: torch.dtype) -> Tensor:
    out = x.to(dtype)
    shape = (1, -1, 1, 1)
    return out.sub_(mean.to(dtype).view(shape)).div_(std.to(dtype).view(shape))
