"""Double backward without the images' gradient (metahpo.second_order): the same numbers, less
work."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import metahpo.estimators.forward as forward
from benchmarks.workloads import _synthetic
from metahpo.inner import FlatTask
from metahpo.second_order import data_convolutions
from metahpo.tasks.models import LeNet


class _ImageShapedConvolutions(TorchDispatchMode):
    """Counts convolutions whose output has the images' shape (the gradient wrt the data)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten._convolution):
            self.count += tuple(out.shape) == self.shape
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [None, 1])
def test_lenet_products_are_bit_identical_without_the_images_gradient(
    dtype: torch.dtype, chunk: int | None, monkeypatch
) -> None:
    task = _synthetic(
        "lenet", (1, 28, 28), lambda: LeNet(1, 28, 10), 8, torch.device("cpu"), dtype=dtype
    )
    flat = FlatTask(task)
    st, batch = flat.init_state(), flat.batch(0)
    Z = torch.randn(3, flat.n_params, generator=torch.Generator().manual_seed(0)).to(dtype)
    spy = _ImageShapedConvolutions(batch[0].shape)
    with spy:
        g, hz = forward.grad_and_hvp("rev_rev", flat, st, batch, Z, chunk)
    assert spy.count == 0
    monkeypatch.setattr(forward, "data_convolutions", contextlib.nullcontext)
    spy = _ImageShapedConvolutions(batch[0].shape)
    with spy:
        g_ref, hz_ref = forward.grad_and_hvp("rev_rev", flat, st, batch, Z, chunk)
    assert spy.count == 3  # autograd's double backward: one per product
    assert torch.equal(g, g_ref) and torch.equal(hz, hz_ref)


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
        lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False),
        lambda: nn.Conv1d(3, 5, 4, stride=3),
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ],
)
def test_strided_grouped_and_1d_convolutions_give_autograd_second_derivatives(conv) -> None:
    torch.manual_seed(0)
    layer = conv().double()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2).double())
    x = torch.randn(5, layer.in_channels, *(7,) * (layer.weight.dim() - 2), dtype=torch.float64)
    model(x)  # materialise the lazy layer

    def products(ours: bool) -> torch.Tensor:
        params = list(model.parameters())
        mode = data_convolutions() if ours else contextlib.nullcontext()
        with mode:
            loss = model(x).pow(2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        v = torch.randn(4, len(flat), generator=torch.Generator().manual_seed(1), dtype=x.dtype)
        hz = torch.autograd.grad(flat, params, v, is_grads_batched=True)
        return torch.cat([flat.detach().expand(4, -1), *(h.reshape(4, -1) for h in hz)], dim=1)

    assert torch.equal(products(True), products(False))


def test_reverse_estimators_are_bit_identical_without_the_images_gradient(monkeypatch) -> None:
    """Exact and truncated reverse and forward mode's rev_rev record their training losses
    through data_convolutions too: the same bits as autograd's own double backward."""
    import metahpo.second_order as second_order
    from metahpo.estimators.exact_reverse import ExactReverse
    from metahpo.estimators.forward import ForwardMode
    from metahpo.estimators.truncated_reverse import TruncatedReverse
    from tests.conftest import make_schedule

    task = _synthetic(
        "lenet", (1, 28, 28), lambda: LeNet(1, 28, 10), 4, torch.device("cpu"), dtype=torch.float64
    )
    schedule = make_schedule(3, 1, seed=1)
    estimators = [ExactReverse(), TruncatedReverse(K=2), ForwardMode(hvp="rev_rev")]
    spy = _ImageShapedConvolutions(torch.Size([4, 1, 28, 28]))
    with spy:
        ours = [e.hypergradient(task, schedule).grads for e in estimators]
    assert spy.count == 0
    monkeypatch.setattr(second_order, "_route", lambda *args, **kwargs: None)
    theirs = [e.hypergradient(task, schedule).grads for e in estimators]
    for a, b in zip(ours, theirs, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_models_without_convolutions_are_left_alone() -> None:
    """No mode (no per-operation dispatch) for a model without a convolution layer."""
    from torch.overrides import _get_current_function_mode_stack

    from tests.conftest import small_digits

    lenet = _synthetic("lenet", (1, 28, 28), lambda: LeNet(1, 28, 10), 4, torch.device("cpu"))
    with data_convolutions(small_digits()):
        assert len(_get_current_function_mode_stack()) == 0
    for task in (lenet, None):  # a task without a model: the mode, to be safe
        with data_convolutions(task):
            assert len(_get_current_function_mode_stack()) == 1
