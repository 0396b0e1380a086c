"""GELU whose backward and double backward are explicit, fused levels (erf and tanh forms)."""

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
    """gelu'(x) and gelu''(x) in x's dtype (fp32 here)."""
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
def gelu_forward(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(opmath(x), approximate=approximate).to(x.dtype)


@fused
def gelu_backward(g: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    d1, _ = _derivatives(opmath(x), approximate)
    return (opmath(g) * d1).to(x.dtype)


@fused
def gelu_double_backward(a: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                         approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangent ``a`` of ``dx = g·gelu'(x)`` -> (its gradient w.r.t. g, w.r.t. x)."""
    d1, d2 = _derivatives(opmath(x), approximate)
    am = opmath(a)
    return (am * d1).to(g.dtype), (am * opmath(g) * d2).to(x.dtype)


class _GeluBackward(Function):
    """Level 1: ``dx = g·gelu'(x)``; its own backward is hand-derived (level 2)."""

    @staticmethod
    def forward(ctx, g, x, approximate):
        ctx.save_for_backward(g, x)
        ctx.approximate = approximate
        return gelu_backward(g, x, approximate)

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        g, x = ctx.saved_tensors
        grad_g, grad_x = gelu_double_backward(a, g, x, ctx.approximate)
        return grad_g, grad_x, None


class _Gelu(Function):
    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return gelu_forward(x, approximate)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _GeluBackward.apply(g, x, ctx.approximate), None


class FastGELU(nn.GELU):
    """``nn.GELU`` (same ``approximate``) with explicit first-order backward levels."""

    kind = "GELU"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Gelu.apply(x, self.approximate)
