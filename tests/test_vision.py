"""Vision tasks end to end on tiny datasets in genuine on-disk formats (tests/vision_files.py).

torchvision's real loading code runs every time. Only one thing is patched, and only where a
test asks for it (the ``skip_md5`` fixture): torchvision compares CIFAR-10 and SVHN files with
the MD5 sums of the official downloads, which tiny fakes cannot have, so ``check_integrity`` in
``torchvision.datasets.cifar`` and ``.svhn`` is replaced by "the file exists". MNIST-format
datasets are read with no checksum (torchvision checks the uncompressed files' presence only).
``test_cifar_checksums_are_checked_unpatched`` shows the real check is live without the patch.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.svhn
import torchvision.transforms.v2.functional as TF

import metahpo
from metahpo.build import build
from metahpo.core import ConfigError
from metahpo.estimators.forward import ForwardMode
from metahpo.inner import fit
from metahpo.schedule import constant_schedule
from metahpo.tasks.cifar10 import CIFAR10
from metahpo.tasks.fashion_mnist import FashionMNIST
from metahpo.tasks.mnist import MNIST
from metahpo.tasks.models import LeNet, WideResNet
from metahpo.tasks.svhn import SVHN
from metahpo.tasks.vision import CropFlip, VisionTask
from tests import vision_files
from tests.conftest import make_schedule

N_TRAIN, N_TEST = 120, 40  # official training and test images in every fake dataset

# name -> (task class, writer, channels, side)
DATASETS: dict[str, tuple[type[VisionTask], Callable[[Path], None], int, int]] = {
    "mnist": (MNIST, vision_files.write_mnist, 1, 28),
    "fashion_mnist": (
        FashionMNIST,
        functools.partial(vision_files.write_mnist, folder="FashionMNIST"),
        1,
        28,
    ),
    "svhn": (SVHN, vision_files.write_svhn, 3, 32),
    "cifar10": (
        CIFAR10,
        functools.partial(vision_files.write_cifar10, per_batch=N_TRAIN // 5),
        3,
        32,
    ),
}
TINY_WRN = functools.partial(WideResNet, depth=10, base_channels=4)


def _exists(fpath, md5=None) -> bool:  # type: ignore[no-untyped-def]
    return os.path.isfile(fpath)


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's integrity check for CIFAR-10 and SVHN, minus the official MD5 sums."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", _exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", _exists)


def make(name: str, root: Path, **kw) -> VisionTask:  # type: ignore[no-untyped-def]
    cls = DATASETS[name][0]
    args = {"root": root, "download": False, "batch_size": 16}
    if name == "cifar10":
        args["model"] = TINY_WRN
    return cls(**{**args, **kw})


def raw_pixels(task: VisionTask, split: str) -> np.ndarray:
    """The split's images back in 0..255 (undoing the normalisation)."""
    x = task.data[split][0].to(torch.float64)
    shape = (1, -1, 1, 1)
    return (x * task.std.view(shape) + task.mean.view(shape)).round().clamp(0, 255).numpy()


@pytest.mark.parametrize("name", DATASETS)
def test_loads_splits_and_normalises(name: str, tmp_path: Path, skip_md5: None) -> None:
    _, write, channels, side = DATASETS[name]
    write(tmp_path)
    task = make(name, tmp_path, val_fraction=0.1, dtype=torch.float64)
    sizes = {s: len(task.data[s][1]) for s in ("train", "val", "test")}
    assert sizes == {"train": 108, "val": 12, "test": N_TEST}
    for s in sizes:
        assert tuple(task.data[s][0].shape[1:]) == (channels, side, side)
        assert task.data[s][0].dtype == torch.float64 and task.data[s][1].dtype == torch.long
    # Per-channel standardisation with the training split's own statistics.
    x = task.data["train"][0]
    torch.testing.assert_close(
        x.mean((0, 2, 3)), torch.zeros(channels, dtype=x.dtype), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        x.transpose(0, 1).reshape(channels, -1).std(1, correction=0),
        torch.ones(channels, dtype=x.dtype),
        rtol=1e-12,
        atol=0,
    )
    # Every image is where it belongs: validation held out of training, the test split whole.
    idx = {s: vision_files.image_index(raw_pixels(task, s)) for s in sizes}
    assert not set(idx["train"]) & set(idx["val"])
    assert sorted([*idx["train"], *idx["val"]]) == list(range(N_TRAIN))
    assert list(idx["test"]) == list(range(N_TEST))
    for s in sizes:  # labels travel with their images (label = index % 10, SVHN's 10 -> 0)
        assert task.data[s][1].tolist() == [int(i) % 10 for i in idx[s]]
    # The split is fixed by split_seed alone.
    again = make(name, tmp_path, val_fraction=0.1, dtype=torch.float64, seed=5)
    other = make(name, tmp_path, val_fraction=0.1, dtype=torch.float64, split_seed=1)
    assert torch.equal(again.data["val"][0], task.data["val"][0])
    assert not torch.equal(other.data["val"][0], task.data["val"][0])


