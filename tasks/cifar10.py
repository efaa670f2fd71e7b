"""CIFAR-10: 50k + 10k 32x32 colour images, read by ``torchvision.datasets.CIFAR10``.

Training batches are augmented with a random crop (padding 4) and a horizontal flip by
default, as in the paper; the default model is WRN-16-1.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets as tvd
from torchvision.datasets import cifar as tv_cifar

from metahpo.tasks.models import WideResNet
from metahpo.tasks.vision import Source, VisionTask, error_summary

# torchvision's own file list and checksums: the pickled batches and the label names.
_MD5 = {name: md5 for name, md5 in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list}
_MD5[tvd.CIFAR10.meta["filename"]] = tvd.CIFAR10.meta["md5"]


def _read(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    ds = tvd.CIFAR10(str(root), train=train, download=download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return images, torch.as_tensor(ds.targets, dtype=torch.long)


def _check_file(path: Path) -> str | None:
    # Looked up on torchvision's module at call time: the check torchvision itself applies.
    if not tv_cifar.check_integrity(str(path), _MD5[path.name]):
        return "its MD5 checksum is not the one torchvision expects"
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as e:  # unpickling garbage raises almost anything
        return f"not a CIFAR pickle: {error_summary(e)}"
    keys = ("label_names",) if path.name == tvd.CIFAR10.meta["filename"] else ("data", "labels")
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        return f"a pickle without the keys {', '.join(keys)}"
    return None


class CIFAR10(VisionTask):
    """CIFAR-10 with WRN-16-1, crop and flip by default (arguments: :class:`VisionTask`)."""

    source = Source("cifar10", "CIFAR-10", tvd.CIFAR10.base_folder, tuple(_MD5), _read, _check_file)
    default_model = WideResNet
    default_crop_padding = 4
    default_flip = True
