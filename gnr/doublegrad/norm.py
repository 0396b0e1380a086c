"""Normalisation (LayerNorm, timm LayerNorm2d, BatchNorm2d) with explicit, fused backward levels.

All three normalise ``x`` over a set of reduction dims and apply a broadcast affine:
``x̂ = (x − ⟨x⟩)·r``, ``r = (⟨(x − ⟨x⟩)²⟩ + eps)^{-1/2}``, ``y = w·x̂ + b``, with ⟨·⟩ the mean over the
reduction dims (the last dim for LayerNorm; batch and space for BatchNorm in train mode, so there
the batch statistics couple the samples exactly as in the native op). ``w``/``b`` arrive shaped to
broadcast against ``x``; their gradients are summed back to that shape.

Level 1 (the backward): with ``P(v) = v − ⟨v⟩ − x̂⟨v·x̂⟩``,
``dx = r·P(g·w)``, ``dw = Σ g·x̂``, ``db = Σ g``.
Level 2 (the backward of level 1), for cotangents ``a, p, q`` of ``dx, dw, db``:
``∂/∂g = r·w·P(a) + p·x̂ + q``, ``∂/∂w = Σ r·g·P(a)``,
``∂/∂x = r·(P(v) − x̂⟨a·dx⟩)`` with ``v = p·g − r·(g·w⟨a·x̂⟩ + a⟨g·w·x̂⟩)``
(P is self-adjoint; ``v`` is the explicit derivative w.r.t. x̂ and ``⟨a·dx⟩`` carries the one
through ``r``).

Outputs come in the input's dtype (under bf16 autocast the next matmul takes bf16 anyway, so no
fp32 copy is made only to be cast down again); all arithmetic is fp32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from gnr.doublegrad.fused import fused, opmath

Dims = tuple[int, ...]


def _normalise(x: torch.Tensor, dims: Dims, eps: float) -> tuple[torch.Tensor, ...]:
    """x̂, r, and the batch mean and biased variance (keepdim), all from fp32 ``x``."""
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return centred * rstd, rstd, mean, var


def _project(v: torch.Tensor, xhat: torch.Tensor, dims: Dims) -> torch.Tensor:
    return v - v.mean(dims, keepdim=True) - xhat * (v * xhat).mean(dims, keepdim=True)


@fused
def norm_forward(x, w, b, dims: Dims, eps: float):
    """-> y in x's dtype, and the fp32 batch mean and biased variance (for running statistics)."""
    xhat, _, mean, var = _normalise(opmath(x), dims, eps)
    return (xhat * w + b).to(x.dtype), mean, var


@fused
def norm_backward(g, x, w, dims: Dims, eps: float):
    xhat, rstd, _, _ = _normalise(opmath(x), dims, eps)
    gm = opmath(g)
    dx = rstd * _project(gm * w, xhat, dims)
    return dx.to(x.dtype), (gm * xhat).sum_to_size(w.shape).to(w.dtype), gm.sum_to_size(w.shape).to(w.dtype)


@fused
def norm_double_backward(a, p, q, g, x, w, dims: Dims, eps: float):
    """Cotangents of (dx, dw, db), each possibly None (unused) -> gradients w.r.t. (g, x, w)."""
    xhat, rstd, _, _ = _normalise(opmath(x), dims, eps)
    gm = opmath(g)
    grad_g = torch.zeros_like(gm)
    v = torch.zeros_like(gm)
    grad_w = torch.zeros_like(opmath(w))
    through_r = 0.0
    if a is not None:
        am, gw = opmath(a), gm * w
        pa = rstd * _project(am, xhat, dims)
        grad_g = grad_g + w * pa
        grad_w = grad_w + (gm * pa).sum_to_size(w.shape)
        v = v - rstd * (gw * (am * xhat).mean(dims, keepdim=True) + am * (gw * xhat).mean(dims, keepdim=True))
        dx = rstd * _project(gw, xhat, dims)
        through_r = xhat * (am * dx).mean(dims, keepdim=True)
    if p is not None:
        grad_g = grad_g + p * xhat
        v = v + p * gm
    if q is not None:
        grad_g = grad_g + q
    grad_x = rstd * (_project(v, xhat, dims) - through_r)
    return grad_g.to(g.dtype), grad_x.to(x.dtype), grad_w.to(w.dtype)


class _NormBackward(Function):
    """Level 1: (dx, dw, db) from g; its own backward is the hand-derived level 2."""

    @staticmethod
    def forward(ctx, g, x, w, dims, eps):
        ctx.save_for_backward(g, x, w)
        ctx.dims, ctx.eps = dims, eps
        ctx.set_materialize_grads(False)
        return norm_backward(g, x, w, dims, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, a, p, q):
        if a is None and p is None and q is None:
            return None, None, None, None, None
        g, x, w = ctx.saved_tensors
        return *norm_double_backward(a, p, q, g, x, w, ctx.dims, ctx.eps), None, None


class _Norm(Function):
    @staticmethod
    def forward(ctx, x, w, b, dims, eps):
        y, mean, var = norm_forward(x, w, b, dims, eps)
        ctx.save_for_backward(x, w)
        ctx.dims, ctx.eps = dims, eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, g, _mean, _var):
        x, w = ctx.saved_tensors
        return *_NormBackward.apply(g, x, w, ctx.dims, ctx.eps), None, None


def normalise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dims: Dims,
              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight·x̂ + bias`` over ``dims`` (weight/bias broadcastable to x) and the batch mean / biased var."""
    return _Norm.apply(x, weight, bias, dims, eps)


class FastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` / timm ``LayerNorm`` over the last dim, with explicit backward levels."""

    kind = "LayerNorm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalise(x, self.weight, self.bias, (-1,), self.eps)[0]


class FastLayerNorm2d(nn.LayerNorm):
    """timm ``LayerNorm2d`` (channels of NCHW, via the same NHWC permute timm uses)."""

    kind = "LayerNorm2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = normalise(x.permute(0, 2, 3, 1), self.weight, self.bias, (-1,), self.eps)[0]
        return y.permute(0, 3, 1, 2)


class FastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (affine) with explicit backward levels.

    Train mode (or no running statistics) normalises with the batch statistics, so the gradient of
    each sample's loss keeps its exact dependence on the other samples (Eq. 2 as specified); the
    running statistics update as in torch (momentum, or a cumulative mean when momentum is None;
    unbiased variance). Eval mode is a per-channel affine map from the running statistics, whose
    double backward is elementwise.
    """

    kind = "BatchNorm2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        weight, bias = self.weight.view(1, -1, 1, 1), self.bias.view(1, -1, 1, 1)
        if self.training or self.running_mean is None:
            if self.training:
                nn.functional._verify_batch_size(x.size())  # torch's own check: one value per channel
            y, mean, var = normalise(x, weight, bias, (0, 2, 3), self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean.view(-1), var.view(-1), x.numel() // x.shape[1])
            return y
        scale = weight * torch.rsqrt(self.running_var.view(1, -1, 1, 1) + self.eps)
        return (x * scale + (bias - self.running_mean.view(1, -1, 1, 1) * scale)).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * (count / (count - 1))
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
