"""Tiny datasets written in each dataset's genuine on-disk format, for torchvision to read.

Every image encodes its own index in its first two pixels (``i % 256``, ``i // 256``), so a
test can tell which file image ended up in which split. Labels are ``i % 10``.

- MNIST / FashionMNIST: uncompressed IDX files in ``<root>/<Class>/raw/`` (big-endian header,
  magic 0x0803 for images, 0x0801 for labels), which torchvision reads with download=False.
- CIFAR-10: pickled dicts in ``<root>/cifar-10-batches-py/`` (``data_batch_1..5``,
  ``test_batch``, ``batches.meta``), rows of 3072 bytes in channel-major order.
- SVHN: MATLAB files ``<root>/SVHN/{train,test}_32x32.mat`` with ``X`` [32, 32, 3, N] and ``y``
  [N, 1] in 1..10 (10 stands for the digit 0).
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io


def images(n: int, shape: tuple[int, ...], seed: int, start: int = 0) -> np.ndarray:
    """``n`` random uint8 images [n, *shape] whose first two pixels encode ``start + i``."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    idx = np.arange(start, start + n)
    flat[:, 0] = idx % 256
    flat[:, 1] = idx // 256
    return x


def image_index(x: np.ndarray) -> np.ndarray:
    """Recover the indices :func:`images` wrote (x: [n, ...] uint8)."""
    flat = x.reshape(len(x), -1).astype(np.int64)
    return flat[:, 0] + 256 * flat[:, 1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40) -> None:
    """``<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (28x28 images)."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x = images(n, (28, 28), seed)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def write_cifar10(root: Path, per_batch: int = 24, n_test: int = 40) -> None:
    """``<root>/cifar-10-batches-py/``: five training batches, the test batch, the label names."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    files = [(f"data_batch_{i + 1}", per_batch, i * per_batch) for i in range(5)]
    files.append(("test_batch", n_test, 0))
    for name, n, start in files:
        x = images(n, (3, 32, 32), seed=7 if name == "test_batch" else 3, start=start)
        entry = {
            "batch_label": name,
            "labels": [int(i % 10) for i in range(start, start + n)],
            "data": x.reshape(n, 3072),
            "filenames": [f"img_{i}.png" for i in range(start, start + n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {
        "num_cases_per_batch": per_batch,
        "label_names": [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ],
        "num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)


def write_svhn(root: Path, n_train: int = 120, n_test: int = 40) -> None:
    """``<root>/SVHN/{train,test}_32x32.mat`` as MATLAB files (digit 0 stored as label 10)."""
    folder = root / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train_32x32.mat", n_train, 5), ("test_32x32.mat", n_test, 6)):
        x = images(n, (3, 32, 32), seed)  # [n, C, H, W]
        digits = np.arange(n) % 10
        labels = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        scipy.io.savemat(str(folder / name), {"X": x.transpose(2, 3, 1, 0), "y": labels})


def corrupt(path: Path, keep: int = 100) -> None:
    """Truncate a file to its first ``keep`` bytes (an interrupted download)."""
    path.write_bytes(path.read_bytes()[:keep])
