"""SVHN: 73k + 26k 32x32 colour house-number digits, read by ``torchvision.datasets.SVHN``.

The ``.mat`` files live in ``<root>/SVHN/`` (torchvision itself puts them directly in the
root it is given). Labels are torchvision's: digit 0 is class 0. The ``extra`` split is unused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch
from torch import Tensor
from torchvision import datasets as tvd
from torchvision.datasets import svhn as tv_svhn

from metahpo.tasks.models import LeNet
from metahpo.tasks.vision import Source, VisionTask, error_summary

FOLDER = "SVHN"
# torchvision's own file names and checksums.
_MD5 = {tvd.SVHN.split_list[s][1]: tvd.SVHN.split_list[s][2] for s in ("train", "test")}


def _read(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    ds = tvd.SVHN(str(root / FOLDER), split="train" if train else "test", download=download)
    images = torch.from_numpy(np.ascontiguousarray(ds.data))  # already [N, 3, 32, 32]
    return images, torch.from_numpy(np.asarray(ds.labels, dtype=np.int64))


def _check_file(path: Path) -> str | None:
    # Looked up on torchvision's module at call time: the check torchvision itself applies.
    if not tv_svhn.check_integrity(str(path), _MD5[path.name]):
        return "its MD5 checksum is not the one torchvision expects"
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError...
        return f"not a MATLAB file: {error_summary(e)}"
    if "X" not in mat or "y" not in mat:
        return "a MATLAB file without the arrays X and y"
    return None


class SVHN(VisionTask):
    """SVHN with LeNet by default (arguments: :class:`metahpo.tasks.vision.VisionTask`)."""

    source = Source("svhn", "SVHN", FOLDER, tuple(_MD5), _read, _check_file)
    default_model = LeNet