@pytest.mark.parametrize("name", DATASETS)
def test_inner_steps_and_hypergradient(name: str, tmp_path: Path, skip_md5: None) -> None:
    DATASETS[name][1](tmp_path)
    task = make(name, tmp_path)
    schedule = make_schedule(4, 2)
    hg = ForwardMode().hypergradient(task, schedule)
    assert np.isfinite(hg.meta_loss)
    for values in hg.grads.values():
        assert torch.isfinite(values).all() and values.abs().max() > 0
    flat, state = fit(task, constant_schedule(4, lr=0.05, momentum=0.9, weight_decay=5e-4))
    out = flat.evaluate(state, "test")
    assert 0.0 <= out["accuracy"] <= 1.0 and np.isfinite(out["loss"])
    if name == "cifar10":  # batch-norm running statistics advanced once per step
        assert int(state.buffers["bn.num_batches_tracked"]) == 4
        assert not torch.equal(
            state.buffers["bn.running_var"], torch.ones_like(state.buffers["bn.running_var"])
        )


def test_cifar_batches_are_cropped_and_flipped_deterministically(
    tmp_path: Path, skip_md5: None
) -> None:
    vision_files.write_cifar10(tmp_path, per_batch=N_TRAIN // 5)
    task = make("cifar10", tmp_path)
    plain = make("cifar10", tmp_path, crop_padding=0, flip=False)
    assert isinstance(task.augment, CropFlip) and task.augment.padding == 4 and task.augment.flip
    assert plain.augment is None
    x, y = task.batch(3)
    x_again, y_again = task.batch(3)
    x_plain, y_plain = plain.batch(3)
    assert torch.equal(x, x_again) and torch.equal(y, y_plain)
    assert not torch.equal(x, x_plain)  # augmented
    assert not torch.equal(task.batch(4)[0][:4], x[:4])
    # The padding is black: the normalised value of a 0 pixel, per channel.
    black = (-task.mean / task.std).to(x.dtype)
    border = x[:, :, 0, :].transpose(0, 1).reshape(3, -1)
    assert any((border[c] == black[c]).any() for c in range(3))


def test_crop_flip_matches_torchvision_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 10, 10, generator=g)
    fill = torch.tensor([-1.0, 0.5, 2.0])
    aug = CropFlip(padding=3, flip=True, fill=fill)
    top, left, flips = aug.draw(len(x), torch.Generator().manual_seed(1))
    assert flips.any() and not flips.all() and (top != top[0]).any()
    got = aug.apply(x, top, left, flips)
    for i in range(len(x)):
        padded = torch.cat(
            [TF.pad(x[i, c : c + 1], [3, 3, 3, 3], fill=float(fill[c])) for c in range(3)]
        )
        want = TF.crop(padded, int(top[i]), int(left[i]), 10, 10)
        want = TF.horizontal_flip(want) if flips[i] else want
        torch.testing.assert_close(got[i], want, rtol=0, atol=0)
    same = aug(x, torch.Generator().manual_seed(1))
    other = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(same, got) and not torch.equal(other, got)


