"""GELU (erf and tanh forms) with an explicit, first-order double backward.

Levels 0 and 1 are torch's own fused ``gelu`` / ``gelu_backward``; level 1 is a custom Function
whose backward, level 2, is :func:`gelu_double_backward`: ``∂/∂g = a·gelu'(x)``, ``∂/∂x = a·g·gelu''(x)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from gnr.doublegrad.fused import fused, opmath

_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_K = math.sqrt(2 / math.pi)  # tanh form: gelu(x) ≈ x/2·(1 + tanh(K(x + C x³)))
_C = 0.044715


def _derivatives(x: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """gelu'(x) and gelu''(x)."""
    if approximate == "tanh":
        inner_d = _K * (1 + 3 * _C * x * x)
        t = torch.tanh(_K * (x + _C * x * x * x))
        sech2 = 1 - t * t
        d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * inner_d
        d2 = sech2 * (inner_d + 0.5 * x * (6 * _K * _C * x - 2 * t * inner_d * inner_d))
        return d1, d2
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT2))
    return cdf + x * pdf, pdf * (2 - x * x)


@fused
def gelu_double_backward(a: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                         approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangent ``a`` of ``dx = g·gelu'(x)`` -> its gradients w.r.t. (g, x), in fp32, cast back once."""
    d1, d2 = _derivatives(opmath(x), approximate)
    am = opmath(a)
    return (am * d1).to(g.dtype), (am * opmath(g) * d2).to(x.dtype)


class _GeluBackward(Function):
    """Level 1: torch's ``gelu_backward``; its own backward is the hand-derived level 2."""

    @staticmethod
    def forward(ctx, g, x, approximate):
        ctx.save_for_backward(g, x)
        ctx.approximate = approximate
        return torch.ops.aten.gelu_backward(g, x, approximate=approximate)

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        g, x = ctx.saved_tensors
        return *gelu_double_backward(a, g, x, ctx.approximate), None


class _Gelu(Function):
    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _GeluBackward.apply(g, x, ctx.approximate), None


class FastGELU(nn.GELU):
    """``nn.GELU`` (same ``approximate``) with an explicit, first-order double backward."""

    kind = "GELU"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Gelu.apply(x, self.approximate)
