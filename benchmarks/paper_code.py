"""metahpo's forward mode against the paper's own code (polo5/FDS ``MetaLearner``), side by side.

``python -m benchmarks.paper_code --fds PATH [--repeats 3] [--out FILE.json]``

``PATH`` is a checkout of https://github.com/polo5/FDS (its ``main.py``, ``models/``,
``utils/``); its imports need ``six``, ``torchvision`` and ``matplotlib`` (``--deps DIR`` adds a
folder holding them to ``sys.path``). Nothing of it is copied here: this script imports it, builds
its ``MetaLearner`` without its ``__init__`` (which wants datasets and a log folder), hands it
our batches and a model of its own ``ReparamModule`` family holding our initial weights, and
calls its ``inner_loop`` (the forward-mode run, clamps off, no pruning), followed by the
validation gradient its ``outer_step`` takes. metahpo's side is ``ForwardMode()`` with the
shipped defaults on the same task, schedule, weights and batches (``--compile MODE``:
``ForwardMode(compile=MODE)``, one estimator per case, so it compiles in the untimed first run;
``first_s`` records that run).

Problems: the digits MLP (64-128-10, batch 128, the paper code's model built with its
``ReparamModule``) and LeNet-5 (the paper code's own ``MetaLeNet``, MNIST-shaped random
batches), float32 and float64 (the paper code runs in ``torch.get_default_dtype()``, set for
it), 7 columns (lr 5 segments, momentum 1, weight decay 1: the paper's setting) and 30 (lr 28).
Before timing, each case checks that the two hypergradients agree (the paper code's
``g_val @ Z`` against metahpo's). Then ``--repeats`` interleaved rounds, each timing the paper
code and metahpo once; min and median seconds and the ratio metahpo / paper (of the medians,
and the min of the per-round ratios). metahpo's lower bound (one gradient per step plus one
Hessian-vector product per started column, each timed alone, in every round) is reported beside
(metahpo's median over the bound's median).
One thread.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.workloads import _synthetic
from metahpo.estimators.forward import ForwardMode
from metahpo.inner import FlatTask
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.tasks.digits import Digits
from metahpo.tasks.models import LeNet

VALUES = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}


def load_paper_code(path: Path, deps: Path | None) -> types.ModuleType:
    """The paper code's ``main`` module, imported from ``path``."""
    for p in (deps, path):
        if p is not None and str(p) not in sys.path:
            sys.path.insert(0, str(p))
    return importlib.import_module("main")


def schedule(horizon: int, columns: int) -> HyperSchedule:
    segments = {"lr": columns - 2, "momentum": 1, "weight_decay": 1}
    specs = {k: HyperSpec(n, (0.0, 1.0)) for k, n in segments.items()}
    return HyperSchedule(horizon, specs, VALUES)


def _paper_model(fds: types.ModuleType, model: str, theta: torch.Tensor) -> nn.Module:
    """The paper code's meta-model holding ``theta`` (our initial weights, same order)."""
    if model == "lenet":
        net = fds.MetaLeNet(n_classes=10, n_channels=1, im_size=28, device="cpu")
    else:
        net = _mlp_class(fds)(device="cpu")
    net = net.to(theta.dtype)
    assert net.flat_w.numel() == theta.numel()
    with torch.no_grad():
        net.flat_w.copy_(theta)
    return net


def _mlp_class(fds: types.ModuleType) -> type:
    """The digits MLP as a model of the paper code's ``ReparamModule`` family."""

    class MetaMLP(fds.ReparamModule):  # type: ignore[misc, name-defined]
        def __init__(self, device: str = "cpu") -> None:
            super().__init__()
            self.device = device
            self.layers = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    return MetaMLP