@pytest.mark.parametrize("name", DATASETS)
def test_missing_data_names_root_files_and_download_key(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        make(name, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "task.download=true" in message
    source = DATASETS[name][0].source
    assert source.folder in message and all(f in message for f in source.files)


def test_partly_missing_data_lists_the_missing_files(tmp_path: Path) -> None:
    vision_files.write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"\(t10k-labels-idx1-ubyte missing\); set task.download"):
        make("mnist", tmp_path)


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
        ("svhn", "SVHN/test_32x32.mat"),
        ("cifar10", "cifar-10-batches-py/data_batch_3"),
        ("cifar10", "cifar-10-batches-py/batches.meta"),
    ],
)
def test_corrupt_file_is_named(name: str, path: str, tmp_path: Path, skip_md5: None) -> None:
    DATASETS[name][1](tmp_path)
    vision_files.corrupt(tmp_path / path, keep=10)
    with pytest.raises(ConfigError) as err:
        make(name, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"file {path} is corrupt" in message and str(tmp_path) in message


def test_cifar_checksums_are_checked_unpatched(tmp_path: Path) -> None:
    vision_files.write_cifar10(tmp_path, per_batch=N_TRAIN // 5)
    with pytest.raises(ConfigError, match=r"data_batch_1 is corrupt \(its MD5 checksum"):
        make("cifar10", tmp_path)


def test_labels_out_of_range_are_reported(tmp_path: Path) -> None:
    vision_files.write_mnist(tmp_path)
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = 42
    labels.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"MNIST train split is corrupt: labels span 0\.\.42"):
        make("mnist", tmp_path)


def test_bad_options_name_their_key(tmp_path: Path) -> None:
    vision_files.write_mnist(tmp_path)
    for kw, key in [
        ({"val_fraction": 0.0}, "task.val_fraction"),
        ({"n_train": 0}, "task.n_train"),
        ({"crop_padding": -1}, "task.crop_padding"),
        ({"batch_size": 10_000}, "task.batch_size"),
        ({"model": functools.partial(LeNet, activation="swish")}, "task.model.activation"),
        ({"model": functools.partial(WideResNet, depth=12)}, "task.model.depth"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make("mnist", tmp_path, **kw)


def test_models_have_the_classic_sizes() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(LeNet(1, 28, 10)) == 44_426
    assert count(LeNet(3, 32, 10)) == 62_006
    wrn = WideResNet(3, 32, 10)
    assert count(wrn) == 175_066
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in wrn.modules()) == 13
    assert wrn(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# -- configs -----------------------------------------------------------------------------------
OFFICIAL_TRAIN = {"mnist": 60_000, "fashion_mnist": 60_000, "svhn": 73_257, "cifar10": 50_000}


@pytest.mark.parametrize("name", DATASETS)
def test_task_config_builds_and_its_horizon_is_50_epochs(
    name: str, tmp_path: Path, skip_md5: None
) -> None:
    DATASETS[name][1](tmp_path)
    cfg = metahpo.compose(
        [f"task={name}", f"task.root={tmp_path}", "task.download=false", "task.batch_size=16"]
    )
    task = build(cfg).task
    assert isinstance(task, DATASETS[name][0]) and task.name == name
    n = OFFICIAL_TRAIN[name]
    assert cfg.horizon == 50 * ((n - round(0.05 * n)) // 256)
    assert cfg.task.batch_size == 16 and metahpo.compose([f"task={name}"]).task.batch_size == 256
    assert (task.augment is not None) == (name == "cifar10")
    want = WideResNet if name == "cifar10" else LeNet
    assert isinstance(task.model, want)


@pytest.mark.parametrize(
    ("experiment", "task"),
    [
        ("mnist_lenet", "mnist"),
        ("svhn_lenet", "svhn"),
        pytest.param("cifar10_wrn", "cifar10", marks=pytest.mark.slow),
    ],
)
def test_experiment_runs_on_tiny_data(
    experiment: str, task: str, tmp_path: Path, skip_md5: None
) -> None:
    cfg = metahpo.compose([f"experiment={experiment}"])
    assert cfg.device == "auto" and cfg.task.batch_size == 256 and cfg.outer.steps == 10
    assert cfg.task._target_ == DATASETS[task][0].__module__ + "." + DATASETS[task][0].__name__
    assert cfg.outer.optimizer._target_ == "metahpo.outer.Rprop" and cfg.outer.budget == 22
    assert cfg.outer.accept == "meta_loss" and cfg.outer.seeds == 2
    DATASETS[task][1](tmp_path)
    small = [
        f"experiment={experiment}",
        f"task.root={tmp_path}",
        "task.download=false",
        "task.batch_size=16",
        "horizon=5",  # one step per learning-rate segment
    ]
    if task == "cifar10":
        small += ["task.model.depth=10", "task.model.base_channels=4"]
    hg = metahpo.hypergradient(metahpo.compose(small))
    assert np.isfinite(hg.meta_loss) and hg.grads["lr"].shape == (5,)
    assert float(hg.grads["lr"].abs().sum()) > 0  # from zero, only the lr columns can move


def test_cli_reports_missing_data_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "metahpo",
            "experiment=cifar10_wrn",
            f"task.root={tmp_path}",
            "task.download=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("metahpo: error:")]
    assert len(lines) == 1 and "task.download=true" in lines[0] and "data_batch_1" in lines[0]
