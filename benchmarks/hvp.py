"""Which Hessian-vector product formulation should forward mode use? Measured side by side.

Times one full forward-mode hypergradient on digits for each formulation, interleaved over
several repeats, and prints the median seconds and the ratio to ``fwd_rev``.

    python benchmarks/hvp.py [--horizon 200] [--segments 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from estimators.forward import ForwardMode
from metahpo.schedule import HYPERPARAMETERS, HyperSchedule, HyperSpec
from tasks.digits import Digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--segments", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)

    print(f"digits MLP 64-128-10, batch 128, T={args.horizon}, {args.segments} segments x 3 types")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}\n")
    print("| hidden | hvp | median s / hypergradient | ratio to fwd_rev | peak MiB |")
    print("|---|---|---|---|---|")
    for hidden in [(128,), (512, 512)]:
        task = Digits(hidden=hidden, dtype=dtype)
        specs = {n: HyperSpec(args.segments, (0.0, 1.0)) for n in HYPERPARAMETERS}
        sched = HyperSchedule(
            args.horizon, specs, {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-3}
        )
        modes = ["fwd_rev", "rev_rev"]
        times: dict[str, list[float]] = {m: [] for m in modes}
        mem: dict[str, list[int]] = {m: [] for m in modes}
        for m in modes:  # warm-up
            ForwardMode(hvp=m).hypergradient(task, sched)
        for _ in range(args.repeats):
            for m in modes:
                hg = ForwardMode(hvp=m).hypergradient(task, sched)
                times[m].append(hg.seconds)
                mem[m].append(hg.peak_memory)
        base = statistics.median(times["fwd_rev"])
        for m in modes:
            med = statistics.median(times[m])
            print(
                f"| {'-'.join(map(str, hidden))} | {m} | {med:.3f} | {med / base:.2f} "
                f"| {max(mem[m]) / 2**20:.1f} |"
            )


if __name__ == "__main__":
    main()
