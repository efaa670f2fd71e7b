"""Reversible learning against the other exact estimators: seconds, peak memory, buffer.

``python -m benchmarks.reversible [--horizons 200 800] [--columns 10 30] [--lenet 200]
[--lenet-reversal 1000] [--no-bits] [--no-distance] [--out FILE]`` prints (and writes as JSON):

- per digits horizon, the seconds and peak memory (metahpo.device.CostMeter, as every estimator
  reports; after one warm-up run each) of ``reversible``, ``exact_reverse`` (up to
  ``--exact-max``) and ``forward`` (3 columns: one segment per key); ``forward`` again at each
  of ``--columns`` (segments split over lr, momentum and weight decay) up to ``--columns-max``;
- the same three estimators on LeNet-5 (:func:`lenet_digits`, batch 32) at each ``--lenet``
  horizon;
- ``--lenet-reversal T``: whether the reverse sweep on LeNet over T steps with momenta cycling
  0 .. 0.99 ends at the quantised initial weights and a zero velocity bit for bit;
- the buffer's bits per parameter per step beside log2(1/momentum) for momentum 0.5, 0.9 and
  0.99, and the relative distance of the fixed-point run's final weights from the float run's;
- ``--scaling T ...``: per digits horizon, one after the other in this process, ``reversible``,
  ``reversible`` with the previous information buffer (:class:`LimbBuffer`, up to
  ``--limb-max``), ``checkpointed_reverse`` (default stretch round(sqrt(T))) and ``forward``,
  all on a schedule that learns lr only (one column), with seconds and peak as ratios to
  ``reversible``'s; ``--repeats N`` runs the four in N interleaved rounds at horizons up to
  ``--repeats-max`` and keeps the least seconds.

Digits: MLP 64-128-10, ReLU, batch 128, float32 unless stated; lr 0.1, momentum 0.9, weight
decay 1e-4 everywhere but the reversal check.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from metahpo.estimators.checkpointed_reverse import CheckpointedReverse
from metahpo.estimators.exact_reverse import ExactReverse
from metahpo.estimators.forward import ForwardMode
from metahpo.estimators.reversible import Reversible
from metahpo.inner import FlatTask, Steps, train
from metahpo.optim import SGD
from metahpo.schedule import HyperSchedule, HyperSpec
from metahpo.taskbase import SupervisedTask
from metahpo.tasks.digits import Digits
from metahpo.tasks.models import LeNet


class LimbBuffer:
    """The information buffer reversible learning had first, kept to measure against: one
    integer per element as 31-bit limbs ``[limbs, P]``, each push and pop a Python loop over
    all the limbs (O(T) per step, O(T^2) per run)."""

    BITS = 31

    def __init__(self, n: int, device: torch.device | str) -> None:
        self.limbs = torch.zeros(0, n, dtype=torch.int64, device=device)

    def push(self, r: torch.Tensor, m: torch.Tensor) -> None:
        carry, rows = r, []
        for limb in self.limbs:
            cur = limb * m + carry
            rows.append(cur & ((1 << self.BITS) - 1))
            carry = cur >> self.BITS
        if bool((carry != 0).any()):
            rows.append(carry)
        self.limbs = torch.stack(rows) if rows else self.limbs

    def pop(self, m: torch.Tensor) -> torch.Tensor:
        if not len(self.limbs):
            return torch.zeros((), dtype=torch.int64, device=self.limbs.device)
        rem, rows = torch.zeros_like(self.limbs[0]), []
        for limb in reversed(self.limbs):
            cur = (rem << self.BITS) + limb
            rows.append(torch.div(cur, m, rounding_mode="floor"))
            rem = torch.remainder(cur, m)
        rows.reverse()
        while rows and not bool(rows[-1].any()):
            rows.pop()
        self.limbs = torch.stack(rows) if rows else self.limbs[:0]
        return rem

    def empty(self) -> bool:
        return not bool(self.limbs.any())

    @property
    def nbytes(self) -> int:
        return self.limbs.numel() * 8

    def bits(self) -> torch.Tensor:
        """The bit length of each element's integer (float64 [P])."""
        if not len(self.limbs):
            return torch.zeros(self.limbs.shape[1], dtype=torch.float64)
        nz = self.limbs != 0
        top = torch.where(nz.any(0), len(self.limbs) - 1 - nz.flip(0).to(torch.int8).argmax(0), -1)
        limb = self.limbs.gather(0, top.clamp(min=0).unsqueeze(0)).squeeze(0).to(torch.float64)
        length = torch.where(limb > 0, torch.floor(torch.log2(limb.clamp(min=1))) + 1, 0.0)
        return torch.where(top >= 0, top * self.BITS + length, 0.0)