def paper_run(
    fds: types.ModuleType, task: Any, model: str, sched: HyperSchedule, theta: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The paper code's forward-mode run on our task, and ``g_val @ Z`` per hyperparameter
    (its raw hypergradient before it divides by the batches per value)."""
    T = sched.horizon
    args = types.SimpleNamespace(
        device="cpu", dataset="digits", architecture=model, init_type="default",
        init_param=1, learn_lr=True, learn_mom=True, learn_wd=True,
        n_lrs=sched.specs["lr"].n_segments, n_moms=1, n_wds=1,
        clamp_grads=False, clamp_HZ=False, pruning_ratio=0.0, pruning_mode="alternate",
    )  # fmt: skip
    learner = object.__new__(fds.MetaLearner)
    learner.args = args
    learner.cross_entropy = nn.CrossEntropyLoss()
    learner.inner_lrs = torch.full((args.n_lrs,), VALUES["lr"], dtype=torch.float64)
    learner.inner_moms = torch.full((1,), VALUES["momentum"], dtype=torch.float64)
    learner.inner_wds = torch.full((1,), VALUES["weight_decay"], dtype=torch.float64)
    # float64 values: the paper code reads them with float(), as our schedule holds them
    learner.train_loader = [tuple(task.batch(t))[:2] for t in range(T)]
    learner.n_inner_epochs_for_this_outer_step = 1
    learner.n_batches_per_epoch = T
    learner.n_total_batches_for_this_outer_step = T
    net = _paper_model(fds, model, theta)
    saved_select, saved_dtype, saved_print = fds.select_model, torch.get_default_dtype(), print
    fds.select_model = lambda *a, **k: net
    fds.print = lambda *a, **k: None  # its per-epoch line
    torch.set_default_dtype(theta.dtype)
    try:
        z_lr, z_mom, z_wd = learner.inner_loop()
        x_val, y_val = task.data["val"]
        val_loss = learner.cross_entropy(
            learner.classifier.forward_with_param(x_val, learner.weights), y_val
        )
        (g_val,) = torch.autograd.grad(val_loss, learner.weights)
    finally:
        fds.select_model = saved_select
        fds.print = saved_print
        torch.set_default_dtype(saved_dtype)
    return {"lr": g_val @ z_lr, "momentum": g_val @ z_mom, "weight_decay": g_val @ z_wd}


def _task(model: str, dtype: torch.dtype, batch: int) -> Any:
    if model == "lenet":
        make = lambda: LeNet(1, 28, 10)  # noqa: E731
        return _synthetic("lenet", (1, 28, 28), make, batch, torch.device("cpu"), dtype=dtype)
    return Digits(dtype=dtype, batch_size=batch)


def lower_bound(task: Any, sched: HyperSchedule, repeats: int = 5) -> float:
    """metahpo's lower bound (benchmarks.timing): one gradient per step plus one
    Hessian-vector product per started column, each timed alone."""
    from benchmarks.timing import lower_bound_parts
    from metahpo.estimators.auto import started_columns

    parts = lower_bound_parts(task, repeats=repeats)
    return sum(parts["grad_seconds"] + parts["hvp_seconds"] * c for c in started_columns(sched))


def case(
    fds: types.ModuleType, model: str, dtype: torch.dtype, columns: int, horizon: int,
    batch: int, repeats: int, compile: str = "off",
) -> dict[str, Any]:  # fmt: skip
    task = _task(model, dtype, batch)
    sched = schedule(horizon, columns)
    theta = FlatTask(task).init_state().theta
    if compile != "off":  # a cold compilation per case (and within dynamo's recompile limit)
        torch._dynamo.reset()
    estimator = ForwardMode(compile=compile)  # one estimator: compiled once, in the first run
    start = time.perf_counter()
    ours = estimator.hypergradient(task, sched)
    first_s = time.perf_counter() - start
    theirs = paper_run(fds, task, model, sched, theta)
    agree = max(
        float((ours.grads[k] - theirs[k].double()).abs().max())
        / max(float(ours.grads[k].abs().max()), 1e-300)
        for k in theirs
    )
    paper_s, ours_s, bound_s = [], [], []
    for _ in range(repeats):  # the bound too, in every round: the machine's load moves
        start = time.perf_counter()
        paper_run(fds, task, model, sched, theta)
        paper_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        estimator.hypergradient(task, sched)
        ours_s.append(time.perf_counter() - start)
        bound_s.append(lower_bound(task, sched, repeats=3))
    bound = statistics.median(bound_s)
    return {
        "model": model, "dtype": str(dtype).removeprefix("torch."), "columns": columns,
        "horizon": horizon, "batch": batch, "relative_difference": agree,
        "hvp": ours.metrics["hvp"] if compile == "off" else f"compiled {compile}",
        "compile": compile, "first_s": first_s, "paper_s": paper_s, "metahpo_s": ours_s,
        "ratio_median": statistics.median(ours_s) / statistics.median(paper_s),
        "ratio_min": min(o / p for o, p in zip(ours_s, paper_s, strict=True)),
        "lower_bound_s": bound_s, "metahpo_over_bound": statistics.median(ours_s) / bound,
    }  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    p, o = r["paper_s"], r["metahpo_s"]
    first = f" first run {r['first_s']:.1f} s |" if r.get("compile", "off") != "off" else ""
    return (
        f"| {r['model']} | {r['dtype']} | {r['columns']} | {r['horizon']} | {r['batch']} | "
        f"{min(p):.2f} / {statistics.median(p):.2f} | {min(o):.2f} / {statistics.median(o):.2f} "
        f"({r['hvp']}) | {r['ratio_min']:.2f} / {r['ratio_median']:.2f} | "
        f"{r['metahpo_over_bound']:.2f} | {r['relative_difference']:.1e} |{first}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fds", type=Path, required=True, help="a checkout of polo5/FDS")
    parser.add_argument("--deps", type=Path, default=None, help="a folder with six etc.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["digits", "lenet"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--columns", nargs="+", type=int, default=[7, 30])
    parser.add_argument("--horizon", type=int, default=140, help="divisible by 5 and 28")
    parser.add_argument("--lenet-horizon", type=int, default=28)
    parser.add_argument("--lenet-batch", type=int, default=32)
    parser.add_argument(
        "--compile", default="off", help="metahpo's estimator.compile (its first run compiles)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fds = load_paper_code(args.fds.resolve(), args.deps)
    print(
        "| model | dtype | columns | T | batch | paper code s (min / median) | metahpo s "
        "(min / median) | metahpo / paper (min / median) | metahpo / its lower bound | "
        "hypergradients differ by |"
    )
    print("|---|---|---:|---:|---:|---|---|---|---:|---:|")
    rows = []
    for model in args.models:
        for dtype in args.dtypes:
            for columns in args.columns:
                lenet = model == "lenet"
                horizon = args.lenet_horizon if lenet else args.horizon
                if lenet and columns == 7:
                    horizon = max(5, horizon // 5 * 5)
                batch = args.lenet_batch if lenet else 128
                row = case(
                    fds, model, getattr(torch, dtype), columns, horizon, batch, args.repeats,
                    args.compile,
                )  # fmt: skip
                rows.append(row)
                print(_line(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
