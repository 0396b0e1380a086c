"""Swap a timm model's supported layers for their explicit-double-backward versions, in place."""

from __future__ import annotations

from collections import Counter

from timm.layers import Attention as TimmAttention
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerNorm2d as TimmLayerNorm2d
from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh as TimmGELUTanh
from timm.models.convnext import ConvNeXtBlock
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block as VitBlock
from torch import nn

from gnr.doublegrad.activation import FastGELU, FastSiLU
from gnr.doublegrad.attention import FastAttention, FastWindowAttention
from gnr.doublegrad.conv import FastConv2d
from gnr.doublegrad.norm import FastBatchNorm2d, FastLayerNorm, FastLayerNorm2d

FAST_TYPES = (FastAttention, FastWindowAttention, FastConv2d, FastGELU, FastSiLU, FastLayerNorm, FastBatchNorm2d)

# timm blocks whose named norms feed only a Linear or convolution (pre-norm branches, patch merging):
# those return autocast's lower precision themselves (FastLayerNorm.feeds_matmul).
NORMS_FEEDING_MATMULS = {VitBlock: ("norm1", "norm2"), SwinTransformerBlock: ("norm1", "norm2"),
                         PatchMerging: ("norm",), ConvNeXtBlock: ("norm",)}


def _affine_last_dim(m: nn.LayerNorm) -> bool:
    return len(m.normalized_shape) == 1 and m.weight is not None and m.bias is not None


def _adopt(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A ``cls`` sharing ``module``'s state: the same Parameter and buffer objects under the same
    names (so state dicts stay timm's and an optimizer built before still holds them), same flags."""
    fast = cls.__new__(cls)
    fast.__dict__.update(module.__dict__)
    return fast


def fast_version(module: nn.Module, attention: bool = False) -> nn.Module | None:
    """The explicit-double-backward replacement of ``module``, or None if it is not supported (or is
    attention and ``attention`` is off).

    Types match exactly: a subclass may compute something else in its forward.
    """
    kind = type(module)
    if kind in (nn.GELU, TimmGELU, TimmGELUTanh):
        return FastGELU(approximate="tanh" if kind is TimmGELUTanh else getattr(module, "approximate", "none"))
    if kind is nn.SiLU:
        return FastSiLU()
    if kind in (nn.LayerNorm, TimmLayerNorm) and _affine_last_dim(module):
        return _adopt(FastLayerNorm, module)
    if kind is TimmLayerNorm2d and _affine_last_dim(module):
        return _adopt(FastLayerNorm2d, module)
    if kind is nn.BatchNorm2d and module.affine:
        return _adopt(FastBatchNorm2d, module)
    if kind is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return _adopt(FastConv2d, module)
    if attention and kind is TimmAttention:
        return _adopt(FastAttention, module)
    if attention and kind is WindowAttention:
        return _adopt(FastWindowAttention, module)
    return None


def use_fast_double_backward(model: nn.Module, attention: bool = False) -> dict[str, int]:
    """Replace every supported layer of ``model`` in place; return how many of each kind.

    ``attention`` adds timm's ``Attention`` and Swin's ``WindowAttention`` (``model.fast_attention``,
    on by default). Unsupported layers (other norms, activations, convolutions and attention modules)
    keep autograd's path.
    """
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            fast = fast_version(child, attention)
            if fast is not None:
                setattr(parent, name, fast)
        for name in NORMS_FEEDING_MATMULS.get(type(parent), ()):
            norm = getattr(parent, name, None)
            if isinstance(norm, FastLayerNorm):
                norm.feeds_matmul = True
    return fast_layer_counts(model)


def fast_layer_counts(model: nn.Module) -> dict[str, int]:
    """How many explicit-double-backward layers of each kind ``model`` holds (any wrapper)."""
    return dict(sorted(Counter(m.kind for m in model.modules() if isinstance(m, FAST_TYPES)).items()))