class LimbReversible(Reversible):
    """``reversible`` with :class:`LimbBuffer` (for ``--scaling``'s comparison only)."""

    buffer = LimbBuffer


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


def schedule(
    horizon: int, momentum: float, segments: int | tuple[int, int, int] = 1
) -> HyperSchedule:
    """Constant lr 0.1, momentum (rounded to a multiple of 2^-30) and weight decay 1e-4, with
    ``segments`` per key (one number for all three, or one each: the forward-mode columns)."""
    mom = round(momentum * 2**30) / 2**30
    segs = (segments,) * 3 if isinstance(segments, int) else segments
    starts = {"lr": 0.1, "momentum": mom, "weight_decay": 1e-4}
    values = {
        k: torch.full((n,), v, dtype=torch.float64)
        for (k, v), n in zip(starts.items(), segs, strict=True)
    }
    specs = {k: HyperSpec(len(v), (0.0, 1.0)) for k, v in values.items()}
    return HyperSchedule(horizon, specs, values, SGD())


def one_column(horizon: int) -> HyperSchedule:
    """:func:`schedule` with lr learned (one segment: one forward-mode column) and momentum 0.9
    and weight decay 1e-4 fixed."""
    s = schedule(horizon, 0.9)
    specs = {k: HyperSpec(1, (0.0, 1.0), learn=k == "lr") for k in s.values}
    return HyperSchedule(horizon, specs, s.values, SGD())


def split_columns(columns: int) -> tuple[int, int, int]:
    """``columns`` forward-mode columns as segments of lr, momentum, weight decay (10: 4, 3, 3)."""
    base, extra = divmod(columns, 3)
    return tuple(base + (i < extra) for i in range(3))  # type: ignore[return-value]


