"""LayerNorm, timm LayerNorm2d and BatchNorm2d with an explicit, first-order double backward.

Level 0 (forward) and level 1 (backward) are torch's own fused kernels (``native_layer_norm``,
``native_batch_norm`` and their backward ops), called directly on the input's dtype: autocast casts
only the ops it lists (``layer_norm``, not ``native_layer_norm``), so no cast is recorded to be
replayed in the double backward. Level 1 is a custom Function whose backward, level 2, is
:func:`norm_double_backward`, derived here by hand (autograd's generic double-backward formulas are
the memory-bound part of exact gradnorm).

All three normalise ``x`` over reduction dims: ``x̂ = (x − μ)·r``, ``y = w·x̂ + b``. With batch
statistics (LayerNorm; BatchNorm in train mode, where they couple the samples exactly as in the
native op) μ and ``r = (σ² + eps)^{-1/2}`` are the mean and inverse std of ``x`` over those dims;
with frozen statistics (BatchNorm in eval mode) they are the running ones.

Level 1, with ``P(v) = v − ⟨v⟩ − x̂⟨v·x̂⟩`` (⟨·⟩: mean over the reduction dims) for batch statistics
and ``P(v) = v`` for frozen ones: ``dx = r·P(g·w)``, ``dw = Σ g·x̂``, ``db = Σ g``.
Level 2, for cotangents ``a, p, q`` of ``dx, dw, db`` (P is self-adjoint):
``∂/∂g = r·w·P(a) + p·x̂ + q``, ``∂/∂w = Σ r·g·P(a)``, ``∂/∂x = r·(P(v) − x̂⟨a·dx⟩)`` with
``v = p·g − r·(g·w⟨a·x̂⟩ + a⟨g·w·x̂⟩)``; for frozen statistics ``∂/∂x = r·p·g``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from gnr.doublegrad.engine import remember_inputs, tracked, used_gradients
from gnr.doublegrad.fused import fused, opmath


@dataclass(frozen=True)
class Norm:
    """What a level needs besides tensors: which native op, over which dims, with which statistics."""

    kind: str  # "layer" (last dim) or "batch" (N, H, W of NCHW)
    eps: float
    batch_stats: bool = True

    @property
    def dims(self) -> tuple[int, ...]:
        """The reduction dims of :meth:`canonical` tensors."""
        return (-1,) if self.kind == "layer" else (0, 2)

    def canonical(self, t: torch.Tensor | None, channels: int) -> torch.Tensor | None:
        """``t`` as level 2 takes it: ``(rows, C)`` for LayerNorm, ``(N, C, H·W)`` for BatchNorm; a
        view wherever the layout allows. One rank and one symbolic width per kind keep a compiled
        level 2 to a graph or two per model instead of one per stage, rank and layout."""
        if t is None:
            return None
        return t.reshape(-1, channels) if self.kind == "layer" else t.flatten(2)


def _plus(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


@fused
def norm_double_backward(a, p, q, g, x, w, mean, rstd, dims: tuple[int, ...], batch_stats: bool):
    """Cotangents of (dx, dw, db), each None when unused -> gradients w.r.t. (g, x, w).

    ``w``, ``mean`` and ``rstd`` broadcast against ``x``; ``p``/``q`` against ``w``. One reduction
    pass (the means below) and one elementwise pass; fp32 arithmetic (fp64 stays), cast back once.
    """
    xm, gm, wm = opmath(x), opmath(g), opmath(w)
    xhat = (xm - mean) * rstd

    def avg(t):
        return t.mean(dims, keepdim=True)

    grad_g = grad_x = grad_w = None
    if a is not None:
        am = opmath(a)
        if batch_stats:
            gw = gm * wm
            a_avg, a_xhat, gw_avg, gw_xhat = avg(am), avg(am * xhat), avg(gw), avg(gw * xhat)
            pa = rstd * (am - a_avg - xhat * a_xhat)  # r·P(a)
            a_dx = rstd * (avg(am * gw) - a_avg * gw_avg - a_xhat * gw_xhat)  # ⟨a·dx⟩
            # r·(v − ⟨v⟩ − x̂(⟨v·x̂⟩ + ⟨a·dx⟩)) for v = −r(g·w⟨a·x̂⟩ + a⟨g·w·x̂⟩), written out
            grad_x = (rstd * rstd * (gw_avg * a_xhat + a_avg * gw_xhat - gw * a_xhat - am * gw_xhat)
                      - rstd * xhat * (a_dx - 2 * rstd * a_xhat * gw_xhat))
        else:
            pa = rstd * am
        grad_g = wm * pa
        grad_w = (gm * pa).sum_to_size(wm.shape)
    if p is not None:
        pg = p * gm
        grad_g = _plus(grad_g, p * xhat)
        grad_x = _plus(grad_x, rstd * (pg - avg(pg) - xhat * avg(pg * xhat) if batch_stats else pg))
    if q is not None:
        grad_g = _plus(grad_g, q.expand_as(gm))
    grad_g = torch.zeros_like(gm) if grad_g is None else grad_g
    grad_x = torch.zeros_like(xm) if grad_x is None else grad_x
    grad_w = torch.zeros_like(wm) if grad_w is None else grad_w
    return grad_g.to(g.dtype), grad_x.to(x.dtype), grad_w.to(w.dtype)


def _stats_and_weight(norm: Norm, w, running_mean, running_var, mean, rstd):
    """(w, μ, r) shaped to broadcast against canonical x, as level 2 takes them."""
    if norm.kind == "layer":
        return w, mean.reshape(-1, 1), rstd.reshape(-1, 1)
    if not norm.batch_stats:
        mean, rstd = running_mean, torch.rsqrt(running_var + norm.eps)
    return w.view(1, -1, 1), mean.view(1, -1, 1), rstd.view(1, -1, 1)


@functools.cache
def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types``, once per pair (it is a dispatched op, and every LayerNorm call asks)."""
    return torch.promote_types(a, b)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class _NormBackward(Function):
    """Level 1: torch's native backward (dx, dw, db; those the pass uses); its own backward is the
    hand-derived level 2."""

    @staticmethod
    def forward(ctx, g, x, w, b, running_mean, running_var, mean, rstd, norm, mask):
        ctx.save_for_backward(g, x, w, running_mean, running_var, mean, rstd)
        ctx.norm = norm
        ctx.set_materialize_grads(False)
        if norm.kind == "batch":  # CUDA takes half inputs with fp32 weights and statistics; g has x's dtype
            return torch.ops.aten.native_batch_norm_backward(g, x, w, running_mean, running_var, mean, rstd,
                                                             norm.batch_stats, norm.eps, list(mask))
        c = _wider(x.dtype, w.dtype)  # CUDA's kernel takes one dtype for all four
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(g.to(c), x.to(c), w.shape, mean, rstd, w.to(c),
                                                               b.to(c), list(mask))
        return _cast(dx, x.dtype), _cast(dw, w.dtype), _cast(db, b.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, a, p, q):
        none = (None,) * 10
        if a is None and p is None and q is None:
            return none
        g, x, w, running_mean, running_var, mean, rstd = ctx.saved_tensors
        norm = ctx.norm
        wb, mean, rstd = _stats_and_weight(norm, w, running_mean, running_var, mean, rstd)
        if norm.kind == "batch":
            p, q = (None if t is None else t.view(1, -1, 1) for t in (p, q))
        a, g2, x2 = (norm.canonical(t, w.numel()) for t in (a, g, x))
        grad_g, grad_x, grad_w = norm_double_backward(a, p, q, g2, x2, wb, mean, rstd, norm.dims, norm.batch_stats)
        return grad_g.view(g.shape), grad_x.view(x.shape), grad_w.view_as(w), *none[3:]


