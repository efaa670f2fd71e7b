"""Forward-mode hypergradients with contiguous sharing (FDS, Micaelli & Storkey 2020)."""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from metahpo import distributed
from metahpo.core import Batch, Hypergradient, Task, loss_hyper
from metahpo.device import CostMeter
from metahpo.inner import FlatTask, InnerState, Steps, train
from metahpo.optim import SGD, State
from metahpo.parameterisation import Constant
from metahpo.reverse import check_window, window_ends
from metahpo.schedule import HyperSchedule
from metahpo.second_order import data_convolutions
from metahpo.validation import Positive, PositiveInt, checked

HVPMode = Literal["auto", "fwd_rev", "rev_rev", "model"]
HVP_FORMULATIONS = ("fwd_rev", "rev_rev")
TangentMode = Literal["auto", "generic"]
CompileMode = Literal["off", "inductor", "aot_eager", "cuda_graphs"]

# torch's forward-mode AD scripts its own decompositions on first use and warns about its own
# call to torch.jit.script; nothing a user can act on.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)


class Columns:
    """The tangent columns of a schedule: one per learned raw value.

    Columns are ordered by the first step their raw value can influence
    (:meth:`HyperSchedule.supports`), so the columns started by step ``t`` are the prefix
    ``[:n_active(t)]`` (a column is exactly zero before its support starts). Everything here is
    O(C) for C columns, nothing O(T): forward mode's memory must not grow with the horizon.

    Attributes:
        keys: ``(type, raw index)`` of every column.
        starts: the step each column's support starts (ascending).
    """

    def __init__(
        self,
        schedule: HyperSchedule,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        cols = sorted(
            (s, name, k)
            for name in schedule.learned
            for k, s in enumerate(schedule.segment_starts(name))
        )
        self.schedule = schedule
        self.keys = [(name, k) for _, name, k in cols]
        self.starts = [s for s, _, _ in cols]
        self._index = {key: i for i, key in enumerate(self.keys)}
        self._onehot = torch.eye(len(cols), device=device, dtype=dtype)

    def __len__(self) -> int:
        return len(self.keys)

    def n_active(self, step: int) -> int:
        """How many columns have started by ``step``."""
        return bisect.bisect_right(self.starts, step)

    def derivative(self, name: str, step: int) -> list[tuple[int, float]]:
        """``[(column, d value_step / d column)]`` of key ``name`` (empty when it is fixed)."""
        if name not in self.schedule.learned:
            return []
        param, raw = self.schedule.param(name), self.schedule.values[name]
        pairs = param.derivative(raw, step, self.schedule.horizon)
        return [(self._index[name, k], d) for k, d in pairs if d != 0.0]

    def in_force(self, name: str, step: int) -> int | None:
        """The column of ``name``'s segment in force at ``step`` (None: ``name`` is fixed);
        for piecewise-constant keys, whose step depends on one raw value."""
        pairs = self.derivative(name, step)
        return pairs[0][0] if pairs else None

    def tangent(self, name: str, step: int, a: int) -> Tensor:
        """``[a]``: d value_step / d column of key ``name`` for the ``a`` started columns."""
        pairs = self.derivative(name, step)
        if len(pairs) == 1 and pairs[0][1] == 1.0:  # a segment's own value: a one-hot row
            return self._onehot[:a, pairs[0][0]]
        out = torch.zeros(a, dtype=torch.float64)
        for i, d in pairs:
            out[i] = d
        return out.to(self._onehot)

    def grads(self, per_column: Tensor) -> dict[str, Tensor]:
        """Per-column values as ``{type: float64 CPU [n raw values]}`` (zeros for fixed types)."""
        out = {
            name: torch.zeros(self.schedule.specs[name].n_segments, dtype=torch.float64)
            for name in self.schedule.values
        }
        values = per_column.to(device="cpu", dtype=torch.float64)
        for i, (name, k) in enumerate(self.keys):
            out[name][k] = values[i]
        return out


@checked("estimator")
class ForwardMode:
    """Exact d L_val(theta_T) / d h for every shared value h, by forward-mode differentiation.

    Works for any inner optimiser (:mod:`metahpo.optim`): it carries the tangents
    ``Z = d theta / d h`` and ``S = d state / d h`` of the optimiser's state tensors (one column
    per learned shared value) alongside the inner run, and per step (docs/estimators.md)::

        HZ = H Z                                   (Hessian-vector products of started columns)
        (Z, S) <- jvp(step, (theta, state, g, h_t), (Z, S, HZ, dh_t/dcolumn))   (vmap on columns)

    and returns ``grad L_val(theta_T) . Z_T``. One column per learned raw value of each key's
    parameterisation (:mod:`metahpo.parameterisation`); columns are ordered by the step their
    support starts and a column is exactly zero before then, so step t only updates the prefix
    of columns that have started (:class:`Columns`). Hyperparameters of the training loss add
    their mixed second derivative to each column's ``H Z`` in the same call (:class:`Mixed`).
    The training gradient of a step comes out of the same call as its Hessian-vector
    products (:func:`propagate` does the rest).

    Bias: none (exact to floating point) unless ``clamp_hvp`` is set (the paper code's clamp of
    the products: inexact). ``clamp_grad`` clamps the training gradient in the inner run and
    differentiates that clamped run exactly (the tangent of ``clamp(g)`` is ``H Z`` masked to 0
    where ``|g| > c``; the paper's code propagated the unmasked one).
    Memory: ``(1 + s) C P`` numbers for C learned shared values, P parameters and an optimiser
    with s state tensors (SGD 1, Adam 2), constant in the horizon T, plus the activations of
    one batched Hessian-vector product (``chunk_size`` columns at a time bounds it) and the
    temporaries of the vmapped step (a few ``C_active P``).
    Compute: per step one gradient plus one Hessian-vector product per started column, i.e.
    about ``T (1 + 2 C_active)`` gradient evaluations, plus the step's jvp (elementwise,
    ``O(C_active P)``; docs/benchmarks.md measures it).
    Data-parallel (:mod:`metahpo.distributed`): each rank differentiates its shard; per step
    the gradient (P numbers) and the Hessian-vector products (``C_active P``) are averaged
    over ranks, once per run the validation gradient; tangents stay identical on every rank.

    Args:
        hvp: how Hessian-vector products are computed. ``"model"`` (default): the formulation
            and columns per call :func:`formulation_for` picks from the task's model alone
            (``rev_rev``, one column per call for convolutional models, all at once otherwise;
            an explicit ``chunk_size`` wins), the same on every machine; ``"rev_rev"``:
            double backward (the gradient with ``create_graph``, then vector-Jacobian
            products through it; convolutions of the data skip the
            images' gradient, :mod:`metahpo.second_order`); ``"fwd_rev"``: ``torch.func``
            forward-over-reverse (``jvp`` of ``grad``), which also returns the gradient;
            ``"auto"``: before the first step, time both, each vectorised over the columns
            (``chunk_size``) and looped one column at a time, on all C columns, and keep the
            fastest for this task, device and dtype (about 12 C extra Hessian-vector products,
            once per estimator). All are exact, but they round differently, so ``auto`` can
            make float32 runs differ from machine to machine; ``model`` cannot
            (docs/benchmarks.md measures them per model).
            ``metrics["hvp"]`` and ``metrics["hvp_chunk_size"]`` report the one used.
        chunk_size: columns per vectorised Hessian-vector product (None: all at once; 1: a
            plain loop over columns, without ``vmap``).
        clamp_grad: clamp the training gradient to ``[-c, c]`` in the inner update, as the
            paper's code does; the result is the exact hypergradient of that clamped run.
        clamp_hvp: clamp Hessian-vector products to ``[-c, c]`` (inexact).
        tangents: ``"auto"`` (default): plain SGD without groups takes the hand-written
            recurrence (:func:`sgd_propagate`, faster), everything else the generic jvp;
            ``"generic"``: always the jvp. ``metrics["tangents"]`` reports the one used.
        window: None (default): the meta-objective is the final validation loss. ``W``: it is
            the **sum of the validation losses every W steps** (after steps W, 2W, ..., and at
            the end), the objective ``estimator=pes`` is unbiased for, for like-for-like
            comparisons: ``meta_loss`` is that sum (``metrics["final_val_loss"]`` the last
            term) and ``grads`` its exact gradient, at ``T / W`` extra validation gradients.
        compile: ``"off"`` (default) or compiled Hessian-vector products
            (:class:`CompiledProducts`: ``torch.compile`` of the ``fwd_rev`` product with
            ``dynamic=False``; ``"inductor"``: generated C++/Triton code, needs a C++ compiler
            on CPU; ``"aot_eager"``: traced but not code-generated; ``"cuda_graphs"``: inductor
            with ``mode="reduce-overhead"``, CUDA graphs on a GPU, plain inductor on CPU).
            The started columns are padded with zero tangents up to the next of
            ``compile_sizes`` (blocks of the largest beyond it), so a run compiles at most once
            per size and batch shape. The same products, rounded differently (float64: equal
            to 1e-10). Steps with loss hyperparameters or random layers stay uncompiled.
            Compiling costs 10-25 s per size on this CPU (about 1-2 s once inductor's on-disk
            cache holds the same graph); docs/benchmarks.md ("Compiled steps") measures when it
            pays for itself (off by default: long runs on MLP-sized models only).
            ``metrics["compiled_steps"]`` counts the compiled steps.
        compile_sizes: the column counts compiled for (see ``compile``).
    """

    name = "forward"
    data_parallel = True

    def __init__(
        self,
        hvp: HVPMode = "model",
        chunk_size: PositiveInt | None = None,
        clamp_grad: Positive | None = None,
        clamp_hvp: Positive | None = None,
        tangents: TangentMode = "auto",
        window: PositiveInt | None = None,
        compile: CompileMode = "off",
        compile_sizes: tuple[PositiveInt, ...] = (8, 32),
    ) -> None:
        # argument types and ranges: checked from these hints (metahpo.validation)
        self.tangents = tangents
        self.window = window
        self.hvp = hvp
        self.chunk_size = chunk_size
        self.clamp_grad = clamp_grad
        self.clamp_hvp = clamp_hvp
        self.compile = compile
        self.compile_sizes = tuple(sorted(set(compile_sizes)))
        # compiled products per task (kept across hypergradients: compiled once per process)
        self._compiled: dict[tuple[str, int, str, str], tuple[Task, CompiledProducts]] = {}
        # auto's or model's choice per (task, P, device, dtype): formulation, columns per call
        self._measured: dict[tuple[str, int, str, str], str] = {}
        self._measured_chunk: dict[tuple[str, int, str, str], int | None] = {}

    @property
    def exact(self) -> bool:
        """The exact derivative of the inner run it runs (``clamp_grad``'s run is clamped)."""
        return self.clamp_hvp is None

    def check(self, schedule: HyperSchedule) -> None:
        """Raise ConfigError unless ``window`` (if set) fits the horizon."""
        if self.window is not None:
            check_window("window", self.window, schedule.horizon)

    def hypergradient(self, task: Task, schedule: HyperSchedule) -> Hypergradient:
        self.check(schedule)
        with CostMeter(task.device) as cost:
            meta_loss, grads, metrics = self._run(task, schedule)
        return Hypergradient(meta_loss, grads, cost.seconds, cost.peak, schedule.horizon, metrics)

    # -- the method ----------------------------------------------------------------------------
    def _run(
        self, task: Task, schedule: HyperSchedule
    ) -> tuple[float, dict[str, Tensor], dict[str, Any]]:
        flat = FlatTask(task)
        dev, dt = task.device, task.dtype
        compiled = self._compiled_for(flat)
        calls = compiled.calls if compiled is not None else 0
        steps = Steps(flat, schedule)
        cols = Columns(schedule, dev, dt)

        state = steps.init_state(flat)
        Z = torch.zeros(len(cols), flat.n_params, device=dev, dtype=dt)
        S = tuple(torch.zeros_like(Z) for _ in state.opt_state)  # tangents of the state
        learned = [k for k in schedule.keys if k in schedule.learned]
        in_loss = [k for k in learned if k in schedule.loss_keys]  # the loss's own, learned
        key = _key(flat)
        if self.hvp == "model":  # a chunk_size given explicitly wins over the rule's
            self._measured[key], chunk = formulation_for(task)
            self._measured_chunk[key] = chunk if self.chunk_size is None else self.chunk_size
        if self.hvp == "auto" and key not in self._measured and len(cols):
            self._measured[key] = self._fastest(flat, state, flat.batch(0), Z)
        hz: list[Tensor] = []  # the step's H Z, handed from grad_fn to step_fn

        def grad_fn(t: int, st: InnerState, batch: Batch) -> Tensor:
            a = cols.n_active(t)
            if a == 0:
                g = flat.grad(t, st, batch)
                hz[:] = []
            else:
                mixed = None
                if in_loss:  # d g / d column gains the loss's mixed second derivative
                    values = steps.values(t)
                    mixed = Mixed(
                        tuple(values[k] for k in in_loss),
                        torch.stack([cols.tangent(k, t, a) for k in in_loss], dim=1),
                        lambda lam: steps.attach(t, batch, dict(zip(in_loss, lam, strict=True))),
                    )
                g, h = self._grad_and_hvp(flat, st, batch, Z[:a], mixed)
                if self.clamp_grad is not None:  # d clamp(g) = d g where |g| <= c, else 0
                    h.masked_fill_(g.abs() > self.clamp_grad, 0.0)
                hz[:] = [h]
            if self.clamp_grad is not None:
                g = g.clamp(-self.clamp_grad, self.clamp_grad)
            return g

        fast = self.tangents == "auto" and sgd_fast_path_applies(schedule)

        def step_fn(t: int, st: InnerState, g: Tensor) -> tuple[Tensor, State]:
            a = cols.n_active(t)
            if a == 0:
                return steps.step(t, st.theta, st.opt_state, g, steps.values(t))
            if fast:
                in_force = {k: cols.derivative(k, t)[0][0] for k in learned}
                return sgd_propagate(steps, t, st, g, Z[:a], S[0][:a], hz[0], in_force)
            # d h_t / d column (for a segment: 1 in the column of the segment in force, else 0)
            dvalues = {k: cols.tangent(k, t, a) for k in learned}
            return propagate(steps, t, st, g, Z[:a], tuple(s[:a] for s in S), hz[0], dvalues)

        T = schedule.horizon
        ends = set(window_ends(self.window, T)[:-1])  # the objective's earlier terms
        sums: list[Any] = [0.0, torch.zeros(len(cols), device=dev, dtype=dt)]

        def window_end(t: int, before: InnerState, after: InnerState, batch: Batch) -> None:
            if t + 1 in ends:
                loss, g = flat.val_loss_and_grad(after.theta, after.buffers)
                sums[0] += loss
                sums[1] += Z @ g

        state = train(flat, steps, state, T, grad_fn=grad_fn, step_fn=step_fn, on_step=window_end)
        meta_loss, g_val = flat.val_loss_and_grad(state.theta, state.buffers)
        grads = cols.grads(Z @ g_val + sums[1])
        metrics: dict[str, Any] = {"val_accuracy": flat.evaluate(state, "val")["accuracy"]}
        if self.window is not None:
            metrics["final_val_loss"] = meta_loss
            meta_loss += sums[0]
        metrics["hvp"], metrics["hvp_chunk_size"] = self._setting(key)
        metrics["tangents"] = "sgd" if fast else "generic"
        if compiled is not None:
            metrics["compiled_steps"] = compiled.calls - calls
        return meta_loss, grads, metrics

    def _setting(self, key: tuple[str, int, str, str]) -> tuple[str | None, int | None]:
        """The formulation and columns per call in use for ``key``."""
        if self.hvp in HVP_FORMULATIONS:
            return self.hvp, self.chunk_size
        return self._measured.get(key), self._measured_chunk.get(key, self.chunk_size)

    def _compiled_for(self, flat: FlatTask) -> CompiledProducts | None:
        """This task's compiled products (made on first use), or None with ``compile="off"``."""
        if self.compile == "off":
            return None
        key = _key(flat)
        entry = self._compiled.get(key)
        if entry is None or entry[0] is not flat.task:
            entry = (flat.task, CompiledProducts(flat, self.compile, self.compile_sizes))
            self._compiled[key] = entry
        return entry[1]

    def _grad_and_hvp(
        self,
        flat: FlatTask,
        st: InnerState,
        batch: Batch,
        Z: Tensor,
        mixed: Mixed | None,
    ) -> tuple[Tensor, Tensor]:
        """Training gradient at ``st.theta`` and ``H Z^T`` (plus the mixed term) for the rows
        of ``Z``."""
        compiled = self._compiled_for(flat)
        if compiled is not None and mixed is None and compiled.applies(batch):
            g, hz = compiled(st, batch, Z)
        else:
            mode, chunk = self._setting(_key(flat))
            g, hz = grad_and_hvp(mode or "rev_rev", flat, st, batch, Z, chunk, mixed)
        g, hz = distributed.all_reduce_mean_(g), distributed.all_reduce_mean_(hz)
        if self.clamp_hvp is not None:
            hz = hz.clamp(-self.clamp_hvp, self.clamp_hvp)
        return g, hz

    def _fastest(self, flat: FlatTask, st: InnerState, batch: Batch, Z: Tensor) -> str:
        """The fastest formulation on the rows of ``Z`` (records its columns per call too).

        Times every formulation vectorised (``chunk_size``) and looped (one column per call):
        one warm-up each, then the best of two, interleaved.
        """
        chunks = [self.chunk_size] if self.chunk_size == 1 else [self.chunk_size, 1]
        candidates = [(mode, chunk) for mode in HVP_FORMULATIONS for chunk in chunks]
        times = time_hvp(flat, st, batch, Z, candidates, repeats=3)
        # Every rank must pick the same candidate (they round differently): mean over ranks.
        best = torch.tensor([min(times[c][1:]) for c in candidates], device=flat.task.device)
        mode, chunk = candidates[int(distributed.all_reduce_mean_(best).argmin())]
        self._measured_chunk[_key(flat)] = chunk
        return mode


class CompiledProducts:
    """The training gradient and ``H Z^T`` by ``torch.compile`` of the ``fwd_rev`` product
    (``vmap`` over columns of ``jvp(grad(loss))``), for a fixed set of column counts.

    ``Z``'s rows are padded with zero rows up to the smallest of ``sizes`` that holds them
    (in blocks of the largest beyond it), and compiled with ``dynamic=False``: one compilation
    per size and batch shape, whatever the number of started columns. A zero tangent's product
    is exactly zero and the columns of a ``vmap`` are independent, so padding changes nothing
    but the rounding of the batched kernels (float64: equal to eager to 1e-10, tested).
    The batch goes in as plain tensors, so steps with loss hyperparameters or random layers
    (:meth:`applies`) are left to the eager products.
    Cost: the compilation, once per size (10-25 s per size on this CPU, 1-2 s with inductor's
    cache warm; docs/benchmarks.md), then one padded product per call; memory as the eager
    ``fwd_rev`` at the padded size. Dynamo keeps at most
    ``torch._dynamo.config.recompile_limit`` (8) versions per process; beyond that (many
    tasks or estimators in one process) the calls run the traced function uncompiled.
    """

    def __init__(self, flat: FlatTask, mode: str, sizes: tuple[int, ...]) -> None:
        self.flat = flat
        self.sizes = tuple(sorted(sizes))
        self.graphs = mode == "cuda_graphs"
        self.calls = 0
        backend = "aot_eager" if mode == "aot_eager" else "inductor"
        options: dict[str, Any] = {"mode": "reduce-overhead"} if self.graphs else {}
        self._fn = torch.compile(self._products, backend=backend, dynamic=False, **options)

    def applies(self, batch: Batch) -> bool:
        """Whether a step on ``batch`` can use the compiled products (no loss hyperparameters
        in it, no random layers in the model)."""
        return not loss_hyper(batch) and not getattr(self.flat.task, "random_layers", False)

    def _products(
        self, theta: Tensor, buffers: dict[str, Tensor], x: Tensor, y: Tensor, Z: Tensor
    ) -> tuple[Tensor, Tensor]:
        # the eager fwd_rev product itself, traced (one block: the padding chunks outside)
        return grad_and_hvp("fwd_rev", self.flat, InnerState(theta, (), buffers), (x, y), Z)

    def padded_size(self, n: int) -> int:
        """The compiled column count that holds ``n`` columns (the largest size beyond it)."""
        return next((s for s in self.sizes if s >= n), self.sizes[-1])

    def __call__(self, st: InnerState, batch: Batch, Z: Tensor) -> tuple[Tensor, Tensor]:
        x, y = batch[0], batch[1]
        g: Tensor | None = None
        parts = []
        for i in range(0, len(Z), self.sizes[-1]):
            block = Z[i : i + self.sizes[-1]]
            n, size = len(block), self.padded_size(len(block))
            if size > n:
                block = torch.cat([block, block.new_zeros(size - n, block.shape[1])])
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()
            g_i, h = self._fn(st.theta, st.buffers, x, y, block)
            if self.graphs:  # a graph's outputs are overwritten by its next replay
                g_i, h = g_i.clone(), h.clone()
            g = g_i if g is None else g
            parts.append(h[:n])
        self.calls += 1
        assert g is not None
        return g, parts[0] if len(parts) == 1 else torch.cat(parts)


def formulation_for(task: Task) -> tuple[str, int | None]:
    """The default (``hvp="model"``) Hessian-vector products for ``task``: formulation and
    columns per call, from its model's layers alone (no timing: the same choice on every
    machine, for every dtype).

    ``("rev_rev", 1)`` (double backward, one column per call) for a model with a convolution,
    ``("rev_rev", None)`` (all columns in one vectorised call) otherwise, including tasks
    without an ``nn.Module`` model. Measured on this CPU (docs/benchmarks.md, "The default
    formulation"): on LeNet-5 the looped double backward is the fastest of the four in float32
    (0.53-0.44x of autograd's own double backward at 7 and 30 columns, against 0.65-0.72x
    vectorised and 0.67-0.78x ``fwd_rev``) and level with ``fwd_rev`` in float64 (0.71-0.72x
    against 0.75-0.77x); ``vmap``'s batching of convolution and max-pool backward loops over
    the columns anyway and then copies. On the digits MLP the vectorised double backward is
    fastest (looped 1.3-1.7x slower, ``fwd_rev`` 1.1-1.9x); on the batch-norm WRN looped and
    vectorised ``rev_rev`` are level at one column.
    """
    model = getattr(task, "model", None)
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in modules)
    return "rev_rev", 1 if conv else None