def cycling_schedule(horizon: int) -> HyperSchedule:
    """Per-step momentum cycling 0, 0.01, 0.05, 0.3, 0.5, 0.9, 0.99 (multiples of 2^-30; the
    first three store the velocity), lr 0.05, weight decay 1e-3."""
    cycle = torch.tensor([0.0, 0.01, 0.05, 0.3, 0.5, 0.9, 0.99], dtype=torch.float64)
    mom = torch.round(cycle.repeat(horizon // len(cycle) + 1)[:horizon] * 2**30) / 2**30
    values = {
        "lr": torch.full((horizon,), 0.05, dtype=torch.float64),
        "momentum": mom,
        "weight_decay": torch.full((horizon,), 1e-3, dtype=torch.float64),
    }
    specs = {k: HyperSpec(horizon, (-1.0, 1.0)) for k in values}
    return HyperSchedule(horizon, specs, values, SGD())


def cost_row(task_name: str, name: str, est, task, sched: HyperSchedule, **extra) -> dict:  # type: ignore[no-untyped-def]
    hg = est.hypergradient(task, sched)
    row = {"task": task_name, "estimator": name, "T": sched.horizon, **extra}
    row["seconds"] = round(hg.seconds, 2)
    row["peak_MiB"] = round(hg.peak_memory / 2**20, 2)
    if name.startswith("reversible"):
        row["bits_per_param_step"] = round(hg.metrics["buffer_bits_per_param_step"], 4)
        row["buffer_MiB"] = round(hg.metrics["buffer_bytes"] / 2**20, 3)
        row["stored_velocity_MiB"] = round(hg.metrics["stored_velocity_bytes"] / 2**20, 3)
    print(row, flush=True)
    return row


def least(a: dict, b: dict) -> dict:
    """Of two runs' rows, the least seconds and the largest peak (the machine is shared)."""
    return {
        **a,
        "seconds": min(a["seconds"], b["seconds"]),
        "peak_MiB": max(a["peak_MiB"], b["peak_MiB"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--horizons", type=int, nargs="*", default=[200, 800])
    p.add_argument("--exact-max", type=int, default=800, help="longest horizon for exact_reverse")
    p.add_argument("--columns", type=int, nargs="*", default=[], help="more forward columns")
    p.add_argument("--columns-max", type=int, default=800, help="longest horizon for --columns")
    p.add_argument("--lenet", type=int, nargs="*", default=[], help="LeNet horizons")
    p.add_argument("--lenet-reversal", type=int, default=0, help="LeNet reversal check horizon")
    p.add_argument("--scaling", type=int, nargs="*", default=[], help="1-column horizons")
    p.add_argument("--repeats", type=int, default=1, help="--scaling rounds (least seconds)")
    p.add_argument("--repeats-max", type=int, default=800, help="longest horizon repeated")
    p.add_argument("--limb-max", type=int, default=3200, help="longest --scaling limb run")
    p.add_argument("--no-bits", action="store_true")
    p.add_argument("--no-distance", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows: dict[str, list] = {"cost": [], "scaling": [], "bits": [], "distance": [], "reversal": []}
    for est in (Reversible(), ExactReverse(), ForwardMode(), CheckpointedReverse()):  # warm-up
        est.hypergradient(Digits(), schedule(20, 0.9))
    for T in args.scaling:
        ests = [("reversible", Reversible())]
        ests += [("reversible (limb buffer)", LimbReversible())] if T <= args.limb_max else []
        ests += [("checkpointed_reverse", CheckpointedReverse()), ("forward", ForwardMode())]
        got: list[dict] = []
        for _ in range(args.repeats if T <= args.repeats_max else 1):  # rounds, interleaved
            new = [cost_row("digits", n, e, Digits(), one_column(T), columns=1) for n, e in ests]
            got = new if not got else [least(a, b) for a, b in zip(got, new, strict=True)]
        for row in got:
            rev = got[0]
            row["s_x_rev"] = round(row["seconds"] / rev["seconds"], 2)
            row["MiB_x_rev"] = round(row["peak_MiB"] / rev["peak_MiB"], 2)
            rows["scaling"].append(row)
            print("scaling", row, flush=True)
    for T in args.horizons:
        for name, est in (
            ("reversible", Reversible()),
            ("exact_reverse", ExactReverse()),
            ("forward", ForwardMode()),
        ):
            if name == "exact_reverse" and T > args.exact_max:
                continue
            rows["cost"].append(cost_row("digits", name, est, Digits(), schedule(T, 0.9)))
        for c in args.columns if T <= args.columns_max else []:
            sched = schedule(T, 0.9, split_columns(c))
            rows["cost"].append(
                cost_row("digits", "forward", ForwardMode(), Digits(), sched, columns=c)
            )
    for T in args.lenet:
        for name, est in (
            ("reversible", Reversible()),
            ("exact_reverse", ExactReverse()),
            ("forward", ForwardMode()),
        ):
            rows["cost"].append(cost_row("lenet", name, est, lenet_digits(), schedule(T, 0.9)))
    if args.lenet_reversal:
        task = lenet_digits()
        est = Reversible()
        hg = est.hypergradient(task, cycling_schedule(args.lenet_reversal))
        W, V, W0 = est.recovered
        want = torch.round(FlatTask(task).init_state().theta.double() * 2.0**44).to(torch.int64)
        row = {
            "task": "lenet",
            "T": args.lenet_reversal,
            "params": W.numel(),
            "weights_bit_exact": bool(torch.equal(W0, want) and torch.equal(W, want)),
            "velocity_zero": bool(torch.equal(V, torch.zeros_like(V))),
            "stored_velocity_steps": hg.metrics["stored_velocity_steps"],
            "buffered_steps": hg.metrics["buffered_steps"],
            "bits_per_param_step": round(hg.metrics["buffer_bits_per_param_step"], 4),
            "bound": round(hg.metrics["bound_bits_per_param_step"], 4),
            "seconds": round(hg.seconds, 1),
        }
        rows["reversal"].append(row)
        print(row, flush=True)
    for mom in () if args.no_bits else (0.5, 0.9, 0.99):
        hg = Reversible().hypergradient(Digits(), schedule(200, mom))
        row = {
            "momentum": mom,
            "bits_per_param_step": round(hg.metrics["buffer_bits_per_param_step"], 4),
            "bound": round(math.log2(1 / mom), 4),
        }
        rows["bits"].append(row)
        print(row, flush=True)
    for dtype in () if args.no_distance else (torch.float32, torch.float64):
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
