"""Fashion-MNIST: 60k + 10k 28x28 clothing images, read by ``torchvision.datasets.FashionMNIST``."""

from __future__ import annotations

from torchvision import datasets as tvd

from metahpo.tasks.mnist import idx_source
from metahpo.tasks.models import LeNet
from metahpo.tasks.vision import VisionTask


class FashionMNIST(VisionTask):
    """Fashion-MNIST with LeNet by default (arguments: :class:`metahpo.tasks.vision.VisionTask`)."""

    source = idx_source(tvd.FashionMNIST, "fashion_mnist", "FashionMNIST")
    default_model = LeNet
