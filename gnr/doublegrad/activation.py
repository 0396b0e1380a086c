"""GELU (erf and tanh forms) and SiLU with an explicit, first-order double backward.

Levels 0 and 1 are torch's own fused ops (``gelu`` / ``gelu_backward``, ``silu`` / ``silu_backward``);
level 1 is a custom Function whose backward, level 2, is :func:`activation_double_backward`:
for the cotangent ``a`` of ``dx = g·f'(x)``, ``∂/∂g = a·f'(x)`` and ``∂/∂x = a·g·f''(x)``.
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


def _derivatives(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """f'(x) and f''(x) for ``act`` in ``silu``, ``gelu`` (erf), ``gelu_tanh``."""
    if act == "silu":
        s = torch.sigmoid(x)
        ds = s * (1 - s)
        return s + x * ds, ds * (2 + x * (1 - 2 * s))
    if act == "gelu_tanh":
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
def activation_double_backward(a: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                               act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangent ``a`` of ``dx = g·f'(x)`` -> its gradients w.r.t. (g, x), in fp32, cast back once."""
    d1, d2 = _derivatives(opmath(x), act)
    am = opmath(a)
    return (am * d1).to(g.dtype), (am * opmath(g) * d2).to(x.dtype)


def _forward(x: torch.Tensor, act: str) -> torch.Tensor:
    return F.silu(x) if act == "silu" else F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def _backward(g: torch.Tensor, x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return torch.ops.aten.silu_backward(g, x)
    return torch.ops.aten.gelu_backward(g, x, approximate="tanh" if act == "gelu_tanh" else "none")


class _ActivationBackward(Function):
    """Level 1: torch's native backward; its own backward is the hand-derived level 2."""

    @staticmethod
    def forward(ctx, g, x, act):
        ctx.save_for_backward(g, x)
        ctx.act = act
        return _backward(g, x, act)

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        g, x = ctx.saved_tensors
        # Elementwise, so level 2 runs on flat views in x's memory order: one compiled graph for
        # every shape, rank and layout (a tensor laid out otherwise is copied into that order).
        order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
        flat = [t.permute(order).reshape(-1) for t in (a, g, x)]
        shape = [x.shape[d] for d in order]
        unflat = [order.index(d) for d in range(x.dim())]
        grad_g, grad_x = (t.view(shape).permute(unflat) for t in activation_double_backward(*flat, ctx.act))
        return grad_g, grad_x, None


class _Activation(Function):
    @staticmethod
    def forward(ctx, x, act):
        ctx.save_for_backward(x)
        ctx.act = act
        return _forward(x, act)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _ActivationBackward.apply(g, x, ctx.act), None


class FastGELU(nn.GELU):
    """``nn.GELU`` (same ``approximate``) with an explicit, first-order double backward."""

    kind = "GELU"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Activation.apply(x, "gelu_tanh" if self.approximate == "tanh" else "gelu")


class FastSiLU(nn.SiLU):
    """``nn.SiLU`` with an explicit, first-order double backward (never in place)."""

    kind = "SiLU"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Activation.apply(x, "silu")
