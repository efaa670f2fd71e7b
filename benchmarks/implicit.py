"""Implicit differentiation (``estimator=implicit``) measured: its solve, its bias against the
unrolled run, and its cost beside forward mode.

``python -m benchmarks.implicit [--part neumann horizon mlp] [--mlp-horizons 200 1000 4000]
[--out docs/benchmarks]``

Three parts, CPU, one thread, every figure from one process:

* ``neumann``: ``task=digits_logreg`` (the whole training split, full batch, float64, one L2
  per class), trained to ``|grad L| < 1e-13``; the Neumann series' relative error against the
  conjugate-gradient solution (tol 1e-14, which ``tests/test_implicit.py`` shows equals the
  dense closed form to 1e-8) as the terms grow, at ``alpha = 1 / lambda_max`` (power
  iteration on the Hessian).
* ``horizon``: the same task; forward mode's exact hypergradient of the unrolled run and the
  implicit one at the weights that run ends with, per horizon: relative difference and cosine,
  the implicit one's distance to the converged optimum's, and ``|grad L(w_T)|``.
* ``mlp``: the digits MLP (64-128-10, ReLU, batch 128, float32, SGD lr 0.1, momentum 0.9) with
  one L2 coefficient per layer (``l2/hidden`` on ``0.*``, ``l2/out`` on ``2.*``, 1e-3 each):
  forward mode against implicit (CG, tol 1e-5, at most 100 iterations, damping 0 and 0.1;
  Neumann, alpha 0.01, 50 and 500 terms), per horizon: cosine and relative difference to
  forward mode, seconds and peak memory (CostMeter: wall time and sampled peak heap above the
  start), the solve's iterations and residual, ``|grad L(w_T)|`` over the training split.

Writes ``implicit.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from metahpo.device import CostMeter
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.implicit import Implicit
from metahpo.inner import Steps, fit
from metahpo.optim import SGD
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.tasks.digits import Digits, DigitsLogReg

MIB = 2**20
PER_CLASS = {"l2": {f"c{c}": (f"classes.{c}.*",) for c in range(10)}}
PER_LAYER = {"l2": {"hidden": ("0.*",), "out": ("2.*",)}}


def schedule(task: Any, horizon: int, groups: dict, l2: list[float], lr: float, mu: float):  # type: ignore[no-untyped-def]
    specs = {"lr": HyperSpec(1, (0, 1), False), "momentum": HyperSpec(1, (0, 0.99), False)}
    values: dict[str, Any] = {"lr": lr, "momentum": mu}
    for g, v in zip(groups["l2"], l2, strict=True):
        specs[f"l2/{g}"], values[f"l2/{g}"] = HyperSpec(1, (0, 1), True), v
    return HyperSchedule(horizon, specs, values, SGD(), groups, task.loss_hyperparameters)


def vector(grads: dict[str, torch.Tensor], s: HyperSchedule) -> torch.Tensor:
    return torch.cat([grads[k] for k in s.learned]).to(torch.float64)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Relative difference of ``a`` to the reference ``b``, and their cosine."""
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {"rel_diff": float((a - b).norm() / b.norm()), "cosine": cos}


LOGREG_L2 = [0.01 * (1 + c / 10) for c in range(10)]
LOGREG_STEP = (1.0, 0.9)  # lr, momentum (heavy ball; full batch)


def logreg() -> DigitsLogReg:
    task = DigitsLogReg(dtype=torch.float64, batch_size=1149)  # the whole training split
    assert task.batches_per_epoch == 1
    return task


