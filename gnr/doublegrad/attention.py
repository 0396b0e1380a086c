"""Softmax attention with an explicit, first-order double backward.

``S = s·Q·Kᵀ + B``, ``P = softmax(S)``, ``O = P·V``. Level 0 is torch's
``scaled_dot_product_attention`` with every backend allowed (flash / memory-efficient where they
apply: level 0 is never differentiated twice). Level 1, for ``G = ∂/∂O``:
``dV = Pᵀ·G``, ``dP = G·Vᵀ``, ``dS = P∘(dP − δ)`` with ``δ = rowsum(P∘dP)``, ``dQ = s·dS·K``,
``dK = s·dSᵀ·Q``, ``dB = dS``. Level 2, for cotangents ``A_Q, A_K, A_V, A_B`` of those: with
``C = s(A_Q·Kᵀ + Q·A_Kᵀ) + A_B``, ``c = rowsum(C∘P)``, ``E = P∘(C − c)``,
``C_P = C∘(dP − δ) − c∘dP + G·A_Vᵀ`` and ``C_S = P∘(C_P − rowsum(P∘C_P))``:
``∂/∂G = P·A_V + E·V``, ``∂/∂V = Eᵀ·G``, ``∂/∂Q = s(dS·A_K + C_S·K)``, ``∂/∂K = s(dSᵀ·A_Q + C_Sᵀ·Q)``,
``∂/∂B = C_S``. Matmuls run in the inputs' dtype, softmax and elementwise work in fp32, over
keys padded to a multiple of 8 (:class:`_Keys`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.swin_transformer import WindowAttention
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from gnr.doublegrad.fused import fused, opmath
from gnr.doublegrad.twice import is_differentiated_twice


KEY_ALIGN = 8  # elements: 16 bytes of bf16, the row alignment Hopper's GEMM kernels (TMA) need


class _Keys:
    """The key axis padded to a multiple of :data:`KEY_ALIGN`.

    Every N×N matrix of the levels (logits, P, dP, dS, ...) is a GEMM operand or output whose row
    length is the number of keys: 197 in a ViT-B/16, 49 in a Swin window. cuBLAS serves such rows
    (not 16-byte aligned) with Turing-generation kernels instead of Hopper's (a quarter of a ViT-B
    gradnorm step on an H200). Padded keys are zero with logit −∞, so P and every N×N intermediate
    is zero there and the padded rows of key-side gradients are dropped: the same numbers, for
    (N_pad / N) times the N×N matmul work (1.02 for ViT-B, 1.14 for Swin).
    """

    def __init__(self, n: int):
        self.n = n
        self.extra = -n % KEY_ALIGN

    def pad(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A key-side ``[..., N, d]`` tensor with zero rows appended."""
        return t if t is None or not self.extra else F.pad(t, (0, 0, 0, self.extra))

    def pad_columns(self, t: torch.Tensor | None, value: float = 0.0) -> torch.Tensor | None:
        """An ``[..., N]`` (bias, its cotangent) tensor with ``value`` columns appended."""
        return t if t is None or not self.extra else F.pad(t, (0, self.extra), value=value)

    def mask(self, bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The additive logit term over the padded keys: the bias, and −∞ on the padding."""
        if bias is not None:
            return self.pad_columns(opmath(bias), float("-inf"))
        if not self.extra:
            return None
        keys = torch.arange(self.n + self.extra, device=like.device)
        return torch.zeros((), dtype=opmath(like).dtype, device=like.device).masked_fill(keys >= self.n, float("-inf"))

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """A key-side gradient without the padded rows."""
        return t[..., : self.n, :] if self.extra else t


def _levels(keys: _Keys, g, q, k, v, bias, scale):
    """P, dP, δ, dS (fp32, over padded keys) for level 1 and level 2; ``k``, ``v`` padded."""
    logits = opmath(q @ k.transpose(-2, -1)) * scale
    mask = keys.mask(bias, q)
    if mask is not None:
        logits = logits + mask
    p = torch.softmax(logits, dim=-1)
    dp = opmath(g @ v.transpose(-2, -1))
    delta = (p * dp).sum(-1, keepdim=True)
    return p, dp, delta, p * (dp - delta)


def _bias_grad(keys: _Keys, grad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return grad[..., : keys.n].sum_to_size(bias.shape).to(bias.dtype)


@fused
def attention_backward(g, q, k, v, bias, scale: float):
    keys = _Keys(k.shape[-2])
    k, v = keys.pad(k), keys.pad(v)
    p, _, _, ds = _levels(keys, g, q, k, v, bias, scale)
    dsm = ds.to(q.dtype)
    dq = (dsm @ k) * scale
    dk = keys.unpad(dsm.transpose(-2, -1) @ q) * scale
    dv = keys.unpad(p.to(v.dtype).transpose(-2, -1) @ g)
    db = None if bias is None else _bias_grad(keys, ds, bias)
    return dq, dk, dv, db


@fused
def attention_double_backward(aq, ak, av, ab, g, q, k, v, bias, scale: float):
    """Cotangents of (dQ, dK, dV, dB), each None when unused -> gradients w.r.t. (G, Q, K, V, B)."""
    keys = _Keys(k.shape[-2])
    k, v, ak, av, ab = keys.pad(k), keys.pad(v), keys.pad(ak), keys.pad(av), keys.pad_columns(ab)
    p, dp, delta, ds = _levels(keys, g, q, k, v, bias, scale)
    grad_g = torch.zeros_like(opmath(g))
    grad_v = torch.zeros_like(opmath(v))
    grad_q = torch.zeros_like(opmath(q))
    grad_k = torch.zeros_like(opmath(k))
    c = torch.zeros_like(p)
    if aq is not None:
        c = c + opmath(aq @ k.transpose(-2, -1)) * scale
        grad_k = grad_k + opmath(ds.to(aq.dtype).transpose(-2, -1) @ aq) * scale
    if ak is not None:
        c = c + opmath(q @ ak.transpose(-2, -1)) * scale
        grad_q = grad_q + opmath(ds.to(ak.dtype) @ ak) * scale
    if ab is not None:
        c = c + ab
    rc = (c * p).sum(-1, keepdim=True)
    e = p * (c - rc)
    c_p = c * (dp - delta) - rc * dp
    grad_g = grad_g + opmath(e.to(v.dtype) @ v)
    grad_v = grad_v + opmath(e.to(g.dtype).transpose(-2, -1) @ g)
    if av is not None:
        c_p = c_p + opmath(g @ av.transpose(-2, -1))
        grad_g = grad_g + opmath(p.to(av.dtype) @ av)
    c_s = p * (c_p - (p * c_p).sum(-1, keepdim=True))
    grad_q = grad_q + opmath(c_s.to(k.dtype) @ k) * scale
    grad_k = grad_k + opmath(c_s.to(q.dtype).transpose(-2, -1) @ q) * scale
    grad_b = None if bias is None else _bias_grad(keys, c_s, bias)
    return (grad_g.to(g.dtype), grad_q.to(q.dtype), keys.unpad(grad_k).to(k.dtype), keys.unpad(grad_v).to(v.dtype),
            grad_b)


class _AttentionBackward(Function):
    @staticmethod
    def forward(ctx, g, q, k, v, bias, scale):
        ctx.save_for_backward(g, q, k, v, bias)
        ctx.scale = scale
        ctx.set_materialize_grads(False)
        return attention_backward(g, q, k, v, bias, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, aq, ak, av, ab):
        g, q, k, v, bias = ctx.saved_tensors
        return *attention_double_backward(aq, ak, av, ab, g, q, k, v, bias, ctx.scale), None


class _Attention(Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale = scale
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    @staticmethod
    def backward(ctx, g):
        q, k, v, bias = ctx.saved_tensors
        dq, dk, dv, db = _AttentionBackward.apply(g, q, k, v, bias, ctx.scale)
        return dq, dk, dv, db, None


class _ExplicitSDPA(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to :class:`_Attention` where it applies: no dropout,
    not causal, no GQA, and no mask or an additive float one; anything else runs as called."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            plain = (len(args) <= 4 and not kwargs.get("dropout_p", 0.0) and not kwargs.get("is_causal", False)
                     and not kwargs.get("enable_gqa", False) and q.shape[-1] == v.shape[-1]
                     and (mask is None or (mask.is_floating_point() and mask.shape[-1] == k.shape[-2])))
            if plain:
                scale = kwargs.get("scale") or q.shape[-1] ** -0.5
                return _Attention.apply(q, k, v, mask, scale)
        return func(*args, **kwargs)


class _ExplicitWhenTwice:
    """Mixin for a timm attention module with an SDPA branch (``fused_attn``): forwards that will be
    differentiated twice take that branch, whose SDPA call gets explicit levels; other forwards are
    timm's, on whichever branch timm chose (Swin's default is the unfused one)."""

    def forward(self, *args, **kwargs):
        if not is_differentiated_twice():
            return super().forward(*args, **kwargs)
        fused_attn, self.fused_attn = self.fused_attn, True
        try:
            with _ExplicitSDPA():
                return super().forward(*args, **kwargs)
        finally:
            self.fused_attn = fused_attn


class FastAttention(_ExplicitWhenTwice, TimmAttention):
    """timm ``Attention`` (ViT, DeiT, ...)."""

    kind = "Attention"


class FastWindowAttention(_ExplicitWhenTwice, WindowAttention):
    """timm Swin ``WindowAttention``: its relative-position bias (plus the shift mask) is the additive,
    learned mask of the levels, so the bias table gets its gradient through ``∂/∂B``."""

    kind = "WindowAttention"
