"""Fashion-MNIST: 60k + 10k 28x28 clothing images, read by ``torchvision.datasets.FashionMNIST``."""

from __future__ import annotations

from torchvision import datasets as tvd

from tasks.mnist import idx_source
from tasks.models import LeNet
from tasks.vision import VisionTask


class FashionMNIST(VisionTask):
    """Fashion-MNIST with LeNet by default (arguments: :class:`tasks.vision.VisionTask`)."""

    source = idx_source(tvd.FashionMNIST, "fashion_mnist", "FashionMNIST")
    default_model = LeNet
