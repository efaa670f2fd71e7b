"""Forward mode's cost per inner step, per inner optimiser, against plain training.

``python -m benchmarks.optimizer_step [--quick] [--out docs/benchmarks/optimizer_step.json]``

One inner step of each, timed in isolation at a fixed number C of started tangent columns (every
column active, as at the end of a run), interleaved, median over repeats:

* ``plain``: the training gradient and the optimiser's step (what ``fit`` does per step);
* ``generic``: forward mode's step, i.e. the gradient with the Hessian-vector products of the C
  columns (:func:`~metahpo.estimators.forward.grad_and_hvp`, ``rev_rev``) and the jvp of the
  optimiser's step vmapped over the columns (:func:`~metahpo.estimators.forward.propagate`), as
  ForwardMode runs it;
* ``specialised`` (SGD only): the same Hessian-vector products, then the hand-written SGD
  tangent recurrence, in place (:func:`~metahpo.estimators.forward.sgd_propagate`,
  ForwardMode's fast path for plain SGD);
* ``update_generic`` / ``update_specialised``: the tangent update alone (no gradient, no HVP).

Tasks: the MLP 64-128-10 on digits (batch 128) and LeNet-5 on random MNIST-shaped batches
(batch 16), float32, one thread. Results: a JSON file and a markdown table on stdout
(docs/benchmarks.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.workloads import _synthetic
from metahpo.estimators.forward import grad_and_hvp, propagate, sgd_propagate
from metahpo.inner import FlatTask, InnerState, Steps
from metahpo.optim import SGD, AdamW, InnerOptimizer
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.tasks.digits import Digits
from metahpo.tasks.models import LeNet

VALUES = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2},
}


def _setup(task, optimizer: InnerOptimizer, name: str, C: int):
    flat = FlatTask(task)
    names = list(VALUES[name])
    specs = {n: HyperSpec(1, (0.0, 1.0)) for n in names}
    schedule = HyperSchedule(8, specs, VALUES[name], optimizer)
    steps = Steps(flat, schedule)
    state = steps.init_state(flat)
    g = torch.Generator().manual_seed(0)
    # a state a few steps into training, tangents of the size forward mode carries
    for t in range(3):
        grad = flat.grad(t, state, flat.batch(t))
        theta, opt_state = steps.step(t, state.theta, state.opt_state, grad, steps.values(t))
        state = InnerState(theta, opt_state, state.buffers, t + 1)
    P = flat.n_params
    Z = 1e-3 * torch.randn(C, P, generator=g).to(task.dtype)
    S = tuple(1e-3 * torch.randn(C, P, generator=g).to(task.dtype) for _ in state.opt_state)
    learned = names[: min(C, len(names))]  # one column in force per learned key
    onehot = torch.eye(C, dtype=task.dtype)
    dvalues = {k: onehot[:, j] for j, k in enumerate(learned)}
    return flat, steps, state, Z, S, dvalues, {k: j for j, k in enumerate(learned)}


def measure(task, name: str, C: int, repeats: int) -> dict[str, float]:
    optimizer = SGD() if name == "sgd" else AdamW()
    flat, steps, st, Z, S, dvalues, cols = _setup(task, optimizer, name, C)
    t, batch = st.step, flat.batch(st.step)
    _, HZ = grad_and_hvp("rev_rev", flat, st, batch, Z)

    def plain() -> None:
        g = flat.grad(t, st, batch)
        steps.step(t, st.theta, st.opt_state, g, steps.values(t))

    def generic() -> None:
        g, hz = grad_and_hvp("rev_rev", flat, st, batch, Z)
        propagate(steps, t, st, g, Z.clone(), tuple(s.clone() for s in S), hz, dvalues)

    def update_generic() -> None:
        propagate(steps, t, st, HZ[0], Z.clone(), tuple(s.clone() for s in S), HZ, dvalues)

    fns: dict[str, Callable[[], None]] = {
        "plain": plain,
        "generic": generic,
        "update_generic": update_generic,
    }
    if name == "sgd":

        def specialised() -> None:
            g, hz = grad_and_hvp("rev_rev", flat, st, batch, Z)
            sgd_propagate(steps, t, st, g, Z.clone(), S[0].clone(), hz, cols)

        def update_specialised() -> None:
            sgd_propagate(steps, t, st, HZ[0], Z.clone(), S[0].clone(), HZ, cols)

        fns.update(specialised=specialised, update_specialised=update_specialised)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:  # the first round is a warm-up
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def tasks(quick: bool) -> dict[str, Callable[[], Any]]:
    if quick:
        return {"digits-MLP": lambda: Digits(hidden=(16,), batch_size=32, n_train=256)}
    return {
        "digits-MLP": lambda: Digits(hidden=(128,), batch_size=128),
        "LeNet": lambda: _synthetic(
            "lenet", (1, 28, 28), lambda: LeNet(1, 28, 10), 16, torch.device("cpu")
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = args.repeats or (3 if args.quick else 30)
    columns = (1, 5) if args.quick else (1, 5, 15)
    rows = []
    for task_name, make in tasks(args.quick).items():
        task = make()
        for opt in ("sgd", "adamw"):
            for C in columns:
                m = measure(task, opt, C, repeats)
                rows.append({"task": task_name, "optimizer": opt, "columns": C, **m})
    out = {"repeats": repeats, "threads": 1, "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    print(table(rows))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | optimiser | columns | plain step (ms) | forward step / plain | "
        "generic / specialised (step) | tangent update (ms): generic, specialised |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        spec = r.get("specialised")
        ratio = f"{r['generic'] / spec:.3f}" if spec else "n/a"
        upd = f"{1e3 * r['update_generic']:.3f}"
        if spec:
            upd += f", {1e3 * r['update_specialised']:.3f}"
        lines.append(
            f"| {r['task']} | {r['optimizer']} | {r['columns']} | {1e3 * r['plain']:.3f} | "
            f"{r['generic'] / r['plain']:.2f} | {ratio} | {upd} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
