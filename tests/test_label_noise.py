"""Noisy-label digits: exactly the configured share of training labels is wrong, chosen by its
own seed; validation and test labels stay clean."""

from __future__ import annotations

import pytest
import torch

import metahpo
from metahpo.tasks.digits import Digits, flip_labels


def test_flips_exactly_that_share_to_other_classes() -> None:
    y = torch.arange(200) % 10
    noisy = flip_labels(y, 0.3, 10, seed=4)
    assert int((noisy != y).sum()) == 60
    assert bool(((noisy >= 0) & (noisy < 10)).all())
    assert torch.equal(flip_labels(y, 0.3, 10, seed=4), noisy)  # seeded
    assert not torch.equal(flip_labels(y, 0.3, 10, seed=5), noisy)
    assert torch.equal(flip_labels(y, 0.0, 10, seed=4), y)


def test_only_training_labels_are_noisy() -> None:
    clean = Digits(hidden=(8,))
    noisy = Digits(hidden=(8,), label_noise=0.3, label_noise_seed=1)
    for split in ("val", "test"):
        assert torch.equal(noisy.data[split][1], clean.data[split][1])
        assert torch.equal(noisy.data[split][0], clean.data[split][0])
    assert torch.equal(noisy.data["train"][0], clean.data["train"][0])
    wrong = noisy.data["train"][1] != clean.data["train"][1]
    assert int(wrong.sum()) == round(0.3 * len(wrong))
    # the seed of the noise is its own: the run's seed does not change which labels flip
    other = Digits(hidden=(8,), label_noise=0.3, label_noise_seed=1, seed=7)
    assert torch.equal(other.data["train"][1], noisy.data["train"][1])


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_a_share_outside_zero_one_is_one_line(value: str) -> None:
    with pytest.raises(metahpo.ConfigError, match=rf"^task\.label_noise={value} must be a number"):
        metahpo.compose(["task=digits", f"task.label_noise={value}"])
