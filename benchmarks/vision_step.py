"""Seconds per inner step of plain training and of forward mode on the vision models, batch 256.

Random tensors of each dataset's shape stand in for the data (nothing to download; a step's
cost does not depend on pixel values). Each model runs a few inner steps per mode, the modes
interleaved over repeats. A step's time is read between consecutive ``on_step`` calls of the one
inner loop (``metahpo.inner.train``), so set-up and the final validation gradient are left out;
the first step of every run is dropped as warm-up, and the median over the rest is reported.

- ``plain``: what retraining does: gradient, batch-norm running statistics, SGD update.
- ``forward C=n``: ForwardMode with n learned shared values active at that step (lr, momentum
  and weight decay with n/3 segments each; only steps where all n columns have started count),
  with the Hessian-vector products named by ``--hvp``: ``fwd_rev`` (vmapped jvp of grad, the
  benchmark's default), ``rev_rev`` (double backward, the estimator's default) and
  ``fwd_rev/1`` (fwd_rev one column at a time).
- ``next_buffers``: the extra no-grad forward pass that advances batch-norm statistics (part
  of both modes).

    python benchmarks/vision_step.py [--repeats 3] [--columns 3 6] [--models ...] [--threads 1]
        [--hvp fwd_rev rev_rev fwd_rev/1] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

import estimators.forward
from estimators.forward import ForwardMode
from metahpo.device import resolve_device, synchronize
from metahpo.inner import FlatTask, train
from metahpo.schedule import HYPERPARAMETERS, HyperSchedule, HyperSpec
from metahpo.taskbase import SupervisedTask
from tasks.models import LeNet, WideResNet
from tasks.vision import CropFlip

# name -> (description, (C, H, W), model factory, crop + flip, default inner steps per run)
MODELS: dict[str, tuple[str, tuple[int, int, int], Callable[[], nn.Module], bool, int]] = {
    "lenet28": ("LeNet-5", (1, 28, 28), lambda: LeNet(1, 28, 10), False, 10),
    "lenet32": ("LeNet-5", (3, 32, 32), lambda: LeNet(3, 32, 10), False, 10),
    "wrn16_1": ("WRN-16-1", (3, 32, 32), lambda: WideResNet(3, 32, 10), True, 3),
}
VALUES = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def make_task(name: str, batch: int, dtype: torch.dtype, device: torch.device) -> SupervisedTask:
    _, shape, model, augment, _ = MODELS[name]
    g = torch.Generator().manual_seed(0)
    data = {
        split: (torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
        for split, n in (("train", 2 * batch), ("val", batch), ("test", batch))
    }
    return SupervisedTask(
        name,
        data,
        model,
        loss="cross_entropy",
        batch_size=batch,
        seed=0,
        device=device,
        dtype=dtype,
        augment=CropFlip(4, True) if augment else None,
    )


def schedule(horizon: int, segments: int) -> HyperSchedule:
    specs = {n: HyperSpec(segments, (0.0, 1.0)) for n in HYPERPARAMETERS}
    return HyperSchedule(horizon, specs, VALUES)


def stamp(stamps: list[float], device: torch.device) -> None:
    synchronize(device)  # CUDA: wait for the step's kernels
    stamps.append(time.perf_counter())


@contextmanager
def stamped(stamps: list[float], device: torch.device) -> Any:
    """Record the time after every inner step of ForwardMode's run of ``metahpo.inner.train``."""

    def timed_train(*args: Any, on_step: Any = None, **kwargs: Any) -> Any:
        def hook(*a: Any) -> None:
            if on_step is not None:
                on_step(*a)
            stamp(stamps, device)

        stamp(stamps, device)
        return train(*args, on_step=hook, **kwargs)

    original = estimators.forward.train
    estimators.forward.train = timed_train
    try:
        yield
    finally:
        estimators.forward.train = original


def step_times(stamps: list[float], keep: list[bool]) -> list[float]:
    """Durations of steps 1.. (step 0 is warm-up) for which ``keep`` is true."""
    return [stamps[t + 1] - stamps[t] for t in range(1, len(stamps) - 1) if keep[t]]