def propagate(
    steps: Steps,
    t: int,
    st: InnerState,
    g: Tensor,
    Z: Tensor,
    S: State,
    HZ: Tensor,
    dvalues: dict[str, Tensor],
) -> tuple[Tensor, State]:
    """The optimiser's step ``t`` and, in place, the tangents of the columns in ``Z``.

    The step is a function ``(theta, state, grad, values) -> (theta', state')``; its ``jvp`` at
    ``(st.theta, st.opt_state, g, values_t)`` with tangents ``(Z, S, HZ, dvalues)`` per column
    (``vmap`` over the rows) gives ``(Z', S')``::

        Z' = d theta'/d theta Z + d theta'/d state S + d theta'/d grad HZ + d theta'/d h dh
        S' = (the same for the state)

    Args:
        Z: ``[a, P]`` tangents of the parameters (rows: started columns), updated in place.
        S: the tangents of each state tensor, ``[a, P]`` each, updated in place.
        HZ: ``[a, P]`` Hessian-vector products ``H Z`` (the tangent of the gradient).
        dvalues: ``{key: [a]}`` the tangent of each learned key's value at step ``t`` (1 in the
            column of its segment in force, else 0); keys not named are constants.

    Returns:
        The new parameters and optimiser state (the primal of the same call).
    """
    values = steps.values(t)
    learned = list(dvalues)

    def update(theta: Tensor, opt_state: State, grad: Tensor, lv: tuple[Tensor, ...]):
        return steps.step(
            t, theta, opt_state, grad, {**values, **dict(zip(learned, lv, strict=True))}
        )

    primals = (st.theta, st.opt_state, g, tuple(values[k] for k in learned))

    def column(z: Tensor, zs: State, h: Tensor, dv: tuple[Tensor, ...]):
        return jvp(update, primals, (z, zs, h, dv))

    (theta, opt_state), (z, zs) = vmap(column, out_dims=(None, 0))(
        Z, S, HZ, tuple(dvalues[k] for k in learned)
    )
    Z.copy_(z)
    for s, new in zip(S, zs, strict=True):
        s.copy_(new)
    return theta, opt_state


