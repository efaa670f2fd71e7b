"""Compiled forward-mode products (``estimator.compile``): compile cost, per-step gain, break-even.

``python -m benchmarks.compiled_forward [--repeats 5] [--backend inductor] [--out FILE.json]``

On the digits MLP (64-128-10, batch 128) and LeNet-5 (MNIST-shaped random batches, batch 32 by
default), float32 and float64, 7 and 30 started columns: one step's training gradient and
Hessian-vector products by

- ``eager``: the shipped default (``hvp="model"``: ``rev_rev``, vectorised on the MLP, one
  column per call on LeNet);
- ``compiled``: :class:`metahpo.estimators.forward.CompiledProducts` (``fwd_rev`` through
  ``torch.compile``, ``dynamic=False``), the columns padded to ``compile_sizes``
  (``--sizes``, default 8 32; 7 30 measures exact sizes, no padding);

``compile_s`` is the first compiled call (dynamo trace, AOT autograd, code generation and one
run) with inductor's on-disk caches off (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` is set before
torch is imported; ``--warm-cache`` keeps them) and dynamo reset before each case. Then
``--repeats`` interleaved rounds, each timing both once; min and median ms. The break-even
horizon is ``compile_s / (eager - compiled)`` (medians): the steps at this column count after
which compiling has paid for itself (a run of C columns compiles every size its started
columns pass through: 7 columns one size, 30 columns two). The products are checked against
the eager ones (max relative difference). One thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if "--warm-cache" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

from benchmarks.workloads import _synthetic  # noqa: E402
from metahpo.estimators.forward import CompiledProducts, formulation_for, grad_and_hvp  # noqa: E402
from metahpo.inner import FlatTask  # noqa: E402
from metahpo.tasks.digits import Digits  # noqa: E402
from metahpo.tasks.models import LeNet  # noqa: E402


def _task(model: str, dtype: torch.dtype, batch: int) -> Any:
    if model == "lenet":
        make = lambda: LeNet(1, 28, 10)  # noqa: E731
        return _synthetic("lenet", (1, 28, 28), make, batch, torch.device("cpu"), dtype=dtype)
    return Digits(dtype=dtype, batch_size=128)


def case(
    model: str, dtype: torch.dtype, columns: int, batch: int, repeats: int, backend: str,
    sizes: tuple[int, ...] = (8, 32),
) -> dict[str, Any]:  # fmt: skip
    task = _task(model, dtype, batch)
    flat = FlatTask(task)
    st, b = flat.init_state(), flat.batch(0)
    Z = torch.randn(columns, flat.n_params, generator=torch.Generator().manual_seed(0)).to(dtype)
    mode, chunk = formulation_for(task)

    def eager() -> tuple[torch.Tensor, torch.Tensor]:
        return grad_and_hvp(mode, flat, st, b, Z, chunk)

    torch._dynamo.reset()
    products = CompiledProducts(flat, backend, sizes)
    start = time.perf_counter()
    g, hz = products(st, b, Z)
    compile_s = time.perf_counter() - start
    g0, hz0 = eager()
    diff = float((hz - hz0).abs().max() / hz0.abs().max())
    diff = max(diff, float((g - g0).abs().max() / g0.abs().max()))
    seconds: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for name, fn in (("eager", eager), ("compiled", lambda: products(st, b, Z))):
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    gain = med["eager"] - med["compiled"]
    return {
        "model": model, "dtype": str(dtype).removeprefix("torch."), "columns": columns,
        "padded": products.padded_size(columns), "batch": batch if model == "lenet" else 128,
        "eager": f"{mode}" + (", looped" if chunk == 1 else ""), "backend": backend,
        "compile_s": compile_s, "seconds": seconds, "relative_difference": diff,
        "min": {k: min(v) for k, v in seconds.items()}, "median": med,
        "ratio_median": med["compiled"] / med["eager"],
        "ratio_min": min(c / e for c, e in zip(seconds["compiled"], seconds["eager"], strict=True)),
        "break_even_steps": compile_s / gain if gain > 0 else None,
    }  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    e, c = r["seconds"]["eager"], r["seconds"]["compiled"]
    be = "never" if r["break_even_steps"] is None else f"{r['break_even_steps']:.0f}"
    return (
        f"| {r['model']} | {r['dtype']} | {r['columns']} ({r['padded']}) | {r['compile_s']:.1f} | "
        f"{min(e) * 1e3:.2f} / {statistics.median(e) * 1e3:.2f} ({r['eager']}) | "
        f"{min(c) * 1e3:.2f} / {statistics.median(c) * 1e3:.2f} | "
        f"{r['ratio_min']:.2f} / {r['ratio_median']:.2f} | {be} | {r['relative_difference']:.1e} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--models", nargs="+", default=["digits", "lenet"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--columns", nargs="+", type=int, default=[7, 30])
    parser.add_argument("--lenet-batch", type=int, default=32)
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=[8, 32], help="compile_sizes (columns padded to)"
    )
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's disk caches")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        "| model | dtype | columns (padded) | compile s | eager ms (min / median) | compiled ms "
        "(min / median) | compiled / eager (min / median) | break-even steps | differ by |"
    )
    print("|---|---|---|---:|---|---|---|---:|---:|")
    rows = []
    for model in args.models:
        for dtype in args.dtypes:
            for columns in args.columns:
                row = case(
                    model, getattr(torch, dtype), columns, args.lenet_batch, args.repeats,
                    args.backend, tuple(args.sizes),
                )  # fmt: skip
                rows.append(row)
                print(_line(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
