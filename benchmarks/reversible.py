"""Reversible learning against the other exact estimators on digits: seconds, peak memory, buffer.

``python -m benchmarks.reversible [--horizons 200 800] [--out FILE]`` prints (and writes as
JSON) per horizon the seconds and peak memory (metahpo.device.CostMeter, as every estimator
reports; after one warm-up run each) of ``reversible``, ``exact_reverse`` and ``forward``
(3 columns: one segment per key), the buffer's bits per parameter per step beside
log2(1/momentum) for momentum 0.5, 0.9 and 0.99, and the relative distance of the
fixed-point run's final weights from the float run's.
Digits (MLP 64-128-10, ReLU, batch 128, float32 unless stated), lr 0.1, weight decay 1e-4.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from estimators.exact_reverse import ExactReverse
from estimators.forward import ForwardMode
from estimators.reversible import Reversible
from metahpo.inner import FlatTask, Steps, train
from metahpo.optim import SGD
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.taskbase import SupervisedTask
from tasks.digits import Digits
from tasks.models import LeNet


def lenet_digits(
    *, n_train: int | None = None, batch_size: int = 32, dtype: torch.dtype = torch.float32
) -> SupervisedTask:
    """LeNet-5 (6-16 / 120-84, ReLU, max-pool; 44,426 parameters) on the digits upscaled to
    28x28 in memory (bilinear), a stand-in for MNIST that needs no download."""
    digits = Digits(n_train=n_train, batch_size=1, dtype=torch.float64)

    def up(x: torch.Tensor) -> torch.Tensor:
        img = x.reshape(-1, 1, 8, 8)
        return torch.nn.functional.interpolate(img, size=28, mode="bilinear", align_corners=False)

    data = {k: (up(x), y) for k, (x, y) in digits.data.items()}
    return SupervisedTask(
        "lenet_digits",
        data,
        lambda: LeNet(1, 28, 10),
        loss="cross_entropy",
        batch_size=batch_size,
        seed=0,
        device=torch.device("cpu"),
        dtype=dtype,
    )


def schedule(horizon: int, momentum: float, segments: int = 1) -> HyperSchedule:
    mom = round(momentum * 2**30) / 2**30
    values = {
        "lr": torch.full((segments,), 0.1, dtype=torch.float64),
        "momentum": torch.full((segments,), mom, dtype=torch.float64),
        "weight_decay": torch.full((segments,), 1e-4, dtype=torch.float64),
    }
    specs = {k: HyperSpec(segments, (0.0, 1.0)) for k in values}
    return HyperSchedule(horizon, specs, values, SGD())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--horizons", type=int, nargs="+", default=[200, 800])
    p.add_argument("--exact-max", type=int, default=800, help="longest horizon for exact_reverse")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows: dict[str, list] = {"cost": [], "bits": [], "distance": []}
    for est in (Reversible(), ExactReverse(), ForwardMode()):  # warm-up: first-call costs
        est.hypergradient(Digits(), schedule(20, 0.9))
    for T in args.horizons:
        for name, est in (
            ("reversible", Reversible()),
            ("exact_reverse", ExactReverse()),
            ("forward", ForwardMode()),
        ):
            if name == "exact_reverse" and T > args.exact_max:
                continue
            hg = est.hypergradient(Digits(), schedule(T, 0.9))
            row = {"estimator": name, "T": T, "seconds": round(hg.seconds, 2)}
            row["peak_MiB"] = round(hg.peak_memory / 2**20, 2)
            if name == "reversible":
                row["buffer_MiB"] = round(hg.metrics["buffer_bytes"] / 2**20, 3)
            rows["cost"].append(row)
            print(row, flush=True)
    for mom in (0.5, 0.9, 0.99):
        hg = Reversible().hypergradient(Digits(), schedule(200, mom))
        row = {
            "momentum": mom,
            "bits_per_param_step": round(hg.metrics["buffer_bits_per_param_step"], 4),
            "bound": round(math.log2(1 / mom), 4),
        }
        rows["bits"].append(row)
        print(row, flush=True)
    for dtype in (torch.float32, torch.float64):
        task = Digits(dtype=dtype)
        s = schedule(800, 0.9)
        est = Reversible()
        est.hypergradient(task, s)
        flat = FlatTask(task)
        steps = Steps(flat, s)
        with torch.no_grad():
            ref = train(flat, steps, steps.init_state(flat), s.horizon).theta
        rel = float((est.recovered_final - ref).norm() / ref.norm())
        row = {"dtype": str(dtype), "T": 800, "relative_distance": f"{rel:.2e}"}
        rows["distance"].append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
