"""Conv2d with an explicit double backward made of ordinary convolution calls.

Level 0 is ``convolution``, level 1 ``convolution_backward`` (only the gradients the running pass
uses: :mod:`gnr.doublegrad.engine`). ``dx`` is linear in ``(g, w)`` and ``dw`` in ``(g, x)``, so
level 2, for cotangents ``a_x, a_w, a_b`` of ``(dx, dw, db)``, is again convolutions:
``∂/∂g = conv(a_x, w) + conv(x, a_w) + a_b`` (forward convolutions),
``∂/∂w`` = the weight gradient of a convolution with input ``a_x`` and output gradient ``g``,
``∂/∂x`` = the input gradient of a convolution with weight ``a_w`` and output gradient ``g``.

Autograd's generic formula (``_convolution_double_backward``) computes ``∂/∂w`` as a convolution
over operands with batch and channels swapped: neither contiguous nor channels-last, which cuDNN
serves with legacy kernels without tensor cores (57% of a ResNet-50 gradnorm step on an H200).
Here every call is a forward, input-gradient or weight-gradient kernel on operands in the model's
own layout. Under autocast the inputs are cast as autocast casts them (the autocast dtype), outside
the Function, so every level sees one dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from gnr.doublegrad.engine import remember_inputs, tracked, used_gradients
from gnr.doublegrad.twice import is_differentiated_twice


@dataclass(frozen=True)
class Conv:
    """The convolution's constants, as ``convolution`` / ``convolution_backward`` take them."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return torch.convolution(x, w, b, self.stride, self.padding, self.dilation, False, (0, 0), self.groups)

    def backward(self, g, x, w, mask, bias: bool = False):
        """``(dx, dw, db)`` of the convolution of ``x`` with ``w`` for output gradient ``g``; None where
        ``mask`` is off."""
        bias_sizes = [w.shape[0]] if bias else None
        return torch.ops.aten.convolution_backward(g, x, w, bias_sizes, self.stride, self.padding, self.dilation,
                                                   False, [0, 0], self.groups, list(mask))


def _like(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` in ``x``'s memory format. Gradients can arrive in another (a pooling's or a max-pool's
    double backward is NCHW in a channels-last model); cuDNN would transpose them itself, with
    extra kernels, or pick a slower kernel."""
    if t is None or t.dim() != 4:
        return t
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return t.contiguous(memory_format=layout)


def _plus(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


class _ConvBackward(Function):
    """Level 1: ``convolution_backward``; its own backward, level 2, is three more convolutions."""

    @staticmethod
    def forward(ctx, g, x, w, has_bias, conv, mask):
        g = _like(g, x)
        ctx.save_for_backward(g, x, w)
        ctx.conv = conv
        ctx.set_materialize_grads(False)
        remember_inputs(ctx, g, x, w, has_bias, conv, mask)
        return conv.backward(g, x, w, mask, has_bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, a_x, a_w, a_b):
        g, x, w = ctx.saved_tensors
        a_x, a_w = _like(a_x, x), _like(a_w, w)
        conv = ctx.conv
        need_g, need_x, need_w = used_gradients(ctx)[:3]
        grad_g = grad_x = grad_w = None
        if need_g:
            if a_x is not None:
                grad_g = conv.forward(a_x, w, a_b)
            if a_w is not None:
                grad_g = _plus(grad_g, conv.forward(x, a_w, None))
            if grad_g is None and a_b is not None:
                grad_g = torch.empty_like(g).copy_(a_b.view(1, -1, 1, 1).expand_as(g))
        if need_x and a_w is not None:
            grad_x = conv.backward(g, x, a_w, (True, False, False))[0]
        if need_w and a_x is not None:
            grad_w = conv.backward(g, a_x, w, (False, True, False))[1]
        return grad_g, grad_x, grad_w, None, None, None


class _Conv(Function):
    @staticmethod
    def forward(ctx, x, w, b, conv):
        ctx.save_for_backward(x, w)
        ctx.conv = conv
        ctx.has_bias = b is not None
        remember_inputs(ctx, x, w, b, conv)
        return conv.forward(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        mask = used_gradients(ctx)[:3]
        dx, dw, db = _ConvBackward.apply(g, x, w, ctx.has_bias, ctx.conv, mask)
        return dx, dw, db, None


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding given as numbers) whose double backward is ordinary convolutions;
    forwards that are not differentiated twice are ``nn.Conv2d``'s (autocast caches its weight casts)."""

    kind = "Conv2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_differentiated_twice():
            return super().forward(x)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        conv = Conv(self.stride, self.padding, self.dilation, self.groups)
        with torch.autocast(device, enabled=False):
            return _Conv.apply(tracked(x, dtype), tracked(self.weight, dtype), tracked(self.bias, dtype), conv)
