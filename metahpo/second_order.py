"""Double backward without the gradient with respect to the data.

PyTorch's double backward of a convolution (``_convolution_double_backward``) computes the
gradient with respect to the convolution's input whenever the weight's incoming gradient is
defined, whether or not the input requires grad (it checks no output mask for that term). In a
Hessian-vector product by double backward the first layer's input is the batch of images, so
every product pays for a transposed convolution nobody reads: 21 % of a LeNet-5 ``rev_rev``
product at batch 256 in float32 (profiled, docs/benchmarks.md).

:func:`data_convolutions` routes convolutions whose input does not require grad (the data)
through :class:`DataConv`, whose backward gives the weight's and bias's gradients by the same
``convolution_backward`` call as autograd's, and whose double backward computes only the
gradient with respect to the incoming output gradient (``conv(x, ggW) + ggb``, the term autograd
computes too). Same kernels, same order: the products are bit-identical (tested).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_CONVS = {
    F.conv1d: 1,
    F.conv2d: 2,
    F.conv3d: 3,
    torch.conv1d: 1,
    torch.conv2d: 2,
    torch.conv3d: 3,
}


def _tuple(v: Any, n: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * n


class _WeightGrad(torch.autograd.Function):
    """``(gO) -> (gW, gb)`` of a convolution of fixed data ``x``: linear in ``gO``, so its
    backward is ``ggO = conv(x, ggW) + ggb`` (nothing with respect to ``x``)."""

    @staticmethod
    def forward(ctx: Any, g_out: Tensor, x: Tensor, weight: Tensor, has_bias: bool, p: Any):
        stride, padding, dilation, groups = p
        bias_sizes = [weight.shape[0]] if has_bias else None
        _, g_w, g_b = torch.ops.aten.convolution_backward(
            g_out, x, weight, bias_sizes, stride, padding, dilation, False,
            [0] * len(stride), groups, [False, True, has_bias],
        )  # fmt: skip
        ctx.save_for_backward(x)
        ctx.p, ctx.dim, ctx.has_bias, ctx.shape = p, weight.dim() - 2, has_bias, g_out.shape
        return (g_w, g_b) if has_bias else (g_w,)

    @staticmethod
    def backward(ctx: Any, gg_w: Tensor | None, gg_b: Tensor | None = None):
        (x,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.p
        gg_out = None
        if gg_w is not None:
            gg_out = torch.convolution(
                x, gg_w, None, stride, padding, dilation, False, [0] * ctx.dim, groups
            )
        if ctx.has_bias and gg_b is not None:  # as autograd: the bias's term added last
            term = gg_b.contiguous().view(1, -1, *[1] * ctx.dim).expand(ctx.shape)
            gg_out = term if gg_out is None else gg_out + term
        return gg_out, None, None, None, None


class DataConv(torch.autograd.Function):
    """A convolution of data ``x`` (not requiring grad) whose backward is :class:`_WeightGrad`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, p: Any) -> Tensor:
        stride, padding, dilation, groups = p
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.has_bias = p, bias is not None
        dim = weight.dim() - 2
        return torch.convolution(
            x, weight, bias, stride, padding, dilation, False, [0] * dim, groups
        )

    @staticmethod
    def backward(ctx: Any, g_out: Tensor):
        x, weight = ctx.saved_tensors
        grads = _WeightGrad.apply(g_out, x, weight, ctx.has_bias, ctx.p)
        return None, grads[0], grads[1] if ctx.has_bias else None, None


class _DataConvolutions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        dim = _CONVS.get(func)
        if dim is not None:
            routed = _route(dim, *args, **kwargs)
            if routed is not None:
                return routed
        return func(*args, **kwargs)


def _route(
    dim: int,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor | None:
    """:class:`DataConv` for data ``x`` with a weight that requires grad, else None."""
    if (
        x.requires_grad
        or not weight.requires_grad
        or isinstance(padding, str)
        or x.dim() != dim + 2  # unbatched input: leave it to torch
        or not torch.is_grad_enabled()
    ):
        return None
    p = (_tuple(stride, dim), _tuple(padding, dim), _tuple(dilation, dim), int(groups))
    return DataConv.apply(x, weight, bias, p)  # type: ignore[no-any-return]


@contextmanager
def data_convolutions(task: Any = None) -> Iterator[None]:
    """Within the block, convolutions of data (inputs that do not require grad) are recorded as
    :class:`DataConv`: first and second derivatives as autograd's, without the second
    backward's gradient with respect to the data. For reverse-over-reverse products only
    (``torch.func`` transforms do not go through it).

    Args:
        task: the task whose loss the block computes: when its ``model`` is an ``nn.Module``
            without a convolution layer, the block changes nothing and costs nothing (the mode
            would add a Python dispatch to every operation: 5 % of the digits MLP's run).
    """
    model = getattr(task, "model", None)
    if isinstance(model, torch.nn.Module) and not any(
        isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules()
    ):
        yield
        return
    with _DataConvolutions():
        yield
