"""MNIST: 60k + 10k grey-level 28x28 handwritten digits, read by ``torchvision.datasets.MNIST``.

Also home of :func:`idx_source`, shared by the other datasets in MNIST's IDX format.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets as tvd
from torchvision.datasets import mnist as tv_mnist

from metahpo.tasks.models import LeNet
from metahpo.tasks.vision import Source, VisionTask, error_summary


def idx_source(dataset: type[tvd.MNIST], id: str, name: str) -> Source:
    """The files of a torchvision MNIST-style dataset: uncompressed IDX files in ``<Class>/raw``.

    The file names are torchvision's own (its ``resources`` without ``.gz``); with
    ``download=False`` torchvision reads the uncompressed files only.
    """
    files = tuple(Path(url).name.removesuffix(".gz") for url, _ in dataset.resources)

    def read(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
        ds = dataset(str(root), train=train, download=download)
        return ds.data.unsqueeze(1), torch.as_tensor(ds.targets)

    return Source(id, name, f"{dataset.__name__}/raw", files, read, _check_idx_file)


def _check_idx_file(path: Path) -> str | None:
    labels = "labels" in path.name
    reader = tv_mnist.read_label_file if labels else tv_mnist.read_image_file
    try:
        reader(str(path))
    except Exception as e:  # torchvision's parser fails with asserts, RuntimeError, TypeError...
        return f"not an IDX {'label' if labels else 'image'} file: {error_summary(e)}"
    return None


class MNIST(VisionTask):
    """MNIST with LeNet by default (arguments: :class:`metahpo.tasks.vision.VisionTask`)."""

    source = idx_source(tvd.MNIST, "mnist", "MNIST")
    default_model = LeNet
