"""Seconds of one forward-mode step's gradient and Hessian-vector products, per formulation.

``python -m benchmarks.hvp_formulations [--quick] [--repeats 5] [--out FILE.json]``

On LeNet-5 (MNIST-shaped random batches of 256, P = 44,426) and the digits MLP (64-128-10,
batch 128), float32 and float64, 7 and 30 columns: ``grad_and_hvp`` by

- ``rev_rev (images' gradient)``: double backward as autograd does it, which also computes the
  gradient with respect to the input images in every product (metahpo.second_order);
- ``rev_rev``: the shipped double backward, convolutions of data through
  :func:`metahpo.second_order.data_convolutions`;
- ``fwd_rev``: ``torch.func`` forward-over-reverse;
- ``rev_rev looped``: the shipped double backward, one column per call (``chunk_size=1``);

interleaved in one process, each repeat running every variant once, after one warm-up; min and
median seconds, and each variant's median relative to the first. The two ``rev_rev`` variants
are checked bit-identical on every case. One thread (the machine's cores are shared).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import metahpo.estimators.forward as forward
from benchmarks.workloads import _synthetic
from metahpo.inner import FlatTask
from metahpo.tasks.digits import Digits
from metahpo.tasks.models import LeNet

VARIANTS = ("rev_rev (images' gradient)", "rev_rev", "fwd_rev", "rev_rev looped")


@contextlib.contextmanager
def _plain(task: Any = None) -> Iterator[None]:
    yield


def _task(model: str, dtype: torch.dtype, quick: bool) -> Any:
    if model == "lenet":
        batch = 32 if quick else 256
        make = lambda: LeNet(1, 28, 10)  # noqa: E731
        return _synthetic("lenet", (1, 28, 28), make, batch, torch.device("cpu"), dtype=dtype)
    return Digits(dtype=dtype)


def _call(variant: str, flat: FlatTask, st: Any, batch: Any, Z: torch.Tensor) -> Any:
    if variant.startswith("rev_rev ("):
        saved = forward.data_convolutions
        forward.data_convolutions = _plain  # type: ignore[assignment]
        try:
            return forward.grad_and_hvp("rev_rev", flat, st, batch, Z)
        finally:
            forward.data_convolutions = saved
    if variant == "rev_rev looped":
        return forward.grad_and_hvp("rev_rev", flat, st, batch, Z, 1)
    return forward.grad_and_hvp(variant, flat, st, batch, Z)


def measure(
    repeats: int, quick: bool, models: tuple[str, ...] = ("lenet", "digits")
) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        for dtype in (torch.float32, torch.float64):
            task = _task(model, dtype, quick)
            flat = FlatTask(task)
            st, batch = flat.init_state(), flat.batch(0)
            for columns in (7, 30):
                Z = torch.randn(
                    columns, flat.n_params, generator=torch.Generator().manual_seed(0)
                ).to(dtype)
                outs = {v: _call(v, flat, st, batch, Z) for v in VARIANTS}  # warm-up
                same = all(
                    torch.equal(a, b)
                    for a, b in zip(outs[VARIANTS[0]], outs[VARIANTS[1]], strict=True)
                )
                seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
                for _ in range(repeats):
                    for v in VARIANTS:
                        start = time.perf_counter()
                        _call(v, flat, st, batch, Z)
                        seconds[v].append(time.perf_counter() - start)
                base = statistics.median(seconds[VARIANTS[0]])
                row = {
                    "model": model,
                    "dtype": str(dtype).removeprefix("torch."),
                    "columns": columns,
                    "bit_identical": same,
                    "seconds": seconds,
                    "min": {v: min(s) for v, s in seconds.items()},
                    "median": {v: statistics.median(s) for v, s in seconds.items()},
                    "median_ratio": {v: statistics.median(s) / base for v, s in seconds.items()},
                }
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    cells = " | ".join(
        f"{row['min'][v] * 1e3:.1f} / {row['median'][v] * 1e3:.1f} ({row['median_ratio'][v]:.2f})"
        for v in VARIANTS
    )
    same = "yes" if row["bit_identical"] else "no"
    return f"| {row['model']} | {row['dtype']} | {row['columns']} | {cells} | {same} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="LeNet at batch 32, 1 repeat")
    parser.add_argument("--models", nargs="+", default=["lenet", "digits"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    head = " | ".join(f"{v}: min / median ms (x first)" for v in VARIANTS)
    print(f"| model | dtype | columns | {head} | rev_rev bit-identical |")
    rows = measure(1 if args.quick else args.repeats, args.quick, tuple(args.models))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
