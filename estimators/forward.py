"""Forward-mode hypergradients with contiguous sharing (FDS, Micaelli & Storkey 2020)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from metahpo import distributed
from metahpo.core import Batch, ConfigError, Hypergradient, Task
from metahpo.device import CostMeter
from metahpo.inner import FlatTask, InnerState, train
from metahpo.schedule import HyperSchedule

HVPMode = Literal["auto", "fwd_rev", "rev_rev"]
HVP_FORMULATIONS = ("fwd_rev", "rev_rev")

# torch's forward-mode AD scripts its own decompositions on first use and warns about its own
# call to torch.jit.script; nothing a user can act on.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)


class ForwardMode:
    """Exact d L_val(theta_T) / d h for every shared value h, by forward-mode differentiation.

    Carries the tangents ``Z = d theta / d h`` and ``Y = d v / d h`` (one column per learned
    shared value) alongside the inner run (docs/estimators.md has the recurrences)::

        Y <- mu Y + H Z + lambda Z + [h is mu's segment] v + [h is lambda's segment] theta
        Z <- Z - alpha Y - [h is alpha's segment] v_new

    and returns ``grad L_val(theta_T) . Z_T``. Columns are ordered by the step their segment
    starts and a column is exactly zero before then, so step t only updates the prefix of
    columns that have started.

    Bias: none (exact to floating point) unless ``clamp_grad`` or ``clamp_hvp`` are set; those
    reproduce the clamps of the paper's code and make the result inexact.
    Memory: ``2 C P`` numbers for C learned shared values and P parameters, constant in the
    horizon T, plus the activations of one batched Hessian-vector product (``chunk_size``
    columns at a time bounds it).
    Compute: per step one gradient plus one Hessian-vector product per started column, i.e.
    about ``T (1 + 2 C_active)`` gradient evaluations.
    Data-parallel (:mod:`metahpo.distributed`): each rank differentiates its shard; per step
    the gradient (P numbers) and the Hessian-vector products (``C_active P``) are averaged
    over ranks, once per run the validation gradient; tangents stay identical on every rank.

    Args:
        hvp: how Hessian-vector products are computed. ``"rev_rev"`` (default): double backward
            with batched grad outputs; ``"fwd_rev"``: ``torch.func`` forward-over-reverse
            (``jvp`` of ``grad``) vmapped over columns, which also returns the gradient;
            ``"auto"``: time both on the first step that has started columns and keep the
            faster for this task, device and dtype. Both are exact, but they round differently,
            so ``auto`` can make float32 runs differ from machine to machine; the default is
            fixed, and is the faster one on the default MLP and on WRN-16-1
            (docs/benchmarks.md). ``metrics["hvp"]`` reports the one used.
        chunk_size: columns per vectorised Hessian-vector product (None: all at once).
        clamp_grad: clamp the training gradient to ``[-c, c]`` in the inner update (inexact).
        clamp_hvp: clamp Hessian-vector products to ``[-c, c]`` (inexact).
    """

    name = "forward"
    data_parallel = True

    def __init__(
        self,
        hvp: HVPMode = "rev_rev",
        chunk_size: int | None = None,
        clamp_grad: float | None = None,
        clamp_hvp: float | None = None,
    ) -> None:
        if hvp not in ("auto", *HVP_FORMULATIONS):
            raise ConfigError(
                f"estimator.hvp={hvp!r} is unknown; allowed: auto, {', '.join(HVP_FORMULATIONS)}"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"estimator.chunk_size={chunk_size} must be a positive integer")
        for key, c in (("clamp_grad", clamp_grad), ("clamp_hvp", clamp_hvp)):
            if c is not None and not c > 0:
                raise ConfigError(f"estimator.{key}={c} must be positive (or null: off)")
        self.hvp = hvp
        self.chunk_size = chunk_size
        self.clamp_grad = clamp_grad
        self.clamp_hvp = clamp_hvp
        self._measured: dict[tuple[str, int, str, str], str] = {}

    @property
    def exact(self) -> bool:
        return self.clamp_grad is None and self.clamp_hvp is None

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        with CostMeter(task.device) as cost:
            meta_loss, grads, metrics = self._run(task, schedule)
        return Hypergradient(meta_loss, grads, cost.seconds, cost.peak, schedule.horizon, metrics)

    # -- the method ----------------------------------------------------------------------------
    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], dict[str, float]]:
        flat = FlatTask(task)
        dev, dt = task.device, task.dtype
        table = schedule.table(dev, dt)

        # One column per learned shared value, ordered by the step its segment starts.
        cols = sorted(
            (s, name, k)
            for name in schedule.learned
            for k, s in enumerate(schedule.segment_starts(name))
        )
        starts = torch.tensor([c[0] for c in cols], dtype=torch.long)
        col_of = {(name, k): i for i, (_, name, k) in enumerate(cols)}
        seg = {name: schedule.segment_index(name).tolist() for name in schedule.learned}
        n_active = torch.searchsorted(starts, torch.arange(schedule.horizon), right=True).tolist()

        state = flat.init_state()
        Z = torch.zeros(len(cols), flat.n_params, device=dev, dtype=dt)
        Y = torch.zeros_like(Z)
        hz: list[Tensor] = []  # the step's H Z, handed from grad_fn to on_step

        def grad_fn(t: int, st: InnerState, batch: Batch) -> Tensor:
            a = n_active[t]
            if a == 0:
                g = flat.grad(t, st, batch)
                hz[:] = []
            else:
                g, h = self._grad_and_hvp(flat, st, batch, Z[:a])
                hz[:] = [h]
            if self.clamp_grad is not None:
                g = g.clamp(-self.clamp_grad, self.clamp_grad)
            return g

        def on_step(t: int, old: InnerState, new: InnerState, batch: Batch) -> None:
            a = n_active[t]
            if a == 0:
                return
            lr, mu, wd = table["lr"][t], table["momentum"][t], table["weight_decay"][t]
            Ya, Za = Y[:a], Z[:a]
            Ya.mul_(mu).add_(hz[0]).add_(wd * Za)
            if "momentum" in seg:
                Y[col_of["momentum", seg["momentum"][t]]].add_(old.velocity)
            if "weight_decay" in seg:
                Y[col_of["weight_decay", seg["weight_decay"][t]]].add_(old.theta)
            Za.sub_(lr * Ya)
            if "lr" in seg:
                Z[col_of["lr", seg["lr"][t]]].sub_(new.velocity)

        state = train(flat, table, state, schedule.horizon, grad_fn=grad_fn, on_step=on_step)
        meta_loss, g_val = flat.val_loss_and_grad(state.theta, state.buffers)
        total = (Z @ g_val).to(device="cpu", dtype=torch.float64)
        grads = {
            name: torch.zeros(schedule.specs[name].n_segments, dtype=torch.float64)
            for name in schedule.values
        }
        for i, (_, name, k) in enumerate(cols):
            grads[name][k] = total[i]
        metrics: dict[str, Any] = {"val_accuracy": flat.evaluate(state, "val")["accuracy"]}
        metrics["hvp"] = self.hvp if self.hvp != "auto" else self._measured.get(_key(flat))
        return meta_loss, grads, metrics

    def _grad_and_hvp(
        self, flat: FlatTask, st: InnerState, batch: Batch, Z: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Training gradient at ``st.theta`` and ``H Z^T`` for the rows of ``Z``."""
        mode = self.hvp
        if mode == "auto":
            key = _key(flat)
            if key not in self._measured:
                self._measured[key] = self._fastest(flat, st, batch, Z)
            mode = self._measured[key]
        g, hz = self._hvp(mode, flat, st, batch, Z)
        g, hz = distributed.all_reduce_mean_(g), distributed.all_reduce_mean_(hz)
        if self.clamp_hvp is not None:
            hz = hz.clamp(-self.clamp_hvp, self.clamp_hvp)
        return g, hz

    def _fastest(self, flat: FlatTask, st: InnerState, batch: Batch, Z: Tensor) -> str:
        """Time each formulation (one warm-up, then the best of two, interleaved)."""
        times: dict[str, float] = {mode: float("inf") for mode in HVP_FORMULATIONS}
        for repeat in range(3):
            for mode in HVP_FORMULATIONS:
                with CostMeter(flat.task.device, sample_memory=False) as cost:
                    self._hvp(mode, flat, st, batch, Z)
                if repeat:
                    times[mode] = min(times[mode], cost.seconds)
        # Every rank must pick the same formulation: they round differently.
        seconds = torch.tensor([times[m] for m in HVP_FORMULATIONS], device=flat.task.device)
        mean = distributed.all_reduce_mean_(seconds)
        return HVP_FORMULATIONS[int(mean.argmin())]

    def _hvp(
        self, mode: str, flat: FlatTask, st: InnerState, batch: Batch, Z: Tensor
    ) -> tuple[Tensor, Tensor]:
        def loss(theta: Tensor) -> Tensor:
            return flat.train_loss(theta, st.buffers, batch)

        if mode == "fwd_rev":
            gradf = grad(loss)

            def column(z: Tensor) -> tuple[Tensor, Tensor]:
                return jvp(gradf, (st.theta,), (z,))

            batched = vmap(column, out_dims=(None, 0))
            chunk = self.chunk_size or len(Z)
            g, hz = batched(Z[:chunk])
            if chunk < len(Z):  # the gradient comes with the first chunk; the rest add columns
                rest = [batched(Z[i : i + chunk])[1] for i in range(chunk, len(Z), chunk)]
                hz = torch.cat([hz, *rest])
            return g, hz
        theta = st.theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
            hz = _batched_vjp(g, theta, Z, self.chunk_size)
        return g.detach(), hz


def _key(flat: FlatTask) -> tuple[str, int, str, str]:
    task = flat.task
    return (task.name, flat.n_params, str(task.device), str(task.dtype))


def _batched_vjp(out: Tensor, inp: Tensor, vs: Tensor, chunk: int | None) -> Tensor:
    chunk = chunk or len(vs)
    parts = []
    for i in range(0, len(vs), chunk):
        (p,) = torch.autograd.grad(
            out, inp, vs[i : i + chunk], retain_graph=True, is_grads_batched=True
        )
        parts.append(p)
    return torch.cat(parts)