class _Norm(Function):
    """Level 0: torch's native forward (BatchNorm updates its running statistics in place, as in torch).

    LayerNorm runs in the wider of the input's and the weight's dtype, as autocast runs
    ``layer_norm`` (fp32 for a bf16 input and fp32 weights), and returns ``out_dtype`` (default: that
    dtype); the casts happen inside, so none is recorded and replayed in the double backward.
    BatchNorm runs in the input's dtype with fp32 or same-dtype weights, as torch does.
    """

    @staticmethod
    def forward(ctx, x, w, b, running_mean, running_var, momentum, norm, out_dtype):
        remember_inputs(ctx, x, w, b, running_mean, running_var, momentum, norm, out_dtype)
        if norm.kind == "layer":
            c = _wider(x.dtype, w.dtype)
            y, mean, rstd = torch.native_layer_norm(x.to(c), w.shape, w.to(c), b.to(c), norm.eps)
            y = y.to(out_dtype or c)
        else:
            y, mean, rstd = torch.native_batch_norm(x, w, b, running_mean, running_var, norm.batch_stats,
                                                    momentum, norm.eps)
        ctx.save_for_backward(x, w, b, running_mean, running_var, mean, rstd)
        ctx.norm = norm
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, b, running_mean, running_var, mean, rstd = ctx.saved_tensors
        mask = used_gradients(ctx)[:3]
        dx, dw, db = _NormBackward.apply(g, x, w, b, running_mean, running_var, mean, rstd, ctx.norm, mask)
        return dx, dw, db, None, None, None, None, None


class FastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` / timm ``LayerNorm`` over the last dim (affine), explicit double backward.

    ``feeds_matmul``: the output only goes, through reshapes and window shuffles, into a Linear or
    convolution, which autocast runs in its lower precision. Under autocast such a norm returns that
    dtype itself: the same numbers (the cast only moves earlier), and a Swin's roll, pad and window
    partition move half the bytes. Other norms return fp32, as autocast's ``layer_norm``.
    """

    kind = "LayerNorm"
    feeds_matmul = False

    def _layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if self.feeds_matmul and torch.is_autocast_enabled(device) else None
        return _Norm.apply(x, tracked(self.weight), tracked(self.bias), None, None, 0.0, Norm("layer", self.eps),
                           out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._layer_norm(x)


class FastLayerNorm2d(FastLayerNorm):
    """timm ``LayerNorm2d`` (channels of NCHW, through the same NHWC permute timm uses)."""

    kind = "LayerNorm2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (affine), explicit double backward; otherwise torch's BatchNorm2d.forward.

    In train mode the batch statistics keep each sample's gradient exactly dependent on the other
    samples (Eq. 2 as specified), and the running statistics update as in torch.
    """

    kind = "BatchNorm2d"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if batch_stats:
            nn.functional._verify_batch_size(x.size())
        track = not self.training or self.track_running_stats
        return _Norm.apply(x, tracked(self.weight), tracked(self.bias), self.running_mean if track else None,
                           self.running_var if track else None, momentum, Norm("batch", self.eps, batch_stats), None)