def sgd_fast_path_applies(schedule: HyperSchedule) -> bool:
    """The hand-written SGD recurrence covers plain :class:`metahpo.optim.SGD` (not a subclass,
    no Nesterov, no averaged momentum) without per-group values, every learned key piecewise
    constant."""
    opt = schedule.optimizer
    constant = all(type(schedule.param(k)) is Constant for k in schedule.learned)
    plain = type(opt) is SGD and not opt.nesterov and not opt.average
    return plain and not schedule.groups and constant


def sgd_propagate(
    steps: Steps,
    t: int,
    st: InnerState,
    g: Tensor,
    Z: Tensor,
    Y: Tensor,
    HZ: Tensor,
    in_force: dict[str, int],
) -> tuple[Tensor, State]:
    """:func:`propagate` for plain SGD, written out by hand and in place (the fast path).

    ``Y`` is the velocity's tangent. With ``alpha, mu, lambda`` the values at step ``t``::

        Y <- mu Y + H Z + lambda Z + [mu's column] v + [lambda's column] theta
        Z <- Z - alpha Y - [alpha's column] v_new

    The same numbers as the generic jvp up to rounding
    (``tests/test_optim.py::test_sgd_fast_path_equals_the_generic_tangents``), without its
    dispatch overhead: docs/benchmarks.md measured the generic path 12-100 % slower per inner
    step on the digits MLP and LeNet, so SGD keeps this path (``tangents="generic"`` turns it
    off). No temporaries and no device sync: the values stay 0-d tensors.
    """
    values = steps.values(t)
    theta, (v,) = steps.step(t, st.theta, st.opt_state, g, values)
    h = steps.expand(values)  # names the schedule omits at the optimiser's defaults
    lr, mu, wd = h["lr"], h["momentum"], h["weight_decay"]
    Y.mul_(mu).add_(HZ).addcmul_(Z, wd)
    if (i := in_force.get("momentum")) is not None:
        Y[i].add_(st.opt_state[0])
    if (i := in_force.get("weight_decay")) is not None:
        Y[i].add_(st.theta)
    Z.addcmul_(Y, lr, value=-1)
    if (i := in_force.get("lr")) is not None:
        Z[i].sub_(v)
    return theta, (v,)