def part_neumann() -> dict[str, Any]:
    task = logreg()
    s = schedule(task, 2000, PER_CLASS, LOGREG_L2, *LOGREG_STEP)
    flat, state = fit(task, s)
    steps = Steps(flat, s)
    exact = Implicit(tol=1e-14, max_iter=2000)
    _, ref, m = exact.at(flat, steps, state)
    raw = exact._terms(flat, s.horizon)
    terms = [(steps.attach(s.horizon - 1, b), w) for b, w in raw]
    A = exact.operator(flat, state.theta, state.buffers, terms, torch.zeros(()))
    v = torch.randn(flat.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(200):  # power iteration: the largest eigenvalue
        v = A(v)
        top = float(v.norm())
        v = v / top
    rows = []
    for n in (1, 3, 10, 30, 100, 300, 1000, 3000):
        _, got, mm = Implicit(solver="neumann", terms=n, alpha=1.0 / top).at(flat, steps, state)
        err = compare(vector(got, s), vector(ref, s))
        rows.append({"terms": n, **err, "residual": mm["implicit_residual"]})
    # the error bound: (1 - alpha mu)^(J+1) for the smallest eigenvalue mu >= min l2
    return {
        "train_grad_norm": m["implicit_train_grad_norm"],
        "cg_iterations": m["implicit_iterations"],
        "cg_residual": m["implicit_residual"],
        "lambda_max": top,
        "alpha": 1.0 / top,
        "rows": rows,
    }


def part_horizon() -> dict[str, Any]:
    task = logreg()
    converged = schedule(task, 2000, PER_CLASS, LOGREG_L2, *LOGREG_STEP)
    star = vector(
        Implicit(tol=1e-14, max_iter=2000).hypergradient(task, converged).grads, converged
    )
    rows = []
    for T in (5, 10, 20, 40, 80, 160, 320, 640):
        s = schedule(task, T, PER_CLASS, LOGREG_L2, *LOGREG_STEP)
        fwd = vector(ForwardMode().hypergradient(task, s).grads, s)
        hg = Implicit(tol=1e-12, max_iter=2000).hypergradient(task, s)
        imp = vector(hg.grads, s)
        rows.append(
            {
                "horizon": T,
                **compare(imp, fwd),
                "implicit_vs_optimum": compare(imp, star)["rel_diff"],
                "forward_vs_optimum": compare(fwd, star)["rel_diff"],
                "train_grad_norm": hg.metrics["implicit_train_grad_norm"],
            }
        )
    return {"rows": rows}


def metered(fn):  # type: ignore[no-untyped-def]
    with CostMeter(torch.device("cpu")) as cost:
        out = fn()
    return out, cost.seconds, cost.peak / MIB


def part_mlp(horizons: list[int]) -> dict[str, Any]:
    task = Digits(dtype=torch.float32)
    rows = []
    solvers = {
        "implicit_cg": Implicit(),
        "implicit_cg_damping_0.1": Implicit(damping=0.1),
        "implicit_neumann_50": Implicit(solver="neumann", terms=50, alpha=0.01),
        "implicit_neumann_500": Implicit(solver="neumann", terms=500, alpha=0.01),
    }
    warm = schedule(task, 10, PER_LAYER, [1e-3, 1e-3], 0.1, 0.9)
    for est in (ForwardMode(), *solvers.values()):  # one-time allocations out of the figures
        est.hypergradient(task, warm)
    for T in horizons:
        s = schedule(task, T, PER_LAYER, [1e-3, 1e-3], 0.1, 0.9)
        fwd, secs, peak = metered(lambda: ForwardMode().hypergradient(task, s))  # noqa: B023
        ref = vector(fwd.grads, s)
        rows.append(
            {
                "horizon": T,
                "method": "forward",
                "grads": ref.tolist(),
                "seconds": secs,
                "peak_mb": peak,
            }
        )
        for name, est in solvers.items():
            try:
                hg, secs, peak = metered(lambda: est.hypergradient(task, s))  # noqa: B023
            except Exception as e:  # a diverging Neumann series: say so in the table
                rows.append({"horizon": T, "method": name, "error": str(e)})
                continue
            got = vector(hg.grads, s)
            rows.append(
                {
                    "horizon": T,
                    "method": name,
                    "grads": got.tolist(),
                    **compare(got, ref),
                    "seconds": secs,
                    "peak_mb": peak,
                    "iterations": hg.metrics["implicit_iterations"],
                    "residual": hg.metrics["implicit_residual"],
                    "train_grad_norm": hg.metrics["implicit_train_grad_norm"],
                }
            )
    return {"rows": rows}


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if math.isfinite(x) else str(x)
    return str(x)


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", default=["neumann", "horizon", "mlp"])
    p.add_argument("--mlp-horizons", nargs="+", type=int, default=[200, 1000, 4000])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    path = args.out / "implicit.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = "CPU, one thread (torch.set_num_threads(1)), shared"
    if "neumann" in args.part:
        results["neumann"] = part_neumann()
        print(table(results["neumann"]["rows"], ["terms", "rel_diff", "cosine", "residual"]))
    if "horizon" in args.part:
        results["horizon"] = part_horizon()
        cols = [
            "horizon",
            "rel_diff",
            "cosine",
            "implicit_vs_optimum",
            "forward_vs_optimum",
            "train_grad_norm",
        ]
        print(table(results["horizon"]["rows"], cols))
    if "mlp" in args.part:
        results["mlp"] = part_mlp(args.mlp_horizons)
        cols = [
            "horizon",
            "method",
            "cosine",
            "rel_diff",
            "seconds",
            "peak_mb",
            "iterations",
            "residual",
            "train_grad_norm",
            "error",
        ]
        print(table(results["mlp"]["rows"], cols))
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
