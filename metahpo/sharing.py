"""Does sharing tame gradient degradation? Per-step hypergradients across batch orders.

``python -m metahpo.sharing [--seeds 12] [--out DIR] [overrides]`` (default overrides:
``experiment=claim_sharing``) computes, for S batch orders s with the same initial weights, the
per-step learning-rate hypergradients ``g[s, t] = dL_val / d alpha_t`` of one schedule, then asks
how well a value shared by a block of W contiguous steps estimates the per-step ones. With the
seed mean ``m_t`` standing for the true per-step hypergradient:

- ``sigma^2 = mean_t var_s g[s, t]``: the noise of one per-step hypergradient;
- ``eps``: the typical drift of ``m_t`` per step (RMS of its first differences after a 9-step
  moving average, which keeps the seeds' leftover noise out of the differences);
- for each W dividing T, the block mean ``b[s, k] = mean_{t in block k} g[s, t]`` (the shared
  hypergradient divided by W) and
  ``variance(W) = mean_k var_s b[s, k]`` and ``bias2(W) = mean_t (m_t - mean_{block(t)} m)^2``,
  whose sum is the mean squared error of the shared value as an estimate of the per-step
  hypergradient; set against the bound of Micaelli & Storkey ``sigma^2 / W + eps^2 (W^2 - 1) / 12``
  (equal to it, term by term, for independent noise and a linear drift).

Writes ``sharing.json``, ``sharing.png`` and ``sharing.md`` (the table) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from metahpo.build import build
from metahpo.config import compose
from metahpo.core import ConfigError

DEFAULT_OVERRIDES = ("experiment=claim_sharing",)


def per_step_hypergradients(cfg: Any, seeds: Sequence[int], progress: bool = True) -> Tensor:
    """``[S, T]`` learning-rate hypergradients, one value per step, one row per batch order.

    Every row starts from the initial weights of ``cfg.seed``; only the batch order changes.
    """
    setup = build(cfg)
    schedule = setup.schedule
    if schedule.specs["lr"].n_segments != schedule.horizon or "lr" not in schedule.learned:
        raise ConfigError(
            f"schedule.lr.segments={schedule.specs['lr'].n_segments} must equal the horizon "
            f"({schedule.horizon}) with schedule.lr.learn=true: one learning rate per step"
        )
    rows = []
    for s in tqdm(seeds, desc="batch orders", unit="run", disable=not progress):
        task = setup.task.with_seed(int(s), keep_weights=True)
        rows.append(setup.estimator.hypergradient(task, schedule).grads["lr"])
    return torch.stack(rows).to(torch.float64)


def sharing_statistics(g: Tensor, windows: Sequence[int] | None = None) -> dict[str, Any]:
    """Noise, drift and the error of block-shared estimates (module docstring) from ``g[S, T]``."""
    n_seeds, horizon = g.shape
    if n_seeds < 2:
        raise ValueError(f"g has {n_seeds} row(s); the variance needs at least 2 batch orders")
    windows = list(windows or [w for w in range(1, horizon + 1) if horizon % w == 0])
    m = g.mean(0)
    sigma2 = float(g.var(0).mean())
    k = min(9, horizon)
    smooth = torch.nn.functional.avg_pool1d(m[None, None], k, stride=1)[0, 0]
    eps = float(smooth.diff().pow(2).mean().sqrt()) if len(smooth) > 1 else 0.0
    rows = []
    for w in windows:
        blocks = g.reshape(n_seeds, horizon // w, w).mean(-1)  # [S, T / W]
        block_of_m = m.reshape(-1, w).mean(-1).repeat_interleave(w)  # [T]
        variance = float(blocks.var(0).mean())
        bias2 = float((m - block_of_m).pow(2).mean())
        rows.append(
            {
                "W": w,
                "variance": variance,
                "bias2": bias2,
                "mse": variance + bias2,
                "bound": sigma2 / w + eps**2 * (w**2 - 1) / 12,
                "variance_ratio": variance / sigma2,
            }
        )
    return {"seeds": n_seeds, "horizon": horizon, "sigma2": sigma2, "eps": eps, "windows": rows}


def table(stats: dict[str, Any]) -> str:
    """The statistics as a markdown table."""
    lines = [
        f"S = {stats['seeds']} batch orders, T = {stats['horizon']} steps, "
        f"sigma^2 = {stats['sigma2']:.3g}, eps = {stats['eps']:.3g}; "
        "MSE = variance + bias^2, bound = sigma^2/W + eps^2 (W^2-1)/12",
        "",
        "| W | variance | variance x W / sigma^2 | bias^2 | MSE | bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in stats["windows"]:
        lines.append(
            f"| {r['W']} | {r['variance']:.3g} | {r['variance_ratio'] * r['W']:.2f} | "
            f"{r['bias2']:.3g} | {r['mse']:.3g} | {r['bound']:.3g} |"
        )
    return "\n".join(lines)


def plot(g: Tensor, stats: dict[str, Any], path: Path) -> Path:
    """Left: per-step hypergradients (seeds and their mean). Right: error against W, log-log."""
    from metahpo.plots import plt  # the Agg backend, set once there

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    steps = range(g.shape[1])
    for row in g[: min(len(g), 5)]:
        left.plot(steps, row.numpy(), lw=0.6, alpha=0.5, color="tab:gray")
    m, sd = g.mean(0), g.std(0)
    left.fill_between(steps, (m - sd).numpy(), (m + sd).numpy(), alpha=0.25, color="tab:blue")
    left.plot(steps, m.numpy(), color="tab:blue", label="mean over batch orders (± 1 sd)")
    left.set_xlabel("inner step t")
    left.set_ylabel("dL_val / d lr_t")
    left.set_title("per-step learning-rate hypergradients")
    left.legend(loc="best", fontsize=8)
    left.grid(alpha=0.3)
    w = [r["W"] for r in stats["windows"]]
    right.loglog(w, [r["variance"] for r in stats["windows"]], "o-", label="variance of the mean")
    right.loglog(w, [r["mse"] for r in stats["windows"]], "s-", label="MSE = variance + bias^2")
    right.loglog(w, [r["bound"] for r in stats["windows"]], "k--", label="bound")
    right.loglog(w, [stats["sigma2"] / x for x in w], ":", color="tab:gray", label="sigma^2 / W")
    right.set_xlabel("sharing window W (steps per shared value)")
    right.set_title("error of a shared value as a per-step estimate")
    right.legend(fontsize=8)
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m metahpo.sharing",
        description="Per-step hypergradient variance against the sharing window "
        "(docs/results.md, claim 1). Remaining arguments are config overrides.",
    )
    parser.add_argument("--seeds", type=int, default=12, help="batch orders (default 12)")
    parser.add_argument("--out", type=Path, default=Path("outputs/claims/sharing"))
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.seeds < 2:
            raise ConfigError(f"--seeds={args.seeds} must be at least 2")
        cfg = compose([*DEFAULT_OVERRIDES, *overrides])
        g = per_step_hypergradients(cfg, range(args.seeds), progress=bool(cfg.progress))
        stats = sharing_statistics(g)
    except ConfigError as e:
        print(f"metahpo.sharing: error: {e}", file=sys.stderr)
        sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharing.json").write_text(
        json.dumps({**stats, "overrides": list(overrides), "hypergradients": g.tolist()})
    )
    (args.out / "sharing.md").write_text(table(stats) + "\n")
    plot(g, stats, args.out / "sharing.png")
    print(table(stats))
    print(f"written: {args.out}/sharing.{{json,md,png}}")


if __name__ == "__main__":
    main()
