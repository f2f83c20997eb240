"""Max pooling over non-overlapping windows, with PyTorch's exact values and gradients.

On a CPU, ``F.max_pool2d`` on a contiguous (NCHW) tensor runs a scalar loop per output: 2x2
pooling of a ``[270, 32, 28, 28]`` batch took ~23 ms here, where reading the four strided
views of the windows and keeping a running maximum takes ~3 ms. :func:`window_max` is that
running maximum, for the common case the layer-by-layer executor meets (kernel = stride, no
padding, dilation 1, floor mode): for each window it returns what ``F.max_pool2d`` returns and
sends the gradient to the element PyTorch's kernel sends it to, the first maximum in the
window's row-major order, so a model trains to the same bits either way, signed zeros included
(tests/models/test_pooling.py compares both on inputs with ties and signed zeros; only an
incoming gradient of exactly -0 comes back as +0). A window
holding a NaN gives NaN, as PyTorch's does, but its gradient goes to an element of the top row
rather than to the NaN. Only 2x2 windows on a CPU take this way (the CNNs' pooling); others
call ``F.max_pool2d``.

With ``relu=True`` it returns ``relu(max_pool(x))``, which equals ``max_pool(relu(x))``,
gradient included, bit for bit but for the sign of a zero output (a window with no positive
element: which zero PyTorch's way returns depends on the window's first element; a zero's
sign changes no later sum that has a nonzero term): a window's maximum is positive exactly
when its ReLU'd maximum is, at the same first position, and otherwise both send nothing back. The executor fuses a ReLU whose
only reader is such a pooling this way, so the activation and its backward run on a quarter of
the elements.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def plain_window(kernel, stride, padding, dilation, ceil_mode: bool, return_indices: bool) -> int | None:
    """The window size ``k`` when these max-pooling arguments are non-overlapping ``k x k``
    windows that :func:`window_max` runs, else None."""
    def pair(v):
        return (v, v) if isinstance(v, int) else tuple(v)
    kernel = pair(kernel)
    stride = kernel if stride is None or stride == [] or stride == () else pair(stride)
    if (kernel[0] != kernel[1] or stride != kernel or pair(padding) != (0, 0) or pair(dilation) != (1, 1)
            or ceil_mode or return_indices or kernel[0] < 1):
        return None
    return kernel[0]


def module_window(mod: nn.Module) -> int | None:
    """:func:`plain_window` of an ``nn.MaxPool2d`` (None for any other module)."""
    if not isinstance(mod, nn.MaxPool2d):
        return None
    return plain_window(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
                        mod.return_indices)


def function_window(args: tuple, kwargs: dict) -> int | None:
    """:func:`plain_window` of a ``F.max_pool2d(x, ...)`` call's other arguments."""
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    given = dict(zip(names, args[1:], strict=False)) | kwargs
    if "kernel_size" not in given or set(given) - set(names):
        return None
    return plain_window(given["kernel_size"], given.get("stride"), given.get("padding", 0),
                        given.get("dilation", 1), bool(given.get("ceil_mode", False)),
                        bool(given.get("return_indices", False)))


class _Max2x2(torch.autograd.Function):
    """2x2 windows as a tournament: each row's pair (the left one kept on a tie), then the two
    rows' winners (the top one kept): the first maximum in row-major order, as PyTorch's
    kernel takes it. The values come from ``torch.maximum`` (vectorized, NaN-propagating);
    training keeps which one won each match (a byte each), and the backward multiplies the
    gradient by them. The forms were measured: a bool mask in a float product is converted
    first (~3x the time of the same bytes read as uint8), and a comparison written straight
    into a float tensor from strided inputs was ~10x slower than into a bool one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, relu: bool) -> torch.Tensor:  # noqa: D102
        ho, wo = x.shape[-2] // 2, x.shape[-1] // 2
        ctx.relu, ctx.shape = relu, x.shape
        # the input's gradient comes back in its layout: a grouped channels-last convolution
        # before the pooling then reads it without converting (its forward and backward took
        # 13-16 ms against 15-18 ms for LeNet's first layer over 50 nodes, 15 against 30 ms
        # for a 3 -> 32 channel layer over 22)
        ctx.layout = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
                      and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        x = x[..., : 2 * ho, : 2 * wo]                          # (floor mode: a last odd row goes)
        left, right = x[..., 0::2], x[..., 1::2]
        pairs = torch.maximum(left, right)                                  # [..., 2 ho, wo]
        top, bottom = pairs[..., 0::2, :], pairs[..., 1::2, :]
        best = torch.maximum(top, bottom)                                   # [..., ho, wo]
        if ctx.needs_input_grad[0]:
            masks = [right > left, bottom > top] + ([best > 0] if relu else [])   # (ReLU's gradient)
            ctx.save_for_backward(*(m.view(torch.uint8) for m in masks))
        return torch.relu(best) if relu else best

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        right, bottom, *live = ctx.saved_tensors
        ho, wo = grad.shape[-2], grad.shape[-1]
        # g * m with m in {0, 1}; "+ 0" makes the -0 of a negative g's product +0, as PyTorch
        # writes it; g - g * m is then exact for finite g
        if live:
            grad = (grad * live[0]).add_(0.0)
        rows = grad.new_empty((*grad.shape[:-1], 2, wo))                    # [..., ho, 2, wo]
        lower = torch.mul(grad, bottom, out=rows[..., 1, :]).add_(0.0)
        torch.sub(grad, lower, out=rows[..., 0, :])
        rows = rows.flatten(-3, -2)                                         # [..., 2 ho, wo]
        second = (rows * right).add_(0.0)
        full = ctx.shape[-2:] == (2 * ho, 2 * wo)
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout)
        if not full:
            out.zero_()                         # (floor mode: a last odd row or column gets none)
        pairs = out[..., : 2 * ho, : 2 * wo].unflatten(-1, (wo, 2))         # [..., 2 ho, wo, 2]
        pairs[..., 1] = second
        torch.sub(rows, second, out=pairs[..., 0])
        return out, None


def window_max(x: torch.Tensor, k: int, relu: bool = False) -> torch.Tensor:
    """``F.max_pool2d(x, k)`` (non-overlapping ``k x k`` windows, floor mode) with the same
    values and gradient, or ``relu`` of it; ``x`` is ``[..., H, W]`` in any layout."""
    if k != 2 or x.device.type != "cpu" or x.dim() < 3 or x.shape[-2] < 2 or x.shape[-1] < 2:
        out = F.max_pool2d(x, k)
        return torch.relu(out) if relu else out
    return _Max2x2.apply(x, relu)