@dataclass
class Mixed:
    """Hyperparameters of the training loss in a forward-mode step: the training gradient
    depends on them, so its tangent along column j is ``H Z_j + sum_k D_jk d2L/dtheta dlam_k``.

    Attributes:
        values: the learned loss hyperparameters' values at this step (0-d each, K of them).
        tangents: ``[a, K]``: d value_k / d column j for the started columns.
        batch: the step's batch carrying given values instead (``(lam_1, ..., lam_K) ->``).
    """

    values: tuple[Tensor, ...]
    tangents: Tensor
    batch: Callable[[tuple[Tensor, ...]], Batch]


def grad_and_hvp(
    mode: str,
    flat: FlatTask,
    st: InnerState,
    batch: Batch,
    Z: Tensor,
    chunk: int | None = None,
    mixed: Mixed | None = None,
) -> tuple[Tensor, Tensor]:
    """Training gradient at ``st.theta`` and ``H Z^T`` (``[len(Z), P]``) by one formulation.

    Args:
        mode: ``"fwd_rev"`` (``vmap`` over columns of ``jvp(grad(loss))``) or ``"rev_rev"``
            (gradient with ``create_graph``, then batched vector-Jacobian products through it).
        chunk: columns per vectorised call (None: all; 1: a plain loop without ``vmap``).
        mixed: hyperparameters of the loss: each column's product gains their mixed term
            (:class:`Mixed`), in the same call (``fwd_rev``: their tangents join the jvp's;
            ``rev_rev``: the K derivatives dL/dlam_k join the differentiated outputs).

    Cost: one gradient plus ``len(Z)`` Hessian-vector products (about two gradients each),
    with or without ``mixed``.
    """
    # without loss hyperparameters: no lam inputs (K = 0), the same operations as plain HVPs
    values = mixed.values if mixed is not None else ()
    D = mixed.tangents if mixed is not None else Z.new_zeros(len(Z), 0)

    def loss(theta: Tensor, lam: tuple[Tensor, ...]) -> Tensor:
        return flat.train_loss(theta, st.buffers, mixed.batch(lam) if mixed else batch)

    chunk = chunk or len(Z)
    if mode == "fwd_rev":
        gradf = grad(loss)

        def column(z: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
            return jvp(lambda th, *lam: gradf(th, lam), (st.theta, *values), (z, *d.unbind(0)))

        if chunk == 1:  # one jvp per column; the gradient comes with the first
            pairs = [column(z, d) for z, d in zip(Z, D, strict=True)]
            return pairs[0][0], torch.stack([h for _, h in pairs])
        # randomness="same": a random layer's one mask for every column (the step's masks)
        batched = vmap(column, out_dims=(None, 0), randomness="same")
        # the gradient comes with the first chunk; the rest add columns
        parts = [batched(Z[i : i + chunk], D[i : i + chunk]) for i in range(0, len(Z), chunk)]
        hz = parts[0][1] if len(parts) == 1 else torch.cat([h for _, h in parts])
        return parts[0][0], hz
    theta = st.theta.detach().requires_grad_(True)
    lam = tuple(v.detach().requires_grad_(True) for v in values)
    with torch.enable_grad():
        with data_convolutions(flat.task):  # no gradient wrt the images in the second backward
            value = loss(theta, lam)
        outs = torch.autograd.grad(value, (theta, *lam), create_graph=True)
        hz_parts = []
        for i in range(0, len(Z), chunk):
            last = i + chunk >= len(Z)
            if chunk == 1:
                v = (Z[i], *D[i].unbind(0))
                (p,) = torch.autograd.grad(outs, theta, v, retain_graph=not last)
                p = p.unsqueeze(0)
            else:
                v = (Z[i : i + chunk], *D[i : i + chunk].T.unbind(0))
                (p,) = torch.autograd.grad(
                    outs, theta, v, retain_graph=not last, is_grads_batched=True
                )
            hz_parts.append(p)
    return outs[0].detach(), hz_parts[0] if len(hz_parts) == 1 else torch.cat(hz_parts)


Candidate = tuple[str, int | None]


def time_hvp(
    flat: FlatTask,
    st: InnerState,
    batch: Batch,
    Z: Tensor,
    candidates: list[Candidate],
    repeats: int,
) -> dict[Candidate, list[float]]:
    """Seconds of :func:`grad_and_hvp` on ``Z`` per ``(mode, chunk)``, interleaved over repeats.

    The first repeat is a warm-up; callers usually drop it. Cost: ``repeats`` calls per
    candidate.
    """
    times: dict[Candidate, list[float]] = {c: [] for c in candidates}
    for _ in range(repeats):
        for mode, chunk in candidates:
            with CostMeter(flat.task.device, sample_memory=False) as cost:
                grad_and_hvp(mode, flat, st, batch, Z, chunk)
            times[mode, chunk].append(cost.seconds)
    return times


def _key(flat: FlatTask) -> tuple[str, int, str, str]:
    task = flat.task
    return (task.name, flat.n_params, str(task.device), str(task.dtype))
