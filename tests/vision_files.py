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


def write_digits_as_mnist(
    root: Path, train_copies: int = 4, test_copies: int = 3, split_seed: int = 0
) -> dict[str, int]:
    """scikit-learn's 8x8 digits upscaled to 28x28, as MNIST IDX files in ``<root>/MNIST/raw``.

    A real-data stand-in for MNIST that needs no download: the 1797 digits are split 80/20
    (stratified, ``split_seed``) into training and test originals *before* augmenting, so no
    test digit has a copy in training. Each original is scaled from 0..16 to 0..255, upscaled
    bilinearly to 20x20 and placed in a 28x28 frame (MNIST's layout: a 20x20 box in a 4-pixel
    margin) shifted by up to 2 pixels per axis; the first copy is centred. Returns the counts.
    """
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, random_state=split_seed, stratify=y
    )
    rng = np.random.default_rng(split_seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    counts = {}
    for prefix, xs, ys, copies in (
        ("train", x_tr, y_tr, train_copies),
        ("t10k", x_te, y_te, test_copies),
    ):
        small = torch.as_tensor(xs.reshape(-1, 1, 8, 8) * (255.0 / 16.0), dtype=torch.float32)
        big = torch.nn.functional.interpolate(
            small, size=(20, 20), mode="bilinear", align_corners=False
        )
        big = big.clamp(0, 255).round().to(torch.uint8).numpy()[:, 0]
        out, labels = [], []
        for c in range(copies):
            frame = np.zeros((len(xs), 28, 28), dtype=np.uint8)
            for i, img in enumerate(big):
                dy, dx = (0, 0) if c == 0 else rng.integers(-2, 3, size=2)
                frame[i, 4 + dy : 24 + dy, 4 + dx : 24 + dx] = img
            out.append(frame)
            labels.append(ys)
        order = rng.permutation(len(xs) * copies)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", np.concatenate(out)[order])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.concatenate(labels)[order])
        counts[prefix] = len(order)
    return counts


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