def run_plain(task: SupervisedTask, steps: int) -> list[float]:
    flat = FlatTask(task)
    table = schedule(steps, 1).table(task.device, task.dtype)
    stamps: list[float] = []
    stamp(stamps, task.device)
    with torch.no_grad():
        train(flat, table, flat.init_state(), steps, on_step=lambda *a: stamp(stamps, task.device))
    return step_times(stamps, [True] * steps)


def run_forward(
    task: SupervisedTask, steps: int, columns: int, estimator: ForwardMode
) -> list[float]:
    per_type = columns // len(HYPERPARAMETERS)
    sched = schedule(steps * per_type, per_type)  # the last segment spans the last `steps` steps
    starts = sorted(s for n in HYPERPARAMETERS for s in sched.segment_starts(n))
    active = [sum(s <= t for s in starts) == columns for t in range(sched.horizon)]
    stamps: list[float] = []
    with stamped(stamps, task.device):
        estimator.hypergradient(task, sched)
    return step_times(stamps, active)


def run_next_buffers(task: SupervisedTask) -> list[float]:
    params, buffers = task.init_params()
    batch = task.batch(0)
    out = []
    for _ in range(2):
        synchronize(task.device)
        start = time.perf_counter()
        task.next_buffers(params, buffers, batch)
        synchronize(task.device)
        out.append(time.perf_counter() - start)
    return out[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="inner steps per run, the first one warm-up (default: 10 for LeNet, 3 for WRN-16-1)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--columns", type=int, nargs="+", default=[3], help="multiples of 3")
    p.add_argument(
        "--hvp",
        nargs="+",
        default=["fwd_rev"],
        choices=["fwd_rev", "rev_rev", "fwd_rev/1"],
        help="forward mode's Hessian-vector products (fwd_rev/1: fwd_rev with chunk_size 1)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 "
        "is steadier on a machine shared with other jobs",
    )
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if any(c % 3 or c < 3 for c in args.columns):
        p.error("--columns must be multiples of 3 (lr, momentum and weight decay alike)")
    dtype = getattr(torch, args.dtype)
    device = resolve_device(args.device)

    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, "
        f"{args.dtype}, batch {args.batch}, {args.repeats} interleaved repeats, "
        f"load average at start {os.getloadavg()[0]:.1f}\n"
    )
    estimators = {
        hvp: ForwardMode(hvp=hvp.split("/")[0], chunk_size=1 if hvp.endswith("/1") else None)
        for hvp in args.hvp
    }
    label = {hvp: f"forward {hvp}" for hvp in args.hvp}
    forward_modes = {
        f"{label[h]} C={c}": (c, est) for c in args.columns for h, est in estimators.items()
    }
    modes = ["plain", *forward_modes]
    header = " | ".join(f"{m} s/step" for m in modes)
    ratios = " | ".join(f"{m} / plain" for m in modes[1:])
    print(f"| model | input | params | {header} | {ratios} | next_buffers s |")
    print("|---" * (4 + 2 * len(forward_modes) + 1) + "|")
    for name in args.models:
        task = make_task(name, args.batch, dtype, device)
        steps = args.steps or MODELS[name][4]
        times: dict[str, list[float]] = {m: [] for m in modes}
        nb: list[float] = []
        for _ in range(args.repeats):  # interleaved: load drifts hit every mode alike
            times["plain"] += run_plain(task, steps)
            for mode, (c, est) in forward_modes.items():
                times[mode] += run_forward(task, steps, c, est)
            nb += run_next_buffers(task)
        med = {m: statistics.median(v) for m, v in times.items()}
        desc, shape = MODELS[name][:2]
        n_params = sum(q.numel() for q in task.model.parameters())
        cells = " | ".join(f"{med[m]:.3f}" for m in modes)
        rel = " | ".join(f"{med[m] / med['plain']:.1f}" for m in modes[1:])
        nb_cell = f"{statistics.median(nb):.3f}" if any(True for _ in task.model.buffers()) else "-"
        size = "x".join(map(str, shape[1:])) + f"x{shape[0]}"
        print(f"| {desc} | {size} | {n_params:,} | {cells} | {rel} | {nb_cell} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
